"""Scenic/Flax checkpoints: a msgpack reader (no JAX, no pickle) and one explicit name table.

A Scenic checkpoint is one msgpack map (``flax.training.checkpoints``): the params live at
``optimizer/target`` of a train state, at ``params`` of a variables dict, or at the top of a bare
params file. Arrays are msgpack ext type 1 (payload ``[shape, dtype name, raw bytes]``), numpy
scalars ext type 3 (same payload), and leaves over 2 GB chunked dicts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import msgpack
import numpy as np
import torch

from mbt_fast.config import MBTConfig
from mbt_fast.modalities import SCENIC_MODALITIES

_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"
# Only plain numeric dtypes are accepted: a checkpoint can never name an object dtype.
_DTYPES = {name: np.dtype(name) for name in
           ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool")}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not match the model."""


def _ext_hook(code: int, payload: bytes):
    if code not in (_EXT_NDARRAY, _EXT_NPSCALAR):
        raise CheckpointError(f"unsupported msgpack ext type {code} (expected 1 = ndarray or 3 = numpy scalar)")
    shape, dtype, buf = msgpack.unpackb(payload, raw=True)
    dtype = dtype.decode() if isinstance(dtype, bytes) else dtype
    if dtype == "bfloat16":  # ml_dtypes' bfloat16: the upper half of a float32
        bits = np.frombuffer(buf, np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if dtype not in _DTYPES:
        raise CheckpointError(f"array of dtype {dtype!r} is not a numeric checkpoint leaf")
    arr = np.frombuffer(buf, _DTYPES[dtype])
    if arr.size != int(np.prod(shape)):
        raise CheckpointError(f"array of shape {tuple(shape)} holds {arr.size} elements: truncated or corrupt payload")
    return arr.reshape(shape) if code == _EXT_NDARRAY else arr.reshape(())


def _unchunk(tree):
    if isinstance(tree, dict):
        if tree.get(_CHUNKED):
            chunks = tree["chunks"]
            return np.concatenate([chunks[str(i)].reshape(-1) for i in range(len(chunks))]).reshape(tree["shape"])
        return {k: _unchunk(v) for k, v in tree.items()}
    return tree


def read_msgpack_checkpoint(path) -> dict:
    """Parse a Flax msgpack checkpoint into nested dicts of numpy arrays."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # msgpack raises several types for truncated or foreign data
        raise CheckpointError(f"{path}: not a readable Flax msgpack checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: expected a msgpack map at the top level, got {type(tree).__name__}")
    return _unchunk(tree)


def scenic_params(tree: dict) -> dict:
    """The params tree of a train state, a variables dict or a bare params file."""
    if isinstance(tree.get("optimizer"), dict) and "target" in tree["optimizer"]:
        return tree["optimizer"]["target"]
    if isinstance(tree.get("params"), dict):
        return tree["params"]
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = np.asarray(v)
    return out


# ---- the name table ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    torch_key: str
    flax_keys: tuple[str, ...]
    convert: Callable[..., np.ndarray]


def _dense(k):  # Flax Dense kernel (in, out) -> torch Linear weight (out, in)
    return k.T


def _qkv_weight(q, k, v):  # three (C, heads, head_dim) kernels -> one (3C, C) Linear weight
    return np.concatenate([w.reshape(w.shape[0], -1).T for w in (q, k, v)])


def _qkv_bias(q, k, v):
    return np.concatenate([b.reshape(-1) for b in (q, k, v)])


def _out_weight(k):  # (heads, head_dim, C) -> (C, C)
    return k.reshape(-1, k.shape[-1]).T


def _rgb_kernel(k):  # (T, H, W, Cin, Cout) -> (Cout, Cin, T, H, W)
    return k.transpose(4, 3, 0, 1, 2)


def _spec_kernel(k):  # (time, mel, 3, Cout) -> (Cout, 1, time, mel): Scenic's 3 channels are identical
    return k.sum(axis=2, keepdims=True).transpose(3, 2, 0, 1)


def _same(x):
    return x


def scenic_name_table(cfg: MBTConfig) -> list[Entry]:
    """Every torch tensor of ``MBT(cfg)`` and the Flax leaves it is made of."""
    mods = cfg.modality_fusion
    other = [m for m in mods if m not in SCENIC_MODALITIES]
    if other:
        raise ValueError(f"modality_fusion: Scenic's MBT has parameters for {SCENIC_MODALITIES} only, got "
                         f"{', '.join(map(repr, other))}; a Scenic checkpoint cannot fill them")
    table = []
    add = lambda t, f, fn=_same: table.append(Entry(t, tuple(f) if isinstance(f, (list, tuple)) else (f,), fn))  # noqa: E731
    for m in mods:
        if m == "rgb":
            add("embed_rgb.weight", "embedding/kernel", _rgb_kernel)
            add("embed_rgb.bias", "embedding/bias")
        else:
            add("embed_spectrogram.weight", "embedding_spectrogram/kernel", _spec_kernel)
            add("embed_spectrogram.bias", "embedding_spectrogram/bias")
        if cfg.has_cls:
            add(f"cls_{m}", "cls" if m == "rgb" or len(mods) == 1 else f"cls{m}")
        add(f"pos_embed_{m}", "Transformer/posembed_input" + ("" if m == "rgb" else f"_{m}") + "/pos_embedding")
    if cfg.use_bottleneck:
        add("bottleneck", "bottleneck")
    keys = {"shared": ""} if cfg.share_encoder else {m: "" if m == "rgb" else f"_{m}" for m in mods}
    for lyr in range(cfg.num_layers):
        for key, suffix in keys.items():
            t, f = f"blocks.{lyr}.{key}", f"Transformer/encoderblock_{lyr}{suffix}"
            att = f"{f}/MultiHeadDotProductAttention_0"
            for i in (0, 1):
                add(f"{t}.norm{i + 1}.weight", f"{f}/LayerNorm_{i}/scale")
                add(f"{t}.norm{i + 1}.bias", f"{f}/LayerNorm_{i}/bias")
            add(f"{t}.attn.qkv.weight", [f"{att}/{n}/kernel" for n in ("query", "key", "value")], _qkv_weight)
            add(f"{t}.attn.qkv.bias", [f"{att}/{n}/bias" for n in ("query", "key", "value")], _qkv_bias)
            add(f"{t}.attn.proj.weight", f"{att}/out/kernel", _out_weight)
            add(f"{t}.attn.proj.bias", f"{att}/out/bias")
            for i in (0, 1):
                add(f"{t}.mlp.fc{i + 1}.weight", f"{f}/MlpBlock_0/Dense_{i}/kernel", _dense)
                add(f"{t}.mlp.fc{i + 1}.bias", f"{f}/MlpBlock_0/Dense_{i}/bias")
    add("encoder_norm.weight", "Transformer/encoder_norm/scale")
    add("encoder_norm.bias", "Transformer/encoder_norm/bias")
    if cfg.representation_size:
        add("pre_logits.weight", "pre_logits/kernel", _dense)
        add("pre_logits.bias", "pre_logits/bias")
    add("head.weight", "output_projection/kernel", _dense)
    add("head.bias", "output_projection/bias")
    return table


def load_state_dict_checked(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` that reports every missing, unexpected and mis-shaped key at once."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = [f"{k}: expected {tuple(expected[k].shape)}, got {tuple(tensors[k].shape)}"
                 for k in sorted(set(expected) & set(tensors)) if tuple(expected[k].shape) != tuple(tensors[k].shape)]
    if missing or unexpected or misshaped:
        lines = [f"{source} does not match the model configuration:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})


def scenic_to_state_dict(params: dict, cfg: MBTConfig, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Map a Scenic params tree onto ``MBT(cfg)``'s state dict names through the name table."""
    flat = flatten(params)
    table = scenic_name_table(cfg)
    used = {k for e in table for k in e.flax_keys}
    missing = sorted(k for k in used if k not in flat)
    unexpected = sorted(k for k in flat if k not in used)
    if missing or unexpected:
        lines = [f"{source}: the Scenic params do not match the configuration:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + "; ".join(missing))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + "; ".join(unexpected))
        raise CheckpointError("\n".join(lines))
    _check_heads(flat, cfg, source)
    out = {}
    for e in table:
        try:
            out[e.torch_key] = torch.from_numpy(np.array(e.convert(*(flat[k] for k in e.flax_keys)), dtype=np.float32))
        except ValueError as err:  # a reshape that cannot apply: the leaf has the wrong shape
            shapes = ", ".join(f"{k} {flat[k].shape}" for k in e.flax_keys)
            raise CheckpointError(f"{source}: mis-shaped leaf for {e.torch_key}: {shapes} ({err})") from None
    return out


def _check_heads(flat: dict, cfg: MBTConfig, source: str) -> None:
    """The head split is in the file (query/key/value kernels ``[C, heads, head_dim]``, out ``[heads,
    head_dim, C]``) but disappears in the fused torch weights, so a wrong ``num_heads`` would load and
    give wrong logits: check it here."""
    C, want = cfg.hidden_size, (cfg.num_heads, cfg.head_dim)
    for k, v in flat.items():
        parts = k.split("/")
        if v.ndim != 3 or parts[-1] != "kernel" or "MultiHeadDotProductAttention_0" not in parts:
            continue
        qkv = parts[-2] in ("query", "key", "value")
        split, width = (tuple(v.shape[1:]), v.shape[0]) if qkv else (tuple(v.shape[:2]), v.shape[2])
        # other widths are reported as mis-shaped by the generic check; here only the head split
        if width == C and split[0] * split[1] == C and split != want:
            raise CheckpointError(
                f"{source}: {k} has shape {tuple(v.shape)}, i.e. {split[0]} heads of {split[1]}; the config expects "
                f"num_heads={cfg.num_heads} x head_dim={cfg.head_dim} (hidden_size={C}): fix num_heads in the config")


def load_scenic_checkpoint(path, cfg: MBTConfig, backend: str = "torch"):
    """Read a Scenic/Flax msgpack checkpoint into an eval-mode ``MBT(cfg)``."""
    from mbt_fast.model import MBT

    state = scenic_to_state_dict(scenic_params(read_msgpack_checkpoint(path)), cfg, source=str(path))
    model = MBT(cfg, backend=backend)
    load_state_dict_checked(model, state, source=str(path))
    return model.eval()
