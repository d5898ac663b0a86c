// Multimodal bottleneck attention, backward: dQ, dK, dV recomputed from the saved LSE; no N x N matrix
// ever reaches global memory.
//
// Three launches, all deterministic (no atomics):
//   1. _mbt_attention_bwd_preprocess_kernel: delta = rowsum(dO * O) per query row (fp32), a warp per row;
//   2. _mbt_attention_bwd_dq_kernel: one block per query tile (4 warps x 16 rows), loops over the
//      segment's key tiles: S = Q K^T, P = exp(S - LSE), dP = dO V^T, dS = P (dP - delta), dQ += dS K;
//   3. _mbt_attention_bwd_dkv_kernel: one block per key tile (4 warps x 16 keys), loops over the
//      segment's query tiles with the transposed products: dV += P^T dO, dK += dS^T Q.
// GEMMs per (query tile, key tile) pair: 3 in dQ and 4 in dK/dV. FlashAttention-2 does 5 in one kernel
// (S, dP, dV, dK, dQ) and adds dQ with atomics; without atomics dQ is summed by the block that owns the query
// tile, which must recompute S and dP itself: 5 + 2 = 7, the GEMM count of the split.
// Tiles are swizzled (attention.cuh, Swizzled) and loaded by zero-filling cp.async; at D <= 64 each warp
// keeps its A operands in registers for the whole loop (Q and dO in dQ, K and V in dK/dV; Shape::kBwdResident*),
// so only B operands stream from shared memory, and P / dS stay in registers as A fragments (acc_to_a).
// Only a segment's partial last key tile tests the key bound in dQ; in dK/dV query rows past the segment
// get LSE = +inf (P = 0) and key rows past it are not stored.
// When segments share keys, the dK/dV launches go in waves of segments with disjoint key ranges,
// accumulating in fp32 buffers; otherwise (every PackedLayout) dK/dV are written once, directly.
#include "attention_host.h"

namespace MBT_NS {

using namespace mbt;
using namespace mbt::attn;

// delta[b, h, n] = sum_d dO[n, b, h, d] * O[n, b, h, d]: one warp per (n, b, h) row, lane l reading the
// contiguous elements [l D/32, (l+1) D/32), so a warp reads each row in one coalesced pass (one thread
// per row read 2 bytes at a time from 32 different rows), then a shuffle sum over the warp
template <class T, int D>
MBT_GLOBAL void MBT_LAUNCH_BOUNDS(kThreads) _mbt_attention_bwd_preprocess_kernel(Params p) {
    constexpr int E = D / 32;
    const int B = p.B, lane = static_cast<int>(thread_x() % 32);
    const int64_t idx = static_cast<int64_t>(block_x()) * kWarps + thread_x() / 32;  // this warp's row
    if (idx >= static_cast<int64_t>(p.Nq) * B * p.H) return;  // warp-uniform
    const int n = static_cast<int>(idx / (B * p.H)), bh = static_cast<int>(idx % (B * p.H)), b = bh / p.H, h = bh % p.H;
    const T* o = row_ptr<T>(p.o, n, b, h) + lane * E;
    const T* g = row_ptr<T>(p.dout, n, b, h) + lane * E;
    float acc = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc += TypeOps<T>::to_float(o[e]) * TypeOps<T>::to_float(g[e]);
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1) acc += shfl_xor(acc, mask);
    if (lane == 0) p.delta[(static_cast<int64_t>(b) * p.H + h) * p.Nq + n] = acc;
}

// The A operands a warp keeps for the whole loop (Q and dO in dQ, K and V in dK/dV): once the older cp.async
// group (those two tiles) has landed, every active warp reads its 16 rows of both into registers; the
// closing barrier frees the tiles' stage for the first prefetch.
template <int D, int KD, class T>
MBT_DEVICE void load_resident_pair(uint32_t (&af)[KD][4], uint32_t (&bf)[KD][4], const T* smem, int a_tile,
                                   int b_tile, int wrow, bool active) {
    cp_async_wait<1>();
    sync_threads();
    if (active) {
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
            load_a_sw<D>(af[kk], smem, a_tile, wrow, kk * 16);
            load_a_sw<D>(bf[kk], smem, b_tile, wrow, kk * 16);
        }
    }
    sync_threads();
}

