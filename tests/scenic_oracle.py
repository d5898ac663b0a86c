"""Test helpers: random Scenic-format MBT checkpoints, and an independent NumPy forward over the Flax
params tree (Flax layouts, no torch), written from Scenic's ``model.py`` semantics.

The fixtures in shared/ pin the torch port to Google's own Flax output for one configuration; this
oracle extends the check to every mode and shape the tests generate.
"""
from __future__ import annotations

import msgpack
import numpy as np

from mbt_fast.config import MBTConfig

_CONTEXT_ORDER = ("rgb", "spectrogram")


# ---- random params in Scenic's tree ---------------------------------------------------------------

def scenic_param_tree(cfg: MBTConfig, seed: int = 0, std: float = 0.2) -> dict:
    rng = np.random.default_rng(seed)
    r = lambda *s: (rng.standard_normal(s) * std).astype(np.float32)  # noqa: E731
    C, H, D, F = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    fh, fw, ft = cfg.patches_size
    mods = cfg.modality_fusion
    p: dict = {"Transformer": {}}
    for m in mods:
        if m == "rgb":
            p["embedding"] = {"kernel": r(ft, fh, fw, 3, C), "bias": r(C)}
            p["Transformer"]["posembed_input"] = {"pos_embedding": r(1, cfg.num_tokens(m), C)}
        else:
            p["embedding_spectrogram"] = {"kernel": r(fh, fw, 3, C), "bias": r(C)}
            p["Transformer"][f"posembed_input_{m}"] = {"pos_embedding": r(1, cfg.num_tokens(m), C)}
        if cfg.has_cls:
            p["cls" if m == "rgb" or len(mods) == 1 else f"cls{m}"] = r(1, 1, C)
    if cfg.use_bottleneck:
        p["bottleneck"] = r(1, cfg.num_bottleneck_tokens, C)
    names = [""] if cfg.share_encoder else ["" if m == "rgb" else f"_{m}" for m in mods]
    for lyr in range(cfg.num_layers):
        for suffix in names:
            att = {n: {"kernel": r(C, H, D), "bias": r(H, D)} for n in ("query", "key", "value")}
            att["out"] = {"kernel": r(H, D, C), "bias": r(C)}
            p["Transformer"][f"encoderblock_{lyr}{suffix}"] = {
                "LayerNorm_0": {"scale": 1 + r(C), "bias": r(C)},
                "MultiHeadDotProductAttention_0": att,
                "LayerNorm_1": {"scale": 1 + r(C), "bias": r(C)},
                "MlpBlock_0": {"Dense_0": {"kernel": r(C, F), "bias": r(F)}, "Dense_1": {"kernel": r(F, C), "bias": r(C)}},
            }
    p["Transformer"]["encoder_norm"] = {"scale": 1 + r(C), "bias": r(C)}
    width = C
    if cfg.representation_size:
        p["pre_logits"] = {"kernel": r(C, cfg.representation_size), "bias": r(cfg.representation_size)}
        width = cfg.representation_size
    p["output_projection"] = {"kernel": r(width, cfg.num_classes), "bias": r(cfg.num_classes)}
    return p


def _pack_array(a: np.ndarray) -> msgpack.ExtType:
    a = np.ascontiguousarray(a)
    return msgpack.ExtType(1, msgpack.packb((list(a.shape), a.dtype.name, a.tobytes()), use_bin_type=True))


def _encode(tree):
    if isinstance(tree, dict):
        return {k: _encode(v) for k, v in tree.items()}
    return _pack_array(np.asarray(tree))


def write_scenic_checkpoint(path, params: dict, train_state: bool = True) -> None:
    """Write params as Scenic's ``save_checkpoint`` does (a train state) or as a bare params file."""
    if train_state:
        momentum = {k: v for k, v in _map(params, lambda a: {"momentum": np.zeros_like(a)}).items()}
        tree = {"accum_train_time": np.float32(0), "global_step": np.int32(7), "model_state": {},
                "optimizer": {"target": params, "state": {"step": np.int32(7), "param_states": momentum}},
                "rng": np.zeros(2, np.uint32)}
    else:
        tree = params
    with open(path, "wb") as f:
        f.write(msgpack.packb(_encode(tree), use_bin_type=True))


