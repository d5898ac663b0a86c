"""Benchmarks (smoke runs at tiny sizes on the CPU, CSV columns) and the performance model (hand-computed
counts, the ``mbt-fast bench model --json`` structure)."""
import contextlib
import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import bench_attention, bench_block, bench_profile, bench_train, common  # noqa: E402
from mbt_fast import perf_model  # noqa: E402


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _by(rows, **kw):
    return [r for r in rows if all(r[k] == v for k, v in kw.items())]


# ---- benchmark scripts ----------------------------------------------------------------------------------
def test_bench_attention_smoke(tmp_path):
    bench_attention.main(["--device", "cpu", "--tokens", "5,9", "--batch", "2", "--n-bottleneck", "2",
                          "--providers", "eager", "sdpa", "flex", "flash_attn", "triton", "triton_autotune", "cuda",
                          "--modes", "fwd", "fwd+bwd", "--warmup", "0", "--reps", "3", "--out", str(tmp_path)])
    cols, rows = _read(tmp_path / "attention.csv")
    assert cols == bench_attention.COLUMNS
    assert len(rows) == 14
    assert all(r["status"].startswith("unavailable:") for r in _by(rows, provider="triton_autotune"))
    for p in ("eager", "sdpa"):
        for r in _by(rows, provider=p):
            assert r["status"] == "ok", r
            assert r["measurement"] == "CPU measurement" and r["device"] == "cpu" and r["dtype"] == "float32"
            assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
            assert float(r["tflops"]) > 0 and float(r["gbps"]) > 0
            assert r["peak_mem_mb"] == "" and r["mem_method"].startswith("n/a")
            assert r["torch"] == torch.__version__ and r["commit"]
    assert _by(rows, provider="flash_attn")[0]["status"].startswith("unavailable:")
    assert _by(rows, provider="cuda")[0]["status"].startswith("unavailable:")
    assert _by(rows, provider="flex", mode="fwd+bwd")[0]["status"].startswith("unavailable:")
    triton = _by(rows, provider="triton")
    if os.environ.get("TRITON_INTERPRET") == "1":  # tests/conftest.py sets it: the interpreter runs, labelled
        assert all(r["status"] == "ok" and r["measurement"] == "interpreter" for r in triton), triton
    else:
        assert all(r["status"].startswith("unavailable:") for r in triton), triton
    assert (tmp_path / "attention.png").is_file()


def test_bench_attention_providers_agree():
    """The providers compute the same attention (a benchmark of a wrong kernel is worthless)."""
    layout, seg = bench_attention.layout_segments((5, 9), 2)
    n = layout.total_rows
    q, k, v = (torch.randn(n, 2, 2, 32, dtype=torch.float64) for _ in range(3))
    ref = bench_attention.make_eager(seg, n, torch.device("cpu"), torch.float64, "fwd")[0](q, k, v)
    for p in ("sdpa", "flex"):
        try:
            fn = bench_attention.MAKERS[p](seg, n, torch.device("cpu"), torch.float64, "fwd")[0]
            out = fn(q, k, v)
        except bench_attention.Unavailable as e:
            pytest.skip(f"{p}: {e}")
        err = (out - ref).abs().max().item()
        assert err < 1e-6, f"{p}: max|out - eager| = {err:.3e}"


def test_bench_block_smoke(tmp_path):
    bench_block.main(["--device", "cpu", "--tokens", "5,9", "--batch", "1", "--hidden", "32", "--heads", "1",
                      "--mlp-dim", "64", "--n-bottleneck", "2", "--providers", "reference", "torch", "cuda",
                      "--modes", "fwd", "fwd+bwd", "--warmup", "0", "--reps", "3", "--no-plot", "--out", str(tmp_path)])
    cols, rows = _read(tmp_path / "block.csv")
    assert cols == bench_block.COLUMNS
    assert len(rows) == 6
    for r in rows:
        if r["provider"] == "cuda":
            assert r["status"].startswith("unavailable:")
        else:
            assert r["status"] == "ok", r
            assert float(r["tflops"]) > 0 and float(r["gbps"]) > 0 and r["measurement"] == "CPU measurement"


