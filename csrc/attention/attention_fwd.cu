// Multimodal bottleneck attention, forward: flash-style online softmax over each segment's key range.
//
// Block = one tile of 128 query rows of one segment, for one (batch, head): 4 warps x 32 rows, two m16
// tiles each, so every K or V fragment read by ldmatrix feeds 4 mma (at D = 128: 64 rows, 4 warps x 16;
// see Shape::kWarpRowsFwd). Q fragments stay in registers; K and V tiles stream through shared memory in
// two stages: the next tile's cp.async copies are in flight while the current one is computed on. Tiles
// are swizzled (attention.cuh, Swizzled), not padded. S = Q K^T and O += P V run on mma.m16n8k16 with fp32
// accumulation. Only a segment's last, partial key tile tests the segment bound (a separately compiled
// step), and only kKeyMask kernels test padding keys. O leaves through shared memory, so every global
// store is a coalesced 16-byte row chunk.
//
// Occupancy at D = 64 (static count, nvcc 13.0, sm_90): 255 registers x 128 threads = 32768 of an SM's
// 65536, so 2 CTAs (8 warps, 256 query rows) per SM; 32 KiB of shared memory per CTA would allow 6.
#include "attention_host.h"

namespace MBT_NS {

using namespace mbt;
using namespace mbt::attn;

// kKeyMask: compiled apart, so the unmasked kernel carries no per-score mask test (static count, nvcc 13.0,
// sm_90 bf16 D=64: 3488 SASS instructions without a mask, 3944 with one)
template <class T, int D, bool kKeyMask>
MBT_GLOBAL void MBT_LAUNCH_BOUNDS(kThreads) _mbt_attention_fwd_kernel(Params p) {
    using Sh = Shape<D>;
    using L = Swizzled<D>;
    constexpr int BM = Sh::kBlockMFwd, BN = Sh::kBlockNFwd, NT = BN / 8, KD = D / 16;
    constexpr int MT = BM / (16 * kWarps);  // m16 tiles per warp
    constexpr int kStage = 2 * BN * D;      // elements of one stage: K, then V
    MBT_DYNAMIC_SMEM(T, smem);
    // element offsets in smem: stage s (K, then V) at s kStage; Q over stage 1 (and past it when larger),
    // read into registers before stage 1 gets K/V; the epilogue's O tile at 0, once the loop is done with K/V
    constexpr int kQTile = kStage;
    T* q_tile = smem + kQTile;
    T* o_tile = smem;

    const int4 blk = load16(p.blocks + block_x());
    const int q0 = blk.x, q1 = blk.y, k0 = blk.z, k1 = blk.w;
    const int b = block_y() / p.H, h = block_y() % p.H;
    const int warp = thread_x() / 32, lane = thread_x() % 32, gid = lane / 4, tig = lane % 4;
    const int wrow = warp * 16 * MT;            // this warp's first row in the tile
    const bool active = q0 + wrow < q1;         // warp-uniform: warps past the segment only help load and store

    // group 0: Q; group 1: the first K/V tile, still in flight while Q goes to registers
    load_tile_sw_async<T, D, BM>(q_tile, p.q, q0, q1, b, h);
    cp_async_commit();
    load_stage_sw_async<T, D, BN>(smem, p.k, p.v, k0, k1, b, h);
    cp_async_commit();
    cp_async_wait<1>();
    sync_threads();
    uint32_t qf[MT][KD][4];
    if (active) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) load_a_sw<D>(qf[mt][kk], smem, kQTile, wrow + 16 * mt, kk * 16);
    }
    sync_threads();  // every warp holds its Q: stage 1 may take the first prefetch

    float acc[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < D / 8; ++j) acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.f;
    float m[MT][2], l[MT][2];  // running max of rows gid, gid+8 of each m16 tile (log2 units, scaled); partial sums
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.f;

    // one key tile at kt in `stage`; kTail: the tile may hold keys past k1, which get -inf
    auto step = [&](int kt, int stage, auto tail) {
        constexpr bool kTail = decltype(tail)::value;
        const int k_tile = stage * kStage, v_tile = k_tile + BN * D;
        // prefetch the next tile into the other stage, which every warp finished reading at the end of the
        // previous step
        if (kt + BN < k1) load_stage_sw_async<T, D, BN>(smem + (stage ^ 1) * kStage, p.k, p.v, kt + BN, k1, b, h);
        current_stage_ready();
        if (active) {
            float s[MT][NT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int j = 0; j < NT; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
            gemm_nt_sw<D, NT, MT, true>(s, qf, smem, kQTile, wrow, k_tile);  // S = Q K^T

            // which of this lane's columns may be attended: tested on the tail tile and with a key mask only
            bool keep[NT][2];
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const int col = kt + 8 * j + 2 * tig + i;
                    keep[j][i] = (!kTail || col < k1) && (!kKeyMask || key_allowed(p, b, col));
                }
            uint32_t pf[MT][BN / 16][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                // online softmax in log2 units
                float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        s[mt][j][i] = keep[j][i % 2] ? s[mt][j][i] * p.scale_log2 : -INFINITY;
                        mx[i / 2] = fmaxf(mx[i / 2], s[mt][j][i]);
                    }
                float alpha[2], base[2];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    // without a key mask every tile holds a valid key and the new max is finite; a tile of
                    // padding can leave it at -inf, and the exponentials are then taken against 0
                    const float m_new = fmaxf(m[mt][r], quad_max(mx[r]));
                    base[r] = kKeyMask && m_new == -INFINITY ? 0.f : m_new;
                    alpha[r] = exp2f(m[mt][r] - base[r]);
                    m[mt][r] = m_new;
                    l[mt][r] *= alpha[r];
                }
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        s[mt][j][i] = exp2f(s[mt][j][i] - base[i / 2]);
                        l[mt][i / 2] += s[mt][j][i];
                    }
