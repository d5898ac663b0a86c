// Segment LayerNorm, forward and backward (semantics of mbt_fast.kernels.segment_layernorm without the
// fused residual; contract in mbt_fast.ops).
//
// x, out, grad: contiguous [N, B, C] (row r = n * B + b); w, b: fp32 [M, C] (the host casts the weights,
// M * C values); row_weight[n]: modality of row n; mean, rstd: fp32 [N * B], saved by the forward.
//   out = (x - mean) * rstd * w[m] + b[m],  statistics in fp32.
// A row lives in registers: thread t holds columns t + i * blockDim (i < kLnPerThread, coalesced), the
// block size is the smallest multiple of 32 covering C / kLnPerThread, and the row sums are warp
// shuffles + one shared-memory step (block_sum2).
// Forward: one block per row. Backward: each block walks a contiguous chunk of rows, writes grad_x, and
// keeps its columns' sums of dy * xhat and dy in registers, flushed into its own slice of a
// [blocks, M, C] partial buffer whenever the modality changes; the host adds the slices (deterministic,
// no atomics).
#include <algorithm>

#include "../common/block_reduce.cuh"
#include "../common/ops.h"

namespace MBT_NS {

using namespace mbt;

constexpr int kLnPerThread = 8;
constexpr int kLnMaxThreads = 512;  // 128 registers per thread at most: no spills in the backward
constexpr int kLnMaxC = kLnPerThread * kLnMaxThreads;

struct LnParams {
    const void* x;
    const float* w;
    const float* b;
    const int* row_weight;
    void* out;  // forward: out; backward: grad_x
    float* mean;
    float* rstd;
    const void* g;  // backward: grad of out
    float* dw_part;  // backward: [blocks, M, C]
    float* db_part;
    int rows, B, C, M, rows_per_block;
    float eps;
};

template <class T>
MBT_GLOBAL void MBT_LAUNCH_BOUNDS(kLnMaxThreads) _segment_layernorm_fwd_kernel(LnParams p) {
    MBT_STATIC_SMEM(float, red, 2 * kMaxWarps);
    const int row = static_cast<int>(block_x());
    const int t = static_cast<int>(thread_x()), nt = static_cast<int>(block_dim_x());
    const int64_t base = static_cast<int64_t>(row) * p.C;
    const T* x = static_cast<const T*>(p.x) + base;
    float v[kLnPerThread];
    float sum = 0.f, unused = 0.f;
#pragma unroll
    for (int i = 0; i < kLnPerThread; ++i) {
        const int c = t + i * nt;
        v[i] = c < p.C ? TypeOps<T>::to_float(x[c]) : 0.f;
        sum += v[i];
    }
    block_sum2(sum, unused, red);
    const float mean = sum / static_cast<float>(p.C);
    float sq = 0.f;  // centred second pass over the registers: no cancellation
#pragma unroll
    for (int i = 0; i < kLnPerThread; ++i) {
        const float d = t + i * nt < p.C ? v[i] - mean : 0.f;
        sq += d * d;
    }
    block_sum2(sq, unused, red);
    const float rstd = 1.f / sqrtf(sq / static_cast<float>(p.C) + p.eps);
    const int m = p.row_weight[row / p.B];
    const float* w = p.w + static_cast<int64_t>(m) * p.C;
    const float* bb = p.b + static_cast<int64_t>(m) * p.C;
    T* out = static_cast<T*>(p.out) + base;
#pragma unroll
    for (int i = 0; i < kLnPerThread; ++i) {
        const int c = t + i * nt;
        if (c < p.C) out[c] = TypeOps<T>::from_float((v[i] - mean) * rstd * w[c] + bb[c]);
    }
    if (t == 0) {
        p.mean[row] = mean;
        p.rstd[row] = rstd;
    }
}

// add this thread's per-modality sums into the block's own slice of the partial buffers, then clear them
MBT_DEVICE void ln_flush(const LnParams& p, int m, float (&acc_w)[kLnPerThread], float (&acc_b)[kLnPerThread]) {
    const int t = static_cast<int>(thread_x()), nt = static_cast<int>(block_dim_x());
    const int64_t slice = (static_cast<int64_t>(block_x()) * p.M + m) * p.C;
#pragma unroll
    for (int i = 0; i < kLnPerThread; ++i) {
        const int c = t + i * nt;
        if (c < p.C) {
            p.dw_part[slice + c] += acc_w[i];
            p.db_part[slice + c] += acc_b[i];
        }
        acc_w[i] = 0.f;
        acc_b[i] = 0.f;
    }
}

template <class T>
MBT_GLOBAL void MBT_LAUNCH_BOUNDS(kLnMaxThreads) _segment_layernorm_bwd_kernel(LnParams p) {
    MBT_STATIC_SMEM(float, red, 2 * kMaxWarps);
    const int t = static_cast<int>(thread_x()), nt = static_cast<int>(block_dim_x());
    const int row0 = static_cast<int>(block_x()) * p.rows_per_block;
    const int row_end = row0 + p.rows_per_block < p.rows ? row0 + p.rows_per_block : p.rows;
    const float inv_c = 1.f / static_cast<float>(p.C);
    float acc_w[kLnPerThread], acc_b[kLnPerThread];
#pragma unroll
    for (int i = 0; i < kLnPerThread; ++i) acc_w[i] = acc_b[i] = 0.f;
    int m_cur = -1;  // modality whose sums acc_w / acc_b hold (the same for every thread of the block)
    for (int row = row0; row < row_end; ++row) {
        const int m = p.row_weight[row / p.B];
        if (m != m_cur) {
            if (m_cur >= 0) ln_flush(p, m_cur, acc_w, acc_b);
            m_cur = m;
        }
        const int64_t base = static_cast<int64_t>(row) * p.C;
        const T* x = static_cast<const T*>(p.x) + base;
        const T* g = static_cast<const T*>(p.g) + base;
        const float* w = p.w + static_cast<int64_t>(m) * p.C;
        const float mean = p.mean[row], rstd = p.rstd[row];
        float xhat[kLnPerThread], wdy[kLnPerThread];
        float s_xw = 0.f, s_w = 0.f;  // sums of xhat * w * dy and w * dy over the row
#pragma unroll
        for (int i = 0; i < kLnPerThread; ++i) {
            const int c = t + i * nt;
            float dy = 0.f;
            xhat[i] = 0.f;
            if (c < p.C) {
                dy = TypeOps<T>::to_float(g[c]);
                xhat[i] = (TypeOps<T>::to_float(x[c]) - mean) * rstd;
            }
            wdy[i] = c < p.C ? w[c] * dy : 0.f;
            s_xw += xhat[i] * wdy[i];
            s_w += wdy[i];
            acc_w[i] += dy * xhat[i];
            acc_b[i] += dy;
        }
        block_sum2(s_xw, s_w, red);
        const float c1 = s_xw * inv_c, c2 = s_w * inv_c;
        T* gx = static_cast<T*>(p.out) + base;
#pragma unroll
        for (int i = 0; i < kLnPerThread; ++i) {
            const int c = t + i * nt;
            if (c < p.C) gx[c] = TypeOps<T>::from_float((wdy[i] - (xhat[i] * c1 + c2)) * rstd);
        }
    }
    if (m_cur >= 0) ln_flush(p, m_cur, acc_w, acc_b);
}

// smallest multiple of 32 threads that holds a row in kLnPerThread registers each
static int ln_threads(int64_t C) { return static_cast<int>(((C + kLnPerThread - 1) / kLnPerThread + 31) / 32 * 32); }

static LnParams ln_params(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_weight) {
    check_device(x, "x");
    TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "x: expected a contiguous [N, B, C] tensor, got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                "x: expected float32, float16 or bfloat16, got ", x.scalar_type());
    const int64_t C = x.size(2);
    TORCH_CHECK(C >= 1 && C <= kLnMaxC, "x: the CUDA segment_layernorm kernel holds a row in registers, C must be in [1, ",
                kLnMaxC, "], got ", C);
    TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.dim() == 2 && weight.size(1) == C &&
                    weight.size(0) >= 1 && weight.device() == x.device(),
                "weight: expected contiguous float32 [M, ", C, "] on ", x.device(), ", got ", weight.scalar_type(), " ",
                weight.sizes(), " on ", weight.device());
    TORCH_CHECK(row_weight.scalar_type() == at::kInt && row_weight.is_contiguous() && row_weight.numel() == x.size(0) &&
                    row_weight.device() == x.device(),
                "row_weight: expected contiguous int32 [", x.size(0), "] on ", x.device(), ", got ", row_weight.scalar_type(),
                " ", row_weight.sizes(), " on ", row_weight.device());
    TORCH_CHECK(x.size(0) * x.size(1) <= INT32_MAX, "x: too many rows");
    LnParams p{};
    p.w = weight.data_ptr<float>();
    p.row_weight = row_weight.data_ptr<int>();
    p.rows = static_cast<int>(x.size(0) * x.size(1));
    p.B = static_cast<int>(x.size(1));
    p.C = static_cast<int>(C);
    p.M = static_cast<int>(weight.size(0));
    return p;
}