template <class T, int D, bool kKeyMask>  // kKeyMask compiled apart, as in the forward
MBT_GLOBAL void MBT_LAUNCH_BOUNDS(kThreads) _mbt_attention_bwd_dq_kernel(Params p) {
    using Sh = Shape<D>;
    constexpr int BM = Sh::kBlockM, BN = Sh::kBlockN, NT = BN / 8, KD = D / 16;
    constexpr bool kResident = Sh::kBwdResidentDq;
    constexpr int kStage = 2 * BN * D;  // elements of one stage: K, then V
    MBT_DYNAMIC_SMEM(T, smem);
    // element offsets: stage s (K, then V) at s kStage; Q and dO over stage 1 when their fragments go to
    // registers before stage 1 gets K/V (BM == BN: the same size), else after both stages
    constexpr int kQTile = kResident ? kStage : 2 * kStage, kDoTile = kQTile + BM * D;
    static_assert(!kResident || BM == BN, "Q and dO fill stage 1 exactly");

    const int4 blk = load16(p.blocks + block_x());
    const int q0 = blk.x, q1 = blk.y, k0 = blk.z, k1 = blk.w;
    const int b = block_y() / p.H, h = block_y() % p.H;
    const int warp = thread_x() / 32, lane = thread_x() % 32, gid = lane / 4, tig = lane % 4;
    const int wrow = warp * 16;
    const bool active = q0 + wrow < q1;  // warp-uniform: warps past the segment only help load

    // group 0: Q and dO; group 1: the first K/V tile
    load_stage_sw_async<T, D, BM>(smem + kQTile, p.q, p.dout, q0, q1, b, h);
    cp_async_commit();
    load_stage_sw_async<T, D, BN>(smem, p.k, p.v, k0, k1, b, h);
    cp_async_commit();
    // LSE (log2 units) and delta of rows gid, gid+8; rows past the segment get LSE = +inf, so P = 0
    float lse[2], delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = q0 + wrow + gid + 8 * r;
        const int64_t at = (static_cast<int64_t>(b) * p.H + h) * p.Nq + row;
        lse[r] = row < q1 ? p.lse[at] * kLog2e : INFINITY;
        delta[r] = row < q1 ? p.delta[at] : 0.f;
    }
    uint32_t qf[kResident ? KD : 1][4], dof[kResident ? KD : 1][4];
    if constexpr (kResident) load_resident_pair<D>(qf, dof, smem, kQTile, kDoTile, wrow, active);

    float acc[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

    // one key tile at kt in `stage`; kTail: the tile may hold keys past k1 (zero-filled), whose P is forced to 0
    auto step = [&](int kt, int stage, auto tail) {
        constexpr bool kTail = decltype(tail)::value;
        const int k_tile = stage * kStage, v_tile = k_tile + BN * D;
        // prefetch the next K/V tile into the other stage, which every warp finished reading last step
        if (kt + BN < k1) load_stage_sw_async<T, D, BN>(smem + (stage ^ 1) * kStage, p.k, p.v, kt + BN, k1, b, h);
        current_stage_ready();
        if (active) {
            float s[NT][4], dp[NT][4];
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) s[j][i] = dp[j][i] = 0.f;
            gemm_nt_sw<D, NT, 1, kResident>(&s, &qf, smem, kQTile, wrow, k_tile);    // S = Q K^T
            gemm_nt_sw<D, NT, 1, kResident>(&dp, &dof, smem, kDoTile, wrow, v_tile);  // dP = dO V^T
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int col = kt + 8 * j + 2 * tig + (i % 2);
                    const bool keep = (!kTail || col < k1) && (!kKeyMask || key_allowed(p, b, col));
                    const float pr = keep ? exp2f(s[j][i] * p.scale_log2 - lse[i / 2]) : 0.f;
                    s[j][i] = pr * (dp[j][i] - delta[i / 2]);  // dS (unscaled)
                }
            uint32_t dsf[BN / 16][4];
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) acc_to_a<T>(dsf[kk], s[2 * kk], s[2 * kk + 1]);
            gemm_nn_sw<D, BN / 16, 1>(&acc, &dsf, smem, k_tile);  // dQ += dS K
        }
        sync_threads();  // this stage fully read before the next step's prefetch overwrites it
    };
    // full key tiles carry no bound test; a partial last tile gets one
    int kt = k0, stage = 0;
    for (; kt + BN <= k1; kt += BN, stage ^= 1) step(kt, stage, TailTile<false>{});
    if (kt < k1) step(kt, stage, TailTile<true>{});

    if (!active) return;
    store_acc<T, D>(acc, p.scale, p.scale, p.dq, q0 + wrow, q1, b, h);
}

