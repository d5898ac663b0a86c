"""Scenic checkpoint loading: malformed files fail clearly, nothing is unpickled, and the CLI converts."""
import dataclasses
import json

import msgpack
import numpy as np
import pytest
import torch

import mbt_fast
from mbt_fast.cli import main as cli
from mbt_fast.config import MBTConfig
from mbt_fast.convert import CheckpointError, read_msgpack_checkpoint, scenic_name_table
from scenic_oracle import random_inputs, scenic_param_tree, to_torch_inputs, write_scenic_checkpoint

CFG = MBTConfig(hidden_size=32, num_heads=1, mlp_dim=48, num_layers=2, fusion_layer=1, n_bottlenecks=2, num_classes=3,
                input_shapes={"rgb": (-1, 2, 16, 16, 3), "spectrogram": (-1, 32, 16, 3)})


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "checkpoint_7"
    write_scenic_checkpoint(path, scenic_param_tree(CFG))
    return path


def test_bare_params_and_train_state_load_the_same(tmp_path, ckpt):
    params = scenic_param_tree(CFG)
    write_scenic_checkpoint(tmp_path / "bare", params, train_state=False)
    a, b = mbt_fast.load_scenic_checkpoint(ckpt, CFG), mbt_fast.load_scenic_checkpoint(tmp_path / "bare", CFG)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert not a.training


def test_name_table_covers_every_tensor_once():
    for cfg in (CFG, dataclasses.replace(CFG, share_encoder=True), dataclasses.replace(CFG, modality_fusion=("rgb",)),
                dataclasses.replace(CFG, representation_size=8)):
        keys = [e.torch_key for e in scenic_name_table(cfg)]
        assert sorted(keys) == sorted(mbt_fast.MBT(cfg).state_dict()), cfg


def test_truncated_file(tmp_path, ckpt):
    data = ckpt.read_bytes()
    bad = tmp_path / "truncated"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        mbt_fast.load_scenic_checkpoint(bad, CFG)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x04\x95 this is a pickle, never unpickled")
    with pytest.raises(CheckpointError):
        read_msgpack_checkpoint(bad)


def test_object_dtype_is_refused(tmp_path):
    payload = msgpack.packb(([1], "object", b"\x00" * 8), use_bin_type=True)
    bad = tmp_path / "evil"
    bad.write_bytes(msgpack.packb({"x": msgpack.ExtType(1, payload)}, use_bin_type=True))
    with pytest.raises(CheckpointError, match="dtype 'object' is not a numeric checkpoint leaf"):
        read_msgpack_checkpoint(bad)


def test_wrong_config(ckpt):
    with pytest.raises(CheckpointError, match=r"mis-shaped.*expected \(1, 1, 48\)|mis-shaped leaf"):
        mbt_fast.load_scenic_checkpoint(ckpt, dataclasses.replace(CFG, hidden_size=48, mlp_dim=48))
    with pytest.raises(CheckpointError, match="missing .*encoderblock_2"):
        mbt_fast.load_scenic_checkpoint(ckpt, dataclasses.replace(CFG, num_layers=3))


def test_missing_key(tmp_path):
    params = scenic_param_tree(CFG)
    del params["Transformer"]["encoderblock_1_spectrogram"]["MlpBlock_0"]["Dense_1"]["bias"]
    params["extra_head"] = {"kernel": np.zeros((2, 2), np.float32)}
    write_scenic_checkpoint(tmp_path / "c", params)
    with pytest.raises(CheckpointError) as e:
        mbt_fast.load_scenic_checkpoint(tmp_path / "c", CFG)
    assert "missing (1): Transformer/encoderblock_1_spectrogram/MlpBlock_0/Dense_1/bias" in str(e.value)
    assert "unexpected (1): extra_head/kernel" in str(e.value)


def test_wrong_shape(tmp_path):
    params = scenic_param_tree(CFG)
    params["bottleneck"] = np.zeros((1, 4, 32), np.float32)
    write_scenic_checkpoint(tmp_path / "c", params)
    with pytest.raises(CheckpointError, match=r"mis-shaped \(1\): bottleneck: expected \(1, 3, 32\), got \(1, 4, 32\)"):
        mbt_fast.load_scenic_checkpoint(tmp_path / "c", CFG)


def test_cli_convert_roundtrip(tmp_path, ckpt, capsys):
    import json

    config = tmp_path / "config.json"
    config.write_text(json.dumps(CFG.to_dict()))
    out = tmp_path / "model.safetensors"
    assert cli(["convert", str(ckpt), "--config", str(config), "--out", str(out)]) == 0
    assert "parameters" in capsys.readouterr().out
    converted = mbt_fast.MBT.from_pretrained(out)
    direct = mbt_fast.load_scenic_checkpoint(ckpt, CFG)
    inputs = to_torch_inputs(random_inputs(CFG, 2))
    with torch.no_grad():
        assert torch.equal(converted(**inputs), direct(**inputs))
    # a bad checkpoint: non-zero exit with the reason, no traceback
    (tmp_path / "bad").write_bytes(b"\x01\x02")
    assert cli(["convert", str(tmp_path / "bad"), "--config", str(config), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not a readable Flax msgpack checkpoint" in capsys.readouterr().err


def test_cli_info(capsys):
    assert cli(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "reference  available" in out and "cuda " in out


def test_wrong_num_heads_is_named(ckpt):
    """The head split is in the file: a config with another num_heads must not load (it would give
    logits off by ~1e-3 with no error)."""
    with pytest.raises(CheckpointError, match=r"MultiHeadDotProductAttention_0/\w+/kernel has shape \(32, 1, 32\), i.e. 1 heads of 32.*num_heads=2"):
        mbt_fast.load_scenic_checkpoint(ckpt, dataclasses.replace(CFG, num_heads=2))


def test_cli_convert_refuses_to_overwrite_its_input(tmp_path, ckpt, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CFG.to_dict()))
    before = ckpt.read_bytes()
    assert cli(["convert", str(ckpt), "--config", str(config), "--out", str(ckpt)]) == 2
    assert "is one of the inputs" in capsys.readouterr().err
    assert ckpt.read_bytes() == before


@pytest.mark.parametrize("content, match", [
    (b"", "not a readable safetensors file"),
    (b"\x00" * 3, "not a readable safetensors file"),
    (bytes(range(256)) * 4, "not a readable safetensors file"),
    (None, "is a directory"),
])
def test_from_pretrained_bad_file_names_it(tmp_path, content, match):
    path = tmp_path / "m.safetensors"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
        mbt_fast.MBT.from_pretrained(path)
    assert str(path) in str(e.value)


def test_from_pretrained_truncated_file_names_it(tmp_path):
    path = tmp_path / "m.safetensors"
    mbt_fast.MBT(CFG).save_pretrained(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a readable safetensors file") as e:
        mbt_fast.MBT.from_pretrained(path)
    assert str(path) in str(e.value)
