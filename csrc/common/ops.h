// The launchers each op's .cu file defines; csrc/binding.cpp registers them as torch ops.
#pragma once

#include <vector>

#include "torch_glue.h"

namespace MBT_NS {

// mbt_attention: q [Nq,B,H,D], k/v [Nk,B,H,D] (last dim contiguous), seg int32 [S,4] on the CPU,
// key_mask bool [B,Nk] contiguous on q's device (true: the key may be attended) or empty (every key).
// Returns (out [Nq,B,H,D], lse fp32 [B,H,Nq]).
std::vector<at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& seg, double scale, const at::Tensor& key_mask);
// Returns (dq, dk, dv) with the shapes of q, k, v.
std::vector<at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                      const at::Tensor& seg, double scale, const at::Tensor& key_mask);

// residual_mean: x, y [N,B,C] contiguous, keep [B,M] or empty, row_mod int32 [N] (modality of each row),
// slot_start int32 [M] (first bottleneck row of each modality), mode 0 add / 1 keep / 2 mean.
at::Tensor residual_mean_fwd(const at::Tensor& x, const at::Tensor& y, const at::Tensor& keep,
                             const at::Tensor& row_mod, const at::Tensor& slot_start, int64_t n_bottleneck,
                             int64_t mode);
// Returns (dx, dy).
std::vector<at::Tensor> residual_mean_bwd(const at::Tensor& grad, const at::Tensor& keep, const at::Tensor& row_mod,
                                          const at::Tensor& slot_start, int64_t n_bottleneck, int64_t mode);

// segment_layernorm: x [N,B,C] contiguous, weight/bias fp32 [M,C], row_weight int32 [N] (modality of each row).
// Returns (out [N,B,C], mean fp32 [N*B], rstd fp32 [N*B]).
std::vector<at::Tensor> segment_layernorm_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                              const at::Tensor& row_weight, double eps);
// Returns (grad_x, grad_weight fp32 [M,C], grad_bias fp32 [M,C]).
std::vector<at::Tensor> segment_layernorm_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                              const at::Tensor& row_weight, const at::Tensor& mean, const at::Tensor& rstd);

// bias_gelu: x [N,B,F] contiguous, bias fp32 [M,F], row_weight int32 [N]; tanh-GELU of x + bias[row_weight[n]].
at::Tensor bias_gelu_fwd(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& row_weight);
// Returns (grad_x, grad_bias fp32 [M,F]).
std::vector<at::Tensor> bias_gelu_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias,
                                      const at::Tensor& row_weight);

// Tests of the arch.cuh wrappers themselves (one warp per block).
at::Tensor arch_test_mma(const at::Tensor& a_regs, const at::Tensor& b_regs, const at::Tensor& c, bool bf16);
at::Tensor arch_test_ldmatrix(const at::Tensor& smem, const at::Tensor& row_offsets, int64_t num, bool trans);
at::Tensor arch_test_shfl_xor(const at::Tensor& vals, int64_t lane_mask);
// Kernels with one planted bug each (uninitialised shared memory, a cross-block dependency, a misaligned
// 16-byte access) and a launch with a given configuration: the emulation must fail where a GPU would.
at::Tensor arch_test_smem_uninit(const at::Tensor& vals, int64_t blocks);
at::Tensor arch_test_block_chain(const at::Tensor& vals);
at::Tensor arch_test_vec16(const at::Tensor& src, int64_t load_offset, int64_t store_offset);
at::Tensor arch_test_launch(const at::Tensor& val, int64_t grid_x, int64_t grid_y, int64_t grid_z, int64_t threads,
                            int64_t smem_bytes, int64_t max_dynamic_smem);
// cp.async into shared memory, two committed groups, then wait_group 0, 1 or no wait (-1)
at::Tensor arch_test_cp_async(const at::Tensor& src, int64_t wait);

}  // namespace MBT_NS
