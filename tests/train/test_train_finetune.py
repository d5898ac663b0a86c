"""Fine-tuning: ``mbt-fast train --init-from MODEL`` (safetensors, or a Scenic checkpoint with
``--init-config``) loads every tensor of matching name and shape and reports the rest; ``--freeze-backbone``
trains the classifier alone (also under DDP); a resume continues from the run's own checkpoint."""
import dataclasses
import json
import logging

import pytest
import torch
from safetensors import safe_open

import mbt_fast
from mbt_fast.cli import main as cli_main
from mbt_fast.data.testing import write_clip
from mbt_fast.train import read_checkpoint
from mbt_fast.train.checkpoint import model_state
from mbt_fast.train.finetune import format_report, freeze_backbone, init_from
from scenic_oracle import scenic_param_tree, write_scenic_checkpoint
from test_train_cli import _error
from test_train_distributed import torchrun_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = mbt_fast.MBTConfig.preset("tiny")  # 10 classes; the synthetic task has 8
# a Scenic-format model of another size (3 classes) at small input shapes
SCENIC_CFG = mbt_fast.MBTConfig(hidden_size=32, num_heads=2, mlp_dim=48, num_layers=2, fusion_layer=1,
                                n_bottlenecks=2, num_classes=3,
                                input_shapes={"rgb": (-1, 4, 32, 32, 3), "spectrogram": (-1, 32, 16, 3)})


def _source_model(cfg=TINY, seed=0):
    """A model with every tensor random, the head too (a trained head is not zero, so a copy would show)."""
    torch.manual_seed(seed)
    model = mbt_fast.MBT(cfg)
    with torch.no_grad():
        model.head.weight.normal_()
        model.head.bias.normal_()
    return model


@pytest.fixture
def source(tmp_path):
    """(path of a saved tiny model, its state dict)."""
    model = _source_model()
    path = tmp_path / "src.safetensors"
    model.save_pretrained(path)
    return path, model.state_dict()


def _args(out, *extra):
    return ["train", "--data", "synthetic", "--steps", "4", "--batch-size", "8", "--train-size", "24",
            "--val-size", "0", "--ckpt-every", "2", "--num-workers", "0", "--no-progress", "--threads", "1",
            "--out", str(out), *extra]


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(("head.", "pre_logits."))}


# ---- the loading rule ---------------------------------------------------------------------------------
def test_init_from_copies_matching_tensors_and_reports_the_rest():
    src = _source_model()
    model = mbt_fast.MBT(dataclasses.replace(TINY, num_classes=8))
    report = init_from(model, src)
    got, want = model.state_dict(), src.state_dict()
    for name in ("blocks.1.rgb.attn.qkv.weight", "blocks.3.spectrogram.mlp.fc2.bias", "pos_embed_rgb",
                 "pos_embed_spectrogram", "bottleneck", "embed_rgb.weight", "encoder_norm.weight"):
        assert torch.equal(got[name], want[name]), name
    assert all(torch.equal(got[k], want[k]) for k in _backbone(got))
    assert torch.equal(got["head.weight"], torch.zeros(8, 64)) and torch.equal(got["head.bias"], torch.zeros(8))
    assert report["loaded"] == list(_backbone(got))
    assert report["not_loaded"] == {"head.weight": {"source": [10, 64], "model": [8, 64]},
                                    "head.bias": {"source": [10], "model": [8]}}
    assert report["unused"] == []
    assert report["loaded_params"] == sum(v.numel() for v in _backbone(got).values())
    assert report["total_params"] == report["loaded_params"] + 8 * 64 + 8
    text = format_report(report, "src.safetensors")
    assert text.startswith(f"initialised from src.safetensors: loaded 107 of 109 tensors "
                           f"({report['loaded_params']:,} of {report['total_params']:,} parameters)\n")
    assert "  head.weight: shape [10, 64] in src.safetensors vs [8, 64] in the model\n" in text
    assert text.endswith("  head.bias: shape [10] in src.safetensors vs [8] in the model")

    # the same class count: the head is loaded too
    same = mbt_fast.MBT(TINY)
    assert init_from(same, src)["not_loaded"] == {}
    assert torch.equal(same.head.weight, src.head.weight)

    # a tensor the source lacks (pre_logits) and one the model lacks
    rep_model = mbt_fast.MBT(dataclasses.replace(TINY, representation_size=16))
    report = init_from(rep_model, src)
    assert report["not_loaded"]["pre_logits.weight"] == {"source": None, "model": [16, 64]}
    assert report["not_loaded"]["head.weight"] == {"source": [10, 64], "model": [10, 16]}
    assert "  pre_logits.weight: missing in MODEL\n" in format_report(report, "MODEL")
    back = init_from(mbt_fast.MBT(TINY), rep_model)
    assert back["unused"] == ["pre_logits.bias", "pre_logits.weight"]
    assert format_report(back, "X").endswith("in X but not in the model (ignored): pre_logits.bias, pre_logits.weight")


