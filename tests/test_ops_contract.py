"""The fused ops' contract at their entry (mbt_fast.ops): every bad argument gets a clear error naming
it, with the expected and the actual value; an empty batch works on every backend like the reference."""
import pytest
import torch

import mbt_fast
from mbt_fast import cuda_ext, ops
from mbt_fast.layout import PackedLayout

LAYOUT = PackedLayout(("spectrogram", "rgb"), (5, 7), 2)  # 16 rows
N, B, C = LAYOUT.total_rows, 2, 8
_EMU = cuda_ext.build_problems(emulated=True)
ALL = ["torch", "triton", pytest.param("cuda-emu", marks=pytest.mark.skipif(bool(_EMU), reason="; ".join(_EMU) or "ok"))]


def _qkv(nq=N, nk=N, dtype=torch.float32):
    return torch.randn(nq, B, 2, 32, dtype=dtype), torch.randn(nk, B, 2, 32, dtype=dtype), torch.randn(nk, B, 2, 32, dtype=dtype)


# ---- attention segments ---------------------------------------------------------------------------

@pytest.mark.parametrize("segments, error, message", [
    ((), ValueError, r"segments: expected at least one row \(q_start, q_end, k_start, k_end\), got none"),
    (((0, 8, 0, 8, 1),), ValueError, r"segments: expected rows of 4 values .*got row 0 = \(0, 8, 0, 8, 1\)"),
    (((0, 8, 0),), ValueError, r"segments: expected rows of 4 values .*got row 0 = \(0, 8, 0\)"),
    (((0, 8.5, 0, 8),), TypeError, r"segments: expected int values .*got row 0 = \(0, 8.5, 0, 8\)"),
    (((0, True, 0, 8),), TypeError, r"segments: expected int values"),
    (((0, 17, 0, 8),), ValueError, r"segments: row \(0, 17, 0, 8\) is empty or outside q rows \[0, 16\)"),
    (((-1, 8, 0, 8),), ValueError, r"segments: row \(-1, 8, 0, 8\) is empty or outside"),
    (((4, 4, 0, 8),), ValueError, r"segments: row \(4, 4, 0, 8\) is empty"),
    (((0, 8, 0, 8), (7, 16, 0, 16)), ValueError, r"segments: query ranges must not overlap, got \(0, 8, 0, 8\) and \(7, 16, 0, 16\)"),
    (torch.tensor([[0.0, 8.0, 0.0, 8.0]]), TypeError, r"segments: expected integer rows .*got a torch.float32 tensor"),
])
def test_attention_segments_are_validated(segments, error, message):
    q, k, v = _qkv()
    with pytest.raises(error, match=message):
        ops.mbt_attention(q, k, v, segments)


def test_attention_accepts_an_integer_tensor_table_in_eager():
    q, k, v = _qkv()
    seg = ((0, 7, 0, 7), (7, 16, 7, 16))
    torch.testing.assert_close(ops.mbt_attention(q, k, v, torch.tensor(seg, dtype=torch.int64)), ops.mbt_attention(q, k, v, seg))


@pytest.mark.parametrize("p", [-1, 1.0, 1.5, float("nan"), "0.1", True])
def test_attention_dropout_range(p):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"dropout_p: expected a number in \[0, 1\), got"):
        ops.mbt_attention(q, k, v, ((0, 16, 0, 16),), dropout_p=p)


def test_attention_shapes_and_dtypes_are_named():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q, k, v: expected \[Nq, B, H, D\] and two equal"):
        ops.mbt_attention(q, k[:, :1], v, ((0, 16, 0, 16),))
    with pytest.raises(TypeError, match="q, k, v: expected one dtype"):
        ops.mbt_attention(q, k.double(), v, ((0, 16, 0, 16),))
    with pytest.raises(ValueError, match=r"q: expected 4 dimensions, got shape \(16, 2, 64\)"):
        ops.mbt_attention(q.flatten(2), k, v, ((0, 16, 0, 16),))


# ---- segment_linear segments ----------------------------------------------------------------------

def _linear_args():
    x = torch.randn(N, B, C)
    return x, [torch.randn(4, C), torch.randn(4, C)], [torch.randn(4), torch.randn(4)]