template <class T, int D>
MBT_GLOBAL void MBT_LAUNCH_BOUNDS(kThreads) _mbt_attention_bwd_dkv_kernel(Params p) {
    using Sh = Shape<D>;
    constexpr int BN = Sh::kBlockN, BM = Sh::kBlockMBwd, NT = BM / 8, KD = D / 16;
    constexpr bool kResident = Sh::kBwdResidentDkv;
    constexpr int kStage = 2 * BM * D;  // elements of one stage: Q, then dO
    MBT_DYNAMIC_SMEM(T, smem);
    // element offsets: stage s (Q, then dO) at s kStage; K and V over stage 1 (and past it when larger) when
    // their fragments go to registers before stage 1 gets Q/dO, else after both stages; then the fp32 LSE
    // and delta of each stage
    constexpr int kKTile = kResident ? kStage : 2 * kStage, kVTile = kKTile + BN * D;
    constexpr int kElems = kVTile + BN * D > 2 * kStage ? kVTile + BN * D : 2 * kStage;
    float* stats = reinterpret_cast<float*>(smem + kElems);  // stage s: LSE at stats + 2 s BM, delta after

    const int4 blk = load16(p.blocks + block_x());
    const int k0 = blk.x, k1 = blk.y, q0 = blk.z, q1 = blk.w;
    const int b = block_y() / p.H, h = block_y() % p.H;
    const int warp = thread_x() / 32, lane = thread_x() % 32, gid = lane / 4, tig = lane % 4;
    const int wrow = warp * 16;
    const bool active = k0 + wrow < k1;

    // LSE (log2 units) and delta of the query tile at qt into a stage; P^T = 0 for queries past the segment
    // (their zero-filled Q rows give S = 0, and exp2(0 - inf) = 0), so the query bound needs no other test
    auto load_stats = [&](float* lse_s, int qt) {
        for (int i = thread_x(); i < BM; i += kThreads) {
            const int row = qt + i;
            const int64_t at = (static_cast<int64_t>(b) * p.H + h) * p.Nq + row;
            lse_s[i] = row < q1 ? p.lse[at] * kLog2e : INFINITY;
            lse_s[BM + i] = row < q1 ? p.delta[at] : 0.f;
        }
    };
    // group 0: K and V; group 1: the first Q/dO tile
    load_stage_sw_async<T, D, BN>(smem + kKTile, p.k, p.v, k0, k1, b, h);
    cp_async_commit();
    load_stage_sw_async<T, D, BM>(smem, p.q, p.dout, q0, q1, b, h);
    cp_async_commit();
    load_stats(stats, q0);
    uint32_t kf[kResident ? KD : 1][4], vf[kResident ? KD : 1][4];
    if constexpr (kResident) load_resident_pair<D>(kf, vf, smem, kKTile, kVTile, wrow, active);

    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) dk[j][i] = dv[j][i] = 0.f;

    for (int qt = q0, stage = 0; qt < q1; qt += BM, stage ^= 1) {
        const int q_tile = stage * kStage, do_tile = q_tile + BM * D;
        const float* lse_s = stats + 2 * stage * BM;
        const float* delta_s = lse_s + BM;
        // prefetch the next Q/dO tile and its statistics into the other stage (read to the end last iteration)
        if (qt + BM < q1) {
            load_stage_sw_async<T, D, BM>(smem + (stage ^ 1) * kStage, p.q, p.dout, qt + BM, q1, b, h);
            load_stats(stats + 2 * (stage ^ 1) * BM, qt + BM);
        }
        current_stage_ready();
        if (active) {
            // transposed scores: rows = this warp's 16 keys, columns = the BM queries of the tile
            float st[NT][4], dpt[NT][4];
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) st[j][i] = dpt[j][i] = 0.f;
            gemm_nt_sw<D, NT, 1, kResident>(&st, &kf, smem, kKTile, wrow, q_tile);  // S^T = K Q^T
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) st[j][i] = exp2f(st[j][i] * p.scale_log2 - lse_s[8 * j + 2 * tig + (i % 2)]);
            uint32_t pf[BM / 16][4];
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk) acc_to_a<T>(pf[kk], st[2 * kk], st[2 * kk + 1]);
            gemm_nn_sw<D, BM / 16, 1>(&dv, &pf, smem, do_tile);  // dV += P^T dO

            gemm_nt_sw<D, NT, 1, kResident>(&dpt, &vf, smem, kVTile, wrow, do_tile);  // dP^T = V dO^T
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) dpt[j][i] = st[j][i] * (dpt[j][i] - delta_s[8 * j + 2 * tig + (i % 2)]);
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk) acc_to_a<T>(pf[kk], dpt[2 * kk], dpt[2 * kk + 1]);
            gemm_nn_sw<D, BM / 16, 1>(&dk, &pf, smem, q_tile);  // dK += dS^T Q
        }
        sync_threads();  // this stage fully read before the next iteration's prefetch overwrites it
    }
    if (!active) return;
    if (p.key_mask != nullptr) {
        // a padding key's column of P is 0, and its dK and dV rows depend on that column alone
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = k0 + wrow + gid + 8 * half;
            if (row < k1 && key_allowed(p, b, row)) continue;
#pragma unroll
            for (int j = 0; j < D / 8; ++j) dk[j][2 * half] = dk[j][2 * half + 1] = dv[j][2 * half] = dv[j][2 * half + 1] = 0.f;
        }
    }
    if (p.dk_acc == nullptr) {
        store_acc<T, D>(dk, p.scale, p.scale, p.dk, k0 + wrow, k1, b, h);
        store_acc<T, D>(dv, 1.f, 1.f, p.dv, k0 + wrow, k1, b, h);
        return;
    }
    // segments sharing keys: add into contiguous fp32 [Nk, B, H, D] buffers (one wave at a time)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = k0 + wrow + gid + 8 * half;
        if (row >= k1) continue;
        const int64_t base = ((static_cast<int64_t>(row) * p.B + b) * p.H + h) * D;
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int col = 8 * j + 2 * tig + i;
                p.dk_acc[base + col] += dk[j][2 * half + i] * p.scale;
                p.dv_acc[base + col] += dv[j][2 * half + i];
            }
    }
}

