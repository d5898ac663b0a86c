// The launchers each op's .cu file defines; csrc/binding.cpp registers them as torch ops.
#pragma once

#include <vector>

#include "torch_glue.h"

namespace MBT_NS {

// mbt_attention: q [Nq,B,H,D], k/v [Nk,B,H,D] (last dim contiguous), seg int32 [S,4] on the CPU.
// Returns (out [Nq,B,H,D], lse fp32 [B,H,Nq]).
std::vector<at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& seg, double scale);
// Returns (dq, dk, dv) with the shapes of q, k, v.
std::vector<at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                      const at::Tensor& seg, double scale);

// residual_mean: x, y [N,B,C] contiguous, keep [B,M] or empty, row_mod int32 [N] (modality of each row),
// slot_start int32 [M] (first bottleneck row of each modality), mode 0 add / 1 keep / 2 mean.
at::Tensor residual_mean_fwd(const at::Tensor& x, const at::Tensor& y, const at::Tensor& keep,
                             const at::Tensor& row_mod, const at::Tensor& slot_start, int64_t n_bottleneck,
                             int64_t mode);
// Returns (dx, dy).
std::vector<at::Tensor> residual_mean_bwd(const at::Tensor& grad, const at::Tensor& keep, const at::Tensor& row_mod,
                                          const at::Tensor& slot_start, int64_t n_bottleneck, int64_t mode);

// Tests of the arch.cuh wrappers themselves (one warp per block).
at::Tensor arch_test_mma(const at::Tensor& a_regs, const at::Tensor& b_regs, const at::Tensor& c, bool bf16);
at::Tensor arch_test_ldmatrix(const at::Tensor& smem, const at::Tensor& row_offsets, int64_t num, bool trans);
at::Tensor arch_test_shfl_xor(const at::Tensor& vals, int64_t lane_mask);

}  // namespace MBT_NS