@pytest.mark.parametrize("segments, error, message", [
    (((0, 8, 0), (8, 17, 1)), ValueError, r"segments: row \(8, 17, 1\) is empty or outside rows \[0, 16\)"),
    (((-2, 8, 0), (8, 16, 1)), ValueError, r"segments: row \(-2, 8, 0\) is empty or outside"),
    (((0, 8, 0), (8, 16, 2)), ValueError, r"segments: row \(8, 16, 2\) names weight 2, expected an index in \[0, 2\)"),
    (((0, 8, 0), (8, 16, -1)), ValueError, r"names weight -1"),
    (((0, 9, 0), (8, 16, 1)), ValueError, r"covered exactly once; \(8, 16, 1\) overlaps the previous row"),
    (((0, 6, 0), (8, 16, 1)), ValueError, r"covered exactly once; \(8, 16, 1\) leaves rows \[6, 8\) uncovered"),
    (((0, 8, 0), (8, 12, 1)), ValueError, r"covered exactly once; rows \[12, 16\) are uncovered"),
    (((0, 8.0, 0), (8, 16, 1)), TypeError, r"segments: expected int values \(start, end, weight_index\)"),
    (((0, 8, 0, 1), (8, 16, 1, 1)), ValueError, r"segments: expected rows of 3 values"),
])
def test_segment_linear_segments_are_validated(segments, error, message):
    x, w, b = _linear_args()
    with pytest.raises(error, match=message):
        ops.segment_linear(x, w, b, segments)


def test_segment_linear_weights_are_validated():
    x, w, b = _linear_args()
    seg = ((0, 8, 0), (8, 16, 1))
    with pytest.raises(ValueError, match=r"weights\[1\]: expected shape \[out, 8\] like weights\[0\] \(4, 8\), got \(4, 6\)"):
        ops.segment_linear(x, [w[0], torch.randn(4, 6)], b, seg)
    with pytest.raises(ValueError, match=r"biases: expected 2 \(one per weight\) or None, got 1"):
        ops.segment_linear(x, w, b[:1], seg)
    with pytest.raises(ValueError, match=r"biases\[0\]: expected shape \(4,\), got \(5,\)"):
        ops.segment_linear(x, w, [torch.randn(5), b[1]], seg)
    with pytest.raises(TypeError, match="x: expected the dtype of the weights and biases"):
        ops.segment_linear(x.double(), w, b, seg)


def test_segment_linear_covers_every_row_with_its_weights():
    x, w, b = _linear_args()
    out = ops.segment_linear(x, w, b, ((0, 8, 0), (8, 16, 1)))
    torch.testing.assert_close(out[:8], x[:8] @ w[0].t() + b[0])
    torch.testing.assert_close(out[8:], x[8:] @ w[1].t() + b[1])


# ---- row_weight, eps -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("bad", [2, -1, 7])
def test_row_weight_values_outside_the_table_are_refused(backend, bad):
    rw = LAYOUT.row_weight()
    rw[3] = bad
    x, w, b = torch.randn(N, B, C), torch.randn(2, C), torch.randn(2, C)
    with pytest.raises(ValueError, match=rf"row_weight: expected values in \[0, 2\) .*got values in \[{min(bad, 0)}, {max(bad, 1)}\]"):
        ops.segment_layernorm(x, w, b, rw, 1e-6, backend=backend)
    with pytest.raises(ValueError, match=r"row_weight: expected values in \[0, 2\)"):
        ops.bias_gelu(x, b, rw, backend=backend)


def test_row_weight_is_checked_again_after_an_in_place_change():
    rw = LAYOUT.row_weight()
    x, w, b = torch.randn(N, B, C), torch.randn(2, C), torch.randn(2, C)
    ops.bias_gelu(x, b, rw)
    rw[0] = 5  # bumps the tensor's version: the cached check no longer applies
    with pytest.raises(ValueError, match=r"got values in \[0, 5\]"):
        ops.bias_gelu(x, b, rw)


def test_row_weight_dtype_and_shape_are_named():
    x, w, b = torch.randn(N, B, C), torch.randn(2, C), torch.randn(2, C)
    with pytest.raises(ValueError, match=r"row_weight: expected an int32 tensor of shape \(16,\), got torch.int64 \(16,\)"):
        ops.bias_gelu(x, b, LAYOUT.row_weight().long())
    with pytest.raises(ValueError, match=r"row_weight: expected an int32 tensor of shape \(16,\), got torch.int32 \(15,\)"):
        ops.bias_gelu(x, b, LAYOUT.row_weight()[1:])


@pytest.mark.parametrize("eps", [0, -1, float("nan"), float("inf"), "1e-6", None])
def test_layernorm_eps_must_be_positive(eps):
    x, w, b = torch.randn(N, B, C), torch.randn(2, C), torch.randn(2, C)
    with pytest.raises(ValueError, match=r"eps: expected a finite number > 0, got"):
        ops.segment_layernorm(x, w, b, LAYOUT.row_weight(), eps)


def test_layernorm_bias_shape_is_named():
    x, w = torch.randn(N, B, C), torch.randn(2, C)
    with pytest.raises(ValueError, match=r"bias: expected the shape of weight \(2, 8\), got \(3, 8\)"):
        ops.segment_layernorm(x, w, torch.randn(3, C), LAYOUT.row_weight(), 1e-6)