def test_block_reference_equals_packed():
    """The two paths the block benchmark times are the same fusion layer."""
    from mbt_fast.layers import LayerPlan, packed_block

    layout, seg = bench_attention.layout_segments((5, 9), 2)
    blocks = bench_block.make_blocks(2, 32, 2, 64, "cpu", torch.float64)
    xs = [torch.randn(2, t, 32, dtype=torch.float64) for t in (5, 9)]
    bot = torch.randn(2, 2, 32, dtype=torch.float64)
    outs, new_bot = bench_block.reference_layer(blocks, xs, bot)
    x = torch.cat([xs[0].transpose(0, 1), bot.transpose(0, 1), xs[1].transpose(0, 1), bot.transpose(0, 1)])
    y = packed_block(blocks, x, layout, LayerPlan(seg, "mean"), layout.row_weight(), "torch")
    for m in range(2):
        assert torch.allclose(y[layout.modality_rows(m)].transpose(0, 1), outs[m], atol=1e-10)
        assert torch.allclose(y[layout.bottleneck_rows(m)].transpose(0, 1), new_bot, atol=1e-10)


def test_bench_train_smoke(tmp_path):
    bench_train.main(["--device", "cpu", "--preset", "tiny", "--batch", "2", "--backends", "reference", "torch", "cuda",
                      "--warmup", "0", "--reps", "3", "--no-plot", "--out", str(tmp_path)])
    cols, rows = _read(tmp_path / "train.csv")
    assert cols == bench_train.COLUMNS
    assert len(rows) == 6  # 3 backends x (eager, compile)
    eager = {r["backend"]: r for r in rows if r["compile"] == "False"}
    assert eager["reference"]["status"] == "ok" and eager["torch"]["status"] == "ok"
    assert float(eager["reference"]["speedup_vs_reference"]) == 1.0
    ratio = float(eager["reference"]["median_ms"]) / float(eager["torch"]["median_ms"])
    assert math.isclose(float(eager["torch"]["speedup_vs_reference"]), ratio, rel_tol=1e-4)
    assert eager["cuda"]["status"].startswith("unavailable:")
    assert all(r["status"].startswith("skipped:") for r in rows if r["compile"] == "True" and r["backend"] != "cuda")


def test_bench_attention_forced_sdpa_and_the_backend_that_ran(tmp_path):
    """SDPA held to one implementation runs it or says why not, and every row names what ran."""
    bench_attention.main(["--device", "cpu", "--tokens", "5,9", "--batch", "2", "--n-bottleneck", "2",
                          "--providers", "eager", "sdpa", "sdpa_flash", "sdpa_efficient", "--modes", "fwd", "bwd",
                          "--warmup", "0", "--reps", "3", "--no-plot", "--out", str(tmp_path)])
    _, rows = _read(tmp_path / "attention.csv")
    got = {(r["provider"], r["mode"]): (r["status"].split(":")[0], r["sdpa_backend"]) for r in rows}
    for mode in ("fwd", "bwd"):
        assert got[("eager", mode)] == ("ok", "none")
        assert got[("sdpa", mode)] == got[("sdpa_flash", mode)] == ("ok", "flash (CPU)")  # what SDPA picks on a CPU
        assert got[("sdpa_efficient", mode)][0] == "unavailable"  # no memory-efficient kernel on a CPU


def test_bench_attention_times_every_provider_and_mode_of_a_shape_round_robin(tmp_path, monkeypatch):
    """On a CPU one interleaved timing covers all (mode, provider) cases of a shape: a slow first mode or
    load from another process cannot land on one of them alone (the old forward-row artefact)."""
    calls = []
    real = common.time_interleaved

    def spy(fns, device, warmup, reps):
        calls.append(len(fns))
        return real(fns, device, warmup, reps)

    monkeypatch.setattr(common, "time_interleaved", spy)
    bench_attention.main(["--device", "cpu", "--tokens", "5,9", "7,3", "--batch", "1", "--n-bottleneck", "2",
                          "--providers", "eager", "sdpa", "--warmup", "0", "--reps", "3", "--no-plot", "--out", str(tmp_path)])
    assert calls == [6, 6]  # per shape: 2 providers x 3 modes, timed together