template <class Launch>
static void ln_by_dtype(at::ScalarType t, Launch launch) {
    if (t == at::kFloat) launch(float{});
    else if (t == at::kHalf) launch(__half{});
    else launch(__nv_bfloat16{});
}

std::vector<at::Tensor> segment_layernorm_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                              const at::Tensor& row_weight, double eps) {
    LnParams p = ln_params(x, weight, row_weight);
    TORCH_CHECK(bias.sizes() == weight.sizes() && bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
                    bias.device() == x.device(),
                "bias: expected contiguous float32 ", weight.sizes(), " like weight, got ", bias.scalar_type(), " ", bias.sizes());
    MBT_DEVICE_GUARD(x);
    auto out = at::empty_like(x);
    auto mean = at::empty({x.size(0) * x.size(1)}, x.options().dtype(at::kFloat));
    auto rstd = at::empty_like(mean);
    if (p.rows == 0) return {out, mean, rstd};
    p.x = x.data_ptr();
    p.b = bias.data_ptr<float>();
    p.out = out.data_ptr();
    p.mean = mean.data_ptr<float>();
    p.rstd = rstd.data_ptr<float>();
    p.eps = static_cast<float>(eps);
    ln_by_dtype(x.scalar_type(), [&](auto tag) {
        auto kernel = _segment_layernorm_fwd_kernel<decltype(tag)>;
        MBT_LAUNCH(kernel, dim3(static_cast<unsigned>(p.rows)), dim3(ln_threads(p.C)), 0, MBT_STREAM, p);
    });
    MBT_CHECK_LAUNCH();
    return {out, mean, rstd};
}

