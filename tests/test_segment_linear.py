"""segment_linear's two paths (one grouped GEMM, one GEMM per segment): same results, one place that
picks, device tables built once, no graph break.

On the CPU ``torch._grouped_mm`` runs fp32 and bf16 (torch loops over the groups), so the grouped path's
plumbing (offsets, weight stacking, bias gather, dX/dW/db) is checked here against the per-segment
path and an fp64 reference; its one-kernel CUDA form (sm_90, bf16) needs a GPU run.
"""
import dataclasses
import importlib
import types

import pytest
import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode

import mbt_fast
from compare import assert_close_2x
from mbt_fast import ops

SL = importlib.import_module("mbt_fast.ops.segment_linear")  # the package re-exports the function

# name: (rows N, segments, number of weight sets, shared: every set is the same tensors)
CASES = {
    "one_segment": (7, ((0, 7, 0),), 1, False),
    "two_modalities": (12, ((0, 5, 0), (5, 12, 1)), 2, False),
    "four_segments_repeated_weights": (13, ((0, 3, 0), (3, 4, 1), (4, 9, 0), (9, 13, 1)), 2, False),
    "unsorted_rows_three_weights": (10, ((6, 10, 2), (0, 2, 1), (2, 6, 0)), 3, False),
    "shared_encoder": (12, ((0, 5, 0), (5, 12, 1)), 2, True),
}


def _inputs(n, n_weights, shared, batch, bias, K=16, O=24, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, batch, K, generator=g, dtype=dtype)
    ws = [torch.randn(O, K, generator=g, dtype=dtype) / 4 for _ in range(n_weights)]
    bs = [torch.randn(O, generator=g, dtype=dtype) for _ in range(n_weights)] if bias else None
    if shared:
        ws = [ws[0]] * n_weights
        bs = [bs[0]] * n_weights if bias else None
    return x, ws, bs


def _run(x, ws, bs, segments, dtype):
    """Output and the gradients of x, every distinct weight and bias (leaves cast to ``dtype``)."""
    x = x.to(dtype).requires_grad_()
    leaves = {id(w): w.to(dtype).requires_grad_() for w in ws + (bs or [])}
    out = ops.segment_linear(x, [leaves[id(w)] for w in ws], [leaves[id(b)] for b in bs] if bs else None, segments)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype))
    return [out, x.grad] + [t.grad for t in leaves.values()]