def test_op_classes_of_real_kernel_names():
    """The profiler's kernel names land in the perf model's op classes (names from H100 / A100 traces and
    from this project's kernels); a new name falls to ``other`` rather than into a wrong class."""
    cases = {"sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "gemm",
             "nvjet_tst_192x128_64x4_2x1_v_bz_coopA_TNT": "gemm", "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_tn": "gemm",
             "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>": "attention",
             "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "attention", "cudnn_generated_fort_native_sdpa_sm90": "attention",
             "_mbt_attention_bwd_dq_kernel": "attention", "_segment_layernorm_fwd_kernel": "layernorm",
             "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>": "layernorm",
             "_bias_gelu_bwd_kernel": "elementwise", "_residual_mean_fwd_kernel": "elementwise",
             "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>": "elementwise",
             "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>": "reduction",
             "void at::native::(anonymous namespace)::CatArrayBatchedCopy<float>": "copy",
             "Memcpy HtoD (Pageable -> Device)": "copy", "Memset (Device)": "fill",
             "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<SGD>": "optimizer",
             "triton_poi_fused_add_mul_0": "fused_pointwise", "triton_red_fused_native_layer_norm_1": "fused_pointwise",
             "aten::addmm": "gemm", "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
             "aten::view": "host", "aten::slice_backward": "copy", "some_new_kernel": "other"}
    got = {name: bench_profile.classify(name) for name in cases}
    assert got == cases, {k: (v, cases[k]) for k, v in got.items() if v != cases[k]}


def test_profile_model_takes_the_gpus_code_paths():
    """The profile's model column counts the step on the profiled GPU's paths: on an H100 the grouped
    GEMM of fc1 (its bytes differ from the per-segment count), on an A100 the per-segment GEMMs."""
    from mbt_fast.config import MBTConfig

    cfg = MBTConfig.preset("tiny")
    gemm = {g: bench_profile.model_by_class(cfg, 2, "triton", g)["gemm"] for g in ("h100", "a100")}
    per_segment = perf_model.count_step(cfg, 2, "triton", amp=True).by_class("h100")["gemm"]
    grouped = perf_model.count_step(cfg, 2, "triton", amp=True, gpu="h100").by_class("h100")["gemm"]
    assert grouped["hbm_bytes"] != per_segment["hbm_bytes"]
    assert gemm["h100"] == grouped
    assert gemm["a100"]["hbm_bytes"] == per_segment["hbm_bytes"]


def test_sdpa_backends_names_what_ran():
    q = torch.randn(1, 2, 8, 16)
    assert common.sdpa_backends(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) == "flash (CPU)"
    assert common.sdpa_backends(lambda: q @ q.transpose(-1, -2)) == "none"


def test_quantiles():
    t = common.time_fn(lambda: None, torch.device("cpu"), warmup=0, reps=5)
    assert t["reps"] == 5 and t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]
    assert common._quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)


