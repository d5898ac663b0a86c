// Multimodal bottleneck attention, forward: flash-style online softmax over each segment's key range.
//
// Block = one tile of kBlockM query rows of one segment, for one (batch, head); 4 warps x 16 rows.
// Q fragments stay in registers; K and V tiles stream through shared memory in two stages: the next
// tile's cp.async copies are in flight while the current one is computed on. S = Q K^T and O += P V
// run on mma.m16n8k16 with fp32 accumulation; keys past the segment end, and padding keys of the
// optional key mask, are masked to -inf.
#include "attention_host.h"

namespace MBT_NS {

using namespace mbt;
using namespace mbt::attn;

// kKeyMask: compiled apart, so the unmasked loop carries no per-score mask test (static count, sm_90
// fp16 D=64: 2416 instructions either way without a mask, against 2832 with a runtime test)
template <class T, int D, bool kKeyMask>
MBT_GLOBAL void MBT_LAUNCH_BOUNDS(kThreads) _mbt_attention_fwd_kernel(Params p) {
    using Sh = Shape<D>;
    constexpr int S = Sh::kStride, BM = Sh::kBlockM, BN = Sh::kBlockN, NT = BN / 8;
    MBT_DYNAMIC_SMEM(T, smem);
    T* q_tile = smem;
    T* kv_tiles = q_tile + BM * S;  // stage s: K at kv_tiles + 2 s BN S, V right after it

    const int4 blk = load16(p.blocks + block_x());
    const int q0 = blk.x, q1 = blk.y, k0 = blk.z, k1 = blk.w;
    const int b = block_y() / p.H, h = block_y() % p.H;
    const int warp = thread_x() / 32, lane = thread_x() % 32, gid = lane / 4, tig = lane % 4;
    const int wrow = warp * 16;                 // this warp's first row in the tile
    const bool active = q0 + wrow < q1;         // warp-uniform: warps past the segment only help load

    // group 0: Q and the first K/V tile
    load_tile_async<T, D, BM>(q_tile, p.q, q0, q1, b, h);
    load_stage_async<T, D, BN>(kv_tiles, p.k, p.v, k0, k1, b, h);
    cp_async_commit();
    cp_async_wait<0>();
    sync_threads();
    uint32_t qf[D / 16][4];
    if (active) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) load_a<S>(qf[kk], q_tile, wrow, kk * 16);
    }

    float acc[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY};  // running max of rows gid, gid+8 (log2 units, scaled)
    float l[2] = {0.f, 0.f};              // this lane's partial row sums

    for (int kt = k0, stage = 0; kt < k1; kt += BN, stage ^= 1) {
        const T* k_tile = kv_tiles + 2 * stage * BN * S;
        const T* v_tile = k_tile + BN * S;
        // prefetch the next tile into the other stage, which every warp finished reading at the end of
        // the previous iteration
        if (kt + BN < k1) load_stage_async<T, D, BN>(kv_tiles + 2 * (stage ^ 1) * BN * S, p.k, p.v, kt + BN, k1, b, h);
        current_stage_ready();
        if (!active) {
            sync_threads();  // match the active warps' end-of-tile barrier
            continue;
        }

        float s[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int nn = 0; nn < NT / 2; ++nn) {
                uint32_t bf[2][2];
                load_b<S>(bf, k_tile, nn * 16, kk * 16);
                mma_m16n8k16<T>(s[2 * nn], qf[kk], bf[0]);
                mma_m16n8k16<T>(s[2 * nn + 1], qf[kk], bf[1]);
            }
        }

        // online softmax in log2 units; columns past the segment's keys, or padding, get -inf
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int col = kt + 8 * j + 2 * tig + (i % 2);
                s[j][i] = col < k1 && (!kKeyMask || key_allowed(p, b, col)) ? s[j][i] * p.scale_log2 : -INFINITY;
                mx[i / 2] = fmaxf(mx[i / 2], s[j][i]);
            }
        float alpha[2], base[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            // without a key mask every tile holds a valid key and the new max is finite; a tile of
            // padding can leave it at -inf, and the exponentials are then taken against 0
            const float m_new = fmaxf(m[r], quad_max(mx[r]));
            base[r] = kKeyMask && m_new == -INFINITY ? 0.f : m_new;
            alpha[r] = exp2f(m[r] - base[r]);
            m[r] = m_new;
            l[r] *= alpha[r];
        }
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                s[j][i] = exp2f(s[j][i] - base[i / 2]);
                l[i / 2] += s[j][i];
            }
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            acc[j][0] *= alpha[0];
            acc[j][1] *= alpha[0];
            acc[j][2] *= alpha[1];
            acc[j][3] *= alpha[1];
        }

        uint32_t pf[BN / 16][4];
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) acc_to_a<T>(pf[kk], s[2 * kk], s[2 * kk + 1]);
        gemm_reg_nn<D, BN / 16, T>(acc, pf, v_tile);
        sync_threads();  // this stage fully read before the next iteration's prefetch overwrites it
    }

    if (!active) return;  // warp-uniform, after the last block-wide barrier
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] = quad_sum(l[r]);
        inv[r] = 1.f / l[r];
    }
    store_acc<T, D>(acc, inv[0], inv[1], p.o, q0 + wrow, q1, b, h);
    if (tig == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = q0 + wrow + gid + 8 * r;
            // natural-log LSE of the scaled scores: (m * ln 2) + ln(l)
            if (row < q1) p.lse[(static_cast<int64_t>(b) * p.H + h) * p.Nq + row] = m[r] / kLog2e + logf(l[r]);
        }
    }
}

