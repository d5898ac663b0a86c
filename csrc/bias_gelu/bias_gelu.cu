// Bias + tanh-approximate GELU, forward and backward (semantics of mbt_fast.kernels.bias_gelu; contract
// in mbt_fast.ops): the fused epilogue of the MLP's first Linear.
//
// x, out, grad: contiguous [N, B, F] (row r = n * B + b); bias: fp32 [M, F] (cast on the host, M * F
// values); row_weight[n]: modality of row n.
//   u = x + bias[m],  out = 0.5 * u * (1 + tanh(sqrt(2/pi) * (u + 0.044715 u^3))),  fp32 math.
// Forward: one block per row, threads over F. Backward recomputes u from x and the bias (nothing else is
// saved): a 2-D grid of (row chunks) x (feature tiles of kGeluTile); each thread keeps the grad_bias sums
// of its kGeluPerThread features in registers while walking its chunk's rows, flushed into the block's
// own slice of a [chunks, M, F] partial buffer whenever the modality changes; the host adds the slices
// (deterministic, no atomics).
#include <algorithm>

#include "../common/ops.h"

namespace MBT_NS {

using namespace mbt;

constexpr int kGeluThreads = 256;
constexpr int kGeluPerThread = 4;
constexpr int kGeluTile = kGeluThreads * kGeluPerThread;  // features per backward block
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;

struct GeluParams {
    const void* x;
    const float* bias;
    const int* row_weight;
    void* out;  // forward: out; backward: grad_x
    const void* g;  // backward: grad of out
    float* db_part;  // backward: [chunks, M, F]
    int rows, B, F, M, rows_per_block;
};

MBT_DEVICE float gelu_tanh_inner(float u) { return tanhf(kSqrt2OverPi * (u + kGeluCubic * u * u * u)); }

template <class T>
MBT_GLOBAL void MBT_LAUNCH_BOUNDS(kGeluThreads) _bias_gelu_fwd_kernel(GeluParams p) {
    const int row = static_cast<int>(block_x());
    const int64_t base = static_cast<int64_t>(row) * p.F;
    const T* x = static_cast<const T*>(p.x) + base;
    const float* bias = p.bias + static_cast<int64_t>(p.row_weight[row / p.B]) * p.F;
    T* out = static_cast<T*>(p.out) + base;
    for (int c = static_cast<int>(thread_x()); c < p.F; c += static_cast<int>(block_dim_x())) {
        const float u = TypeOps<T>::to_float(x[c]) + bias[c];
        out[c] = TypeOps<T>::from_float(0.5f * u * (1.f + gelu_tanh_inner(u)));
    }
}

// add this thread's sums into the block's own slice of the partial buffer, then clear them
MBT_DEVICE void gelu_flush(const GeluParams& p, int m, int col0, float (&acc)[kGeluPerThread]) {
    const int64_t slice = (static_cast<int64_t>(block_x()) * p.M + m) * p.F;
#pragma unroll
    for (int i = 0; i < kGeluPerThread; ++i) {
        const int c = col0 + i * kGeluThreads;
        if (c < p.F) p.db_part[slice + c] += acc[i];
        acc[i] = 0.f;
    }
}

template <class T>
MBT_GLOBAL void MBT_LAUNCH_BOUNDS(kGeluThreads) _bias_gelu_bwd_kernel(GeluParams p) {
    const int col0 = static_cast<int>(block_y()) * kGeluTile + static_cast<int>(thread_x());
    const int row0 = static_cast<int>(block_x()) * p.rows_per_block;
    const int row_end = row0 + p.rows_per_block < p.rows ? row0 + p.rows_per_block : p.rows;
    float acc[kGeluPerThread];
#pragma unroll
    for (int i = 0; i < kGeluPerThread; ++i) acc[i] = 0.f;
    int m_cur = -1;  // modality whose sums acc holds (the same for every thread of the block)
    for (int row = row0; row < row_end; ++row) {
        const int m = p.row_weight[row / p.B];
        if (m != m_cur) {
            if (m_cur >= 0) gelu_flush(p, m_cur, col0, acc);
            m_cur = m;
        }
        const int64_t base = static_cast<int64_t>(row) * p.F;
        const T* x = static_cast<const T*>(p.x) + base;
        const T* g = static_cast<const T*>(p.g) + base;
        const float* bias = p.bias + static_cast<int64_t>(m) * p.F;
        T* gx = static_cast<T*>(p.out) + base;
#pragma unroll
        for (int i = 0; i < kGeluPerThread; ++i) {
            const int c = col0 + i * kGeluThreads;
            if (c < p.F) {
                const float u = TypeOps<T>::to_float(x[c]) + bias[c];
                const float th = gelu_tanh_inner(u);
                const float dgelu = 0.5f * (1.f + th) +
                                    0.5f * u * (1.f - th * th) * kSqrt2OverPi * (1.f + 3.f * kGeluCubic * u * u);
                const float du = TypeOps<T>::to_float(g[c]) * dgelu;
                gx[c] = TypeOps<T>::from_float(du);
                acc[i] += du;
            }
        }
    }
    if (m_cur >= 0) gelu_flush(p, m_cur, col0, acc);
}

static GeluParams gelu_params(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& row_weight) {
    check_device(x, "x");
    TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "x: expected a contiguous [N, B, F] tensor, got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                "x: expected float32, float16 or bfloat16, got ", x.scalar_type());
    const int64_t F = x.size(2);
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.dim() == 2 && bias.size(1) == F &&
                    bias.size(0) >= 1 && bias.device() == x.device(),
                "bias: expected contiguous float32 [M, ", F, "] on ", x.device(), ", got ", bias.scalar_type(), " ",
                bias.sizes(), " on ", bias.device());
    TORCH_CHECK(row_weight.scalar_type() == at::kInt && row_weight.is_contiguous() && row_weight.numel() == x.size(0) &&
                    row_weight.device() == x.device(),
                "row_weight: expected contiguous int32 [", x.size(0), "] on ", x.device(), ", got ", row_weight.scalar_type(),
                " ", row_weight.sizes(), " on ", row_weight.device());
    TORCH_CHECK(x.size(0) * x.size(1) <= INT32_MAX && F <= INT32_MAX, "x: too many rows or features");
    GeluParams p{};
    p.x = x.data_ptr();
    p.bias = bias.data_ptr<float>();
    p.row_weight = row_weight.data_ptr<int>();
    p.rows = static_cast<int>(x.size(0) * x.size(1));
    p.B = static_cast<int>(x.size(1));
    p.F = static_cast<int>(F);
    p.M = static_cast<int>(bias.size(0));
    return p;
}