# ---- performance model: hand-computed counts ------------------------------------------------------------
def test_attention_cost_by_hand():
    # two segments of a packed layout: (0, 406) and (406, 3548), B=8, H=12, D=64, bf16
    seg = [(0, 406, 0, 406), (406, 3548, 406, 3548)]
    B, H, D = 8, 12, 64
    fl = 4 * B * H * D * (406 ** 2 + 3142 ** 2)
    assert perf_model.attention_flops(seg, B, H, D) == fl
    fwd = perf_model.attention_cost(seg, B, H, D, 2, "fwd")
    qkvo = 4 * 3548 * B * H * D * 2  # q, k, v read once, out written once
    lse = 4 * B * H * 3548
    assert (fwd.tc_flops, fwd.bytes, fwd.launches) == (fl, qkvo + lse, 1)
    bwd = perf_model.attention_cost(seg, B, H, D, 2, "bwd")
    t = 3548 * B * H * D * 2  # one [N, B, H, D] bf16 tensor
    # preprocess: o, dO, delta; dK/dV: q, dO, k, v, lse, delta -> dk, dv; dQ: q, dO, k, v, lse, delta -> dq
    assert bwd.bytes == (2 * t + lse) + (6 * t + 2 * lse) + (5 * t + 2 * lse)
    assert bwd.tc_flops == 2.5 * fl and bwd.launches == 3
    # H100, central: compute-bound at the triton design's rate (0.8 x the Triton anchor at each segment's
    # length, FLOP-weighted) + 4 us; the scenarios move it to its low / high fractions
    a406 = 340.0  # 406 tokens: below the first anchor point (512), clamped to it
    rate = (406 ** 2 + 3142 ** 2) / (406 ** 2 / a406 + 3142 ** 2 / 396.0)
    assert fwd.anchor_tflops["h100"] == pytest.approx(rate)
    s, dom = fwd.time_s("h100")
    assert dom == "compute" and s == pytest.approx(fl / (0.8 * rate * 1e12) + 4e-6)
    lo, hi = (fwd.time_s("h100", eff=perf_model.scenario(level))[0] for level in ("high", "low"))
    assert lo == pytest.approx(fl / (0.95 * rate * 1e12) + 2.5e-6) and hi == pytest.approx(fl / (0.6 * rate * 1e12) + 5e-6)


def test_layernorm_counts_by_hand():
    # aten: F.layer_norm of bf16 [N*B, C] with affine weights on meta -> one native_layer_norm
    rows, C = 3548 * 8, 768
    counter = perf_model.Counter()
    x = torch.empty(rows, C, dtype=torch.bfloat16, device="meta")
    w = torch.empty(C, dtype=torch.bfloat16, device="meta")
    with perf_model.AtenCounter(counter):
        F.layer_norm(x, (C,), w, w, 1e-6)
    assert len(counter.ops) == 1, [o.name for o in counter.ops]
    op = counter.ops[0]
    # read x + weight + bias (bf16), write y (bf16) + mean and rstd (fp32)
    assert op.name == "native_layer_norm" and op.launches == 1
    assert op.bytes == 2 * rows * C + 2 * 2 * C + 2 * rows * C + 2 * 4 * rows
    t, dom = op.time_s("h100")
    assert dom == "memory" and t == pytest.approx(op.bytes / (0.85 * 3.35e12) + 4e-6)  # central bandwidth efficiency
    # fused segment LayerNorm forward: x + out once, M=2 weight/bias sets, int32 row table, fp32 stats
    fused = perf_model.layernorm_cost(rows, C, 2, 2, 2, "fwd")
    assert fused.bytes == 2 * rows * C * 2 + 2 * 2 * C * 2 + 4 * rows + 2 * 4 * rows and fused.launches == 1


def test_gemm_and_free_ops_by_hand():
    counter = perf_model.Counter()
    a = torch.empty(64, 32, device="meta")
    b = torch.empty(32, 16, device="meta")
    with perf_model.AtenCounter(counter):
        c = a @ b
        c.t().reshape(-1)[:10]  # transpose is a view; reshape of a transposed tensor copies once
        torch.empty(5, device="meta")
    names = [o.name for o in counter.ops]
    assert names == ["mm", "clone"], names
    mm = counter.ops[0]
    assert mm.tc_flops == 2 * 64 * 32 * 16 and mm.bytes == 4 * (64 * 32 + 32 * 16 + 64 * 16)


def test_torch_backend_sdpa_is_flash():
    """On the torch backend the per-segment SDPA is costed as flash (no N x N) and counted per segment."""
    from mbt_fast import ops

    seg = [(0, 7, 0, 7), (7, 20, 7, 20)]
    q = torch.empty(20, 2, 3, 32, device="meta", dtype=torch.bfloat16, requires_grad=True)
    counter = perf_model.Counter()
    with perf_model.counting(counter, "torch"):
        ops.mbt_attention(q, q, q, seg, backend="torch").sum().backward()
    att = [o for o in counter.ops if o.cls == "attention"]
    assert [o.name for o in att] == ["sdpa_flash:mbt_attention_fwd"] * 2 + ["sdpa_flash:mbt_attention_bwd"] * 2
    assert sum(o.tc_flops for o in att) == 3.5 * perf_model.attention_flops(seg, 2, 3, 32)
    assert not any(o.cls == "softmax" for o in counter.ops)