template <class T, int D>
static void launch_fwd(const Params& p, int nblocks, int bh) {
    using Sh = Shape<D>;
    // Q, and two stages of K and V
    const size_t smem = static_cast<size_t>(Sh::kBlockM + 4 * Sh::kBlockN) * Sh::kStride * sizeof(T);
    // named: a template-id's comma would split the macro arguments
    auto kernel = p.key_mask != nullptr ? _mbt_attention_fwd_kernel<T, D, true> : _mbt_attention_fwd_kernel<T, D, false>;
    set_max_dynamic_smem(kernel, smem);
    MBT_LAUNCH(kernel, dim3(nblocks, bh), dim3(kThreads), smem, MBT_STREAM, p);
    MBT_CHECK_LAUNCH();
}

template <class T>
static void dispatch_fwd(int d, const Params& p, int nblocks, int bh) {
    if (d == 32) launch_fwd<T, 32>(p, nblocks, bh);
    else if (d == 64) launch_fwd<T, 64>(p, nblocks, bh);
    else launch_fwd<T, 128>(p, nblocks, bh);
}

std::vector<at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& seg, double scale, const at::Tensor& key_mask) {
    using namespace attn_host;
    check_qkv(q, "q", q);
    check_qkv(k, "k", q);
    check_qkv(v, "v", q);
    TORCH_CHECK(k.sizes() == v.sizes(), "k, v: expected equal shapes, got ", k.sizes(), " and ", v.sizes());
    MBT_DEVICE_GUARD(q);
    const int64_t nq = q.size(0), nk = k.size(0), B = q.size(1), H = q.size(2), D = q.size(3);
    TORCH_CHECK(B * H <= 65535, "q: batch x heads must be at most 65535, got ", B * H);
    const auto segs = segments(seg, nq, nk);
    const auto table = tile_table(segs, Shape<64>::kBlockM, /*by_keys=*/false);
    auto blocks = table_tensor(table, q.device());

    const auto q_gaps = gaps(segs, nq, /*by_keys=*/false);  // rows in no segment output 0
    auto out = empty_but_gaps(at::empty_like(q, at::MemoryFormat::Contiguous), q_gaps);
    auto lse = empty_but_gaps(at::empty({B, H, nq}, q.options().dtype(at::kFloat)), q_gaps, 2);
    Params p{};
    p.q = ref(q); p.k = ref(k); p.v = ref(v); p.o = ref(out);
    p.lse = lse.data_ptr<float>();
    p.blocks = reinterpret_cast<const int4*>(blocks.data_ptr<int32_t>());
    p.key_mask = key_mask_ptr(key_mask, q, B, nk);
    p.B = static_cast<int>(B); p.H = static_cast<int>(H); p.Nq = static_cast<int>(nq); p.Nk = static_cast<int>(nk);
    p.scale = static_cast<float>(scale);
    p.scale_log2 = static_cast<float>(scale) * kLog2e;
    const int nblocks = static_cast<int>(table.size()), bh = static_cast<int>(B * H);
    if (q.scalar_type() == at::kHalf) dispatch_fwd<__half>(static_cast<int>(D), p, nblocks, bh);
    else dispatch_fwd<__nv_bfloat16>(static_cast<int>(D), p, nblocks, bh);
    return {out, lse};
}

}  // namespace MBT_NS
