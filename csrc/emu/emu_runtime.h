// The CPU emulation of the CUDA execution model used by csrc/common/arch.cuh under MBT_EMULATE.
//
// A launch runs the grid's blocks one after another. A block's threads are host threads (one pool per
// launch, reused for every block) with thread-local threadIdx/blockIdx; __syncthreads is a std::barrier
// over the block. Static __shared__ variables are function-local statics (one block runs at a time, so
// they are per block); dynamic shared memory is one buffer per launch.
//
// Warp collectives (shfl, ldmatrix, mma) go through a per-warp scratch area: every lane deposits its
// registers, the warp meets at a barrier, and every lane reads back its own result computed from the
// PTX ISA fragment tables (see arch.cuh). The scratch is double-buffered, so one barrier per collective
// is enough: a lane cannot reach collective n+2 (reusing buffer n%2) before every lane has left
// collective n, because all of them had to arrive at collective n+1 first.
//
// Misuse the GPU would fault on (ldmatrix row address not 16-byte aligned) is recorded and raised as
// std::runtime_error after the launch instead of crashing inside a worker thread.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define MBT_GLOBAL
#define MBT_DEVICE inline
#define MBT_HOST_DEVICE inline
#define MBT_LAUNCH_BOUNDS(n)
#define MBT_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(mbt_emu::dynamic_smem())
#define MBT_STATIC_SMEM alignas(16) static  // attribute first: g++ rejects it between decl-specifiers
#define MBT_LAUNCH(kernel, grid, block, smem, stream, ...) mbt_emu::launch(kernel, grid, block, smem, __VA_ARGS__)

namespace mbt_emu {

// dim3 itself comes from CUDA's vector_types.h, which cuda_fp16.h pulls in as host code
using Dim3 = dim3;

constexpr int kWarp = 32;

// One warp's meeting point: 2 buffers x 32 lanes x 16 words.
struct WarpScratch {
    explicit WarpScratch(int lanes) : bar(lanes) {}
    std::barrier<> bar;
    union Slot {
        uint32_t u[16];
        float f[16];
        const void* p;
    } slot[2][kWarp];
};

// Everything a launch shares between its host threads.
struct LaunchState {
    Dim3 grid, block;
    std::vector<unsigned char> dyn_smem;
    std::unique_ptr<std::barrier<>> block_bar;
    std::vector<std::unique_ptr<WarpScratch>> warps;
    std::mutex err_mu;
    std::string error;
    void fail(const std::string& msg) {
        std::lock_guard<std::mutex> lock(err_mu);
        if (error.empty()) error = msg;
    }
};

// per host thread: the emulated CUDA thread's identity
struct ThreadState {
    Dim3 thread_idx, block_idx;
    unsigned linear = 0;     // linear thread index in the block
    unsigned phase = 0;      // collectives done by this lane (selects the scratch buffer)
    LaunchState* launch = nullptr;
};
inline thread_local ThreadState tls;

inline unsigned char* dynamic_smem() { return tls.launch->dyn_smem.data(); }
inline unsigned lane_id() { return tls.linear % kWarp; }

// Deposit this lane's slot, meet the warp, return the whole warp's slots (valid until the next
// collective but one).
template <class Fill>
inline WarpScratch::Slot* warp_exchange(Fill fill) {
    WarpScratch& w = *tls.launch->warps[tls.linear / kWarp];
    WarpScratch::Slot* slots = w.slot[tls.phase++ & 1];
    fill(slots[lane_id()]);
    w.bar.arrive_and_wait();
    return slots;
}

template <class Kernel, class... Args>
void launch(Kernel kernel, Dim3 grid, Dim3 block, size_t smem_bytes, Args... args) {
    LaunchState st;
    st.grid = grid;
    st.block = block;
    const unsigned nthreads = block.x * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024) throw std::runtime_error("mbt_emu: block size must be in [1, 1024]");
    st.dyn_smem.assign(smem_bytes + 16, 0);
    st.block_bar = std::make_unique<std::barrier<>>(nthreads);
    for (unsigned w = 0; w * kWarp < nthreads; ++w)
        st.warps.push_back(std::make_unique<WarpScratch>(std::min<unsigned>(kWarp, nthreads - w * kWarp)));
    const unsigned long nblocks = static_cast<unsigned long>(grid.x) * grid.y * grid.z;
    auto body = [&](unsigned t) {
        tls = ThreadState{};
        tls.launch = &st;
        tls.linear = t;
        tls.thread_idx = Dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        for (unsigned long b = 0; b < nblocks; ++b) {
            tls.block_idx = Dim3(b % grid.x, (b / grid.x) % grid.y, b / (static_cast<unsigned long>(grid.x) * grid.y));
            kernel(args...);
            // the whole block finishes before the next one reuses static/dynamic shared memory
            st.block_bar->arrive_and_wait();
        }
    };
    std::vector<std::thread> pool;
    pool.reserve(nthreads);
    for (unsigned t = 0; t < nthreads; ++t) pool.emplace_back(body, t);
    for (auto& th : pool) th.join();
    if (!st.error.empty()) throw std::runtime_error("mbt_emu: " + st.error);
}

}  // namespace mbt_emu