# ---- mbt-fast bench model --json ------------------------------------------------------------------------
def _cli_json(argv):
    from mbt_fast.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return json.loads(buf.getvalue())  # exactly one JSON object, nothing else on stdout


REQUIRED = ("triton_over_reference", "triton_over_torch", "torch_over_reference", "cuda_over_reference", "cuda_over_torch",
            "triton_over_eager_sdpa", "cuda_over_eager_sdpa", "triton_over_eager_sdpa_compile")


def test_bench_model_json_structure():
    d = _cli_json(["bench", "model", "--preset", "tiny", "--batch", "2", "--json"])
    assert d["preset"] == "tiny" and d["batch"] == 2 and d["label"] == "model estimate"
    assert set(d["backends"]) == {"reference", "eager_sdpa", "eager_sdpa_compile", "torch", "triton", "cuda"}
    for r in d["backends"].values():
        assert r["flops"] > 0 and r["hbm_bytes"] > 0 and r["launches"] > 0
        assert set(r["est_ms"]) == {"a100", "h100"} and all(v > 0 for v in r["est_ms"].values())
        for g in ("a100", "h100"):
            lo, hi = r["est_ms_range"][g]
            assert lo <= r["est_ms"][g] <= hi, (g, lo, r["est_ms"][g], hi)
    for k in REQUIRED:
        assert set(d["speedup"][k]) == {"a100", "h100", "a100_range", "h100_range"}
        for g in ("a100", "h100"):
            lo, hi = d["speedup"][k][f"{g}_range"]
            assert lo <= d["speedup"][k][g] <= hi, (k, g, lo, d["speedup"][k][g], hi)
    s = d["speedup"]["triton_over_torch"]["h100"]
    assert s == pytest.approx(d["backends"]["torch"]["est_ms"]["h100"] / d["backends"]["triton"]["est_ms"]["h100"])
    assert set(d["efficiency"]["attention"]) == {"sdpa_flash", "triton", "cuda"}
    assert "autocast" in d["precision"]


def test_autocast_emulation_runs_layernorm_in_fp32_and_gemms_in_bf16():
    counter = perf_model.Counter()
    lin = torch.nn.Linear(16, 32, device="meta")
    ln = torch.nn.LayerNorm(32, device="meta")
    x = torch.empty(8, 16, device="meta")
    with perf_model.counting(counter, "torch", amp=True):
        h = lin(x)
        y = ln(h)
        z = lin(x)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.float32
    names = [o.name for o in counter.ops]
    # x and the weight and bias cast once each (the parameter casts are cached for the second call)
    assert names.count("_to_copy") == 3 + 1 + 1, names  # + x again, + h up to fp32 for the LayerNorm
    assert z.dtype == torch.bfloat16


def test_compile_fusion_merges_a_pointwise_run_and_drops_its_intermediates():
    counter = perf_model.Counter()
    a = torch.empty(1024, 1024, device="meta")
    w = torch.empty(1024, 1024, device="meta")
    with perf_model.AtenCounter(counter):
        b = (a * 2 + 1).relu()  # three pointwise kernels eagerly, one compiled
        c = b @ w
    fused = perf_model.compile_fusion(counter)
    assert [o.cls for o in counter.ops] == ["elementwise"] * 3 + ["gemm"]
    assert [o.cls for o in fused.ops] == ["fused_pointwise", "gemm"] and fused.ops[0].launches == 1
    mib4 = 1024 * 1024 * 4
    assert fused.ops[0].bytes == 2 * mib4  # a read once, b written once (the gemm reads it); no intermediates
    assert c.shape == (1024, 1024)