#pragma unroll
                for (int j = 0; j < D / 8; ++j) {
                    acc[mt][j][0] *= alpha[0];
                    acc[mt][j][1] *= alpha[0];
                    acc[mt][j][2] *= alpha[1];
                    acc[mt][j][3] *= alpha[1];
                }
#pragma unroll
                for (int kk = 0; kk < BN / 16; ++kk) acc_to_a<T>(pf[mt][kk], s[mt][2 * kk], s[mt][2 * kk + 1]);
            }

            gemm_nn_sw<D, BN / 16, MT>(acc, pf, smem, v_tile);  // O += P V
        }
        sync_threads();  // this stage fully read before the next step's prefetch overwrites it
    };

    // full key tiles carry no bound test; a partial last tile gets one
    int kt = k0, stage = 0;
    for (; kt + BN <= k1; kt += BN, stage ^= 1) step(kt, stage, TailTile<false>{});
    if (kt < k1) step(kt, stage, TailTile<true>{});

    // epilogue: normalised O into the staging tile (every warp is past the last step's barrier, so the K/V
    // stages are free), then 16-byte row chunks to global memory
    if (active) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            float inv[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                l[mt][r] = quad_sum(l[mt][r]);
                inv[r] = 1.f / l[mt][r];
            }
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int row = wrow + 16 * mt + gid + 8 * half;
#pragma unroll
                for (int j = 0; j < D / 8; ++j)
                    *reinterpret_cast<uint32_t*>(o_tile + L::at(row, j) + 2 * tig) =
                        TypeOps<T>::pack(acc[mt][j][2 * half] * inv[half], acc[mt][j][2 * half + 1] * inv[half]);
                // natural-log LSE of the scaled scores: (m * ln 2) + ln(l)
                if (tig == 0 && q0 + row < q1)
                    p.lse[(static_cast<int64_t>(b) * p.H + h) * p.Nq + q0 + row] = m[mt][half] / kLog2e + logf(l[mt][half]);
            }
        }
    }
    sync_threads();
    // consecutive threads take consecutive chunks of a row: each warp stores whole rows, coalesced
    static_assert(BM * L::kChunks % kThreads == 0, "every thread stores the same number of chunks");
#pragma unroll
    for (int j = 0; j < BM * L::kChunks / kThreads; ++j) {
        const int i = thread_x() + j * kThreads, r = i / L::kChunks, c = i % L::kChunks;
        if (q0 + r < q1) store16(reinterpret_cast<uint4*>(row_ptr_mut<T>(p.o, q0 + r, b, h) + c * 8),
                                 load16(reinterpret_cast<const uint4*>(o_tile + L::at(r, c))));
    }
}

template <class T, int D>
static void launch_fwd(const Params& p, int nblocks, int bh) {
    using Sh = Shape<D>;
    // two stages of K and V, with Q over stage 1 (and past it when Q is the larger), O over stage 0 at the end
    constexpr size_t kStage = 2 * Sh::kBlockNFwd * D, kQ = Sh::kBlockMFwd * D;
    const size_t smem = (kStage + (kStage > kQ ? kStage : kQ)) * sizeof(T);
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
    const int block_m = D == 128 ? Shape<128>::kBlockMFwd : Shape<64>::kBlockMFwd;  // as Shape<32>'s
    const auto table = tile_table(segs, block_m, /*by_keys=*/false);
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