def test_freeze_backbone_leaves_the_classifier_trainable():
    model = mbt_fast.MBT(dataclasses.replace(TINY, representation_size=16))
    trainable, total = freeze_backbone(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["pre_logits.weight", "pre_logits.bias", "head.weight", "head.bias"]
    assert trainable == 16 * 64 + 16 + 10 * 16 + 10 and total == sum(p.numel() for p in model.parameters())


# ---- the command --------------------------------------------------------------------------------------
def test_finetune_from_safetensors_learns_the_new_classes(tmp_path, source, caplog):
    path, _ = source
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="mbt_fast.train.trainer")
    # a clean signal: no mixup, smoothing or stochastic depth; adamw reaches the task fast
    assert cli_main(_args(out, "--init-from", str(path), "--steps", "40", "--batch-size", "16", "--train-size",
                          "256", "--optimizer", "adamw", "--lr", "1e-3", "--mixup-alpha", "0",
                          "--label-smoothing", "0", "--droplayer", "0", "--ckpt-every", "0")) == 0
    report = next(m for m in caplog.messages if m.startswith("initialised from"))
    assert report.startswith(f"initialised from {path}: loaded 107 of 109 tensors")
    assert f"  head.weight: shape [10, 64] in {path} vs [8, 64] in the model" in report
    n = sum(p.numel() for p in mbt_fast.MBT(dataclasses.replace(TINY, num_classes=8)).parameters())
    assert f"{n:,} of {n:,} parameters are trainable" in caplog.messages
    losses = _losses(out)
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.15, f"the loss did not fall: first 5 {first:.3f}, last 5 {last:.3f}"
    model = mbt_fast.MBT.from_pretrained(out / "model.safetensors")
    assert model.cfg == dataclasses.replace(TINY, num_classes=8, stochastic_droplayer_rate=0.0)
    assert model.multi_label is False and model.class_names is None  # synthetic classes have no names


def test_scenic_checkpoint_with_a_frozen_backbone(tmp_path, caplog):
    ckpt, cfg_json = tmp_path / "checkpoint_7", tmp_path / "config.json"
    write_scenic_checkpoint(ckpt, scenic_param_tree(SCENIC_CFG))
    cfg_json.write_text(json.dumps(SCENIC_CFG.to_dict()))
    want = mbt_fast.load_scenic_checkpoint(ckpt, SCENIC_CFG).state_dict()
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="mbt_fast.train.trainer")
    # weight decay and clipping apply to the trainable parameters alone
    assert cli_main(_args(out, "--init-from", str(ckpt), "--init-config", str(cfg_json), "--freeze-backbone",
                          "--weight-decay", "0.01", "--grad-clip", "0.1")) == 0
    assert f"  head.weight: shape [3, 32] in {ckpt} vs [8, 32] in the model" in \
        next(m for m in caplog.messages if m.startswith("initialised from"))
    n = sum(v.numel() for v in _backbone(want).values()) + 8 * 32 + 8
    assert f"264 of {n:,} parameters are trainable (--freeze-backbone: the classifier alone)" in caplog.messages
    tensors, meta = read_checkpoint(out / "checkpoint.safetensors")
    got = model_state(tensors)
    assert all(torch.equal(got[k], want[k]) for k in _backbone(want))  # bit-identical after 4 steps
    assert got["head.weight"].abs().sum() > 0 and got["head.bias"].abs().sum() > 0  # trained from zero
    # the optimizer holds the two head tensors alone
    assert sorted(k for k in tensors if k.startswith("optim.")) == ["optim.0.momentum_buffer", "optim.1.momentum_buffer"]
    assert meta["trainer"]["train_config"]["freeze_backbone"] is True


