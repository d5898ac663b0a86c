"""The emulation layer's warp collectives against the PTX ISA tables, written out here independently of
csrc/emu/emu_runtime.h: mma.m16n8k16 (fp16, bf16) vs a plain matmul, ldmatrix x1/x2/x4 (+ .trans) vs the
documented lane <-> element permutation, __shfl_xor_sync vs a permutation."""
import pytest
import torch

from mbt_fast import cuda_ext

_EMU = cuda_ext.build_problems(emulated=True)


class _Ops:
    """The arch test ops of one build, taking and returning CPU tensors."""

    def __init__(self, emulated):
        self.ops, self.dev = cuda_ext.build(emulated=emulated), "cpu" if emulated else "cuda"

    def __getattr__(self, name):
        fn = getattr(self.ops, name)
        return lambda *a: fn(*[x.to(self.dev) if isinstance(x, torch.Tensor) else x for x in a]).cpu()


# cuda-emu always; the real extension on a GPU, where the same tables check the hardware
@pytest.fixture(scope="module", params=[
    pytest.param(True, id="emu", marks=pytest.mark.skipif(bool(_EMU), reason="; ".join(_EMU) or "ok")),
    pytest.param(False, id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")]),
])
def emu(request):
    return _Ops(request.param)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """16-bit patterns of a half/bfloat16 tensor as int64 in [0, 65536)."""
    return x.view(torch.int16).to(torch.int64) & 0xFFFF


def _pack(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Two 16-bit patterns -> one b32 register (low half = lower-index element), as int32."""
    u = lo | (hi << 16)
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32)


# PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" (groupID = lane >> 2, tig = lane % 4)
def _a_pos(lane, i):  # element a_i, i in 0..7 (register i // 2)
    g, t = lane >> 2, lane % 4
    row = g if (i < 2 or 4 <= i < 6) else g + 8
    col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def _b_pos(lane, i):  # element b_i, i in 0..3, matrix B is [k=16, n=8]
    g, t = lane >> 2, lane % 4
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g


def _c_pos(lane, i):  # element c_i, i in 0..3, matrix C is [16, 8]
    g, t = lane >> 2, lane % 4
    return (g if i < 2 else g + 8), t * 2 + (i & 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_m16n8k16_matches_matmul(emu, dtype):
    g = torch.Generator().manual_seed(0)
    # small integers / 4: products and sums are exact in fp32, so the comparison is exact
    A = (torch.randint(-8, 8, (16, 16), generator=g) / 4).to(dtype)
    B = (torch.randint(-8, 8, (16, 8), generator=g) / 4).to(dtype)
    C = torch.randint(-8, 8, (16, 8), generator=g).float()
    a_bits, b_bits = _bits(A), _bits(B)
    a_regs = torch.zeros(32, 4, dtype=torch.int32)
    b_regs = torch.zeros(32, 2, dtype=torch.int32)
    c_in = torch.zeros(32, 4)
    for lane in range(32):
        for r in range(4):
            a_regs[lane, r] = _pack(a_bits[_a_pos(lane, 2 * r)], a_bits[_a_pos(lane, 2 * r + 1)])
        for r in range(2):
            b_regs[lane, r] = _pack(b_bits[_b_pos(lane, 2 * r)], b_bits[_b_pos(lane, 2 * r + 1)])
        for i in range(4):
            c_in[lane, i] = C[_c_pos(lane, i)]
    d = emu.arch_test_mma(a_regs, b_regs, c_in, dtype == torch.bfloat16)
    D = torch.zeros(16, 8)
    for lane in range(32):
        for i in range(4):
            D[_c_pos(lane, i)] = d[lane, i]
    ref = A.float() @ B.float() + C
    assert torch.equal(D, ref), f"max err {(D - ref).abs().max()}"


@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_permutation(emu, num, trans):
    # 64 rows of 8 int16 (16 bytes) with distinct values; each lane names an arbitrary row (row address)
    tile = torch.arange(64 * 8, dtype=torch.int16).reshape(64, 8)
    rows = torch.randperm(64, generator=torch.Generator().manual_seed(num + 10 * trans))[:32]
    out = emu.arch_test_ldmatrix(tile.reshape(-1), rows * 8, num, trans)
    out_u = out.to(torch.int64) & 0xFFFFFFFF
    for lane in range(32):
        for j in range(num):
            # PTX ISA "ldmatrix": lanes 8j..8j+7 address the rows of matrix j; lane l receives row l//4,
            # elements 2*(l%4) and 2*(l%4)+1 (with .trans: element l//4 of rows 2*(l%4) and 2*(l%4)+1)
            mat = tile[rows[8 * j:8 * j + 8]]
            if trans:
                lo, hi = mat[2 * (lane % 4), lane // 4], mat[2 * (lane % 4) + 1, lane // 4]
            else:
                lo, hi = mat[lane // 4, 2 * (lane % 4)], mat[lane // 4, 2 * (lane % 4) + 1]
            expect = int(lo) | (int(hi) << 16)
            assert int(out_u[lane, j]) == expect, f"lane {lane} matrix {j}: got {int(out_u[lane, j]):#x}, expected {expect:#x}"


def test_ldmatrix_misaligned_row_raises(emu):
    if emu.dev != "cpu":
        pytest.skip("a misaligned ldmatrix faults the GPU; only the emulation checks it")
    tile = torch.arange(64 * 8, dtype=torch.int16)
    offsets = torch.arange(32) * 8
    offsets[3] += 1  # 2 bytes off a 16-byte boundary: the GPU would fault
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        emu.arch_test_ldmatrix(tile, offsets, 4, False)


@pytest.mark.parametrize("mask", [1, 2, 16, 31])
def test_shfl_xor_permutation(emu, mask):
    vals = torch.randn(256)
    out = emu.arch_test_shfl_xor(vals, mask)
    t = torch.arange(256)
    src = (t & ~31) | ((t % 32) ^ mask)
    assert torch.equal(out, vals[src])
