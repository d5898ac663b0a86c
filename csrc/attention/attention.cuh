// Shared pieces of the multimodal bottleneck attention kernels (forward and backward).
//
// Layout: q [Nq,B,H,D], k/v [Nk,B,H,D] token-major with element strides (sn, sb, sh) and a contiguous
// last dim; LSE fp32 [B,H,Nq]. A host-built block table lists one entry per tile of every segment, so
// one launch covers every segment, and blockIdx.y covers batch x heads.
//
// Warp tiling: a block has 4 warps; in the forward kernel each warp owns 32 query rows (128-row tiles),
// in the dQ kernel 16 query rows, in the dK/dV kernel 16 key rows. Every kernel's tiles are swizzled in
// shared memory (Swizzled, below), so ldmatrix and cp.async are free of bank conflicts without padding.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/arch.cuh"

namespace mbt {
namespace attn {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;

// Strides are in elements. Size-1 dimensions may carry any stride; their index is always 0.
struct TensorRef {
    void* ptr;
    int64_t sn, sb, sh;
};

struct Params {
    TensorRef q, k, v, o, dout, dq, dk, dv;
    float* lse;     // [B, H, Nq]
    float* delta;   // [B, H, Nq] rowsum(dO * O), backward only
    float* dk_acc;  // fp32 [Nk, B, H, D] accumulators when segments share keys, else nullptr
    float* dv_acc;
    const int4* blocks;  // per block: (row_start, row_end, other_start, other_end)
    const uint8_t* key_mask;  // [B, Nk] 1: the key may be attended (0: padding); nullptr: every key
    int B, H, Nq, Nk;
    float scale, scale_log2;  // softmax scale, and scale * log2(e) for exp2
};

// whether key `col` of sample b may be attended (the segment bounds are checked by the caller)
MBT_DEVICE bool key_allowed(const Params& p, int b, int col) {
    return p.key_mask == nullptr || p.key_mask[static_cast<int64_t>(b) * p.Nk + col] != 0;
}

// compile-time flag of a key-loop step (forward and dQ): the tile may run past the segment's last key,
// so only that step, compiled apart, tests the bound
template <bool B>
struct TailTile {
    static constexpr bool value = B;
};

template <int D>
struct Shape {
    static_assert(D == 32 || D == 64 || D == 128, "head dim must be 32, 64 or 128");
    static constexpr int kBlockM = 64;                 // query rows per block (dQ)
    static constexpr int kBlockN = 64;                 // key rows per tile
    static constexpr int kBlockMBwd = D > 64 ? 32 : 64;  // query rows per inner step of dK/dV (register budget)
    // backward: whether a warp keeps its A operands (Q and dO in dQ, K and V in dK/dV) in registers across the
    // loop instead of re-reading them from shared memory at every k-step. D = 128: 64 more registers per
    // thread, and both kernels spilled (static count, nvcc 13.0, sm_90: 255 registers, 32-36 bytes of spills)
    static constexpr bool kBwdResidentDq = D <= 64;
    static constexpr bool kBwdResidentDkv = D <= 64;
    // forward: D <= 64: 4 warps x 32 query rows (two m16 tiles per warp, so every K/V fragment from
    // ldmatrix feeds four mma instead of two). D = 128: 4 warps x 16 rows; with 32 rows O alone takes 128
    // registers per thread, and O + Q + S spilled (also with Q re-read from shared memory: 24 bytes on sm_80)
    static constexpr int kWarpRowsFwd = D <= 64 ? 32 : 16;
    static constexpr int kBlockMFwd = kWarps * kWarpRowsFwd;
    static constexpr int kBlockNFwd = 64;
};

template <class T>
MBT_DEVICE const T* row_ptr(const TensorRef& t, int64_t n, int b, int h) {
    return static_cast<const T*>(t.ptr) + n * t.sn + b * t.sb + h * t.sh;
}
template <class T>
MBT_DEVICE T* row_ptr_mut(const TensorRef& t, int64_t n, int b, int h) {
    return static_cast<T*>(t.ptr) + n * t.sn + b * t.sb + h * t.sh;
}

// In a two-stage loop, after issuing the next tile's copies (or none past the last tile: the empty group
// keeps the count uniform): commit them and wait for every older group, then a barrier, so the current
// stage is complete for the whole block on return while the prefetch stays in flight.
MBT_DEVICE void current_stage_ready() {
    cp_async_commit();
    cp_async_wait<1>();
    sync_threads();
}

// Two adjacent 16x8 fp32 accumulator tiles -> one 16x16 A fragment in T (the C and A layouts line up).
template <class T>
MBT_DEVICE void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
    a[0] = TypeOps<T>::pack(c0[0], c0[1]);
    a[1] = TypeOps<T>::pack(c0[2], c0[3]);
    a[2] = TypeOps<T>::pack(c1[0], c1[1]);
    a[3] = TypeOps<T>::pack(c1[2], c1[3]);
}

// max / sum over the 4 lanes that share an accumulator row
MBT_DEVICE float quad_max(float x) {
    x = fmaxf(x, shfl_xor(x, 1));
    return fmaxf(x, shfl_xor(x, 2));
}
MBT_DEVICE float quad_sum(float x) {
    x += shfl_xor(x, 1);
    return x + shfl_xor(x, 2);
}

// Write a 16 x D accumulator tile (rows row0.., scaled) to global rows < r_end, two elements per store.
template <class T, int D>
MBT_DEVICE void store_acc(const float (&acc)[D / 8][4], float mul0, float mul1, const TensorRef& t, int row0, int r_end,
                          int b, int h) {
    const int l = thread_x() % 32, gid = l / 4, tig = l % 4;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + gid + 8 * half;
        if (row >= r_end) continue;
        const float mul = half ? mul1 : mul0;
        T* dst = row_ptr_mut<T>(t, row, b, h);
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            const int col = 8 * j + 2 * tig;
            *reinterpret_cast<uint32_t*>(dst + col) = TypeOps<T>::pack(acc[j][2 * half] * mul, acc[j][2 * half + 1] * mul);
        }
    }
}