def test_resume_continues_from_the_run_checkpoint(tmp_path, source, capsys):
    path, _ = source
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert cli_main(_args(straight, "--init-from", str(path))) == 0
    assert cli_main(_args(run, "--init-from", str(path), "--stop-after", "2")) == 0
    saved = json.loads(
        safe_open(str(run / "checkpoint.safetensors"), "pt").metadata()["mbt_fast_trainer"])["trainer"]
    assert saved["train_config"]["run_args"]["init_from"] == str(path.resolve())
    assert saved["train_config"]["run_args"]["preset"] is None
    # the resume does not read MODEL again: its weights are in the run's checkpoint
    path.rename(tmp_path / "moved.safetensors")
    assert cli_main(_args(run, "--init-from", str(path), "--resume")) == 0
    assert _losses(run) == _losses(straight)
    capsys.readouterr()

    other = tmp_path / "other.safetensors"
    msg = _error(capsys, _args(run, "--init-from", str(other), "--resume"))
    assert f"  init_from: {str(path.resolve())!r} -> {str(other.resolve())!r}\n" in msg
    msg = _error(capsys, _args(run, "--init-from", str(path), "--freeze-backbone", "--resume"))
    assert "  freeze_backbone: False -> True\n" in msg
    # a plain run resumed as a fine-tune (and the other way round) is refused too
    msg = _error(capsys, _args(run, "--resume"))
    assert f"  init_from: {str(path.resolve())!r} -> None\n" in msg and "  preset: None -> 'tiny'\n" in msg


def test_folder_classes_size_the_head_and_are_saved(tmp_path, source):
    path, _ = source
    root = tmp_path / "videos"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            write_clip(root / c / f"{i}.mp4", seconds=1.0, tone_hz=400.0 + 300 * i)
    out = tmp_path / "run"
    assert cli_main(["train", "--init-from", str(path), "--data-dir", str(root), "--steps", "2", "--batch-size",
                     "2", "--num-workers", "0", "--no-progress", "--threads", "1", "--out", str(out)]) == 0
    model = mbt_fast.MBT.from_pretrained(out / "model.safetensors")
    assert model.cfg.num_classes == 2 and model.class_names == ["cat", "dog"] and model.multi_label is False


# ---- bad input ----------------------------------------------------------------------------------------
def test_bad_input_exits_2_naming_the_file(tmp_path, source, capsys):
    path, _ = source
    out = tmp_path / "run"
    missing = tmp_path / "nope.safetensors"
    assert _error(capsys, _args(out, "--init-from", str(missing))).startswith(
        f"mbt-fast train: --init-from: {missing}: does not exist")
    ckpt = tmp_path / "checkpoint_7"
    write_scenic_checkpoint(ckpt, scenic_param_tree(SCENIC_CFG))
    assert _error(capsys, _args(out, "--init-from", str(ckpt))) == (
        f"mbt-fast train: --init-from {ckpt}: not a safetensors file; a Scenic checkpoint needs its config: "
        f"--init-config CONFIG.json (Scenic's model fields and input_shapes, as for `mbt-fast convert --config`)")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(dataclasses.replace(SCENIC_CFG, hidden_size=48, num_heads=2).to_dict()))
    msg = _error(capsys, _args(out, "--init-from", str(ckpt), "--init-config", str(wrong)))
    assert msg.startswith(f"mbt-fast train: {ckpt} does not match the model configuration:") and "mis-shaped" in msg
    # flags that do not go together
    assert _error(capsys, _args(out, "--init-from", str(path), "--preset", "tiny")) == (
        f"mbt-fast train: --preset and --init-from exclude each other: with --init-from {path} the architecture "
        f"is that model's config (num_classes from the data); drop --preset tiny")
    assert _error(capsys, _args(out, "--freeze-backbone")) == (
        "mbt-fast train: --freeze-backbone trains the classifier alone; without --init-from MODEL the backbone "
        "would stay at its random initialisation")
    assert _error(capsys, _args(out, "--init-config", str(wrong))) == (
        f"mbt-fast train: --init-config {wrong} is the config of a Scenic --init-from checkpoint; pass --init-from too")
    assert not out.exists()  # refused before anything is written


# ---- DDP ----------------------------------------------------------------------------------------------
def test_frozen_backbone_under_torchrun(tmp_path):
    # one modality: the bottleneck is never used; frozen, DDP ignores it, so find_unused_parameters is off
    # (were it trainable and the flag off, the second step would fail: DDP waits for its gradient)
    src = _source_model(dataclasses.replace(TINY, modality_fusion=("rgb",), input_shapes={"rgb": (-1, 8, 32, 32, 3)}))
    assert src.bottleneck is not None
    path = tmp_path / "rgb.safetensors"
    src.save_pretrained(path)
    out = tmp_path / "ddp"
    torchrun_cli(*_args(out, "--init-from", str(path), "--freeze-backbone", "--steps", "3", "--device", "cpu"))
    tensors, meta = read_checkpoint(out / "checkpoint.safetensors")
    assert meta["trainer"]["world_size"] == 2 and meta["trainer"]["step"] == 3
    got, want = model_state(tensors), src.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in _backbone(want))
    assert not torch.equal(got["head.weight"], torch.zeros_like(got["head.weight"]))