def _reference(x, ws, bs, segments):
    """fp64, written out: one matmul per segment as listed."""
    x = x.clone().requires_grad_()
    leaves = {id(w): w.clone().requires_grad_() for w in ws + (bs or [])}
    out = torch.empty(x.shape[0], x.shape[1], ws[0].shape[0], dtype=x.dtype)
    for s, e, m in segments:
        y = x[s:e] @ leaves[id(ws[m])].t()
        out = torch.cat([out[:s], y + leaves[id(bs[m])] if bs else y, out[e:]])
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    return [out, x.grad] + [t.grad for t in leaves.values()]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("batch", [1, 3, 0])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_grouped_equals_per_segment_fp32(monkeypatch, case, batch, bias):
    n, segments, n_weights, shared = CASES[case]
    x, ws, bs = _inputs(n, n_weights, shared, batch, bias)
    ref = _reference(x, ws, bs, segments)
    monkeypatch.setattr(SL, "GEMM_PATH", "per_segment")
    per_segment = _run(x, ws, bs, segments, torch.float32)
    monkeypatch.setattr(SL, "GEMM_PATH", "grouped")
    grouped = _run(x, ws, bs, segments, torch.float32)
    names = ["out", "x.grad"] + [f"param{i}.grad" for i in range(len(ref) - 2)]
    assert len(grouped) == len(per_segment) == len(ref)
    for name, g, p, r in zip(names, grouped, per_segment, ref):
        assert g is not None and g.shape == r.shape, name
        if r.numel() == 0:  # B = 0: x, out and their gradients are empty
            continue
        # each path within fp32 rounding of fp64; the grouped one within twice the per-segment one's error
        assert_close_2x(p, r, None, torch.float32, backward=name != "out", name=f"per-segment {name}")
        assert_close_2x(g, r, p, torch.float32, backward=name != "out", name=f"grouped {name}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_grouped_under_autocast_casts_in_the_stack_and_returns_parameter_dtype_gradients(monkeypatch, bias):
    """fp32 parameters under bf16 autocast, as training runs: the grouped path stacks the weights in bf16
    (the stack is the cast) and hands back fp32 gradients, like the per-segment path's casts."""
    n, segments, n_weights, shared = CASES["four_segments_repeated_weights"]
    x, ws, bs = _inputs(n, n_weights, shared, 3, bias)
    ref = _reference(x, ws, bs, segments)
    runs = {}
    for path in ("per_segment", "grouped"):
        monkeypatch.setattr(SL, "GEMM_PATH", path)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs[path] = _run(x, ws, bs, segments, torch.float32)
    names = ["out", "x.grad"] + [f"param{i}.grad" for i in range(len(ref) - 2)]
    for name, g, p, r in zip(names, runs["grouped"], runs["per_segment"], ref):
        assert g.dtype == p.dtype == (torch.bfloat16 if name == "out" else torch.float32), (name, g.dtype, p.dtype)
        assert_close_2x(g, r, p, torch.bfloat16, backward=name != "out", name=f"grouped {name}")


def test_grouped_plan_is_built_once_per_segments_batch_and_device(monkeypatch):
    monkeypatch.setattr(SL, "GEMM_PATH", "grouped")
    monkeypatch.setattr(SL, "_PLANS", {})
    builds = []
    build = SL._build_plan
    monkeypatch.setattr(SL, "_build_plan", lambda *key: builds.append(key) or build(*key))
    x, ws, bs = _inputs(12, 2, False, 3, True, dtype=torch.float32)
    seg = ((0, 5, 0), (5, 12, 1))
    for _ in range(3):
        ops.segment_linear(x, ws, bs, seg)
    assert len(builds) == 1
    plan = SL._PLANS[(seg, 3, 2, x.device, x.dtype)]
    assert plan.offs.dtype == torch.int32 and plan.offs.tolist() == [15, 36]  # row ends of x.view(N * B, K)
    assert plan.row_weight.tolist() == [0] * 5 + [1] * 7 and plan.weight_rows.sum(1).tolist() == [5, 7]
    ops.segment_linear(x[:, :2], ws, bs, seg)  # another batch size: another plan
    assert len(builds) == 2
    monkeypatch.setattr(SL, "GEMM_PATH", "per_segment")
    ops.segment_linear(x, ws, bs, seg)
    assert len(builds) == 2


def test_compiled_grouped_path_reads_the_cached_plan_as_graph_inputs(monkeypatch):
    """Once eager has built a plan, a trace takes its tensors as inputs: no table construction (and, on a
    GPU, no host-to-device copy) in the compiled graph."""
    monkeypatch.setattr(SL, "GEMM_PATH", "grouped")
    x = torch.randn(12, 2, 16, dtype=torch.bfloat16)
    ws = [torch.nn.Parameter(torch.randn(24, 16, dtype=torch.bfloat16)) for _ in range(2)]
    f = lambda x: ops.segment_linear(x, ws, None, ((0, 5, 0), (5, 12, 1)))  # noqa: E731
    f(x)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm

    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend=backend)(x)
    code = graphs[0]
    for building in ("torch.tensor(", "repeat_interleave", "one_hot"):
        assert building not in code, code