namespace mbt {

inline unsigned thread_x() { return mbt_emu::tls.thread_idx.x; }
inline unsigned block_x() { return mbt_emu::tls.block_idx.x; }
inline unsigned block_y() { return mbt_emu::tls.block_idx.y; }
inline unsigned block_dim_x() { return mbt_emu::tls.launch->block.x; }
inline void sync_threads() { mbt_emu::tls.launch->block_bar->arrive_and_wait(); }

template <class T>
inline T shfl_xor(T v, int lane_mask) {
    static_assert(sizeof(T) == 4, "shfl_xor: 32-bit values only");
    auto* s = mbt_emu::warp_exchange([&](auto& slot) { std::memcpy(&slot.u[0], &v, 4); });
    T out;
    std::memcpy(&out, &s[mbt_emu::lane_id() ^ lane_mask].u[0], 4);
    return out;
}

namespace detail {
// this lane's registers of an .xN ldmatrix: matrix j's rows come from lanes 8j..8j+7
template <int N, bool Trans>
inline void ldmatrix(uint32_t* r, const void* p) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0 && mbt_emu::lane_id() < 8 * N)
        mbt_emu::tls.launch->fail("ldmatrix: row address not 16-byte aligned (lane " + std::to_string(mbt_emu::lane_id()) + ")");
    auto* s = mbt_emu::warp_exchange([&](auto& slot) { slot.p = p; });
    const unsigned l = mbt_emu::lane_id();
    for (int j = 0; j < N; ++j) {
        uint16_t lo, hi;
        if (!Trans) {  // row l/4, cols 2*(l%4), +1
            const auto* row = static_cast<const uint16_t*>(s[8 * j + l / 4].p);
            lo = row[2 * (l % 4)];
            hi = row[2 * (l % 4) + 1];
        } else {  // rows 2*(l%4), +1, col l/4
            lo = static_cast<const uint16_t*>(s[8 * j + 2 * (l % 4)].p)[l / 4];
            hi = static_cast<const uint16_t*>(s[8 * j + 2 * (l % 4) + 1].p)[l / 4];
        }
        r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
}

inline float bits_to_float(uint16_t b, __half*) { return __half2float(__ushort_as_half(b)); }
inline float bits_to_float(uint16_t b, __nv_bfloat16*) {
    uint32_t u = static_cast<uint32_t>(b) << 16;  // bf16 is the top half of an fp32
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
}  // namespace detail

inline void ldmatrix_x1(uint32_t (&r)[1], const void* p) { detail::ldmatrix<1, false>(r, p); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* p) { detail::ldmatrix<2, false>(r, p); }
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { detail::ldmatrix<4, false>(r, p); }
inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* p) { detail::ldmatrix<1, true>(r, p); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) { detail::ldmatrix<2, true>(r, p); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { detail::ldmatrix<4, true>(r, p); }

// d += a @ b (A 16x16 row, B 16x8 col), fp32 products and accumulation in k order.
template <class T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    auto* s = mbt_emu::warp_exchange([&](auto& slot) {
        // slot.f[0..7] = a0..a7, slot.f[8..11] = b0..b3 (element i of reg r is index 2r + i)
        for (int r = 0; r < 4; ++r)
            for (int i = 0; i < 2; ++i) slot.f[2 * r + i] = detail::bits_to_float(static_cast<uint16_t>(a[r] >> (16 * i)), (T*)nullptr);
        for (int r = 0; r < 2; ++r)
            for (int i = 0; i < 2; ++i) slot.f[8 + 2 * r + i] = detail::bits_to_float(static_cast<uint16_t>(b[r] >> (16 * i)), (T*)nullptr);
    });
    const unsigned l = mbt_emu::lane_id(), gid = l >> 2, tig = l & 3;
    for (int i = 0; i < 4; ++i) {
        const int row = gid + 8 * (i / 2), col = 2 * tig + (i % 2);
        float acc = d[i];
        for (int k = 0; k < 16; ++k) {
            // A(row, k): lane (row%8)*4 + (k%8)/2, reg (row/8) + 2*(k/8), half k%2
            const float av = s[(row % 8) * 4 + (k % 8) / 2].f[2 * ((row / 8) + 2 * (k / 8)) + (k % 2)];
            // B(k, col): lane col*4 + (k%8)/2, reg k/8, half k%2
            const float bv = s[col * 4 + (k % 8) / 2].f[8 + 2 * (k / 8) + (k % 2)];
            acc += av * bv;
        }
        d[i] = acc;
    }
}

}  // namespace mbt