def test_residual_mean_layout_is_typed():
    x = torch.randn(N, B, C)
    with pytest.raises(TypeError, match="layout: expected a mbt_fast.layout.PackedLayout, got tuple"):
        ops.residual_mean(x, x, None, (5, 7), "mean")


# ---- an empty batch ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "eager_sdpa"] + ALL)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_empty_batch_gives_empty_logits_on_every_backend(backend, train):
    cfg = mbt_fast.MBTConfig.preset("tiny", stochastic_droplayer_rate=0.2)
    dtype = torch.bfloat16 if backend == "cuda-emu" else torch.float32
    model = mbt_fast.MBT(cfg, backend=backend).to(dtype).train(train)
    out = model(rgb=torch.zeros(0, 3, *cfg.rgb_shape, dtype=dtype), spectrogram=torch.zeros(0, *cfg.spectrogram_shape, dtype=dtype))
    assert out.shape == (0, cfg.num_classes)
    out.sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())


@pytest.mark.parametrize("backend", ALL)
def test_rows_in_no_segment_are_zero_on_dirty_memory(backend):
    """Only uncovered rows are zero-filled (not whole buffers): they must be exactly 0 even when the
    allocator returns memory full of NaN from a freed tensor."""
    dtype = torch.bfloat16 if backend == "cuda-emu" else torch.float32
    seg = LAYOUT.attn_segments(fused=False)  # the bottleneck rows are in no segment
    q, k, v = (t.to(dtype).requires_grad_() for t in _qkv())
    for _ in range(3):  # leave NaN-filled blocks of the sizes the op will ask for
        [torch.full_like(t, float("nan")) for t in (q, k, v, q, q, q)]
        torch.full((B, 2, N), float("nan"))
    out = ops.mbt_attention(q, k, v, seg, backend=backend)
    out.float().sum().backward()
    gaps = [LAYOUT.bottleneck_rows(m) for m in range(LAYOUT.num_modalities)]
    for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        for rows in gaps:
            assert torch.equal(t[rows].float(), torch.zeros_like(t[rows].float())), f"{name}[{rows}] is not zero"
        assert torch.isfinite(t.float()).all(), f"{name} has non-finite values outside the gaps"


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("fused", [True, False])
def test_packed_qkv_is_the_per_tensor_op(backend, fused):
    """``mbt_attention_qkv`` on one ``[N, B, 3, H, D]`` buffer gives the per-tensor op's output and qkv
    gradient exactly, on every backend (``triton`` writes the packed gradient itself, on NaN-filled
    memory here: the rows no segment covers must still come back 0)."""
    dtype = torch.bfloat16 if backend == "cuda-emu" else torch.float32
    seg = LAYOUT.attn_segments(fused=fused)
    qkv = torch.stack(_qkv(dtype=dtype), 2).requires_grad_()
    g = torch.randn(N, B, 2, 32, dtype=dtype)
    [torch.full_like(qkv, float("nan")) for _ in range(3)]  # leave NaN-filled blocks of qkv's size
    out = ops.mbt_attention_qkv(qkv, seg, backend=backend)
    (packed,) = torch.autograd.grad(out, qkv, g)
    ref = ops.mbt_attention(*qkv.unbind(2), seg, backend=backend)
    (stacked,) = torch.autograd.grad(ref, qkv, g)
    assert torch.equal(out, ref) and torch.equal(packed, stacked), (
        f"max|out - ref| = {(out - ref).abs().max():.3e}, max|grad - ref grad| = {(packed - stacked).abs().max():.3e}")


def test_packed_qkv_shape_is_named():
    with pytest.raises(ValueError, match=r"qkv: expected 5 dimensions, got shape \(16, 2, 6, 32\)"):
        ops.mbt_attention_qkv(torch.randn(N, B, 6, 32), LAYOUT.attn_segments(fused=True))


# ---- the torch backend's per-segment paths -----------------------------------------------------------

def test_layernorm_segments_give_the_gathered_result_and_must_match_row_weight():
    torch.manual_seed(0)
    x, w, b = torch.randn(N, B, C, dtype=torch.float64), torch.randn(2, C, dtype=torch.float64), torch.randn(2, C, dtype=torch.float64)
    rw = LAYOUT.row_weight()
    gathered = ops.segment_layernorm(x, w, b, rw, 1e-6)
    per_segment = ops.segment_layernorm(x, w, b, rw, 1e-6, segments=LAYOUT.row_segments())
    err = (per_segment - gathered).abs().max().item()
    assert err < 1e-12, f"per-segment LayerNorm differs from the gathered one by {err}"
    unsorted = ops.segment_layernorm(x, w, b, rw, 1e-6, segments=tuple(reversed(LAYOUT.row_segments())))
    err = (unsorted - gathered).abs().max().item()
    assert err < 1e-12, f"segments given in reverse order: per-segment LayerNorm differs from the gathered one by {err}"
    wrong = tuple((s, e, 1 - m) for s, e, m in LAYOUT.row_segments())
    with pytest.raises(ValueError, match=r"segments: expected the weight index of row_weight on every row; row 0 has "
                                         r"row_weight 0, segments name 1"):
        ops.segment_layernorm(x, w, b, rw, 1e-6, segments=wrong)
    with pytest.raises(ValueError, match=r"segments: every row of x must be covered exactly once"):
        ops.segment_layernorm(x, w, b, rw, 1e-6, segments=((0, 5, 0),))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("grad", [False, True])
