// Test kernels for the arch.cuh wrappers: they expose one wrapper each to Python so that the tests
// (tests/csrc/test_emu_arch.py) compare the fragment layouts against the PTX ISA tables written out
// independently in Python, and, on a GPU, the emulation against the hardware. Below them, kernels with
// one planted bug each, which the emulation must catch as a GPU would (tests/csrc/test_emu_faults.py).
#include "ops.h"

namespace MBT_NS {

template <class T>
MBT_GLOBAL void _arch_test_mma_kernel(const int32_t* a_regs, const int32_t* b_regs, const float* c, float* d) {
    const unsigned l = mbt::thread_x();
    uint32_t a[4], b[2];
    float acc[4];
    for (int i = 0; i < 4; ++i) a[i] = static_cast<uint32_t>(a_regs[4 * l + i]);
    for (int i = 0; i < 2; ++i) b[i] = static_cast<uint32_t>(b_regs[2 * l + i]);
    for (int i = 0; i < 4; ++i) acc[i] = c[4 * l + i];
    mbt::mma_m16n8k16<T>(acc, a, b);
    for (int i = 0; i < 4; ++i) d[4 * l + i] = acc[i];
}

at::Tensor arch_test_mma(const at::Tensor& a_regs, const at::Tensor& b_regs, const at::Tensor& c, bool bf16) {
    check_device(a_regs, "a_regs");
    TORCH_CHECK(a_regs.scalar_type() == at::kInt && a_regs.numel() == 128, "a_regs: expected int32 [32, 4]");
    TORCH_CHECK(b_regs.scalar_type() == at::kInt && b_regs.numel() == 64, "b_regs: expected int32 [32, 2]");
    TORCH_CHECK(c.scalar_type() == at::kFloat && c.numel() == 128, "c: expected float32 [32, 4]");
    MBT_DEVICE_GUARD(a_regs);
    auto ac = a_regs.contiguous(), bc = b_regs.contiguous(), cc = c.contiguous();
    auto d = at::empty({32, 4}, c.options());
    if (bf16)
        MBT_LAUNCH(_arch_test_mma_kernel<__nv_bfloat16>, dim3(1), dim3(32), 0, MBT_STREAM, ac.data_ptr<int32_t>(),
                   bc.data_ptr<int32_t>(), cc.data_ptr<float>(), d.data_ptr<float>());
    else
        MBT_LAUNCH(_arch_test_mma_kernel<__half>, dim3(1), dim3(32), 0, MBT_STREAM, ac.data_ptr<int32_t>(),
                   bc.data_ptr<int32_t>(), cc.data_ptr<float>(), d.data_ptr<float>());
    MBT_CHECK_LAUNCH();
    return d;
}

// smem: the whole int16 tile copied to shared memory; lane l's row address is smem + row_offsets[l]
template <int N, bool Trans>
MBT_GLOBAL void _arch_test_ldmatrix_kernel(const int16_t* src, int n, const int64_t* offsets, int32_t* out) {
    MBT_DYNAMIC_SMEM(int16_t, tile);
    const unsigned l = mbt::thread_x();
    for (int i = l; i < n; i += 32) tile[i] = src[i];
    mbt::sync_threads();
    uint32_t r[N];
    const int16_t* p = tile + offsets[l];
    if constexpr (N == 1) { if (Trans) mbt::ldmatrix_x1_trans(r, p); else mbt::ldmatrix_x1(r, p); }
    if constexpr (N == 2) { if (Trans) mbt::ldmatrix_x2_trans(r, p); else mbt::ldmatrix_x2(r, p); }
    if constexpr (N == 4) { if (Trans) mbt::ldmatrix_x4_trans(r, p); else mbt::ldmatrix_x4(r, p); }
    for (int j = 0; j < N; ++j) out[N * l + j] = static_cast<int32_t>(r[j]);
}

at::Tensor arch_test_ldmatrix(const at::Tensor& smem, const at::Tensor& row_offsets, int64_t num, bool trans) {
    check_device(smem, "smem");
    TORCH_CHECK(smem.scalar_type() == at::kShort, "smem: expected int16");
    TORCH_CHECK(row_offsets.scalar_type() == at::kLong && row_offsets.numel() == 32, "row_offsets: expected int64 [32]");
    TORCH_CHECK(num == 1 || num == 2 || num == 4, "num: expected 1, 2 or 4, got ", num);
    TORCH_CHECK(smem.numel() * 2 <= 48 * 1024, "smem: at most 48 KiB");
    MBT_DEVICE_GUARD(smem);
    auto s = smem.contiguous(), o = row_offsets.contiguous();
    auto out = at::empty({32, num}, smem.options().dtype(at::kInt));
    const int n = static_cast<int>(s.numel());
    const size_t bytes = static_cast<size_t>(n) * 2;
    auto args = [&](auto kernel) {
        MBT_LAUNCH(kernel, dim3(1), dim3(32), bytes, MBT_STREAM, s.data_ptr<int16_t>(), n, o.data_ptr<int64_t>(),
                   out.data_ptr<int32_t>());
    };
    if (num == 1) trans ? args(_arch_test_ldmatrix_kernel<1, true>) : args(_arch_test_ldmatrix_kernel<1, false>);
    if (num == 2) trans ? args(_arch_test_ldmatrix_kernel<2, true>) : args(_arch_test_ldmatrix_kernel<2, false>);
    if (num == 4) trans ? args(_arch_test_ldmatrix_kernel<4, true>) : args(_arch_test_ldmatrix_kernel<4, false>);
    MBT_CHECK_LAUNCH();
    return out;
}

MBT_GLOBAL void _arch_test_shfl_xor_kernel(const float* vals, int lane_mask, float* out) {
    const unsigned t = mbt::block_x() * mbt::block_dim_x() + mbt::thread_x();
    out[t] = mbt::shfl_xor(vals[t], lane_mask);
}

at::Tensor arch_test_shfl_xor(const at::Tensor& vals, int64_t lane_mask) {
    check_device(vals, "vals");
    TORCH_CHECK(vals.scalar_type() == at::kFloat && vals.numel() % 64 == 0, "vals: expected float32 with a multiple of 64 elements");
    TORCH_CHECK(lane_mask >= 0 && lane_mask < 32, "lane_mask: expected [0, 32), got ", lane_mask);
    MBT_DEVICE_GUARD(vals);
    auto v = vals.contiguous();
    auto out = at::empty_like(v);
    // blocks of 64 threads: two warps per block, several blocks, so warps and blocks both get exercised
    MBT_LAUNCH(_arch_test_shfl_xor_kernel, dim3(static_cast<unsigned>(v.numel() / 64)), dim3(64), 0, MBT_STREAM,
               v.data_ptr<float>(), static_cast<int>(lane_mask), out.data_ptr<float>());
    MBT_CHECK_LAUNCH();
    return out;
}

// ---- planted bugs ---------------------------------------------------------------------------------------

constexpr int kUninitWords = 64;  // one word per thread of a 64-thread block

// Bug: shared memory read before it is written. Block b copies vals (n <= 64 words) into the first n
// words of a static and of a dynamic array, reads all 64 words back (words n.. were never written), then
// overwrites both arrays with b. out[b][0] / out[b][1]: what the static / dynamic array held.
MBT_GLOBAL void _arch_test_smem_uninit_kernel(const int32_t* vals, int n, int32_t* out) {
    MBT_STATIC_SMEM(int32_t, stat, kUninitWords);
    MBT_DYNAMIC_SMEM(int32_t, dyn);
    const int t = static_cast<int>(mbt::thread_x()), b = static_cast<int>(mbt::block_x());
    if (t < n) {
        stat[t] = vals[t];
        dyn[t] = vals[t];
    }
    mbt::sync_threads();
    out[(2 * b) * kUninitWords + t] = stat[t];
    out[(2 * b + 1) * kUninitWords + t] = dyn[t];
    mbt::sync_threads();
    stat[t] = b;
    dyn[t] = b;
}

at::Tensor arch_test_smem_uninit(const at::Tensor& vals, int64_t blocks) {
    check_device(vals, "vals");
    TORCH_CHECK(vals.scalar_type() == at::kInt && vals.dim() == 1 && vals.numel() <= kUninitWords,
                "vals: expected int32 [n] with n <= ", kUninitWords);
    TORCH_CHECK(blocks >= 1 && blocks <= 1024, "blocks: expected [1, 1024], got ", blocks);
    MBT_DEVICE_GUARD(vals);
    auto v = vals.contiguous();
    auto out = at::empty({blocks, 2, kUninitWords}, v.options());
    MBT_LAUNCH(_arch_test_smem_uninit_kernel, dim3(static_cast<unsigned>(blocks)), dim3(kUninitWords),
               kUninitWords * sizeof(int32_t), MBT_STREAM, v.data_ptr<int32_t>(), static_cast<int>(v.numel()),
               out.data_ptr<int32_t>());
    MBT_CHECK_LAUNCH();
    return out;
}

// Bug: a dependency between blocks. Block b adds vals[b] to what block b-1 wrote (a prefix sum across
// blocks); nothing orders blocks on a GPU, so the sum is right only if blocks happen to run in index order.
MBT_GLOBAL void _arch_test_block_chain_kernel(const int32_t* vals, int32_t* out) {
    const unsigned b = mbt::block_x();
    if (mbt::thread_x() == 0) out[b] = (b == 0 ? 0 : out[b - 1]) + vals[b];
}

at::Tensor arch_test_block_chain(const at::Tensor& vals) {
    check_device(vals, "vals");
    TORCH_CHECK(vals.scalar_type() == at::kInt && vals.dim() == 1 && vals.numel() >= 1 && vals.numel() <= 65535,
                "vals: expected int32 [n], 1 <= n <= 65535");
    MBT_DEVICE_GUARD(vals);
    auto v = vals.contiguous();
    auto out = at::zeros_like(v);
    MBT_LAUNCH(_arch_test_block_chain_kernel, dim3(static_cast<unsigned>(v.numel())), dim3(32), 0, MBT_STREAM,
               v.data_ptr<int32_t>(), out.data_ptr<int32_t>());
    MBT_CHECK_LAUNCH();
    return out;
}

// One 16-byte load from src + load_offset and store to out + store_offset (offsets in int32 elements).
// Bug: an offset that is not a multiple of 4 elements, i.e. a misaligned 128-bit access.
MBT_GLOBAL void _arch_test_vec16_kernel(const int32_t* src, int load_offset, int32_t* out, int store_offset) {
    if (mbt::thread_x() == 0)
        mbt::store16(reinterpret_cast<uint4*>(out + store_offset), mbt::load16(reinterpret_cast<const uint4*>(src + load_offset)));
}

at::Tensor arch_test_vec16(const at::Tensor& src, int64_t load_offset, int64_t store_offset) {
    check_device(src, "src");
    TORCH_CHECK(src.scalar_type() == at::kInt && src.dim() == 1, "src: expected int32 [n]");
    const int64_t n = src.numel();
    // in bounds whatever the alignment: the only bug left to the kernel is the misalignment
    TORCH_CHECK(load_offset >= 0 && load_offset + 4 <= n, "load_offset: expected [0, ", n - 4, "], got ", load_offset);
    TORCH_CHECK(store_offset >= 0 && store_offset + 4 <= n, "store_offset: expected [0, ", n - 4, "], got ", store_offset);
    MBT_DEVICE_GUARD(src);
    auto s = src.contiguous();
    auto out = at::zeros_like(s);
    MBT_LAUNCH(_arch_test_vec16_kernel, dim3(1), dim3(32), 0, MBT_STREAM, s.data_ptr<int32_t>(),
               static_cast<int>(load_offset), out.data_ptr<int32_t>(), static_cast<int>(store_offset));
    MBT_CHECK_LAUNCH();
    return out;
}

// cp.async: 32 threads copy src (2 x 128 int32) into two shared arrays, 16 bytes each per array, as two
// committed groups (array 0, then array 1), then wait for all of them (wait = 0), all but the newest
// (wait = 1), or not at all (wait = -1), and read both arrays back after a __syncthreads. Bug: with
// wait = 1 the second group, with wait = -1 both, may still be in flight when read.
constexpr int kAsyncWords = 128;

MBT_GLOBAL void _arch_test_cp_async_kernel(const int32_t* src, int wait, int32_t* out) {
    MBT_STATIC_SMEM(int32_t, buf, 2 * kAsyncWords);
    const int t = static_cast<int>(mbt::thread_x());
    for (int a = 0; a < 2; ++a) {
        mbt::cp_async16(buf + a * kAsyncWords + 4 * t, src + a * kAsyncWords + 4 * t);
        mbt::cp_async_commit();
    }
    if (wait == 0)
        mbt::cp_async_wait<0>();
    else if (wait == 1)
        mbt::cp_async_wait<1>();
    mbt::sync_threads();
    for (int i = t; i < 2 * kAsyncWords; i += 32) out[i] = buf[i];
    mbt::sync_threads();      // every read done before the last copies may land
    mbt::cp_async_wait<0>();  // nothing in flight when the block exits
}

at::Tensor arch_test_cp_async(const at::Tensor& src, int64_t wait) {
    check_device(src, "src");
    TORCH_CHECK(src.scalar_type() == at::kInt && src.numel() == 2 * kAsyncWords, "src: expected int32 [2, ", kAsyncWords, "]");
    TORCH_CHECK(wait >= -1 && wait <= 1, "wait: expected -1 (none), 0 or 1, got ", wait);
    MBT_DEVICE_GUARD(src);
    auto s = src.contiguous();
    auto out = at::empty({2, kAsyncWords}, s.options());
    MBT_LAUNCH(_arch_test_cp_async_kernel, dim3(1), dim3(32), 0, MBT_STREAM, s.data_ptr<int32_t>(), static_cast<int>(wait),
               out.data_ptr<int32_t>());
    MBT_CHECK_LAUNCH();
    return out;
}

// A trivial kernel launched with the configuration given, after setting its MaxDynamicSharedMemorySize
// attribute: what the driver (or the emulation) accepts and refuses. Thread 0 of every block stores
// val[0] (the same value from every block).
MBT_GLOBAL void _arch_test_launch_kernel(const int32_t* val, int32_t* out) {
    if (mbt::thread_x() == 0) out[0] = val[0];
}

at::Tensor arch_test_launch(const at::Tensor& val, int64_t grid_x, int64_t grid_y, int64_t grid_z, int64_t threads,
                            int64_t smem_bytes, int64_t max_dynamic_smem) {
    check_device(val, "val");
    TORCH_CHECK(val.scalar_type() == at::kInt && val.numel() == 1, "val: expected int32 [1]");
    // only what fits the launch's unsigned arguments; the limits themselves are the launch's to check
    for (const int64_t x : {grid_x, grid_y, grid_z, threads, smem_bytes, max_dynamic_smem})
        TORCH_CHECK(x >= 0 && x <= UINT32_MAX, "launch arguments: expected [0, 2^32), got ", x);
    TORCH_CHECK(max_dynamic_smem <= INT32_MAX, "max_dynamic_smem: expected [0, 2^31), got ", max_dynamic_smem);
    MBT_DEVICE_GUARD(val);
    auto v = val.contiguous();
    auto out = at::zeros_like(v);
    auto kernel = _arch_test_launch_kernel;
    set_dynamic_smem_attribute(kernel, static_cast<size_t>(max_dynamic_smem));
    MBT_LAUNCH(kernel, dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y), static_cast<unsigned>(grid_z)),
               dim3(static_cast<unsigned>(threads)), static_cast<size_t>(smem_bytes), MBT_STREAM, v.data_ptr<int32_t>(),
               out.data_ptr<int32_t>());
    MBT_CHECK_LAUNCH();
    return out;
}

}  // namespace MBT_NS