def test_bench_model_mbt_base():
    """MBT-B at batch 8 on the meta device: fast, and the counts match the analytic totals."""
    d = _cli_json(["bench", "model", "--preset", "mbt_base_16x2", "--batch", "8", "--json"])
    b = d["backends"]
    # analytic: GEMMs 24*C^2 FLOPs per row per layer x3 (fwd+bwd), attention 4*B*H*n^2*D x3.5 (flash) per layer
    rows = 406 + 3142
    gemm = 3 * 24 * 768 ** 2 * rows * 8 * 12
    attn = 3.5 * 12 * 4 * 8 * 12 * 64 * (406 ** 2 + 3142 ** 2)
    assert b["triton"]["flops"] == pytest.approx(gemm + attn, rel=0.03)
    # the reference materialises N x N scores; the fused backend moves the fewest bytes in the fewest launches
    assert b["reference"]["hbm_bytes"] > b["torch"]["hbm_bytes"] > b["triton"]["hbm_bytes"]
    assert b["torch"]["launches"] > b["triton"]["launches"]
    assert b["eager_sdpa_compile"]["launches"] < b["eager_sdpa"]["launches"]
    assert b["eager_sdpa_compile"]["hbm_bytes"] < b["eager_sdpa"]["hbm_bytes"]
    assert d["speedup"]["triton_over_torch"]["h100"] > 1 and d["speedup"]["triton_over_reference"]["h100"] > 1
    # the attention design classes order the fused backends: cuda's kernel is the first-version design
    assert d["speedup"]["cuda_over_eager_sdpa"]["h100"] < d["speedup"]["triton_over_eager_sdpa"]["h100"]