def test_linear_bias_gelu_is_fc1_with_its_epilogue(backend, grad):
    torch.manual_seed(1)
    F_ = 12
    x = torch.randn(N, B, C, requires_grad=grad)
    ws = [torch.randn(F_, C, requires_grad=grad) for _ in range(2)]
    bs = [torch.randn(F_, requires_grad=grad) for _ in range(2)]
    rows = LAYOUT.row_segments()
    with torch.set_grad_enabled(grad):
        out = ops.linear_bias_gelu(x, ws, bs, rows, LAYOUT.row_weight(), backend=backend)
        ref = torch.cat([torch.nn.functional.gelu(x[s:e].double() @ ws[m].double().t() + bs[m].double(), approximate="tanh")
                         for s, e, m in rows])
    err = (out.double() - ref).abs().max().item()
    assert err < 1e-5, f"{backend}: max error {err} against the float64 reference"
    if grad:
        out.sum().backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in [x, *ws, *bs])
    with pytest.raises(ValueError, match=r"biases: expected 2 \(one per weight\), got 1"):
        ops.linear_bias_gelu(x, ws, bs[:1], rows, LAYOUT.row_weight(), backend=backend)


# ---- residual_mean_layernorm: the two ops' contracts in one -----------------------------------------

def _rml_args():
    x, y = torch.randn(N, B, C), torch.randn(N, B, C)
    return x, y, torch.ones(B, 2), LAYOUT, "mean", torch.randn(2, C), torch.randn(2, C), LAYOUT.row_weight(), 1e-6


@pytest.mark.parametrize("i, bad, error, message", [
    (0, torch.randn(N, B), ValueError, r"x: expected 3 dimensions, got shape \(16, 2\)"),
    (1, torch.randn(N, B, C + 1), ValueError, r"y: expected the shape of x \(16, 2, 8\), got \(16, 2, 9\)"),
    (2, torch.ones(B, 3), ValueError, r"keep: expected shape \(2, 2\), got \(2, 3\)"),
    (3, (5, 7), TypeError, "layout: expected a mbt_fast.layout.PackedLayout, got tuple"),
    (4, "sum", ValueError, r"bottleneck: expected one of \('add', 'keep', 'mean'\), got 'sum'"),
    (5, torch.randn(2, C).int(), TypeError, "weight: expected a floating-point tensor, got torch.int32"),
    (6, torch.randn(3, C), ValueError, r"bias: expected the shape of weight \(2, 8\), got \(3, 8\)"),
    (7, LAYOUT.row_weight().long(), ValueError, r"row_weight: expected an int32 tensor of shape \(16,\), got torch.int64"),
    (8, 0.0, ValueError, "eps: expected a finite number > 0, got 0.0"),
])
def test_residual_mean_layernorm_arguments_are_named(i, bad, error, message):
    args = list(_rml_args())
    args[i] = bad
    with pytest.raises(error, match=message):
        ops.residual_mean_layernorm(*args)


def test_residual_mean_layernorm_segments_must_match_row_weight():
    wrong = tuple((s, e, 1 - m) for s, e, m in LAYOUT.row_segments())
    with pytest.raises(ValueError, match="segments: expected the weight index of row_weight on every row"):
        ops.residual_mean_layernorm(*_rml_args(), segments=wrong)


@pytest.mark.parametrize("backend", ALL)
def test_residual_mean_layernorm_empty_batch(backend):
    dtype = torch.bfloat16 if backend == "cuda-emu" else torch.float32
    x = torch.zeros(N, 0, C, dtype=dtype, requires_grad=True)
    w = torch.ones(2, C, dtype=dtype, requires_grad=True)
    x_new, h = ops.residual_mean_layernorm(x, x, None, LAYOUT, "mean", w, w, LAYOUT.row_weight(), backend=backend)
    assert x_new.shape == h.shape == (N, 0, C)
    (x_new.sum() + h.sum()).backward()
    assert x.grad.shape == x.shape and w.grad.abs().sum() == 0