template <class T, int D>
static void launch_bwd(Params p, const std::vector<attn_host::Segment>& segs, const at::Tensor& dk, const at::Tensor& dv,
                       const at::Device& device) {
    using namespace attn_host;
    using Sh = Shape<D>;
    const int bh = p.B * p.H;
    {
        auto kernel = _mbt_attention_bwd_preprocess_kernel<T, D>;  // named: a template-id's comma would split macro args
        const int64_t rows = static_cast<int64_t>(p.Nq) * bh;
        MBT_LAUNCH(kernel, dim3(static_cast<unsigned>((rows + kWarps - 1) / kWarps)), dim3(kThreads), 0, MBT_STREAM, p);  // a warp per row
        MBT_CHECK_LAUNCH();
    }
    {
        const std::vector<Segment> table = tile_table(segs, Sh::kBlockM, /*by_keys=*/false);
        at::Tensor blocks = table_tensor(table, device);
        p.blocks = reinterpret_cast<const int4*>(blocks.data_ptr<int32_t>());
        // two stages of K and V, Q and dO over stage 1 (kBwdResidentDq) or after it
        const size_t smem = static_cast<size_t>((Sh::kBwdResidentDq ? 4 : 6) * Sh::kBlockN) * D * sizeof(T);
        auto kernel = p.key_mask != nullptr ? _mbt_attention_bwd_dq_kernel<T, D, true>
                                            : _mbt_attention_bwd_dq_kernel<T, D, false>;
        set_max_dynamic_smem(kernel, smem);
        MBT_LAUNCH(kernel, dim3(static_cast<unsigned>(table.size()), bh), dim3(kThreads), smem, MBT_STREAM, p);
        MBT_CHECK_LAUNCH();
    }
    // waves of segments whose key ranges are pairwise disjoint
    std::vector<std::vector<Segment>> waves;
    for (const auto& g : segs) {
        bool placed = false;
        for (auto& w : waves) {
            bool clash = false;
            for (const auto& o : w) clash = clash || (g[2] < o[3] && o[2] < g[3]);
            if (!clash) { w.push_back(g); placed = true; break; }
        }
        if (!placed) waves.push_back({g});
    }
    at::Tensor dk32, dv32;
    if (waves.size() > 1) {
        dk32 = at::zeros(dk.sizes(), dk.options().dtype(at::kFloat));
        dv32 = at::zeros(dv.sizes(), dv.options().dtype(at::kFloat));
        p.dk_acc = dk32.data_ptr<float>();
        p.dv_acc = dv32.data_ptr<float>();
    }
    // two stages of Q and dO, K and V over stage 1 (and past it; kBwdResidentDkv) or after it, then two stages
    // of LSE / delta
    constexpr size_t kStage = 2 * Sh::kBlockMBwd * D, kKV = 2 * Sh::kBlockN * D;
    constexpr size_t kElems = Sh::kBwdResidentDkv ? kStage + (kKV > kStage ? kKV : kStage) : 2 * kStage + kKV;
    const size_t smem = kElems * sizeof(T) + 4 * Sh::kBlockMBwd * sizeof(float);
    auto kernel = _mbt_attention_bwd_dkv_kernel<T, D>;
    set_max_dynamic_smem(kernel, smem);
    for (const auto& w : waves) {
        const std::vector<Segment> table = tile_table(w, Sh::kBlockN, /*by_keys=*/true);
        at::Tensor blocks = table_tensor(table, device);
        p.blocks = reinterpret_cast<const int4*>(blocks.data_ptr<int32_t>());
        MBT_LAUNCH(kernel, dim3(static_cast<unsigned>(table.size()), bh), dim3(kThreads), smem, MBT_STREAM, p);
        MBT_CHECK_LAUNCH();
    }
    if (waves.size() > 1) {
        dk.copy_(dk32);
        dv.copy_(dv32);
    }
}