def test_bench_model_text_is_labelled(capsys):
    from mbt_fast.cli import main

    assert main(["bench", "model", "--preset", "tiny", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "model estimate" in out.splitlines()[0]
    assert "triton_over_torch" in out and "fraction" in out


def test_bench_data_tiny(tmp_path):
    """``mbt-fast bench data --tiny``: the clip is generated, every stage is timed, the seek path is used."""
    from bench import bench_data
    from mbt_fast.commands.bench import main as bench_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench_main(["bench", "data", "--tiny", "--reps", "1", "--warmup", "0", "--batch", "2", "--json",
                           "--out", str(tmp_path)]) == 0
    res = json.loads(out.getvalue())
    assert res["measurement"] == "CPU measurement"
    rows = {(r["op"], r["mode"]): r for r in res["rows"]}
    assert set(rows) == {("full_decode", "-"), ("item", "train"), ("item", "eval"), ("prepared", "train"),
                         ("prepared", "eval")}
    full = rows[("full_decode", "-")]
    assert full["frames_in_file"] == 30 and full["median_ms"] > 0
    for m in ("train", "eval"):
        r = rows[("item", m)]
        assert r["measurement"] == "CPU measurement" and r["decode_path"] == "seek=1", r
        assert 0 < r["frames_decoded"] < r["frames_in_file"]  # a 1.2 s clip of a 2 s file, keyframes every 0.5 s
        assert all(r[f"{s}_ms"] > 0 for s in bench_data.STAGES), r
        assert math.isclose(r["ratio_vs_full_decode"], (r["median_ms"] + r["collate_ms"]) / full["median_ms"])
        p = rows[("prepared", m)]
        assert p["decode_path"] == "prepared" and p["prepare_s"] > 0 and p["clips_per_s"] > 0
        assert math.isclose(p["speedup_vs_video_item"], (r["median_ms"] + r["collate_ms"]) /
                            (p["median_ms"] + p["collate_ms"]))
    assert res["resize"]["uint8_bilinear_max"] <= 1.0 + 1e-9 < res["resize"]["swscale_bilinear_max"]
    cols, csv_rows = _read(tmp_path / "data.csv")
    assert cols == bench_data.COLUMNS and len(csv_rows) == 5
    md = (tmp_path / "data.md").read_text()
    assert "CPU measurement" in md and "Prepared cache" in md and "collated in a DataLoader worker" in md


# ---- mbt-fast bench gpu ---------------------------------------------------------------------------------
def _summary_statuses(md: str) -> dict:
    from bench import bench_gpu

    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in md.splitlines() if ln.startswith("|")]
    return {r[0]: r[1] for r in rows if r[0] in bench_gpu.STEPS}


def test_bench_gpu_dry_run(tmp_path):
    """``mbt-fast bench gpu --dry-run`` through the CLI: every step runs (or is skipped with its reason) on
    the CPU, with the real scripts, and leaves env.json, summary.md and one result file per bench step."""
    import xml.etree.ElementTree as ET

    from bench import bench_gpu
    from mbt_fast.cli import main

    out = tmp_path / "gpu"
    assert main(["bench", "gpu", "--dry-run", "--out", str(out)]) == 0  # 0: no step failed
    env = json.loads((out / "env.json").read_text())
    assert env["dry_run"] is True and env["label"] == bench_gpu.DRY_LABEL and env["gpu"] is None
    assert env["torch"] == torch.__version__ and env["commit"] and env["commit_full"]
    assert any(ln.startswith("backends:") for ln in env["mbt_fast_info"]), env["mbt_fast_info"]
    md = (out / "summary.md").read_text()
    assert bench_gpu.DRY_LABEL in md.splitlines()[0]
    status = _summary_statuses(md)
    assert list(status) == list(bench_gpu.STEPS), md
    assert all(status[s] == "ok" for s in bench_gpu.STEPS), md  # build_cuda: the CPU emulation
    suite = ET.parse(out / "pytest_gpu.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("failures")) == int(suite.get("errors")) == 0
    for stem, module in (("attention", bench_attention), ("block", bench_block), ("train", bench_train)):
        cols, rows = _read(out / f"{stem}.csv")
        assert cols == module.COLUMNS and (out / f"{stem}.log").is_file()
        assert any(r["status"] == "ok" for r in rows), rows
        assert not [r for r in rows if r["status"].startswith("error")], [r["status"] for r in rows]
        assert {r["measurement"] for r in rows} <= {"CPU measurement", "interpreter"} and {r["device"] for r in rows} == {"cpu"}
    _, train = _read(out / "train.csv")
    assert {r["backend"] for r in train} == set(bench_train.BACKENDS) and {r["batch"] for r in train} == {"2", "3"}
    assert [r["compile"] for r in train] == ["False"] * 10 + ["True"] * 10  # eager rows first (see bench_train.run)
    assert {r["sdpa_backend"] for r in _by(train, backend="eager_sdpa", compile="False")} == {"flash (CPU)"}
    _, att = _read(out / "attention.csv")
    assert _by(att, provider="sdpa_efficient")[0]["status"].startswith("unavailable: SDPA EFFICIENT_ATTENTION")
    # the report: every section from the steps' files, labelled; the op-class table from profile.csv
    rep = json.loads((out / "report.json").read_text())
    assert rep["label"] == bench_gpu.DRY_LABEL and rep["model_gpu"] == "h100" and (out / "report.png").is_file()
    assert [s["name"] for s in rep["steps"]] == list(bench_gpu.STEPS)
    assert {r["backend"] for r in rep["train"]} >= {"eager_sdpa", "torch", "eager_sdpa+compile"}
    row = next(r for r in rep["train"] if r["backend"] == "eager_sdpa" and r["batch"] == 2)
    assert row["model_ms"] and row["model_range_ms"][0] <= row["model_ms"] <= row["model_range_ms"][1]
    assert row["measured_over_model"] == pytest.approx(row["measured_ms"] / row["model_ms"])
    total = next(r for r in rep["profile"] if r["backend"] == "torch" and r["op_class"] == "total")
    parts = [r for r in rep["profile"] if r["backend"] == "torch" and r["op_class"] not in ("total",)]
    assert total["measured_ms"] == pytest.approx(sum(r["measured_ms"] for r in parts), rel=1e-3)
    assert {"gemm", "attention", "layernorm"} <= {r["op_class"] for r in parts if r["measured_ms"] > 0}
    assert json.loads((out / "sanitizer.json").read_text())["loss"] > 0
    md = (out / "report.md").read_text()
    for section in ("## Training step", "## Model vs measured per op class", "## Attention", "## Fusion layer",
                    "## compute-sanitizer", "## Failures"):
        assert section in md, section
    assert bench_gpu.DRY_LABEL in md.splitlines()[0] and "not a GPU measurement" in md
    assert _by(train, backend="eager_sdpa", compile="False")[0]["status"] == "ok"
    assert _by(train, backend="triton", compile="False")[0]["measurement"] == "interpreter"


def test_bench_gpu_without_a_gpu_exits_2(tmp_path, monkeypatch, capsys):
    from mbt_fast.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "gpu", "--out", str(tmp_path / "gpu")]) == 2
    assert "no CUDA device visible; use --dry-run to check the command on the CPU" in capsys.readouterr().err
    assert not (tmp_path / "gpu").exists()