std::vector<at::Tensor> segment_layernorm_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                              const at::Tensor& row_weight, const at::Tensor& mean, const at::Tensor& rstd) {
    LnParams p = ln_params(x, weight, row_weight);
    TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.is_contiguous() &&
                    grad.device() == x.device(),
                "grad: expected a contiguous tensor like x ", x.sizes(), " ", x.scalar_type(), ", got ", grad.scalar_type(), " ",
                grad.sizes());
    for (const auto* s : {&mean, &rstd})
        TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->numel() == p.rows && s->device() == x.device(),
                    "mean, rstd: expected contiguous float32 [", p.rows, "] from the forward");
    MBT_DEVICE_GUARD(x);
    auto gx = at::empty_like(x);
    // a few row chunks per SM: enough blocks to fill the GPU, few partial slices to add
    const int blocks = std::max(1, std::min(p.rows, 4 * multiprocessor_count(x)));
    p.rows_per_block = (p.rows + blocks - 1) / blocks;
    const int used = p.rows == 0 ? 1 : (p.rows + p.rows_per_block - 1) / p.rows_per_block;
    auto dw_part = at::zeros({used, p.M, p.C}, x.options().dtype(at::kFloat));
    auto db_part = at::zeros_like(dw_part);
    if (p.rows == 0) return {gx, dw_part.sum(0), db_part.sum(0)};
    p.x = x.data_ptr();
    p.g = grad.data_ptr();
    p.out = gx.data_ptr();
    p.mean = mean.data_ptr<float>();
    p.rstd = rstd.data_ptr<float>();
    p.dw_part = dw_part.data_ptr<float>();
    p.db_part = db_part.data_ptr<float>();
    ln_by_dtype(x.scalar_type(), [&](auto tag) {
        auto kernel = _segment_layernorm_bwd_kernel<decltype(tag)>;
        MBT_LAUNCH(kernel, dim3(static_cast<unsigned>(used)), dim3(ln_threads(p.C)), 0, MBT_STREAM, p);
    });
    MBT_CHECK_LAUNCH();
    return {gx, dw_part.sum(0), db_part.sum(0)};
}

}  // namespace MBT_NS
