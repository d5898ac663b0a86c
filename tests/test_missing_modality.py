"""A clip without one of its modalities (``missing="drop"``): the present modalities run their own blocks and
the fusion layers average the bottleneck over the present ones only. Every backend against the reference
path computing that rule, the rule itself against a hand-written loop, and ``model.embed``."""
import dataclasses

import pytest
import torch

from compare import assert_close_2x
from test_model import MODES, TINY, TOLS, make_inputs, make_model, skip_unavailable

FUSED = ["bottleneck", "early_fusion", "late_fusion", "vanilla", "vanilla_shared", "shared_bottleneck", "gap_bottleneck"]
SUBSETS = [("rgb",), ("spectrogram",)]


def present(inputs, subset):
    return {m: inputs[m] for m in subset}


@torch.no_grad()
def outputs(model, inputs, backend):
    model.set_backend(backend).eval()
    emb = model.embed(**inputs, missing="drop", bottleneck=model._uses_bottleneck() and
                      model.cfg.fusion_layer < model.cfg.num_layers)
    return {"logits": model(**inputs, missing="drop"), **{f"embed[{k}]": v for k, v in emb.items()}}


@pytest.mark.parametrize("subset", SUBSETS, ids="+".join)
@pytest.mark.parametrize("mode", FUSED)
@pytest.mark.parametrize("backend", ["eager_sdpa", "torch", "triton"])
def test_backend_matches_reference_with_a_modality_missing(mode, backend, subset):
    skip_unavailable(backend)
    cfg = dataclasses.replace(TINY, **MODES[mode])
    model = make_model(cfg)
    inputs = present(make_inputs(cfg, batch=3), subset)
    ref = outputs(model, inputs, "reference")
    out = outputs(model, inputs, backend)
    assert set(out) == set(ref)
    for k in ref:
        err = (out[k] - ref[k]).abs().max().item()
        assert err <= TOLS[backend][0], f"{mode}/{backend}/{subset} {k}: {err:.3e} > {TOLS[backend][0]}"


@pytest.mark.parametrize("subset", SUBSETS, ids="+".join)
@pytest.mark.parametrize("mode", ["bottleneck", "vanilla"])
def test_cuda_emu_with_a_modality_missing_bf16(mode, subset):
    """cuda-emu's attention is fp16/bf16 only: the 2x rule under bf16 autocast (DESIGN.md section 6)."""
    skip_unavailable("cuda-emu")
    cfg = dataclasses.replace(TINY, **MODES[mode])
    model = make_model(cfg)
    inputs = present(make_inputs(cfg, batch=3), subset)
    ref = outputs(model, inputs, "reference")["logits"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = outputs(model, inputs, "reference")["logits"]
        out = outputs(model, inputs, "cuda-emu")["logits"]
    assert_close_2x(out.float(), ref, low.float(), torch.bfloat16, name=f"{mode}/cuda-emu/{subset} logits")


@pytest.mark.parametrize("kept", ["rgb", "spectrogram"])
def test_the_rule_by_hand(kept):
    """The present modality's blocks, and in fusion layers attention over [tokens | bottleneck] with the
    bottleneck replaced by its own update (the mean over one modality), written out as a plain loop."""
    cfg = TINY
    model = make_model(cfg).eval()
    x_in = make_inputs(cfg, batch=2)[kept]
    with torch.no_grad():
        x = model.tokenize(kept, x_in)
        b = model.bottleneck.expand(2, -1, -1)
        for lyr in range(cfg.num_layers):
            blk = model.block(lyr, kept)
            if lyr < cfg.fusion_layer:
                x = blk(x)
            else:
                y = blk(torch.cat([x, b], dim=1))
                x, b = y[:, :x.shape[1]], y[:, x.shape[1]:]
        expected = model.head(model.encoder_norm(x[:, 0]))
        for backend in ("reference", "torch"):
            got = model.set_backend(backend)(**{kept: x_in}, missing="drop")
            err = (got - expected).abs().max().item()
            assert err <= 1e-5, f"{backend}: {err:.3e}"


def test_late_fusion_drop_equals_the_full_models_own_logits():
    """Without exchange between modalities, dropping one leaves the other's logits exactly as before."""
    cfg = dataclasses.replace(TINY, **MODES["late_fusion"])
    model = make_model(cfg).eval().set_backend("torch")
    inputs = make_inputs(cfg, batch=2)
    with torch.no_grad():
        full = model.forward_per_modality(**inputs)
        alone = model(rgb=inputs["rgb"], missing="drop")
    torch.testing.assert_close(alone, full["rgb"], rtol=0, atol=1e-6)


def test_drop_changes_a_fused_models_answer_and_says_what_it_used():
    cfg = TINY
    model = make_model(cfg).eval().set_backend("torch")
    inputs = make_inputs(cfg, batch=2)
    with torch.no_grad():
        full = model.forward_per_modality(**inputs)
        alone = model.forward_per_modality(rgb=inputs["rgb"], missing="drop")
    assert list(alone) == ["rgb"] and list(full) == ["spectrogram", "rgb"]
    assert (alone["rgb"] - full["rgb"]).abs().max() > 1e-4  # the audio reached the rgb CLS through the bottleneck


def test_missing_errors():
    model = make_model(TINY).eval()
    inputs = make_inputs(TINY, batch=1)
    with pytest.raises(ValueError, match="spectrogram: expected a tensor .* got None .*missing='drop'"):
        model(rgb=inputs["rgb"])
    with pytest.raises(ValueError, match="expected at least one input tensor, got none"):
        model(missing="drop")
    with pytest.raises(ValueError, match="missing: expected one of \\('error', 'drop'\\), got 'skip'"):
        model(**inputs, missing="skip")


def test_embed_shapes_and_mean():
    cfg = TINY
    model = make_model(cfg).eval()
    inputs = make_inputs(cfg, batch=2)
    with torch.no_grad():
        emb = model.embed(**inputs, bottleneck=True)
        logits = model.forward_per_modality(**inputs)
    assert {k: tuple(v.shape) for k, v in emb.items()} == {
        "spectrogram": (2, 32), "rgb": (2, 32), "mean": (2, 32), "bottleneck": (2, cfg.num_bottleneck_tokens, 32)}
    torch.testing.assert_close(emb["mean"], (emb["spectrogram"] + emb["rgb"]) / 2)
    for m in ("spectrogram", "rgb"):  # the embedding is what the head reads
        torch.testing.assert_close(model.head(emb[m]), logits[m], rtol=0, atol=1e-6)
    late = make_model(dataclasses.replace(cfg, fusion_layer=cfg.num_layers)).eval()
    with pytest.raises(ValueError, match="bottleneck: this model has no bottleneck tokens"):
        late.embed(**inputs, bottleneck=True)
