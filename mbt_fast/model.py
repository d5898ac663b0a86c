"""``MBT``: Scenic's Multimodal Bottleneck Transformer as a PyTorch module with switchable backends.

``backend="reference"`` runs Scenic's encoder line by line (concat, block, split, stack, mean);
every other backend runs the packed token-major buffer of ``mbt_fast.layout`` through
``mbt_fast.ops``. Both use the same parameters, so ``set_backend`` switches in place.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from mbt_fast.backends import BACKENDS, resolve_backend, resolved_backend
from mbt_fast.config import MBTConfig
from mbt_fast.layers import LN_EPS, EncoderBlock, LayerPlan, packed_block
from mbt_fast.layout import PackedLayout
from mbt_fast.modalities import get_embedding, scenic_order

MISSING = ("error", "drop")  # forward(missing=...): an absent modality is an error, or left out


class MBT(nn.Module):
    """Multimodal Bottleneck Transformer.

    Inputs: one float tensor per modality of ``cfg.modality_fusion``, by name (:mod:`mbt_fast.modalities`):
    ``rgb`` ``[B, 3, T, H, W]`` in [-1, 1], ``spectrogram`` ``[B, time, mel]``, ``flow``
    ``[B, 2, T, H, W]``, ``tokens`` ``[B, n, d_in]``, or a registered modality's input.
    ``forward`` returns the mean of the per-modality logits ``[B, num_classes]`` (Scenic's eval
    output); ``forward_per_modality`` returns ``{modality: [B, num_classes]}`` (Scenic's train output;
    with ``gap``/``gmp``/``gsp`` pooling there is one pooled output, returned as ``{"all": ...}``).

    ``missing="drop"`` answers from the modalities passed: they run their own blocks, and the fusion
    layers average the bottleneck over them only (one modality: the bottleneck is its own update);
    vanilla fusion attends over their tokens. The outputs cover the modalities present.
    """

    def __init__(self, cfg: MBTConfig, backend: str = "torch"):
        super().__init__()
        self.cfg = cfg
        C, mods = cfg.hidden_size, cfg.modality_fusion
        for m in scenic_order(mods):  # creation order fixes the seeded initialisation: Scenic's first
            setattr(self, f"embed_{m}", get_embedding(m).create(cfg.input_shapes[m][1:], cfg.patches_size, C))
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
        # the task, when a checkpoint says it (save_pretrained / from_pretrained metadata): for predict
        self.class_names: list[str] | None = None
        self.multi_label: bool | None = None
        # the packed layouts (with and without bottleneck rows) and their row -> modality tables are
        # built once: non-persistent buffers follow .to(device) and torch.compile sees plain tensors
        self._layouts = {nb: PackedLayout(mods, tuple(cfg.num_tokens(m) for m in mods), nb)
                         for nb in {0, cfg.num_bottleneck_tokens if cfg.use_bottleneck else 0}}
        for nb, layout in self._layouts.items():
            self.register_buffer(f"_row_weight_{nb}", layout.row_weight(), persistent=False)
        self._subset_row_weight: dict = {}
        self.set_backend(backend)

    # ---- construction ------------------------------------------------------------------------------
    def _init_weights(self):
        """Scenic's initialisers: xavier-uniform q/k/v/out and MLP kernels, N(0, 1e-6) MLP biases,
        zero head, lecun-normal embeddings."""
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
        for m in scenic_order(self.cfg.modality_fusion):
            getattr(self, f"embed_{m}").reset_scenic()
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
    def save_pretrained(self, path, class_names=None, multi_label: bool | None = None) -> None:
        """Write ``path`` as safetensors with the config in its metadata, and the task when known:
        ``class_names`` (one per class) and ``multi_label`` (sigmoid scores) for ``mbt-fast predict``.
        Unset, they default to this model's own (``from_pretrained`` reads them back)."""
        from safetensors.torch import save_file

        class_names = self.class_names if class_names is None else list(class_names)
        multi_label = self.multi_label if multi_label is None else bool(multi_label)
        if class_names is not None and len(class_names) != self.cfg.num_classes:
            raise ValueError(f"class_names: expected {self.cfg.num_classes} names (num_classes), got {len(class_names)}")
        metadata = {"mbt_fast_config": json.dumps(self.cfg.to_dict())}
        if class_names is not None:
            metadata["mbt_fast_class_names"] = json.dumps([str(c) for c in class_names])
        if multi_label is not None:
            metadata["mbt_fast_multi_label"] = json.dumps(multi_label)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = f"{path}.tmp"
        save_file(tensors, tmp, metadata=metadata)
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
        try:
            names = json.loads(meta["mbt_fast_class_names"]) if "mbt_fast_class_names" in meta else None
            multi = json.loads(meta["mbt_fast_multi_label"]) if "mbt_fast_multi_label" in meta else None
        except ValueError as e:
            raise ValueError(f"{path}: the class names or multi-label flag in its metadata are not JSON: {e}") from None
        if names is not None and (not isinstance(names, list) or len(names) != cfg.num_classes):
            raise ValueError(f"{path}: mbt_fast_class_names in its metadata: expected a list of {cfg.num_classes} "
                             f"names, got {type(names).__name__} of length {len(names) if isinstance(names, list) else '-'}")
        model.class_names, model.multi_label = names, multi if multi is None else bool(multi)
        return model.eval()

    # ---- forward -----------------------------------------------------------------------------------
    def block(self, lyr: int, modality: str) -> EncoderBlock:
        return self.blocks[lyr]["shared" if self.cfg.share_encoder else modality]

    def _check_inputs(self, inputs: dict, missing: str = "error") -> dict:
        """The inputs present, checked, in ``modality_fusion`` order; ``missing="drop"`` lets modalities be
        absent (None) as long as one is there."""
        cfg = self.cfg
        if missing not in MISSING:
            raise ValueError(f"missing: expected one of {MISSING}, got {missing!r}")
        extra = [k for k, v in inputs.items() if v is not None and k not in cfg.modality_fusion]
        if extra:
            raise ValueError(f"{extra[0]}: this model's modality_fusion is {cfg.modality_fusion}; got an input for {extra[0]!r}")
        param = self.head.weight
        out = {}
        for m in cfg.modality_fusion:
            x = inputs.get(m)
            expected, layout = cfg.input_shape(m), get_embedding(m).input_layout
            if x is None:
                if missing == "drop":
                    continue
                raise ValueError(f"{m}: expected a tensor {layout} = [B, {', '.join(map(str, expected))}], got None "
                                 f"(missing='drop' answers from the modalities present)")
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{m}: expected a torch.Tensor, got {type(x).__name__}")
            if not x.is_floating_point():
                raise TypeError(f"{m}: expected a floating-point tensor, got {x.dtype}")
            if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != tuple(expected):
                raise ValueError(f"{m}: expected shape {layout} = [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}")
            if x.device != param.device:
                raise ValueError(f"{m}: expected device {param.device} (the model's), got {x.device}")
            out[m] = x
        if not out:
            raise ValueError(f"{', '.join(cfg.modality_fusion)}: expected at least one input tensor, got none")
        batches = {x.shape[0] for x in out.values()}
        if len(batches) != 1:
            raise ValueError(f"{', '.join(out)}: expected one batch size, got {[tuple(x.shape) for x in out.values()]}")
        return out

    def tokenize(self, m: str, x: torch.Tensor) -> torch.Tensor:
        """Modality ``m``'s embedding, CLS and positional embedding: ``[B, n, C]``."""
        x = getattr(self, f"embed_{m}")(x)
        if self.cfg.has_cls:
            x = torch.cat([getattr(self, f"cls_{m}").expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x + getattr(self, f"pos_embed_{m}").to(x.dtype)

    def _token_masks(self, lengths, inputs: dict) -> dict[str, torch.Tensor]:
        """``lengths`` ``{modality: int [B]}`` (ragged modalities only) -> ``{modality: bool [B, n_m]}``, True
        on the tokens that hold data (the CLS and the first ``L[b]`` rows); modalities absent are skipped."""
        if lengths is None:
            return {}
        if not isinstance(lengths, dict):
            raise TypeError(f"lengths: expected a dict {{modality: int tensor [B]}}, got {type(lengths).__name__}")
        cfg, out = self.cfg, {}
        batch = next(iter(inputs.values())).shape[0]
        for m, L in lengths.items():
            if m not in cfg.modality_fusion:
                raise ValueError(f"lengths: {m!r} is not one of this model's modalities {cfg.modality_fusion}")
            if L is None or m not in inputs:
                continue
            emb = get_embedding(m)
            if not emb.ragged:
                raise ValueError(f"lengths[{m!r}]: only sequence modalities (one token per input row, e.g. "
                                 f"FeatureEmbedding) take lengths; {m!r} is tokenized by {emb.__name__}")
            if not isinstance(L, torch.Tensor) or L.is_floating_point() or L.dtype == torch.bool or L.shape != (batch,):
                got = f"{L.dtype} {tuple(L.shape)}" if isinstance(L, torch.Tensor) else type(L).__name__
                raise ValueError(f"lengths[{m!r}]: expected an integer tensor [B] = [{batch}], got {got}")
            if L.device != inputs[m].device:
                raise ValueError(f"lengths[{m!r}]: expected device {inputs[m].device} (the input's), got {L.device}")
            n, lo = cfg.num_patches(m), 0 if cfg.has_cls else 1  # without a CLS a row must keep a token
            ok = ((L >= lo) & (L <= n)).all()
            what = f"lengths[{m!r}]: expected values in [{lo}, {n}] (rows of the input holding data)"
            if L.device.type == "cpu" and not torch.compiler.is_compiling():
                if not bool(ok):
                    raise ValueError(f"{what}, got min {int(L.min())}, max {int(L.max())}")
            else:
                torch._assert_async(ok, what)  # no host sync on a GPU
            rows = torch.arange(n, device=L.device)[None, :] < L[:, None]
            out[m] = torch.cat([rows.new_ones(batch, int(cfg.has_cls)), rows], dim=1)
        return out

    def _encode(self, inputs: dict, missing: str, lengths=None) -> tuple[dict, torch.Tensor | None, dict]:
        """(encoder output before ``encoder_norm`` per modality present, the final bottleneck tokens, the
        token masks of ragged modalities)."""
        inputs = self._check_inputs(inputs, missing)
        valid = self._token_masks(lengths, inputs)
        tokens = {m: self.tokenize(m, x) for m, x in inputs.items()}
        backend = self.backend
        if backend not in ("reference", "eager_sdpa"):
            backend = resolved_backend(backend, next(iter(tokens.values())).device.type)
        if backend in ("reference", "eager_sdpa"):
            return (*self._encode_reference(tokens, sdpa=backend == "eager_sdpa", valid=valid), valid)
        return (*self._encode_packed(tokens, backend, valid), valid)

    # every entry point takes the modalities by name: rgb and spectrogram also by position (Scenic's);
    # ``lengths`` ``{modality: int [B]}`` marks the padding of ragged feature sequences (module doc)
    def forward_features(self, rgb=None, spectrogram=None, missing: str = "error", lengths=None,
                         **inputs) -> dict[str, torch.Tensor]:
        """Encoder output before ``encoder_norm``: ``{modality: [B, n_m, C]}`` for each modality present
        (padding rows of ragged modalities included, computed but never attended to)."""
        return self._encode(dict(rgb=rgb, spectrogram=spectrogram, **inputs), missing, lengths)[0]

    def _pool(self, feats: dict, valid: dict | None = None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if cfg.has_cls:
            # encoder_norm is per token, so normalising the CLS rows alone equals Scenic's norm-then-index
            return {m: self.encoder_norm(f[:, 0]) for m, f in feats.items()}
        allx = self.encoder_norm(torch.cat(list(feats.values()), dim=1))
        if not valid:
            fn = {"gap": torch.mean, "gmp": lambda t, dim: t.max(dim).values, "gsp": torch.sum}[cfg.classifier]
            return {"all": fn(allx, dim=1)}
        keep = torch.cat([valid[m] if m in valid else f.new_ones(f.shape[:2], dtype=torch.bool) for m, f in feats.items()],
                         dim=1)[..., None]  # [B, n, 1]: padding rows are not pooled
        if cfg.classifier == "gmp":
            return {"all": allx.masked_fill(~keep, float("-inf")).max(1).values}
        total = (allx * keep).sum(1)
        return {"all": total / keep.sum(1) if cfg.classifier == "gap" else total}

    def forward_head(self, feats: dict[str, torch.Tensor], valid: dict | None = None) -> dict[str, torch.Tensor]:
        """Logits from ``forward_features``; ``valid``: the token masks of ragged modalities, for pooling."""
        pooled = self._pool(feats, valid)
        if self.pre_logits is not None:
            pooled = {m: torch.tanh(self.pre_logits(v)) for m, v in pooled.items()}
        return {m: self.head(v) for m, v in pooled.items()}

    def forward_per_modality(self, rgb=None, spectrogram=None, missing: str = "error", lengths=None,
                             **inputs) -> dict[str, torch.Tensor]:
        """``{modality: [B, num_classes]}`` for each modality present (``{"all": ...}`` with pooling)."""
        feats, _, valid = self._encode(dict(rgb=rgb, spectrogram=spectrogram, **inputs), missing, lengths)
        return self.forward_head(feats, valid)

    def forward(self, rgb=None, spectrogram=None, missing: str = "error", lengths=None, **inputs) -> torch.Tensor:
        """Mean of the per-modality logits. ``missing="drop"``: an absent modality is left out (module doc)."""
        logits = self.forward_per_modality(rgb, spectrogram, missing, lengths, **inputs)
        return sum(logits.values()) / len(logits)

    def embed(self, rgb=None, spectrogram=None, missing: str = "error", bottleneck: bool = False, lengths=None,
              **inputs) -> dict[str, torch.Tensor]:
        """Per-clip embeddings ``[B, C]``: each present modality's CLS after ``encoder_norm`` (with pooling,
        the one pooled vector as ``"all"``) and ``"mean"``, their mean; ``bottleneck=True`` adds
        ``"bottleneck"`` ``[B, n_bottleneck_tokens, C]``, the bottleneck tokens after the last layer
        and ``encoder_norm`` (fused models whose last layer is a fusion layer; otherwise an error)."""
        feats, bottle, valid = self._encode(dict(rgb=rgb, spectrogram=spectrogram, **inputs), missing, lengths)
        out = self._pool(feats, valid)
        out["mean"] = sum(out.values()) / len(out)
        if bottleneck:
            if bottle is None:
                raise ValueError("bottleneck: this model has no bottleneck tokens at inference (use_bottleneck, "
                                 "test_with_bottlenecks, two or more modalities and a fusion layer are needed)")
            out["bottleneck"] = self.encoder_norm(bottle)
        return out

    # ---- encoders ----------------------------------------------------------------------------------
    def _uses_bottleneck(self) -> bool:
        cfg = self.cfg
        return cfg.use_bottleneck and len(cfg.modality_fusion) > 1 and (self.training or cfg.test_with_bottlenecks)

    def _encode_reference(self, tokens: dict, sdpa: bool = False, valid: dict | None = None) -> tuple[dict, torch.Tensor | None]:
        """Scenic's ``Encoder.__call__``, line by line (before ``encoder_norm``); ``sdpa=True`` is the
        ``eager_sdpa`` baseline (the same structure with SDPA attention), never the oracle. ``valid``: the
        token masks of ragged modalities; each block's keys are masked where its input is padding."""
        cfg, mods = self.cfg, tuple(tokens)  # the modalities present, in modality_fusion order
        x = dict(tokens)
        B = next(iter(x.values())).shape[0]
        valid = valid or {}

        def keys(parts):  # the key mask of a block over cat(parts): modality names, or "bottleneck"
            if not valid:
                return None
            rows = {m: t.shape[1] for m, t in tokens.items()} | {"bottleneck": cfg.num_bottleneck_tokens}
            return torch.cat([valid.get(p, torch.ones(B, rows[p], dtype=torch.bool, device=self.head.weight.device))
                              for p in parts], dim=1)

        bottleneck = self.bottleneck.expand(B, -1, -1) if cfg.use_bottleneck else None
        fused = False  # whether a fusion layer updated the bottleneck
        x_combined = None
        uses_bottleneck = self._uses_bottleneck()
        for lyr in range(cfg.num_layers):
            # a modality alone runs its own blocks, except in a bottleneck model missing the others: it
            # still exchanges with the bottleneck, whose mean is then over the one modality present
            if lyr < cfg.fusion_layer or (not uses_bottleneck and (len(mods) == 1 or cfg.use_bottleneck)):
                for m in mods:
                    x[m] = self.block(lyr, m)(x[m], sdpa, keys([m]))
            elif cfg.use_bottleneck:
                bottle = []
                for m in mods:
                    t_mod = x[m].shape[1]
                    out = self.block(lyr, m)(torch.cat([x[m], bottleneck.to(x[m].dtype)], dim=1), sdpa,
                                             keys([m, "bottleneck"]))
                    x[m] = out[:, :t_mod]
                    bottle.append(out[:, t_mod:])
                bottleneck = torch.stack(bottle, dim=-1).mean(dim=-1)
                fused = True
            elif not cfg.share_encoder:
                x_new = {}
                for m in mods:
                    context = [o for o in scenic_order(mods) if o != m]
                    t = x[m].shape[1]
                    x_new[m] = self.block(lyr, m)(torch.cat([x[o] for o in context] + [x[m]], dim=1), sdpa,
                                                  keys(context + [m]))[:, -t:]
                x = x_new
            else:
                if x_combined is None:
                    x_combined = torch.cat([x[m] for m in mods], dim=1)
                x_combined = self.block(lyr, mods[0])(x_combined, sdpa, keys(mods))
        if x_combined is not None:
            x = dict(zip(mods, torch.split(x_combined, [tokens[m].shape[1] for m in mods], dim=1)))
        return {m: x[m] for m in mods}, bottleneck if fused else None

    def layout(self, modalities: tuple[str, ...] | None = None) -> PackedLayout:
        """The packed layout of all modalities, or of the ``modalities`` present (``missing="drop"``)."""
        layout = self._layouts[self.cfg.num_bottleneck_tokens if self._uses_bottleneck() else 0]
        if modalities is None or tuple(modalities) == layout.modalities:
            return layout
        cfg = self.cfg
        return PackedLayout(tuple(modalities), tuple(cfg.num_tokens(m) for m in modalities), layout.n_bottleneck)

    def _row_weight(self, layout: PackedLayout, device) -> torch.Tensor:
        if layout.modalities == self.cfg.modality_fusion:
            return getattr(self, f"_row_weight_{layout.n_bottleneck}")
        key = (layout, str(device))  # modalities missing: built once per subset and device
        if key not in self._subset_row_weight:
            self._subset_row_weight[key] = layout.row_weight(device)
        return self._subset_row_weight[key]

    def layer_plans(self, layout: PackedLayout) -> list[LayerPlan]:
        cfg, M = self.cfg, layout.num_modalities
        unimodal = LayerPlan(tuple(layout.attn_segments(fused=False)), "keep")
        if layout.n_bottleneck:  # with one modality present (missing="drop"): the mean over that one
            fused = LayerPlan(tuple(layout.attn_segments(fused=True)), "mean")
        elif M == 1:
            fused = unimodal
        elif cfg.use_bottleneck:  # bottlenecks switched off at test time: every layer unimodal
            fused = unimodal
        elif cfg.share_encoder:  # vanilla fusion, one joint sequence through the shared block
            fused = LayerPlan(((0, layout.total_rows, 0, layout.total_rows),), "add")
        else:  # vanilla fusion: each modality attends over all tokens under its own weights
            N = layout.total_rows
            fused = LayerPlan(tuple((s.start, s.stop, m * N, (m + 1) * N)
                                    for m, s in enumerate(map(layout.modality_rows, range(M)))), "add", cross_weights=True)
        return [unimodal if lyr < cfg.fusion_layer else fused for lyr in range(cfg.num_layers)]

    def _encode_packed(self, tokens: dict, backend: str, valid: dict | None = None) -> tuple[dict, torch.Tensor | None]:
        cfg, mods = self.cfg, tuple(tokens)  # the modalities present, in modality_fusion order
        layout = self.layout(mods)
        B = next(iter(tokens.values())).shape[0]
        parts, masks = [], []
        for m in mods:
            parts.append(tokens[m].transpose(0, 1))
            masks.append(valid[m] if valid and m in valid else None)
            if layout.n_bottleneck:
                parts.append(self.bottleneck.to(tokens[m].dtype).transpose(0, 1).expand(-1, B, -1))
                masks.append(None)
        x = torch.cat(parts).contiguous()  # the packed [N, B, C] buffer, assembled once
        # the padding of ragged modalities as one [B, N] key mask of the buffer (None: no padding anywhere)
        key_mask = None if not valid else torch.cat(
            [mk if mk is not None else torch.ones(B, p.shape[0], dtype=torch.bool, device=x.device)
             for p, mk in zip(parts, masks)], dim=1)
        row_weight = self._row_weight(layout, x.device)
        joint = cfg.share_encoder and not cfg.use_bottleneck
        plans = self.layer_plans(layout)
        h = None  # the next block's norm1 of x, when the previous block computed it with its closing residual
        for lyr, plan in enumerate(plans):
            blocks = [self.block(lyr, m) for m in mods]
            chain = lyr + 1 < len(plans) and not plans[lyr + 1].cross_weights
            out = packed_block(blocks, x, layout, plan, row_weight, backend, shared_draw=joint and lyr >= cfg.fusion_layer,
                               key_mask=key_mask, h=h, next_blocks=[self.block(lyr + 1, m) for m in mods] if chain else None)
            x, h = out if chain else (out, None)
        feats = {name: x[layout.modality_rows(m)].transpose(0, 1) for m, name in enumerate(mods)}
        fused = layout.n_bottleneck > 0 and cfg.fusion_layer < cfg.num_layers
        # after a fusion layer every modality's bottleneck slot holds the same mean
        return feats, x[layout.bottleneck_rows(0)].transpose(0, 1) if fused else None

