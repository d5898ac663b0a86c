// Registers the launchers as torch ops: torch.ops.mbt_fast.* (CUDA) or torch.ops.mbt_fast_emu.* (CPU, emulated).
#include "common/ops.h"

MBT_TORCH_LIBRARY(MBT_NS, m) {
    m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor seg, float scale, Tensor key_mask) -> Tensor[]");
    m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor seg, float scale, Tensor key_mask) -> Tensor[]");
    m.def("residual_mean_fwd(Tensor x, Tensor y, Tensor keep, Tensor row_mod, Tensor slot_start, int n_bottleneck, int mode) -> Tensor");
    m.def("residual_mean_bwd(Tensor grad, Tensor keep, Tensor row_mod, Tensor slot_start, int n_bottleneck, int mode) -> Tensor[]");
    m.def("segment_layernorm_fwd(Tensor x, Tensor weight, Tensor bias, Tensor row_weight, float eps) -> Tensor[]");
    m.def("segment_layernorm_bwd(Tensor grad, Tensor x, Tensor weight, Tensor row_weight, Tensor mean, Tensor rstd) -> Tensor[]");
    m.def("bias_gelu_fwd(Tensor x, Tensor bias, Tensor row_weight) -> Tensor");
    m.def("bias_gelu_bwd(Tensor grad, Tensor x, Tensor bias, Tensor row_weight) -> Tensor[]");
    m.def("arch_test_mma(Tensor a_regs, Tensor b_regs, Tensor c, bool bf16) -> Tensor");
    m.def("arch_test_ldmatrix(Tensor smem, Tensor row_offsets, int num, bool trans) -> Tensor");
    m.def("arch_test_shfl_xor(Tensor vals, int lane_mask) -> Tensor");
    m.def("arch_test_smem_uninit(Tensor vals, int blocks) -> Tensor");
    m.def("arch_test_block_chain(Tensor vals) -> Tensor");
    m.def("arch_test_vec16(Tensor src, int load_offset, int store_offset) -> Tensor");
    m.def("arch_test_launch(Tensor val, int grid_x, int grid_y, int grid_z, int threads, int smem_bytes, int max_dynamic_smem) -> Tensor");
    m.def("arch_test_cp_async(Tensor src, int wait) -> Tensor");
}

// seg, row_mod and slot_start are small CPU tables even for the CUDA build; the dispatch key comes
// from the data tensors, so register for the device kind of this build.
MBT_TORCH_LIBRARY_IMPL(MBT_NS, MBT_DISPATCH, m) {
    m.impl("attention_fwd", &MBT_NS::attention_fwd);
    m.impl("attention_bwd", &MBT_NS::attention_bwd);
    m.impl("residual_mean_fwd", &MBT_NS::residual_mean_fwd);
    m.impl("residual_mean_bwd", &MBT_NS::residual_mean_bwd);
    m.impl("segment_layernorm_fwd", &MBT_NS::segment_layernorm_fwd);
    m.impl("segment_layernorm_bwd", &MBT_NS::segment_layernorm_bwd);
    m.impl("bias_gelu_fwd", &MBT_NS::bias_gelu_fwd);
    m.impl("bias_gelu_bwd", &MBT_NS::bias_gelu_bwd);
    m.impl("arch_test_mma", &MBT_NS::arch_test_mma);
    m.impl("arch_test_ldmatrix", &MBT_NS::arch_test_ldmatrix);
    m.impl("arch_test_shfl_xor", &MBT_NS::arch_test_shfl_xor);
    m.impl("arch_test_smem_uninit", &MBT_NS::arch_test_smem_uninit);
    m.impl("arch_test_block_chain", &MBT_NS::arch_test_block_chain);
    m.impl("arch_test_vec16", &MBT_NS::arch_test_vec16);
    m.impl("arch_test_launch", &MBT_NS::arch_test_launch);
    m.impl("arch_test_cp_async", &MBT_NS::arch_test_cp_async);
}