def _map(tree, fn):
    return {k: _map(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


# ---- the NumPy forward ----------------------------------------------------------------------------

def _ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _block(p, x):
    a = p["MultiHeadDotProductAttention_0"]
    y = _ln(x, p["LayerNorm_0"])
    q, k, v = (np.einsum("bnc,chd->bnhd", y, a[n]["kernel"]) + a[n]["bias"] for n in ("query", "key", "value"))
    q = q / np.sqrt(q.shape[-1])
    s = np.einsum("bqhd,bkhd->bhqk", q, k)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", s, v)
    x = np.einsum("bqhd,hdc->bqc", o, a["out"]["kernel"]) + a["out"]["bias"] + x
    m = p["MlpBlock_0"]
    y = _gelu_tanh(_ln(x, p["LayerNorm_1"]) @ m["Dense_0"]["kernel"] + m["Dense_0"]["bias"])
    return y @ m["Dense_1"]["kernel"] + m["Dense_1"]["bias"] + x


def _patches(x, kernel):
    """VALID conv with stride = kernel as a matmul over non-overlapping patches (channels last)."""
    ks = kernel.shape[:-2]
    B, spatial, cin = x.shape[0], x.shape[1:-1], x.shape[-1]
    grid = [s // k for s, k in zip(spatial, ks)]
    shape = [B]
    for g, k in zip(grid, ks):
        shape += [g, k]
    x = x.reshape(*shape, cin)
    nd = len(ks)
    x = x.transpose(0, *[1 + 2 * i for i in range(nd)], *[2 + 2 * i for i in range(nd)], 1 + 2 * nd)
    return x.reshape(B, int(np.prod(grid)), -1) @ kernel.reshape(-1, kernel.shape[-1])


def scenic_forward(params: dict, cfg: MBTConfig, inputs: dict, train: bool = False):
    """Scenic's ``MBT.__call__`` (dropout and stochastic depth off). ``inputs`` in Scenic's layouts."""
    mods, T = cfg.modality_fusion, params["Transformer"]
    x, ntok = {}, {}
    for m in mods:
        emb = params["embedding" if m == "rgb" else "embedding_spectrogram"]
        x[m] = _patches(inputs[m].astype(np.float64), emb["kernel"]) + emb["bias"]
        ntok[m] = x[m].shape[1]
        if cfg.has_cls:
            cls = params["cls" if m == "rgb" or len(mods) == 1 else f"cls{m}"]
            x[m] = np.concatenate([np.tile(cls, (x[m].shape[0], 1, 1)), x[m]], 1)
        x[m] = x[m] + T["posembed_input" + ("" if m == "rgb" else f"_{m}")]["pos_embedding"]
    B = x[mods[0]].shape[0]
    bott = np.tile(params["bottleneck"], (B, 1, 1)) if cfg.use_bottleneck else None
    use_b = train or cfg.test_with_bottlenecks
    block = lambda lyr, m: T[f"encoderblock_{lyr}" + ("" if cfg.share_encoder or m == "rgb" else f"_{m}")]  # noqa: E731
    joint = None
    for lyr in range(cfg.num_layers):
        if lyr < cfg.fusion_layer or len(mods) == 1 or (cfg.use_bottleneck and not use_b):
            x = {m: _block(block(lyr, m), x[m]) for m in mods}
        elif cfg.use_bottleneck:
            outs = {m: _block(block(lyr, m), np.concatenate([x[m], bott], 1)) for m in mods}
            x = {m: o[:, :x[m].shape[1]] for m, o in outs.items()}
            bott = np.mean([o[:, -bott.shape[1]:] for o in outs.values()], axis=0)
        elif not cfg.share_encoder:
            x = {m: _block(block(lyr, m), np.concatenate([x[o] for o in _CONTEXT_ORDER if o != m and o in mods] + [x[m]], 1))[:, -x[m].shape[1]:]
                 for m in mods}
        else:
            joint = np.concatenate([x[m] for m in mods], 1) if joint is None else joint
            joint = _block(block(lyr, mods[0]), joint)
    enc = _ln(joint if joint is not None else np.concatenate([x[m] for m in mods], 1), T["encoder_norm"])
    if cfg.has_cls:
        out, c = {}, 0
        for m in mods:
            out[m] = enc[:, c]
            c += ntok[m] + 1
    else:
        out = {"all": {"gap": np.mean, "gmp": np.max, "gsp": np.sum}[cfg.classifier](enc, axis=1)}
    if cfg.representation_size:
        out = {m: np.tanh(v @ params["pre_logits"]["kernel"] + params["pre_logits"]["bias"]) for m, v in out.items()}
    head = params["output_projection"]
    logits = {m: v @ head["kernel"] + head["bias"] for m, v in out.items()}
    return logits if train else np.mean(list(logits.values()), axis=0)


def random_inputs(cfg: MBTConfig, batch: int, seed: int = 0) -> dict:
    """Scenic-layout inputs: rgb ``[B, T, H, W, 3]`` in [-1, 1], spectrogram ``[B, t, mel, 3]`` (tiled)."""
    rng = np.random.default_rng(seed)
    out = {}
    if "rgb" in cfg.modality_fusion:
        out["rgb"] = rng.uniform(-1, 1, (batch, *cfg.rgb_shape, 3)).astype(np.float32)
    if "spectrogram" in cfg.modality_fusion:
        s = rng.standard_normal((batch, *cfg.spectrogram_shape, 1)).astype(np.float32)
        out["spectrogram"] = np.repeat(s, 3, axis=-1)
    return out


def to_torch_inputs(inputs: dict) -> dict:
    import torch

    out = {}
    if "rgb" in inputs:
        out["rgb"] = torch.from_numpy(inputs["rgb"]).permute(0, 4, 1, 2, 3)
    if "spectrogram" in inputs:
        out["spectrogram"] = torch.from_numpy(np.ascontiguousarray(inputs["spectrogram"][..., 0]))
    return out
