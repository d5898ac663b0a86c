"""MBTConfig validates types, ranges and keys where a config enters, naming the field."""
import dataclasses
import json

import pytest

from mbt_fast.config import MBTConfig

TINY = MBTConfig.preset("tiny")


@pytest.mark.parametrize("field, value, exc, match", [
    ("hidden_size", "64", TypeError, r"hidden_size: expected an int, got '64' \(str\)"),
    ("num_layers", 4.0, TypeError, r"num_layers: expected an int, got 4.0 \(float\)"),
    ("num_heads", True, TypeError, r"num_heads: expected an int, got True \(bool\)"),
    ("use_bottleneck", "false", TypeError, r"use_bottleneck: expected a bool .*got 'false' \(str\)"),
    ("share_encoder", 0, TypeError, r"share_encoder: expected a bool"),
    ("dropout_rate", "0.1", TypeError, r"dropout_rate: expected a number"),
    ("representation_size", 8.5, TypeError, r"representation_size: expected an int or None"),
    ("patches_size", (16.0, 16, 2), TypeError, r"patches_size: expected a list of 3 ints"),
    ("modality_fusion", "rgb", TypeError, r"modality_fusion: expected a list of modality names"),
    ("num_classes", 0, ValueError, r"num_classes: expected >= 1, got 0"),
    ("hidden_size", 0, ValueError, r"hidden_size: expected >= 1, got 0"),
    ("mlp_dim", -4, ValueError, r"mlp_dim: expected >= 1, got -4"),
    ("n_bottlenecks", -1, ValueError, r"n_bottlenecks: expected >= 0"),
    ("representation_size", 0, ValueError, r"representation_size: expected None or >= 1"),
    ("patches_size", (16, 0, 2), ValueError, r"patches_size: expected positive"),
    ("stochastic_droplayer_rate", float("nan"), ValueError, r"stochastic_droplayer_rate: expected a finite rate"),
    ("attention_dropout_rate", 1.0, ValueError, r"attention_dropout_rate: expected a rate in \[0, 1\)"),
    ("input_shapes", {"rgb": (-1, 8, 32, 32, 3), "spectrogram": (-1, 0, 32, 3)}, ValueError,
     r"input_shapes\['spectrogram'\]: expected 4 dims .* positive sizes"),
    ("input_shapes", {"rgb": (-1, 8, 32, 32), "spectrogram": (-1, 64, 32, 3)}, ValueError,
     r"input_shapes\['rgb'\]: expected 5 dims"),
])
def test_bad_field_is_named(field, value, exc, match):
    with pytest.raises(exc, match=match):
        dataclasses.replace(TINY, **{field: value})


def test_flat_config_rejects_typos_and_accepts_scenic_arguments():
    d = TINY.to_dict()
    with pytest.raises(ValueError, match=r"unknown model field\(s\) 'fusion_layers' \(did you mean 'fusion_layer'\?\)"):
        MBTConfig.from_scenic({**d, "fusion_layers": 3})
    # Scenic's own MBT arguments without a meaning here are not typos
    cfg = MBTConfig.from_scenic({**d, "attention_config": {"type": "spacetime"}, "dtype": "float32"})
    assert cfg == TINY
    assert MBTConfig.from_scenic({**d, "fusion_layers": 3}, strict=False) == TINY


def test_nested_config_lists_ignored_model_keys():
    nested = {"model": {**{k: v for k, v in TINY.to_dict().items() if k != "input_shapes"}, "fusion_layerz": 1},
              "dataset_configs": {"num_frames": 8, "crop_size": 32, "num_spec_frames": 1, "spec_shape": [64, 32]},
              "lr": 0.5}
    with pytest.warns(UserWarning, match=r"ignored config.model keys .*'fusion_layerz'"):
        cfg = MBTConfig.from_scenic(nested)
    assert cfg.rgb_shape == (8, 32, 32) and cfg.fusion_layer == TINY.fusion_layer
    with pytest.raises(ValueError, match="fusion_layerz"):
        MBTConfig.from_scenic(nested, strict=True)


@pytest.mark.parametrize("content, match", [
    (b"{not json", r"cannot read an MBT config"),
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", r"cannot read an MBT config"),
    (b"[1, 2]", r"expected a JSON object .* got list"),
    (json.dumps({"hidden_size": "64"}).encode(), r"hidden_size: expected an int"),
])
def test_from_json_names_the_file(tmp_path, content, match):
    path = tmp_path / "cfg.json"
    path.write_bytes(content)
    with pytest.raises((TypeError, ValueError), match=match) as e:
        MBTConfig.from_json(path)
    assert str(path) in str(e.value)


def test_from_json_missing_file_names_it(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.json: cannot read"):
        MBTConfig.from_json(tmp_path / "nope.json")


def test_roundtrip_through_to_dict():
    for name in ("tiny", "mbt_base_16x2", "mbt_base_16x2_rgb"):
        cfg = MBTConfig.preset(name)
        assert MBTConfig.from_scenic(json.loads(json.dumps(cfg.to_dict()))) == cfg