def test_gemm_path_takes_grouped_only_where_it_is_one_kernel_and_saves_launches(monkeypatch):
    monkeypatch.setattr(SL, "device_has_grouped_gemm", lambda device: True)  # a modelled sm_90 GPU
    x = torch.empty(10, 2, 64, dtype=torch.bfloat16)
    w = torch.empty(96, 64, dtype=torch.bfloat16)
    assert SL.gemm_path(x, w, 2, has_bias=False) == "grouped"
    assert SL.gemm_path(x, w, 1, has_bias=False) == "per_segment"  # one segment: nothing to group
    assert SL.gemm_path(x, w, 2, has_bias=True) == "per_segment"  # addmm adds the bias for free
    assert SL.gemm_path(x.float(), w.float(), 2, has_bias=False) == "per_segment"  # fast path is bf16 only
    assert SL.gemm_path(x[:, :0], w, 2, has_bias=False) == "per_segment"  # empty batch
    assert SL.gemm_path(x, torch.empty(90, 64, dtype=torch.bfloat16), 2, has_bias=False) == "per_segment"  # 16 B rows
    assert SL.gemm_path(x[..., :60], torch.empty(96, 60, dtype=torch.bfloat16), 2, has_bias=False) == "per_segment"
    monkeypatch.setattr(SL, "GEMM_PATH", "per_segment")
    assert SL.gemm_path(x, w, 2, has_bias=False) == "per_segment"
    monkeypatch.setattr(SL, "GEMM_PATH", "grouped")
    assert SL.gemm_path(x, w, 2, has_bias=True) == "grouped"
    monkeypatch.undo()
    # torch's fast path: compute capability 9.x (H100/H200) and 10.x (B200); A100 (8.0) and 12.x loop over groups
    for cc, fast in (((8, 0), False), ((9, 0), True), ((10, 0), True), ((12, 0), False)):
        props = types.SimpleNamespace(major=cc[0], minor=cc[1])
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None, props=props: props)
        assert SL.device_has_grouped_gemm(torch.device("cuda", 0)) == fast, cc
    monkeypatch.undo()
    # no GPU: torch would loop over the groups after a copy of offs to the host, so never by default
    assert not SL.device_has_grouped_gemm(torch.device("cpu"))
    assert not SL.device_has_grouped_gemm(torch.device("meta"))
    assert SL.gemm_path(x, w, 2, has_bias=False) == "per_segment"


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["per_segment", "grouped"])
def test_launches_one_gemm_per_group_and_no_gradient_zero_fill(monkeypatch, path):
    monkeypatch.setattr(SL, "GEMM_PATH", path)
    x, ws, bs = _inputs(12, 2, False, 3, True, dtype=torch.float32)
    x.requires_grad_()
    for t in ws + bs:
        t.requires_grad_()
    with _OpNames() as fwd:
        out = ops.segment_linear(x, ws, bs, ((0, 5, 0), (5, 12, 1)))
    with _OpNames() as bwd:
        out.backward(torch.ones_like(out))
    gemms = {"mm", "addmm", "_grouped_mm"}
    n_gemm = lambda names: sum(n in gemms for n in names)  # noqa: E731
    assert n_gemm(fwd.names) == (2 if path == "per_segment" else 1), fwd.names
    assert n_gemm(bwd.names) == (4 if path == "per_segment" else 3), bwd.names  # dX, dW (+ grouped db)
    assert not {"zeros", "zeros_like", "zero_", "fill_", "new_zeros"} & set(bwd.names), bwd.names
    # a shared encoder: both modalities' rows are one segment, one GEMM
    with _OpNames() as shared:
        ops.segment_linear(x.detach(), [ws[0], ws[0]], [bs[0], bs[0]], ((0, 5, 0), (5, 12, 1)))
    assert n_gemm(shared.names) == 1, shared.names


BASE = mbt_fast.MBTConfig(hidden_size=32, num_heads=2, mlp_dim=48, num_layers=2, fusion_layer=1, n_bottlenecks=2,
                          num_classes=5, input_shapes={"rgb": (-1, 4, 32, 32, 3), "spectrogram": (-1, 48, 16, 3)})


