"""torch.compile: no graph break, compiled = eager (outputs and every gradient), and opcheck for every
op of the C++ extension and of the Triton launchers; on configurations nobody tuned to.

``triton`` runs under the interpreter here (its ops are opaque to the compiler either way). The ``cuda``
backend runs the same Python path as ``cuda-emu``.
"""
import dataclasses

import pytest
import torch
import torch._dynamo

import mbt_fast
from mbt_fast import cuda_ext
from mbt_fast.config import MBTConfig

_EMU = cuda_ext.build_problems(emulated=True)
BACKENDS = ["torch", "triton", pytest.param("cuda-emu", marks=pytest.mark.skipif(bool(_EMU), reason="; ".join(_EMU) or "ok"))]

BASE = MBTConfig(hidden_size=64, num_heads=2, mlp_dim=80, num_layers=3, fusion_layer=1, n_bottlenecks=3, num_classes=5,
                 stochastic_droplayer_rate=0.3, input_shapes={"rgb": (-1, 4, 32, 32, 3), "spectrogram": (-1, 48, 16, 3)})
CONFIGS = {
    "bottleneck": {},
    "early_fusion_1_bottleneck": dict(fusion_layer=0, n_bottlenecks=1),
    "late_fusion_7_bottlenecks": dict(fusion_layer=2, n_bottlenecks=7),
    "vanilla": dict(use_bottleneck=False),
    "vanilla_shared": dict(use_bottleneck=False, share_encoder=True),
    "rgb_only": dict(modality_fusion=("rgb",), use_bottleneck=False),
}
BATCH = 3


def _setup(backend, overrides, train, device="cpu"):
    cfg = dataclasses.replace(BASE, **overrides)
    torch.manual_seed(0)
    model = mbt_fast.MBT(cfg, backend=backend)
    with torch.no_grad():  # a zero head would hide every gradient below it
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    # the CUDA attention runs on tensor cores only (fp16/bf16): cuda-emu runs the model in bf16
    dtype = torch.bfloat16 if backend in ("cuda", "cuda-emu") else torch.float32
    model = model.to(device, dtype).train(train)
    g = torch.Generator().manual_seed(1)
    inputs = {"rgb": torch.rand(BATCH, 3, *cfg.rgb_shape, generator=g) * 2 - 1,
              "spectrogram": torch.randn(BATCH, *cfg.spectrogram_shape, generator=g)}
    return model, {m: inputs[m].to(device, dtype) for m in cfg.modality_fusion}