template <class T>
static void dispatch_bwd(int d, const Params& p, const std::vector<attn_host::Segment>& segs, const at::Tensor& dk,
                         const at::Tensor& dv, const at::Device& device) {
    if (d == 32) launch_bwd<T, 32>(p, segs, dk, dv, device);
    else if (d == 64) launch_bwd<T, 64>(p, segs, dk, dv, device);
    else launch_bwd<T, 128>(p, segs, dk, dv, device);
}

std::vector<at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                      const at::Tensor& seg, double scale, const at::Tensor& key_mask) {
    using namespace attn_host;
    check_qkv(q, "q", q);
    check_qkv(k, "k", q);
    check_qkv(v, "v", q);
    check_qkv(out, "out", q);
    check_qkv(dout, "dout", q);
    TORCH_CHECK(k.sizes() == v.sizes(), "k, v: expected equal shapes, got ", k.sizes(), " and ", v.sizes());
    TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes(), "out, dout: expected the shape of q ", q.sizes());
    const int64_t nq = q.size(0), nk = k.size(0), B = q.size(1), H = q.size(2), D = q.size(3);
    TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.sizes() == at::IntArrayRef({B, H, nq}),
                "lse: expected contiguous float32 [B, H, Nq]");
    TORCH_CHECK(B * H <= 65535, "q: batch x heads must be at most 65535 (grid dimension y), got ", B * H);
    MBT_DEVICE_GUARD(q);
    const auto segs = segments(seg, nq, nk);

    // rows in no segment: zero gradient (only they are zero-filled; the kernels write every other row)
    const auto q_gaps = gaps(segs, nq, /*by_keys=*/false), k_gaps = gaps(segs, nk, /*by_keys=*/true);
    auto dq = empty_but_gaps(at::empty_like(q, at::MemoryFormat::Contiguous), q_gaps);
    auto dk = empty_but_gaps(at::empty_like(k, at::MemoryFormat::Contiguous), k_gaps);
    auto dv = empty_but_gaps(at::empty_like(v, at::MemoryFormat::Contiguous), k_gaps);
    auto delta = at::empty({B, H, nq}, q.options().dtype(at::kFloat));
    Params p{};
    p.q = ref(q); p.k = ref(k); p.v = ref(v); p.o = ref(out); p.dout = ref(dout);
    p.dq = ref(dq); p.dk = ref(dk); p.dv = ref(dv);
    p.lse = lse.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    p.key_mask = key_mask_ptr(key_mask, q, B, nk);
    p.B = static_cast<int>(B); p.H = static_cast<int>(H); p.Nq = static_cast<int>(nq); p.Nk = static_cast<int>(nk);
    p.scale = static_cast<float>(scale);
    p.scale_log2 = static_cast<float>(scale) * kLog2e;
    if (q.scalar_type() == at::kHalf) dispatch_bwd<__half>(static_cast<int>(D), p, segs, dk, dv, q.device());
    else dispatch_bwd<__nv_bfloat16>(static_cast<int>(D), p, segs, dk, dv, q.device());
    return {dq, dk, dv};
}

}  // namespace MBT_NS
