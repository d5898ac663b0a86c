"""``MBT``: Scenic's Multimodal Bottleneck Transformer as a PyTorch module with switchable backends.

``backend="reference"`` runs Scenic's encoder line by line (concat, block, split, stack, mean);
every other backend runs the packed token-major buffer of ``mbt_fast.layout`` through
``mbt_fast.ops``. Both use the same parameters, so ``set_backend`` switches in place.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn

from mbt_fast.backends import BACKENDS, resolve_backend, resolved_backend
from mbt_fast.config import MBTConfig
from mbt_fast.layers import LN_EPS, EncoderBlock, LayerPlan, packed_block
from mbt_fast.layout import PackedLayout

_SCENIC_CONTEXT_ORDER = ("rgb", "spectrogram")  # Scenic's _MODALITIES: context order of vanilla fusion


class MBT(nn.Module):
    """Multimodal Bottleneck Transformer.

    Inputs: ``rgb`` float ``[B, 3, T, H, W]`` in [-1, 1]; ``spectrogram`` float ``[B, time, mel]``.
    ``forward`` returns the mean of the per-modality logits ``[B, num_classes]`` (Scenic's eval
    output); ``forward_per_modality`` returns ``{modality: [B, num_classes]}`` (Scenic's train output;
    with ``gap``/``gmp``/``gsp`` pooling there is one pooled output, returned as ``{"all": ...}``).
    """

    def __init__(self, cfg: MBTConfig, backend: str = "torch"):
        super().__init__()
        self.cfg = cfg
        C, mods = cfg.hidden_size, cfg.modality_fusion
        fh, fw, ft = cfg.patches_size
        if "rgb" in mods:
            self.embed_rgb = nn.Conv3d(3, C, (ft, fh, fw), stride=(ft, fh, fw))
        if "spectrogram" in mods:
            # Scenic tiles the spectrogram to 3 identical channels; one channel with the kernel summed
            # over them is the same function.
            self.embed_spectrogram = nn.Conv2d(1, C, (fh, fw), stride=(fh, fw))
        for m in mods:
            if cfg.has_cls:
                setattr(self, f"cls_{m}", nn.Parameter(torch.zeros(1, 1, C)))
            setattr(self, f"pos_embed_{m}", nn.Parameter(torch.randn(1, cfg.num_tokens(m), C) * 0.02))
        self.bottleneck = nn.Parameter(torch.randn(1, cfg.num_bottleneck_tokens, C) * 0.02) if cfg.use_bottleneck else None
        keys = ("shared",) if cfg.share_encoder else mods
        self.blocks = nn.ModuleList([
            nn.ModuleDict({k: EncoderBlock(C, cfg.num_heads, cfg.mlp_dim, cfg.dropout_rate, cfg.attention_dropout_rate,
                                           droplayer_p=lyr / max(cfg.num_layers - 1, 1) * cfg.stochastic_droplayer_rate)
                           for k in keys})
            for lyr in range(cfg.num_layers)])
        self.encoder_norm = nn.LayerNorm(C, eps=LN_EPS)
        self.pre_logits = nn.Linear(C, cfg.representation_size) if cfg.representation_size else None
        self.head = nn.Linear(cfg.representation_size or C, cfg.num_classes)
        self._init_weights()
        # the packed layouts (with and without bottleneck rows) and their row -> modality tables are
        # built once: non-persistent buffers follow .to(device) and torch.compile sees plain tensors
        self._layouts = {nb: PackedLayout(mods, tuple(cfg.num_tokens(m) for m in mods), nb)
                         for nb in {0, cfg.num_bottleneck_tokens if cfg.use_bottleneck else 0}}
        for nb, layout in self._layouts.items():
            self.register_buffer(f"_row_weight_{nb}", layout.row_weight(), persistent=False)
        self.set_backend(backend)

    # ---- construction ------------------------------------------------------------------------------
    def _init_weights(self):
        """Scenic's initialisers: xavier-uniform q/k/v/out and MLP kernels, N(0, 1e-6) MLP biases,
        zero head, lecun-normal patch embeddings."""
        C = self.cfg.hidden_size
        for blocks in self.blocks:
            for blk in blocks.values():
                for i in range(3):  # q, k, v are separate Flax kernels of fan C -> C
                    nn.init.xavier_uniform_(blk.attn.qkv.weight.data[i * C:(i + 1) * C])
                nn.init.zeros_(blk.attn.qkv.bias)
                nn.init.xavier_uniform_(blk.attn.proj.weight)
                nn.init.zeros_(blk.attn.proj.bias)
                for fc in (blk.mlp.fc1, blk.mlp.fc2):
                    nn.init.xavier_uniform_(fc.weight)
                    nn.init.normal_(fc.bias, std=1e-6)
        for name in ("embed_rgb", "embed_spectrogram"):
            conv = getattr(self, name, None)
            if conv is not None:
                # Flax's lecun_normal: truncated normal at 2 std, std corrected for the truncation;
                # the spectrogram kernel's fan-in counts Scenic's 3 tiled channels
                fan_in = conv.weight[0].numel() * (3 if name == "embed_spectrogram" else 1)
                std = 1.0 / math.sqrt(fan_in) / 0.87962566103423978
                nn.init.trunc_normal_(conv.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def set_backend(self, backend: str) -> "MBT":
        """Switch the backend in place (weights unchanged). Raises if an explicit backend cannot run."""
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS + ('auto',)}, got {backend!r}")
        if backend not in ("reference", "eager_sdpa", "torch", "auto"):
            resolve_backend(backend)  # raises with every reason when it cannot run anywhere here
        self.backend = backend
        return self

    # ---- checkpoints -------------------------------------------------------------------------------
    def save_pretrained(self, path) -> None:
        """Write ``path`` as safetensors with the config in its metadata."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = f"{path}.tmp"
        save_file(tensors, tmp, metadata={"mbt_fast_config": json.dumps(self.cfg.to_dict())})
        os.replace(tmp, path)

    @classmethod
    def from_pretrained(cls, path, backend: str = "torch", cfg: MBTConfig | None = None) -> "MBT":
        """Load a safetensors file written by ``save_pretrained`` or ``mbt-fast convert``."""
        from safetensors import safe_open

        from mbt_fast.convert import load_state_dict_checked

        if not os.path.isfile(path):
            what = "is a directory" if os.path.isdir(path) else "does not exist"
            raise FileNotFoundError(f"{path}: {what}; expected a .safetensors file from save_pretrained or mbt-fast convert")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type for every malformed file
            raise ValueError(f"{path}: not a readable safetensors file (truncated, empty or another format?): {e}") from None
        if cfg is None:
            if "mbt_fast_config" not in meta:
                raise ValueError(f"{path}: no mbt_fast_config in the safetensors metadata; pass cfg=")
            try:
                cfg = MBTConfig.from_scenic(json.loads(meta["mbt_fast_config"]))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: the mbt_fast_config in its metadata is invalid: {e}") from None
        model = cls(cfg, backend=backend)
        load_state_dict_checked(model, tensors, source=str(path))
        return model.eval()

    # ---- forward -----------------------------------------------------------------------------------
    def block(self, lyr: int, modality: str) -> EncoderBlock:
        return self.blocks[lyr]["shared" if self.cfg.share_encoder else modality]

    def _check_inputs(self, inputs: dict) -> dict:
        cfg = self.cfg
        extra = [k for k, v in inputs.items() if v is not None and k not in cfg.modality_fusion]
        if extra:
            raise ValueError(f"{extra[0]}: this model's modality_fusion is {cfg.modality_fusion}; got an input for {extra[0]!r}")
        param = self.head.weight
        out = {}
        for m in cfg.modality_fusion:
            x = inputs.get(m)
            expected = (3, *cfg.rgb_shape) if m == "rgb" else cfg.spectrogram_shape
            layout = "[B, 3, T, H, W]" if m == "rgb" else "[B, time, mel]"
            if x is None:
                raise ValueError(f"{m}: expected a tensor {layout} = [B, {', '.join(map(str, expected))}], got None")
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{m}: expected a torch.Tensor, got {type(x).__name__}")
            if not x.is_floating_point():
                raise TypeError(f"{m}: expected a floating-point tensor, got {x.dtype}")
            if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != tuple(expected):
                raise ValueError(f"{m}: expected shape {layout} = [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}")
            if x.device != param.device:
                raise ValueError(f"{m}: expected device {param.device} (the model's), got {x.device}")
            out[m] = x
        batches = {x.shape[0] for x in out.values()}
        if len(batches) != 1:
            raise ValueError(f"rgb, spectrogram: expected one batch size, got {[tuple(x.shape) for x in out.values()]}")
        return out

    def embed(self, m: str, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, CLS and positional embedding: ``[B, n, C]``."""
        conv = self.embed_rgb if m == "rgb" else self.embed_spectrogram
        x = conv(x.to(conv.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # time-major token order, as Flax's reshape
        if self.cfg.has_cls:
            x = torch.cat([getattr(self, f"cls_{m}").expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x + getattr(self, f"pos_embed_{m}").to(x.dtype)

    def forward_features(self, rgb=None, spectrogram=None) -> list[torch.Tensor]:
        """Encoder output before ``encoder_norm``: one ``[B, n_m, C]`` tensor per modality."""
        inputs = self._check_inputs({"rgb": rgb, "spectrogram": spectrogram})
        tokens = {m: self.embed(m, inputs[m] if m == "rgb" else inputs[m].unsqueeze(1)) for m in self.cfg.modality_fusion}
        backend = self.backend
        if backend not in ("reference", "eager_sdpa"):
            backend = resolved_backend(backend, next(iter(tokens.values())).device.type)
        if backend in ("reference", "eager_sdpa"):
            return self._encode_reference(tokens, sdpa=backend == "eager_sdpa")
        return self._encode_packed(tokens, backend)

    def forward_head(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if cfg.has_cls:
            # encoder_norm is per token, so normalising the CLS rows alone equals Scenic's norm-then-index
            pooled = {m: self.encoder_norm(f[:, 0]) for m, f in zip(cfg.modality_fusion, feats)}
        else:
            allx = self.encoder_norm(torch.cat(feats, dim=1))
            fn = {"gap": torch.mean, "gmp": lambda t, dim: t.max(dim).values, "gsp": torch.sum}[cfg.classifier]
            pooled = {"all": fn(allx, dim=1)}
        if self.pre_logits is not None:
            pooled = {m: torch.tanh(self.pre_logits(v)) for m, v in pooled.items()}
        return {m: self.head(v) for m, v in pooled.items()}

    def forward_per_modality(self, rgb=None, spectrogram=None) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(rgb=rgb, spectrogram=spectrogram))

    def forward(self, rgb=None, spectrogram=None) -> torch.Tensor:
        logits = self.forward_per_modality(rgb=rgb, spectrogram=spectrogram)
        return sum(logits.values()) / len(logits)

    # ---- encoders ----------------------------------------------------------------------------------
    def _uses_bottleneck(self) -> bool:
        cfg = self.cfg
        return cfg.use_bottleneck and len(cfg.modality_fusion) > 1 and (self.training or cfg.test_with_bottlenecks)

    def _encode_reference(self, tokens: dict, sdpa: bool = False) -> list[torch.Tensor]:
        """Scenic's ``Encoder.__call__``, line by line (before ``encoder_norm``); ``sdpa=True`` is the
        ``eager_sdpa`` baseline (the same structure with SDPA attention), never the oracle."""
        cfg, mods = self.cfg, self.cfg.modality_fusion
        x = dict(tokens)
        B = next(iter(x.values())).shape[0]
        bottleneck = self.bottleneck.expand(B, -1, -1) if cfg.use_bottleneck else None
        x_combined = None
        for lyr in range(cfg.num_layers):
            if lyr < cfg.fusion_layer or len(mods) == 1 or (cfg.use_bottleneck and not self._uses_bottleneck()):
                for m in mods:
                    x[m] = self.block(lyr, m)(x[m], sdpa)
            elif cfg.use_bottleneck:
                bottle = []
                for m in mods:
                    t_mod = x[m].shape[1]
                    out = self.block(lyr, m)(torch.cat([x[m], bottleneck.to(x[m].dtype)], dim=1), sdpa)
                    x[m] = out[:, :t_mod]
                    bottle.append(out[:, t_mod:])
                bottleneck = torch.stack(bottle, dim=-1).mean(dim=-1)
            elif not cfg.share_encoder:
                x_new = {}
                for m in mods:
                    context = [x[o] for o in _SCENIC_CONTEXT_ORDER if o != m and o in mods]
                    t = x[m].shape[1]
                    x_new[m] = self.block(lyr, m)(torch.cat(context + [x[m]], dim=1), sdpa)[:, -t:]
                x = x_new
            else:
                if x_combined is None:
                    x_combined = torch.cat([x[m] for m in mods], dim=1)
                x_combined = self.block(lyr, mods[0])(x_combined, sdpa)
        if x_combined is not None:
            return list(torch.split(x_combined, [tokens[m].shape[1] for m in mods], dim=1))
        return [x[m] for m in mods]

    def layout(self) -> PackedLayout:
        return self._layouts[self.cfg.num_bottleneck_tokens if self._uses_bottleneck() else 0]

    def layer_plans(self, layout: PackedLayout) -> list[LayerPlan]:
        cfg, M = self.cfg, layout.num_modalities
        unimodal = LayerPlan(tuple(layout.attn_segments(fused=False)), "keep")
        if M == 1:
            fused = unimodal
        elif layout.n_bottleneck:
            fused = LayerPlan(tuple(layout.attn_segments(fused=True)), "mean")
        elif cfg.use_bottleneck:  # bottlenecks switched off at test time: every layer unimodal
            fused = unimodal
        elif cfg.share_encoder:  # vanilla fusion, one joint sequence through the shared block
            fused = LayerPlan(((0, layout.total_rows, 0, layout.total_rows),), "add")
        else:  # vanilla fusion: each modality attends over all tokens under its own weights
            N = layout.total_rows
            fused = LayerPlan(tuple((s.start, s.stop, m * N, (m + 1) * N)
                                    for m, s in enumerate(map(layout.modality_rows, range(M)))), "add", cross_weights=True)
        return [unimodal if lyr < cfg.fusion_layer else fused for lyr in range(cfg.num_layers)]

    def _encode_packed(self, tokens: dict, backend: str) -> list[torch.Tensor]:
        cfg, mods = self.cfg, self.cfg.modality_fusion
        layout = self.layout()
        B = next(iter(tokens.values())).shape[0]
        parts = []
        for m in mods:
            parts.append(tokens[m].transpose(0, 1))
            if layout.n_bottleneck:
                parts.append(self.bottleneck.to(tokens[m].dtype).transpose(0, 1).expand(-1, B, -1))
        x = torch.cat(parts).contiguous()  # the packed [N, B, C] buffer, assembled once
        row_weight = getattr(self, f"_row_weight_{layout.n_bottleneck}")
        joint = cfg.share_encoder and not cfg.use_bottleneck
        for lyr, plan in enumerate(self.layer_plans(layout)):
            blocks = [self.block(lyr, m) for m in mods]
            x = packed_block(blocks, x, layout, plan, row_weight, backend,
                             shared_draw=joint and lyr >= cfg.fusion_layer)
        return [x[layout.modality_rows(m)].transpose(0, 1) for m in range(len(mods))]