def _model_step(cfg, backend, dtype, compiled=False):
    torch.manual_seed(0)
    model = mbt_fast.MBT(cfg, backend=backend).to(dtype).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(1)
    inputs = {"rgb": (torch.rand(2, 3, *cfg.rgb_shape, generator=g) * 2 - 1).to(dtype),
              "spectrogram": torch.randn(2, *cfg.spectrogram_shape, generator=g).to(dtype)}
    fn = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    out = fn(**inputs)
    out.float().square().sum().backward()
    return [out.detach()] + [p.grad for p in model.parameters()], model, inputs


@pytest.mark.parametrize("share_encoder", [False, True], ids=["separate", "shared"])
def test_model_grouped_equals_per_segment(monkeypatch, share_encoder):
    """Every Linear of the packed block (qkv, proj, fc1, fc2) through the grouped path: logits and every
    parameter's gradient as through the per-segment path, within fp32 rounding."""
    cfg = dataclasses.replace(BASE, share_encoder=share_encoder)
    monkeypatch.setattr(SL, "GEMM_PATH", "per_segment")
    ref, model, _ = _model_step(cfg, "torch", torch.float32)
    monkeypatch.setattr(SL, "GEMM_PATH", "grouped")
    got, _, _ = _model_step(cfg, "torch", torch.float32)
    names = ["logits"] + [n for n, _ in model.named_parameters()]
    for name, g, r in zip(names, got, ref):
        assert (g is None) == (r is None), name
        if r is None:
            continue
        err = (g - r).abs().max().item()
        scale = max(r.abs().max().item(), 1.0)
        assert err <= 1e-5 * scale, f"{name}: grouped vs per-segment max error {err:.3e} (scale {scale:.3g})"


def test_grouped_compiles_without_graph_break_bf16(monkeypatch):
    """fullgraph torch.compile through the grouped path. bf16: torch 2.14's meta kernel of _grouped_mm
    (torch/_meta_registrations.py, _meta_grouped_mm_common) accepts bf16/fp16 only, so an fp32 grouped
    GEMM cannot be traced (the fake-tensor call raises "Expected mat_a to be BFloat16 ..."); the
    per-segment path, which fp32 always takes, is covered by test_compile.py."""
    monkeypatch.setattr(SL, "GEMM_PATH", "grouped")
    eager, model, inputs = _model_step(BASE, "torch", torch.bfloat16)
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, [r.reason.splitlines()[0] for r in explanation.break_reasons]
    assert explanation.graph_count == 1
    compiled, _, _ = _model_step(BASE, "torch", torch.bfloat16, compiled=True)
    for i, (c, e) in enumerate(zip(compiled, eager)):
        err = (c.float() - e.float()).abs().max().item()
        assert err <= 2e-2 * max(e.float().abs().max().item(), 1.0), f"tensor {i}: compiled vs eager {err:.3e}"


# ---- fc1's bias + GELU in the GEMM epilogue (torch._addmm_activation) --------------------------------

def test_gelu_epilogue_only_on_cuda_and_only_without_autograd():
    assert SL.gelu_epilogue("cuda", needs_grad=False)
    assert not SL.gelu_epilogue("cuda", needs_grad=True)  # no derivative, no pre-activation output
    assert not SL.gelu_epilogue("cpu", needs_grad=False)  # erf-GELU on the CPU, not Scenic's tanh
    assert not SL.gelu_epilogue("meta", needs_grad=False)


def test_segment_linear_gelu_refuses_the_cpu_and_autograd():
    x, ws, bs = _inputs(12, 2, False, 3, True, dtype=torch.float32)
    with torch.no_grad(), pytest.raises(ValueError, match=r"tanh-GELU on CUDA only.*device cpu, grad False"):
        SL.segment_linear_gelu(x, ws, bs, ((0, 5, 0), (5, 12, 1)))