template <class Launch>
static void gelu_by_dtype(at::ScalarType t, Launch launch) {
    if (t == at::kFloat) launch(float{});
    else if (t == at::kHalf) launch(__half{});
    else launch(__nv_bfloat16{});
}

at::Tensor bias_gelu_fwd(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& row_weight) {
    GeluParams p = gelu_params(x, bias, row_weight);
    MBT_DEVICE_GUARD(x);
    auto out = at::empty_like(x);
    if (out.numel() == 0) return out;
    p.out = out.data_ptr();
    // narrow rows get fewer threads (a multiple of 32)
    const int threads = std::min<int>(kGeluThreads, (p.F + 31) / 32 * 32);
    gelu_by_dtype(x.scalar_type(), [&](auto tag) {
        auto kernel = _bias_gelu_fwd_kernel<decltype(tag)>;
        MBT_LAUNCH(kernel, dim3(static_cast<unsigned>(p.rows)), dim3(threads), 0, MBT_STREAM, p);
    });
    MBT_CHECK_LAUNCH();
    return out;
}

std::vector<at::Tensor> bias_gelu_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias,
                                      const at::Tensor& row_weight) {
    GeluParams p = gelu_params(x, bias, row_weight);
    TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.is_contiguous() &&
                    grad.device() == x.device(),
                "grad: expected a contiguous tensor like x ", x.sizes(), " ", x.scalar_type(), ", got ", grad.scalar_type(), " ",
                grad.sizes());
    MBT_DEVICE_GUARD(x);
    auto gx = at::empty_like(x);
    const int tiles = (p.F + kGeluTile - 1) / kGeluTile;
    // a few blocks per SM over all tiles: enough to fill the GPU, few partial slices to add
    const int chunks = std::max(1, std::min(p.rows, 4 * multiprocessor_count(x) / std::max(1, tiles)));
    p.rows_per_block = std::max(1, (p.rows + chunks - 1) / chunks);
    const int used = p.rows == 0 ? 1 : (p.rows + p.rows_per_block - 1) / p.rows_per_block;
    auto db_part = at::zeros({used, p.M, p.F}, x.options().dtype(at::kFloat));
    if (gx.numel() == 0) return {gx, db_part.sum(0)};
    p.g = grad.data_ptr();
    p.out = gx.data_ptr();
    p.db_part = db_part.data_ptr<float>();
    gelu_by_dtype(x.scalar_type(), [&](auto tag) {
        auto kernel = _bias_gelu_bwd_kernel<decltype(tag)>;
        MBT_LAUNCH(kernel, dim3(static_cast<unsigned>(used), static_cast<unsigned>(tiles)), dim3(kGeluThreads), 0, MBT_STREAM,
                   p);
    });
    MBT_CHECK_LAUNCH();
    return {gx, db_part.sum(0)};
}

}  // namespace MBT_NS
