// Test kernels for the arch.cuh wrappers: they expose one wrapper each to Python so that the tests
// (tests/csrc/test_emu_arch.py) compare the fragment layouts against the PTX ISA tables written out
// independently in Python, and, on a GPU, the emulation against the hardware.
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

}  // namespace MBT_NS