def test_addmm_gelu_segments_write_every_segment_through_its_weights():
    """The epilogue path's per-segment plumbing, run on the CPU, where _addmm_activation is erf-GELU: so
    the reference here is erf-GELU (on CUDA it is tanh: test_linear_bias_gelu_epilogue_on_cuda_is_tanh)."""
    n, segments, n_weights, shared = CASES["four_segments_repeated_weights"]
    x, ws, bs = _inputs(n, n_weights, shared, 3, True)
    out = SL._addmm_gelu_segments(x, ws, bs, SL.merge_segments(segments))
    ref = torch.nn.functional.gelu(_reference(x, ws, bs, segments)[0])
    err = (out - ref).abs().max().item()
    assert err < 1e-12, f"max error {err:.3e} against erf-GELU of the per-segment Linear"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_bias_gelu_epilogue_on_cuda_is_tanh(dtype):
    """On CUDA without autograd linear_bias_gelu runs _addmm_activation: Scenic's tanh-GELU, not erf."""
    n, segments, n_weights, shared = CASES["two_modalities"]
    x, ws, bs = _inputs(n, n_weights, shared, 3, True, K=64, O=96)
    lin = _reference(x, ws, bs, segments)[0].detach()
    tanh, erf = (torch.nn.functional.gelu(lin, approximate=a) for a in ("tanh", "none"))
    rw = torch.tensor([m for s, e, m in segments for _ in range(s, e)], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        out = ops.linear_bias_gelu(x.to("cuda", dtype), [w.to("cuda", dtype) for w in ws],
                                   [b.to("cuda", dtype) for b in bs], segments, rw, backend="torch")
        eager = torch.nn.functional.gelu(ops.segment_linear(x.to("cuda", dtype), [w.to("cuda", dtype) for w in ws],
                                                            [b.to("cuda", dtype) for b in bs], segments), approximate="tanh")
    assert_close_2x(out.cpu(), tanh, eager.cpu(), dtype, name="epilogue vs tanh-GELU")
    if dtype == torch.float32:  # erf and tanh differ by up to ~5e-4 here: the fp32 output tells them apart
        assert (out.cpu().double() - erf).abs().max().item() > 10 * (out.cpu().double() - tanh).abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10),
                    reason="no CUDA device of compute capability 9.x/10.x (torch's one-kernel grouped GEMM)")
@pytest.mark.parametrize("bias", [False, True], ids=["fc1_no_bias", "forced_bias"])
def test_grouped_gemm_on_sm90_bf16_at_mbt_shapes(monkeypatch, bias):
    """The CUTLASS grouped GEMM at MBT-B's rows (406 + 3142, batch 2, 768 -> 3072), bf16: chosen by default
    without a bias, and within twice the per-segment bf16 error of an fp32 reference (forward and grads)."""
    seg = ((0, 406, 0), (406, 3548, 1))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3548, 2, 768, device="cuda", generator=g)
    ws = [torch.randn(3072, 768, device="cuda", generator=g) / 28 for _ in range(2)]
    bs = [torch.randn(3072, device="cuda", generator=g) for _ in range(2)] if bias else None
    assert SL.gemm_path(x.bfloat16(), ws[0].bfloat16(), 2, bias) == ("per_segment" if bias else "grouped")

    def run(path, dtype):
        monkeypatch.setattr(SL, "GEMM_PATH", path)
        xx = x.to(dtype).requires_grad_()
        ww = [w.to(dtype).requires_grad_() for w in ws]
        bb = [b.to(dtype).requires_grad_() for b in bs] if bias else None
        out = ops.segment_linear(xx, ww, bb, seg)
        out.backward(torch.ones_like(out))
        return [out, xx.grad, *[w.grad for w in ww], *([b.grad for b in bb] if bias else [])]

    ref = run("per_segment", torch.float32)
    per_segment, grouped = run("per_segment", torch.bfloat16), run("grouped", torch.bfloat16)
    for i, (o, p, r) in enumerate(zip(grouped, per_segment, ref)):
        assert_close_2x(o.float(), r, p.float(), torch.bfloat16, backward=i > 0, name=f"grouped tensor {i}")


