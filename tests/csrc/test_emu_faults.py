"""The emulator fails where a GPU would (csrc/emu/emu_runtime.h, DESIGN.md section 5.4): each test runs a
tiny kernel of csrc/common/arch_tests.cu with one planted bug and shows that cuda-emu catches it.

* shared memory read before it is written reads the fill pattern (every byte 0xFF: NaN in fp32, fp16 and
  bf16), in every block, for static and dynamic shared memory;
* a block that reads what block b-1 wrote gets the wrong answer in the (default) shuffled block order;
* a misaligned 16-byte load or store raises;
* a cp.async copy lands in shared memory only at the wait_group that covers it (a missing wait reads NaN);
* a launch past the hardware's grid, block or shared-memory limits raises (on a GPU too).
"""
import pytest
import torch

from mbt_fast import cuda_ext

_EMU = cuda_ext.build_problems(emulated=True)
_ENV = ("MBT_EMU_BLOCK_ORDER", "MBT_EMU_SEED", "MBT_EMU_SMEM_FILL")
KIB = 1024


@pytest.fixture
def emu(monkeypatch):
    """The emulated ops, under the emulator's defaults (none of its variables set)."""
    if _EMU:
        pytest.skip("; ".join(_EMU))
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    return cuda_ext.build(emulated=True)


# ---- uninitialised shared memory -------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["shuffle", "linear"])
def test_uninitialised_shared_read_gives_nan_pattern(emu, monkeypatch, order):
    monkeypatch.setenv("MBT_EMU_BLOCK_ORDER", order)
    vals = torch.arange(1, 17, dtype=torch.int32)
    out = emu.arch_test_smem_uninit(vals, 4)  # [block, static | dynamic, word]
    written, unwritten = out[..., :16], out[..., 16:]
    assert torch.equal(written, vals.expand_as(written))
    # every block, not only the first: each block before it overwrote both arrays with its own index
    for b in range(4):
        for kind, name in enumerate(("static", "dynamic")):
            got = unwritten[b, kind]
            assert (got == -1).all(), f"block {b}, {name} shared memory: expected every byte 0xFF, got {got.tolist()}"
    assert unwritten.view(torch.float32).isnan().all()
    assert unwritten.view(torch.float16).isnan().all()
    assert unwritten.view(torch.bfloat16).isnan().all()


def test_zero_fill_reads_zeros(emu, monkeypatch):
    """MBT_EMU_SMEM_FILL=zero: what the emulator used to give (zeros), to tell an uninitialised read apart."""
    monkeypatch.setenv("MBT_EMU_SMEM_FILL", "zero")
    out = emu.arch_test_smem_uninit(torch.arange(1, 17, dtype=torch.int32), 3)
    assert (out[..., 16:] == 0).all()


# ---- block order -----------------------------------------------------------------------------------------

def test_cross_block_dependency_wrong_when_shuffled(emu, monkeypatch):
    vals = torch.arange(1, 65, dtype=torch.int32)
    expect = torch.cumsum(vals, 0).to(torch.int32)
    default = emu.arch_test_block_chain(vals)  # default order: shuffled, fixed seed
    assert not torch.equal(default, expect), "blocks ran in index order by default"
    assert torch.equal(emu.arch_test_block_chain(vals), default), "the default order is not reproducible"
    monkeypatch.setenv("MBT_EMU_BLOCK_ORDER", "shuffle")
    monkeypatch.setenv("MBT_EMU_SEED", "0")
    assert torch.equal(emu.arch_test_block_chain(vals), default)
    monkeypatch.setenv("MBT_EMU_SEED", "12345")
    other = emu.arch_test_block_chain(vals)
    assert not torch.equal(other, expect) and not torch.equal(other, default), "the seed does not change the order"
    monkeypatch.setenv("MBT_EMU_BLOCK_ORDER", "linear")
    assert torch.equal(emu.arch_test_block_chain(vals), expect)


@pytest.mark.parametrize("name, value", [("MBT_EMU_BLOCK_ORDER", "random"), ("MBT_EMU_SEED", "0x1g"),
                                         ("MBT_EMU_SMEM_FILL", "ones")])
def test_bad_setting_raises(emu, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=name):
        emu.arch_test_block_chain(torch.ones(4, dtype=torch.int32))


# ---- alignment of 16-byte accesses -----------------------------------------------------------------------

def test_aligned_16_byte_access(emu):
    src = torch.arange(16, dtype=torch.int32)
    out = emu.arch_test_vec16(src, 8, 4)
    expect = torch.zeros(16, dtype=torch.int32)
    expect[4:8] = src[8:12]
    assert torch.equal(out, expect)


