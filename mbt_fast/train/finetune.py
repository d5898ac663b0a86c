"""Fine-tuning: start a run from another model's weights (``mbt-fast train --init-from MODEL``), and
linear probing (``--freeze-backbone``: only the classifier trains).

A tensor is copied when the source has one of the same name and shape; everything else keeps the
model's fresh initialisation -- with a new class count that is the classifier, which Scenic (and
``MBT``) initialise to zero.
"""
from __future__ import annotations

import torch

# the classifier: the output projection, and the tanh pre-logits layer when the config has one
HEAD_PREFIXES = ("head.", "pre_logits.")


def is_head(name: str) -> bool:
    return name.startswith(HEAD_PREFIXES)


@torch.no_grad()
def init_from(model: torch.nn.Module, source: torch.nn.Module) -> dict:
    """Copy into ``model`` every tensor of ``source``'s state dict whose name and shape match.

    Returns ``{"loaded": [names], "not_loaded": {name: {"source": shape or None (absent), "model": shape}},
    "unused": [source names the model lacks], "loaded_params": int, "total_params": int}`` (the counts are
    elements of the model's state dict)."""
    src = source.state_dict()
    loaded, not_loaded, loaded_params, total = [], {}, 0, 0
    # state_dict() tensors share their storage with the parameters: copy_ writes the model itself
    for name, t in model.state_dict().items():
        total += t.numel()
        s = src.get(name)
        if s is None or s.shape != t.shape:
            not_loaded[name] = {"source": None if s is None else list(s.shape), "model": list(t.shape)}
        else:
            t.copy_(s)
            loaded.append(name)
            loaded_params += t.numel()
    unused = sorted(set(src) - set(model.state_dict()))
    return {"loaded": loaded, "not_loaded": not_loaded, "unused": unused, "loaded_params": loaded_params,
            "total_params": total}


def format_report(report: dict, source: str = "the source") -> str:
    """A few lines for the log: what was loaded, and each tensor left at its fresh initialisation and why."""
    n_all = len(report["loaded"]) + len(report["not_loaded"])
    lines = [f"initialised from {source}: loaded {len(report['loaded'])} of {n_all} tensors "
             f"({report['loaded_params']:,} of {report['total_params']:,} parameters)"]
    if report["not_loaded"]:
        lines.append("not loaded (left at their fresh initialisation):")
        for name, shapes in report["not_loaded"].items():
            why = (f"missing in {source}" if shapes["source"] is None
                   else f"shape {shapes['source']} in {source} vs {shapes['model']} in the model")
            lines.append(f"  {name}: {why}")
    if report["unused"]:
        lines.append(f"in {source} but not in the model (ignored): " + ", ".join(report["unused"]))
    return "\n".join(lines)


def freeze_backbone(model: torch.nn.Module) -> tuple[int, int]:
    """Set ``requires_grad=False`` on every parameter but the classifier's (``HEAD_PREFIXES``);
    returns (trainable, total) parameter element counts."""
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_head(name))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    if trainable == 0:
        raise ValueError(f"freeze_backbone: the model has no parameter named {' or '.join(HEAD_PREFIXES)}*; "
                         f"nothing would train")
    return trainable, total