@pytest.mark.parametrize("quick", [False, True])
def test_bench_gpu_plan_parses_and_fits(tmp_path, quick):
    """The GPU steps' arguments are valid for the scripts they call (a typo would cost a lent GPU), and
    the GPU budgets fit ~8 minutes. The dry run builds the CPU emulation its sanitizer step executes."""
    import argparse

    from bench import bench_gpu

    steps = bench_gpu.plan(tmp_path, dry_run=False, quick=quick)
    assert [s.name for s in steps] == list(bench_gpu.STEPS)
    assert sum(s.budget_s for s in steps) <= 8 * 60
    dry = {s.name: s for s in bench_gpu.plan(tmp_path, dry_run=True, quick=quick)}
    assert dry["build_cuda"].cmd[-1] == "--emu"
    by_name = {s.name: s for s in steps}
    for name, module, reps in (("attention", bench_attention, 30), ("block", bench_block, 20), ("train", bench_train, 20),
                               ("profile", bench_profile, None)):
        cmd = by_name[name].cmd
        assert cmd[1] == str(REPO / "bench" / f"bench_{name}.py")
        ap = argparse.ArgumentParser()
        module.add_arguments(ap)
        args = ap.parse_args(cmd[2:])
        assert args.out == str(tmp_path) and args.device is None
        assert reps is None or args.reps == (reps // 2 if quick else reps)
    assert by_name["train"].cmd[by_name["train"].cmd.index("--batch") + 1:][:2] == ["8", "32"]
    assert by_name["sanitizer"].cmd[1] == str(REPO / "bench" / "sanitize_cuda.py")
    assert "eager_sdpa" in by_name["train"].cmd and by_name["pytest_gpu"].env == {"TRITON_INTERPRET": "0"}


def test_bench_gpu_a_failing_step_loses_only_itself(tmp_path, monkeypatch):
    """A step past its budget is killed, a crashing step is reported with its last log line, and the
    steps after them still run and are summarised (real subprocesses; only the plan is replaced)."""
    from bench import bench_gpu
    from mbt_fast.cli import main

    py = sys.executable
    write_csv = "import sys; open(sys.argv[1], 'w').write('status\\nok\\nunavailable: no GPU\\n')"

    def plan(out, dry_run, quick):
        return [bench_gpu.Step("env", 20, None, ["env.json"], fn=lambda: bench_gpu.step_env(out, dry_run, quick)),
                bench_gpu.Step("attention", 1, [py, "-c", "import time; time.sleep(60)"], ["attention.csv"]),
                bench_gpu.Step("block", 20, [py, "-c", "print('boom'); raise SystemExit(3)"], ["block.csv"]),
                bench_gpu.Step("train", 20, [py, "-c", write_csv, str(out / "train.csv")], ["train.csv"])]

    monkeypatch.setattr(bench_gpu, "plan", plan)
    t0 = time.perf_counter()
    assert main(["bench", "gpu", "--dry-run", "--out", str(tmp_path)]) == 1  # 1: a step failed
    assert time.perf_counter() - t0 < 40  # the sleeper was killed at its 1 s budget
    md = (tmp_path / "summary.md").read_text()
    assert _summary_statuses(md) == {"env": "ok", "attention": "failed", "block": "failed", "train": "ok"}, md
    assert "timed out after its budget of 1 s" in md and "exit status 3: boom" in md
    assert "2 rows (1 ok, 1 unavailable)" in md
    assert (tmp_path / "env.json").is_file() and (tmp_path / "block.log").read_text().splitlines()[-1] == "boom"