@pytest.mark.parametrize("load, store, what", [(1, 0, "16-byte load"), (6, 4, "16-byte load"), (0, 2, "16-byte store")])
def test_misaligned_16_byte_access_raises(emu, load, store, what):
    with pytest.raises(RuntimeError, match=f"{what}: address 0x[0-9a-f]+ not 16-byte aligned"):
        emu.arch_test_vec16(torch.arange(16, dtype=torch.int32), load, store)


# ---- cp.async: a copy lands only at the wait that covers its group ---------------------------------------

def test_cp_async_lands_at_its_wait(emu):
    """Two committed groups (array 0, then array 1): wait_group 0 lands both, wait_group 1 only the older
    one, no wait neither, so a missing or too-weak wait reads the fill pattern (-1: every byte 0xFF)."""
    src = torch.arange(1, 257, dtype=torch.int32).view(2, 128)
    assert torch.equal(emu.arch_test_cp_async(src, 0), src)
    older_only = emu.arch_test_cp_async(src, 1)
    assert torch.equal(older_only[0], src[0]) and (older_only[1] == -1).all(), older_only[1].tolist()
    assert (emu.arch_test_cp_async(src, -1) == -1).all()


def test_cp_async_bad_wait_is_named(emu):
    with pytest.raises(RuntimeError, match="wait: expected -1"):
        emu.arch_test_cp_async(torch.zeros(256, dtype=torch.int32), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_cp_async_on_gpu():
    """The PTX definitions: cp.async.cg 16 bytes, commit_group, wait_group 0 (the waits that race are
    the emulation's to catch: on a GPU their result depends on timing)."""
    ops = cuda_ext.build(emulated=False)
    src = torch.arange(1, 257, dtype=torch.int32, device="cuda").view(2, 128)
    assert torch.equal(ops.arch_test_cp_async(src, 0), src)


# ---- launch limits (sm_90), on the emulation and on a GPU ------------------------------------------------

@pytest.fixture(params=[
    pytest.param("cpu", id="emu", marks=pytest.mark.skipif(bool(_EMU), reason="; ".join(_EMU) or "ok")),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")]),
])
def device(request, monkeypatch):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    return request.param


def _launch(device, grid=(1, 1, 1), threads=32, smem=0, attr=48 * KIB):
    ops = cuda_ext.build(emulated=device == "cpu")
    val = torch.tensor([7], dtype=torch.int32, device=device)
    return ops.arch_test_launch(val, *grid, threads, smem, attr).cpu()


@pytest.mark.parametrize("grid, threads, smem, attr, match", [
    ((2**31, 1, 1), 32, 0, 48 * KIB, "grid"),
    ((1, 65536, 1), 32, 0, 48 * KIB, "grid"),
    ((1, 1, 65536), 32, 0, 48 * KIB, "grid"),
    ((0, 1, 1), 32, 0, 48 * KIB, "grid"),
    ((1, 1, 1), 1025, 0, 48 * KIB, "block"),
    ((1, 1, 1), 0, 0, 48 * KIB, "block"),
    ((1, 1, 1), 32, 48 * KIB + 1, 48 * KIB, "dynamic shared memory"),  # no opt-in past 48 KiB
    ((1, 1, 1), 32, 100 * KIB + 1, 100 * KIB, "dynamic shared memory"),  # past the opt-in
    ((1, 1, 1), 32, 227 * KIB + 1, 227 * KIB, "dynamic shared memory"),
    ((1, 1, 1), 32, 0, 227 * KIB + 1, "cudaFuncSetAttribute"),  # an opt-in past sm_90's 227 KiB
])
def test_launch_past_limits_raises(device, grid, threads, smem, attr, match):
    with pytest.raises(RuntimeError, match=match if device == "cpu" else None):
        _launch(device, grid, threads, smem, attr)


@pytest.mark.parametrize("grid, threads, smem, attr", [
    ((70000, 1, 1), 1, 0, 48 * KIB),  # grid.x is not limited to 65535
    ((1, 65535, 1), 1, 0, 48 * KIB),
    ((1, 1, 65535), 1, 0, 48 * KIB),
    ((1, 1, 1), 1024, 0, 48 * KIB),
    ((2, 1, 1), 32, 48 * KIB, 48 * KIB),
    ((2, 1, 1), 32, 227 * KIB, 227 * KIB),  # sm_90's opt-in maximum
])
def test_launch_at_limits_runs(device, grid, threads, smem, attr):
    if device == "cuda" and smem > 48 * KIB and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("227 KiB of shared memory per block is sm_90's limit")
    assert _launch(device, grid, threads, smem, attr).tolist() == [7]