// ---- Swizzled tiles ------------------------------------------------------------------------------------
//
// Rows of D elements, no padding; the 16-byte chunk c of row r is stored at chunk c ^ pattern(r). An
// ldmatrix phase reads one chunk from each of 8 consecutive rows, and 8 consecutive cp.async lanes write 8
// chunks of one row (D >= 64) or of two rows (D = 32): either way the 8 chunks land in 8 distinct 16-byte
// bank groups of a 128-byte bank line, so neither conflicts. With D >= 64 a row spans one or two whole
// bank lines and the xor is r % 8 (on the low 3 chunk bits); with D = 32 two rows share a line (rows r,
// r+1 sit in its halves) and the xor is (r / 2) % 4.
template <int D>
struct Swizzled {
    static constexpr int kChunks = D / 8;
    // depends on r % 8 only, so tiles and fragments starting at a multiple of 8 rows share the pattern
    static MBT_HOST_DEVICE int pattern(int r) { return kChunks >= 8 ? (r & 7) : ((r >> 1) & 3); }
    // element offset of (row r, chunk c)
    static MBT_HOST_DEVICE int at(int r, int c) { return r * D + ((c ^ pattern(r)) << 3); }
};

// Start copying rows [r0, r0+ROWS) of t (head b,h) into a swizzled tile: one cp.async per 16-byte chunk, so
// all of a thread's chunks are in flight at once (no register round trip). Branch-free: rows >= r_end are
// zero-filled by the copy itself (their source address is row r0's, which exists), so the zeros also belong
// to the group. The copies belong to the next committed group: the tile is complete for this thread after
// the cp_async_wait covering it, and for the block after a sync_threads that follows.
template <class T, int D, int ROWS>
MBT_DEVICE void load_tile_sw_async(T* tile, const TensorRef& t, int r0, int r_end, int b, int h) {
    constexpr int kChunks = D / 8;
    static_assert(ROWS * kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
    for (int j = 0; j < ROWS * kChunks / kThreads; ++j) {  // a constant trip count: unrolled, no loop branches
        const int i = thread_x() + j * kThreads, r = i / kChunks, c = i % kChunks;
        const bool valid = r0 + r < r_end;
        cp_async16_zfill(tile + Swizzled<D>::at(r, c), row_ptr<T>(t, valid ? r0 + r : r0, b, h) + c * 8, valid);
    }
}

// The two tiles of one pipeline stage (K and V, Q and dO) into swizzled tiles, in the same group of copies:
// `first` at `stage`, `second` ROWS rows later
template <class T, int D, int ROWS>
MBT_DEVICE void load_stage_sw_async(T* stage, const TensorRef& first, const TensorRef& second, int r0, int r_end,
                                    int b, int h) {
    load_tile_sw_async<T, D, ROWS>(stage, first, r0, r_end, b, h);
    load_tile_sw_async<T, D, ROWS>(stage + ROWS * D, second, r0, r_end, b, h);
}

// This lane's ldmatrix row address in the swizzled tile at element offset `tile` from `base`: row row0 + dr,
// chunk c0 + dc, where row0 % 8 == 0, c0 is even and dc is 0 or 1. Then pattern(row0 + dr) == pattern(dr),
// and as `tile` and whole rows are multiples of D (above the chunk bits), (c0 + dc) ^ x == c0 ^ (dc ^ x)
// turns into one xor of the lane's offset with the constant c0 * 8. The offset carries `tile` (a K/V
// stage alternates) so the compiler cannot hoist one register per c0 out of the key loop.
template <int D, class T>
MBT_DEVICE const T* ldsm_row(const T* base, int tile, int row0, int dr, int c0, int dc) {
    const int lane = tile + (row0 + dr) * D + ((dc ^ Swizzled<D>::pattern(dr)) << 3);
    return base + (lane ^ (c0 << 3));
}

// Fragments from swizzled tiles (row0 / n0 / k0 multiples of 8, col0 / k0 / n0 of 16): load_a_sw, a 16x16 A
// fragment at (row0, col0); load_b_sw, B fragments (k16 x n8, two n-tiles) of a tile stored [n][k] (K rows
// for Q K^T); load_b_trans_sw, the same of a tile stored [k][n] (V rows for P V), via ldmatrix.trans
template <int D, class T>
MBT_DEVICE void load_a_sw(uint32_t (&a)[4], const T* base, int tile, int row0, int col0) {
    const int l = thread_x() % 32;
    ldmatrix_x4(a, ldsm_row<D>(base, tile, row0, l % 16, col0 / 8, l / 16));
}
template <int D, class T>
MBT_DEVICE void load_b_sw(uint32_t (&b)[2][2], const T* base, int tile, int n0, int k0) {
    const int l = thread_x() % 32;
    uint32_t r[4];
    ldmatrix_x4(r, ldsm_row<D>(base, tile, n0, (l / 16) * 8 + l % 8, k0 / 8, (l / 8) % 2));
    b[0][0] = r[0]; b[0][1] = r[1]; b[1][0] = r[2]; b[1][1] = r[3];
}
template <int D, class T>
MBT_DEVICE void load_b_trans_sw(uint32_t (&b)[2][2], const T* base, int tile, int k0, int n0) {
    const int l = thread_x() % 32;
    uint32_t r[4];
    ldmatrix_x4_trans(r, ldsm_row<D>(base, tile, k0, ((l / 8) % 2) * 8 + l % 8, n0 / 8, l / 16));
    b[0][0] = r[0]; b[0][1] = r[1]; b[1][0] = r[2]; b[1][1] = r[3];
}

// ---- Warp GEMMs (forward and backward) -----------------------------------------------------------------
//
// A warp multiplies MT m16 row tiles at once, so each B fragment read by ldmatrix feeds all MT of them (the
// forward at D <= 64: MT = 2). acc and the A fragments come as pointers to their m-tiles, so a kernel with one
// 16-row tile per warp (the backward) passes &acc, &af with MT = 1.

// acc[mt] (16 x 8 NT) += A[mt] B^T over k = D. A[mt]: from registers (af[mt]) when kResident, else rows
// row0 + 16 mt.. of the swizzled tile at a_tile; B: rows 0.. of the swizzled tile at b_tile, stored [n][k].
template <int D, int NT, int MT, bool kResident, class T>
MBT_DEVICE void gemm_nt_sw(float (*acc)[NT][4], const uint32_t (*af)[kResident ? D / 16 : 1][4], const T* smem,
                           int a_tile, int row0, int b_tile) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            if constexpr (kResident) {
#pragma unroll
                for (int i = 0; i < 4; ++i) a[mt][i] = af[mt][kk][i];
            } else {
                load_a_sw<D>(a[mt], smem, a_tile, row0 + 16 * mt, kk * 16);
            }
        }