# ---- the performance model learns the grouped path (mbt_fast.perf_model) ------------------------------

def test_perf_model_costs_a_grouped_gemm_by_hand():
    from mbt_fast import perf_model

    counter = perf_model.Counter()
    R, K, O, G = 96, 64, 128, 2
    x = torch.empty(R, K, dtype=torch.bfloat16, device="meta")
    w = torch.empty(G, O, K, dtype=torch.bfloat16, device="meta")
    offs = torch.empty(G, dtype=torch.int32, device="meta")
    with perf_model.AtenCounter(counter):
        torch._grouped_mm(x, w.transpose(1, 2), offs)  # forward / dX form: [R, K] x [G, K, O]
        torch._grouped_mm(torch.empty(O, R, dtype=torch.bfloat16, device="meta"), x, offs)  # dW form: [G, O, K]
    fwd, dw = counter.ops
    assert fwd.cls == dw.cls == "gemm" and fwd.launches == dw.launches == 2  # setup kernel + CUTLASS GEMM
    assert fwd.tc_flops == dw.tc_flops == 2 * R * K * O  # the groups split the rows: one product's FLOPs
    assert fwd.bytes == 2 * (R * K + G * K * O + R * O) + 4 * G
    assert dw.bytes == 2 * (O * R + R * K + G * O * K) + 4 * G


@pytest.mark.parametrize("gpu, grouped", [("h100", True), ("a100", False), (None, False)])
def test_perf_model_takes_the_grouped_path_on_the_gpus_that_have_it(gpu, grouped):
    from mbt_fast import perf_model

    fwd, bwd = perf_model.Counter(), perf_model.Counter()
    x = torch.empty(12, 2, 64, device="meta", requires_grad=True)
    ws = [torch.empty(96, 64, device="meta", requires_grad=True) for _ in range(2)]
    with perf_model.counting(fwd, "triton", amp=True, gpu=gpu):  # fp32 parameters under bf16 autocast
        out = ops.segment_linear(x, ws, None, ((0, 5, 0), (5, 12, 1)))  # fc1 on a kernel backend: no bias
    with perf_model.counting(bwd, "triton", gpu=gpu):
        out.backward(torch.empty_like(out))
    names = [o.name for o in fwd.ops]
    # x cast to bf16; the weights cast one by one, or stacked straight into bf16 (the device tables are
    # built once per layout, not per step: no host-to-device copy here)
    assert names == (["_to_copy", "stack", "_grouped_mm"] if grouped else ["_to_copy"] * 3 + ["mm"] * 2), names
    gemms = [o.name for o in bwd.ops if o.cls == "gemm"]
    assert gemms == (["_grouped_mm"] * 2 if grouped else ["mm"] * 4), [o.name for o in bwd.ops]  # dX, dW


def test_perf_model_report_counts_gemm_calls_per_gpu():
    from mbt_fast import perf_model

    report, _, _ = perf_model.estimate("tiny", 2, backends=("torch", "triton"))
    torch_b, triton_b = report["backends"]["torch"], report["backends"]["triton"]
    # the torch backend's Linears all have a bias: per-segment GEMMs on both GPUs
    assert torch_b["gemm_calls_by_gpu"]["h100"] == torch_b["gemm_calls_by_gpu"]["a100"]
    # triton's fc1 (bias in the bias_gelu kernel) is one grouped call per direction on an H100
    saved = triton_b["gemm_calls_by_gpu"]["a100"] - triton_b["gemm_calls_by_gpu"]["h100"]
    cfg = mbt_fast.MBTConfig.preset("tiny")
    assert saved == 3 * cfg.num_layers * (len(cfg.modality_fusion) - 1), saved
    assert triton_b["launches_by_gpu"]["h100"] < triton_b["launches_by_gpu"]["a100"]
    assert triton_b["launches"] == triton_b["launches_by_gpu"]["h100"]