def _step(model, fn, inputs):
    """Logits and every parameter's gradient of one forward/backward, from one RNG state."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # stochastic depth draws the same masks in both runs
    out = fn(**inputs)
    out.float().square().sum().backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach().float().clone(), grads  # clone: CUDA-graph outputs are overwritten by the next replay


def _assert_same(eager, compiled, tol):
    (eo, eg), (co, cg) = eager, compiled
    err = (eo - co).abs().max().item()
    assert err <= tol, f"logits: compiled vs eager max error {err:.3g} > {tol}"
    assert eg.keys() == cg.keys(), f"parameters with gradients differ: {sorted(eg.keys() ^ cg.keys())}"
    assert eg, "no parameter received a gradient"
    for n in eg:
        scale = max(eg[n].abs().max().item(), 1e-30)
        err = (eg[n] - cg[n]).abs().max().item()
        assert err <= tol * max(scale, 1.0), f"{n}.grad: compiled vs eager max error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_explain_reports_no_graph_break(backend, train):
    model, inputs = _setup(backend, {}, train)
    explanation = torch._dynamo.explain(model)(**inputs)
    reasons = [r.reason.splitlines()[0] for r in explanation.break_reasons]
    assert explanation.graph_break_count == 0, f"{explanation.graph_break_count} graph breaks: {reasons}"
    assert explanation.graph_count == 1, f"{explanation.graph_count} graphs"


# the interpreter makes triton slow on the CPU: three configurations cover its ops' modes
_TRITON_CONFIGS = ("bottleneck", "vanilla_shared", "rgb_only")
_NO_EMU = pytest.mark.skipif(bool(_EMU), reason="; ".join(_EMU) or "ok")
CASES = [pytest.param(b, c, marks=[_NO_EMU] if b == "cuda-emu" else [])
         for b in ("torch", "triton", "cuda-emu") for c in CONFIGS if b != "triton" or c in _TRITON_CONFIGS]


@pytest.mark.parametrize("backend, config", CASES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fullgraph_compile_matches_eager(backend, train, config):
    """fullgraph=True raises on any graph break; aot_eager also traces the backward (AOTAutograd)."""
    torch._dynamo.reset()
    model, inputs = _setup(backend, CONFIGS[config], train)
    eager = _step(model, model, inputs)
    compiled = _step(model, torch.compile(model, fullgraph=True, backend="aot_eager"), inputs)
    _assert_same(eager, compiled, 1e-5)


def test_inductor_compile_matches_eager_torch_backend():
    """Inductor generates its own kernels for the torch backend's elementwise work: fp32 rounding only."""
    torch._dynamo.reset()
    model, inputs = _setup("torch", dict(stochastic_droplayer_rate=0.0), True)  # Inductor's RNG is not eager's
    eager = _step(model, model, inputs)
    compiled = _step(model, torch.compile(model, fullgraph=True), inputs)
    _assert_same(eager, compiled, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_cuda_graphs_capture_a_training_step(backend):
    """mode="reduce-overhead": the whole forward/backward replays as CUDA graphs (no skipped capture)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, inputs = _setup(backend, dict(stochastic_droplayer_rate=0.0), True, device="cuda")
    eager = _step(model, model, inputs)
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        compiled = _step(model, step, inputs)
    assert not counters["inductor"]["cudagraph_skips"], f"CUDA graph capture skipped: {dict(counters['inductor'])}"
    _assert_same(eager, compiled, 5e-2 if backend == "cuda" else 1e-4)


def test_segment_tables_are_not_read_on_the_host_per_call(monkeypatch):
    """The hot path validates each segment table once: a second call does no validation work."""
    from mbt_fast.ops import _contract

    model, inputs = _setup("torch", {}, False)
    model(**inputs)
    calls = []
    for name in ("_checked_attention_segments", "_checked_row_segments"):
        real = getattr(_contract, name)
        monkeypatch.setattr(_contract, name, lambda *a, _real=real: calls.append(a) or _real(*a))
    model(**inputs)
    assert calls == [], f"segment tables validated again on a repeated call: {calls[:2]}"


# ---- opcheck of every op of the C++ extension (the emulated build: torch.ops.mbt_fast_emu) -----------

def _attention_samples(nq, nk, B, H, D, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(nq)
    q, k, v = (torch.randn(n, B, H, D, generator=g).to(dtype) for n in (nq, nk, nk))
    seg = torch.tensor([[0, nq // 2, 0, nk // 2], [nq // 2, nq, nk // 3, nk]], dtype=torch.int32)
    return q, k, v, seg


def _samples(ops):
    """Two sample calls per op (op name -> list of argument tuples)."""
    out = {}
    fwd, bwd = [], []
    for shape, masked in (((37, 37, 2, 2, 32), False), ((70, 45, 1, 1, 64), True)):
        q, k, v, seg = _attention_samples(*shape)
        mask = torch.rand(shape[2], shape[1], generator=torch.Generator().manual_seed(0)) > 0.3 if masked else \
            torch.empty(0, dtype=torch.bool)
        if masked:
            mask[:, [0, shape[1] // 3]] = True  # each segment keeps its first key
        o, lse = ops.attention_fwd(q, k, v, seg, 0.2, mask)
        fwd.append((q, k, v, seg, 0.2, mask))
        bwd.append((torch.randn_like(o), q, k, v, o, lse, seg, 0.2, mask))
    out["attention_fwd"], out["attention_bwd"] = fwd, bwd

    fwd, bwd, lnf, lnb, gf, gb = [], [], [], [], [], []
    for N, B, C, nb in ((2 * 9 + 6, 2, 16, 3), (2 * 5 + 2, 3, 40, 1)):
        rows, M = N, 2
        row_mod = torch.tensor([0] * (N // 2) + [1] * (N - N // 2), dtype=torch.int32)
        slot_start = torch.tensor([N // 2 - nb, N - nb], dtype=torch.int32)
        x, y = torch.randn(rows, B, C), torch.randn(rows, B, C)
        keep = (torch.rand(B, M) > 0.5).float()
        fwd += [(x, y, keep, row_mod, slot_start, nb, 2), (x, y, torch.empty(0), row_mod, slot_start, nb, 1)]
        bwd += [(torch.randn(rows, B, C), keep, row_mod, slot_start, nb, 2)]
        w, b = torch.randn(M, C), torch.randn(M, C)
        o, mean, rstd = ops.segment_layernorm_fwd(x, w, b, row_mod, 1e-6)
        lnf.append((x, w, b, row_mod, 1e-6))
        lnb.append((torch.randn_like(x), x, w, row_mod, mean, rstd))
        gf.append((x, b, row_mod))
        gb.append((torch.randn_like(x), x, b, row_mod))
    out.update(residual_mean_fwd=fwd, residual_mean_bwd=bwd, segment_layernorm_fwd=lnf, segment_layernorm_bwd=lnb,
               bias_gelu_fwd=gf, bias_gelu_bwd=gb)

    # registers hold packed pairs of fp16/bf16 values: finite ones, so outputs compare equal
    out["arch_test_mma"] = [(torch.randn(32, 8).to(dt).view(torch.int32), torch.randn(32, 4).to(dt).view(torch.int32),
                             torch.randn(32, 4), dt == torch.bfloat16) for dt in (torch.float16, torch.bfloat16)]
    out["arch_test_ldmatrix"] = [(torch.arange(64 * 8, dtype=torch.int16), torch.arange(32) * 8, n, t) for n, t in ((4, False), (2, True))]
    out["arch_test_shfl_xor"] = [(torch.randn(n), mask) for n, mask in ((64, 1), (256, 17))]
    i32 = torch.int32
    out["arch_test_smem_uninit"] = [(torch.arange(n, dtype=i32), blocks) for n, blocks in ((16, 3), (64, 1))]
    out["arch_test_block_chain"] = [(torch.arange(1, n + 1, dtype=i32),) for n in (1, 9)]
    out["arch_test_vec16"] = [(torch.arange(16, dtype=i32), lo, so) for lo, so in ((0, 4), (8, 12))]
    out["arch_test_launch"] = [(torch.tensor([7], dtype=i32), 2, 3, 1, 64, 1024, 48 * 1024),
                               (torch.tensor([-1], dtype=i32), 1, 1, 2, 32, 0, 64 * 1024)]
    out["arch_test_cp_async"] = [(torch.arange(256, dtype=i32), 0), (torch.arange(256, dtype=i32) - 7, 0)]
    return out


@pytest.mark.skipif(bool(_EMU), reason="; ".join(_EMU) or "ok")
def test_opcheck_every_extension_op():
    ops = cuda_ext.build(emulated=True)
    names = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mbt_fast_emu::"))
    samples = _samples(ops)
    assert names and set(names) == set(samples), f"ops without samples: {set(names) - set(samples)}"
    for name in names:
        for args in samples[name]:
            torch.library.opcheck(getattr(ops, name).default, args)


# ---- opcheck of every Triton launcher op (torch.ops.mbt_fast_triton, run by the interpreter here) ------

def _triton_samples():
    from mbt_fast.layout import PackedLayout

    out = {n: [] for n in ("attention_fwd", "attention_bwd", "attention_bwd_qkv", "residual_mean_fwd",
                           "residual_mean_bwd", "segment_layernorm_fwd", "segment_layernorm_bwd", "bias_gelu_fwd",
                           "bias_gelu_bwd", "residual_mean_layernorm_fwd", "residual_mean_layernorm_bwd")}
    ops = torch.ops.mbt_fast_triton
    for shape in ((37, 37, 2, 2, 32), (70, 45, 1, 1, 64), (45, 45, 3, 1, 64)):
        q, k, v, seg = _attention_samples(*shape, dtype=torch.float32)
        flat = seg.flatten().tolist()
        mask = torch.ones(shape[2], shape[1], dtype=torch.bool)
        mask[:, 1::3] = False  # padding keys; each segment's first key (0, nk // 3) stays
        mask[:, [0, shape[1] // 3]] = True
        o, lse = ops.attention_fwd(q, k, v, flat, 0.2)
        if shape[0] == shape[1]:  # a packed qkv: self-attention
            out["attention_bwd_qkv"].append((torch.randn_like(o), torch.stack((q, k, v), 2), o, lse, flat, 0.2))
            out["attention_bwd_qkv"].append((torch.randn_like(o), torch.stack((q, k, v), 2), o, lse, flat, 0.2, mask))
        if len(out["attention_fwd"]) < 2:
            out["attention_fwd"] += [(q, k, v, flat, 0.2), (q, k, v, flat, 0.2, mask)]
            out["attention_bwd"].append((torch.randn_like(o), q, k, v, o, lse, flat, 0.2))
    for tokens, nb, B, C in (([9, 6], 3, 2, 16), ([5, 4, 3], 1, 3, 40)):
        layout = PackedLayout(tuple(f"m{i}" for i in range(len(tokens))), tuple(tokens), nb)
        N, M = layout.total_rows, len(tokens)
        x, y = torch.randn(N, B, C), torch.randn(N, B, C)
        keep = (torch.rand(B, M) > 0.5).float()
        for mode, kp in ((2, keep), (1, None), (0, keep)):
            out["residual_mean_fwd"].append((x, y, kp, tokens, nb, mode))
            out["residual_mean_bwd"].append((torch.randn(N, B, C), kp, tokens, nb, mode, torch.float32))
        rw, w, b = layout.row_weight(), torch.randn(M, C), torch.randn(M, C)
        for res in (None, torch.randn(N, B, C)):
            out["segment_layernorm_fwd"].append((x, w, b, rw, 1e-6, res))
        o, mean, rstd = ops.segment_layernorm_fwd(x, w, b, rw, 1e-6, None)
        for gs in (None, torch.randn(N, B, C)):
            out["segment_layernorm_bwd"].append((x, w, rw, mean, rstd, torch.randn(N, B, C), gs))
        out["bias_gelu_fwd"].append((x, b, rw))
        out["bias_gelu_bwd"].append((x, b, rw, torch.randn(N, B, C)))
        for mode, kp in ((2, keep), (1, None)):
            out["residual_mean_layernorm_fwd"].append((x, y, kp, w, b, rw, tokens, nb, mode, 1e-6))
            x_new, _, mean, rstd = ops.residual_mean_layernorm_fwd(x, y, kp, w, b, rw, tokens, nb, mode, 1e-6)
            for gxo in (torch.randn(N, B, C), None):
                out["residual_mean_layernorm_bwd"].append((torch.randn(N, B, C), gxo, x_new, w, rw, mean, rstd, kp,
                                                           tokens, nb, mode, torch.float32))
    return out


def test_opcheck_every_triton_op():
    import mbt_fast.kernels.attention, mbt_fast.kernels.bias_gelu, mbt_fast.kernels.residual_mean  # noqa: F401
    import mbt_fast.kernels.residual_mean_layernorm, mbt_fast.kernels.segment_layernorm  # noqa: F401  (the imports register the ops)

    names = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mbt_fast_triton::"))
    samples = _triton_samples()
    assert names and set(names) == set(samples), f"ops without samples: {set(names) - set(samples)}"
    for name in names:
        for args in samples[name]:
            torch.library.opcheck(getattr(torch.ops.mbt_fast_triton, name).default, args)