#pragma unroll
        for (int nn = 0; nn < NT / 2; ++nn) {
            uint32_t bf[2][2];
            load_b_sw<D>(bf, smem, b_tile, nn * 16, kk * 16);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_m16n8k16<T>(acc[mt][2 * nn], a[mt], bf[0]);
                mma_m16n8k16<T>(acc[mt][2 * nn + 1], a[mt], bf[1]);
            }
        }
    }
}

// acc[mt] (16 x D) += P[mt] B, P[mt] (16 x 16 KT) in registers as A fragments, B the swizzled tile at b_tile
// stored [k][n] (read transposed by ldmatrix.trans)
template <int D, int KT, int MT, class T>
MBT_DEVICE void gemm_nn_sw(float (*acc)[D / 8][4], const uint32_t (*pf)[KT][4], const T* smem, int b_tile) {
#pragma unroll
    for (int kk = 0; kk < KT; ++kk)
#pragma unroll
        for (int dn = 0; dn < D / 16; ++dn) {
            uint32_t bf[2][2];
            load_b_trans_sw<D>(bf, smem, b_tile, kk * 16, dn * 16);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_m16n8k16<T>(acc[mt][2 * dn], pf[mt][kk], bf[0]);
                mma_m16n8k16<T>(acc[mt][2 * dn + 1], pf[mt][kk], bf[1]);
            }
        }
}

}  // namespace attn
}  // namespace mbt
