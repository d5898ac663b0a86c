// Residual add + bottleneck mean, forward and backward (semantics of mbt_fast.torch_ops.residual_mean).
//
// x, y, out: contiguous [N, B, C]; keep: fp32 [B, M] per-sample stochastic-depth mask (no rescale) or
// absent; row_mod[n]: modality of row n; slot_start[m]: first bottleneck row of modality m; nb rows each.
//   ordinary rows, or any row in mode "add":  out = x + keep[b, m] * y
//   bottleneck rows, mode "keep" (unimodal layer): out = x
//   bottleneck rows, mode "mean" (fusion layer):   out = mean over m' of (x + keep[b, m'] * y) at slot row j of m'
// One block per (row n, sample b), threads over C. A bottleneck row recomputes the mean over the M
// slots itself (M and nb are tiny), so every slot gets the same value and no launch order matters.
#include "../common/ops.h"

namespace MBT_NS {

using namespace mbt;

constexpr int kResThreads = 128;
enum Mode { kAdd = 0, kKeep = 1, kMean = 2 };

struct ResParams {
    const void* x;
    const void* y;
    const void* g;  // backward: grad of out
    void* out;      // forward: out; backward: dx
    void* dy;       // backward
    const float* keep;  // [B, M] or nullptr
    const int* row_mod;
    const int* slot_start;
    int N, B, C, M, nb, mode;
};

MBT_DEVICE float keep_of(const ResParams& p, int b, int m) { return p.keep ? p.keep[b * p.M + m] : 1.f; }

// the slot index j of bottleneck row n, or -1 for an ordinary row
MBT_DEVICE int slot_of(const ResParams& p, int n, int m) {
    const int j = n - p.slot_start[m];
    return (p.nb > 0 && j >= 0 && j < p.nb) ? j : -1;
}

template <class T>
MBT_GLOBAL void MBT_LAUNCH_BOUNDS(kResThreads) _residual_mean_fwd_kernel(ResParams p) {
    const int row = static_cast<int>(block_x());  // n * B + b
    const int n = row / p.B, b = row % p.B, m = p.row_mod[n];
    const T* x = static_cast<const T*>(p.x);
    const T* y = static_cast<const T*>(p.y);
    T* out = static_cast<T*>(p.out);
    const int j = p.mode == kAdd ? -1 : slot_of(p, n, m);
    const int64_t base = static_cast<int64_t>(row) * p.C;
    if (j < 0) {
        const float k = keep_of(p, b, m);
        for (int c = thread_x(); c < p.C; c += kResThreads)
            out[base + c] = TypeOps<T>::from_float(TypeOps<T>::to_float(x[base + c]) + k * TypeOps<T>::to_float(y[base + c]));
        return;
    }
    if (p.mode == kKeep) {
        for (int c = thread_x(); c < p.C; c += kResThreads) out[base + c] = x[base + c];
        return;
    }
    const float inv_m = 1.f / static_cast<float>(p.M);
    for (int c = thread_x(); c < p.C; c += kResThreads) {
        float acc = 0.f;
        for (int mm = 0; mm < p.M; ++mm) {
            const int64_t at = (static_cast<int64_t>(p.slot_start[mm] + j) * p.B + b) * p.C + c;
            // each updated slot is rounded to T first, as the unfused computation stores it
            const float upd = TypeOps<T>::to_float(x[at]) + keep_of(p, b, mm) * TypeOps<T>::to_float(y[at]);
            acc += TypeOps<T>::to_float(TypeOps<T>::from_float(upd));
        }
        out[base + c] = TypeOps<T>::from_float(acc * inv_m);
    }
}

template <class T>
MBT_GLOBAL void MBT_LAUNCH_BOUNDS(kResThreads) _residual_mean_bwd_kernel(ResParams p) {
    const int row = static_cast<int>(block_x());
    const int n = row / p.B, b = row % p.B, m = p.row_mod[n];
    const T* g = static_cast<const T*>(p.g);
    T* dx = static_cast<T*>(p.out);
    T* dy = static_cast<T*>(p.dy);
    const int j = p.mode == kAdd ? -1 : slot_of(p, n, m);
    const int64_t base = static_cast<int64_t>(row) * p.C;
    const float k = keep_of(p, b, m);
    if (j < 0) {
        for (int c = thread_x(); c < p.C; c += kResThreads) {
            const float gv = TypeOps<T>::to_float(g[base + c]);
            dx[base + c] = g[base + c];
            dy[base + c] = TypeOps<T>::from_float(k * gv);
        }
        return;
    }
    if (p.mode == kKeep) {  // out = x: y gets nothing
        for (int c = thread_x(); c < p.C; c += kResThreads) {
            dx[base + c] = g[base + c];
            dy[base + c] = TypeOps<T>::from_float(0.f);
        }
        return;
    }
    // every slot's output is the mean, so each slot's input receives 1/M of the sum of all slot gradients
    const float inv_m = 1.f / static_cast<float>(p.M);
    for (int c = thread_x(); c < p.C; c += kResThreads) {
        float acc = 0.f;
        for (int mm = 0; mm < p.M; ++mm)
            acc += TypeOps<T>::to_float(g[(static_cast<int64_t>(p.slot_start[mm] + j) * p.B + b) * p.C + c]);
        acc *= inv_m;
        dx[base + c] = TypeOps<T>::from_float(acc);
        dy[base + c] = TypeOps<T>::from_float(k * acc);
    }
}

static ResParams res_params(const at::Tensor& like, const at::Tensor& keep, const at::Tensor& row_mod,
                            const at::Tensor& slot_start, int64_t nb, int64_t mode) {
    TORCH_CHECK(like.dim() == 3 && like.is_contiguous(), "x: expected a contiguous [N, B, C] tensor, got ", like.sizes());
    TORCH_CHECK(like.scalar_type() == at::kFloat || like.scalar_type() == at::kHalf || like.scalar_type() == at::kBFloat16,
                "x: expected float32, float16 or bfloat16, got ", like.scalar_type());
    TORCH_CHECK(mode >= 0 && mode <= 2, "mode: expected 0 (add), 1 (keep) or 2 (mean), got ", mode);
    TORCH_CHECK(row_mod.scalar_type() == at::kInt && row_mod.is_contiguous() && row_mod.numel() == like.size(0),
                "row_mod: expected contiguous int32 [N] with N = ", like.size(0));
    TORCH_CHECK(slot_start.scalar_type() == at::kInt && slot_start.is_contiguous() && slot_start.numel() >= 1,
                "slot_start: expected contiguous int32 [M]");
    TORCH_CHECK(row_mod.device() == like.device() && slot_start.device() == like.device(),
                "row_mod, slot_start: expected device ", like.device());
    check_device(like, "x");
    const int64_t M = slot_start.numel();
    const bool has_keep = keep.numel() > 0;
    if (has_keep)
        TORCH_CHECK(keep.scalar_type() == at::kFloat && keep.is_contiguous() && keep.dim() == 2 && keep.size(0) == like.size(1) &&
                        keep.size(1) == M && keep.device() == like.device(),
                    "keep: expected contiguous float32 [B, M] = [", like.size(1), ", ", M, "] on ", like.device(), ", got ",
                    keep.scalar_type(), " ", keep.sizes());
    TORCH_CHECK(like.size(0) * like.size(1) <= INT32_MAX, "x: too many rows");
    ResParams p{};
    p.keep = has_keep ? keep.data_ptr<float>() : nullptr;
    p.row_mod = row_mod.data_ptr<int>();
    p.slot_start = slot_start.data_ptr<int>();
    p.N = static_cast<int>(like.size(0));
    p.B = static_cast<int>(like.size(1));
    p.C = static_cast<int>(like.size(2));
    p.M = static_cast<int>(M);
    p.nb = static_cast<int>(nb);
    p.mode = static_cast<int>(mode);
    return p;
}

template <class Launch>
static void by_dtype(at::ScalarType t, Launch launch) {
    if (t == at::kFloat) launch(float{});
    else if (t == at::kHalf) launch(__half{});
    else launch(__nv_bfloat16{});
}

at::Tensor residual_mean_fwd(const at::Tensor& x, const at::Tensor& y, const at::Tensor& keep, const at::Tensor& row_mod,
                             const at::Tensor& slot_start, int64_t n_bottleneck, int64_t mode) {
    ResParams p = res_params(x, keep, row_mod, slot_start, n_bottleneck, mode);
    TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type() && y.is_contiguous() && y.device() == x.device(),
                "y: expected a contiguous tensor like x");
    MBT_DEVICE_GUARD(x);
    auto out = at::empty_like(x);
    p.x = x.data_ptr();
    p.y = y.data_ptr();
    p.out = out.data_ptr();
    if (x.numel() == 0) return out;
    by_dtype(x.scalar_type(), [&](auto tag) {
        auto kernel = _residual_mean_fwd_kernel<decltype(tag)>;
        MBT_LAUNCH(kernel, dim3(static_cast<unsigned>(p.N * p.B)), dim3(kResThreads), 0, MBT_STREAM, p);
    });
    MBT_CHECK_LAUNCH();
    return out;
}

std::vector<at::Tensor> residual_mean_bwd(const at::Tensor& grad, const at::Tensor& keep, const at::Tensor& row_mod,
                                          const at::Tensor& slot_start, int64_t n_bottleneck, int64_t mode) {
    ResParams p = res_params(grad, keep, row_mod, slot_start, n_bottleneck, mode);
    MBT_DEVICE_GUARD(grad);
    auto dx = at::empty_like(grad), dy = at::empty_like(grad);
    p.g = grad.data_ptr();
    p.out = dx.data_ptr();
    p.dy = dy.data_ptr();
    if (grad.numel() == 0) return {dx, dy};
    by_dtype(grad.scalar_type(), [&](auto tag) {
        auto kernel = _residual_mean_bwd_kernel<decltype(tag)>;
        MBT_LAUNCH(kernel, dim3(static_cast<unsigned>(p.N * p.B)), dim3(kResThreads), 0, MBT_STREAM, p);
    });
    MBT_CHECK_LAUNCH();
    return {dx, dy};
}

}  // namespace MBT_NS
