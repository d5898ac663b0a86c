// The CPU emulation of the CUDA execution model used by csrc/common/arch.cuh under MBT_EMULATE.
//
// A launch runs the grid's blocks one after another (in a shuffled order, below). A block's threads are
// host threads (one pool per launch, reused for every block) with thread-local threadIdx/blockIdx;
// __syncthreads is a std::barrier over the block. Shared memory (dynamic, and static arrays declared with MBT_STATIC_SMEM, which take
// consecutive slices of a per-launch arena) is one buffer per launch, reused by every block.
//
// Warp collectives (shfl, ldmatrix, mma) go through a per-warp scratch area: every lane deposits its
// registers, the warp meets at a barrier, and every lane reads back its own result computed from the
// PTX ISA fragment tables (see arch.cuh). The scratch is double-buffered, so one barrier per collective
// is enough: a lane cannot reach collective n+2 (reusing buffer n%2) before every lane has left
// collective n, because all of them had to arrive at collective n+1 first.
//
// The emulator fails where a GPU would (DESIGN.md section 5.4):
// * shared memory is filled with 0xFF bytes (NaN in fp32, fp16 and bf16; -1 as an integer) before every
//   block, so a read of shared memory the block did not write shows up as NaN, not as zeros or as the
//   previous block's data (MBT_EMU_SMEM_FILL=nan|zero, default nan: zero only to tell such a bug apart);
// * blocks run in a shuffled order, a fixed permutation per grid shape and seed, so a block that relies
//   on another block having run first gets a wrong answer (MBT_EMU_BLOCK_ORDER=shuffle|linear, default
//   shuffle; MBT_EMU_SEED, default 0; read at every launch);
// * 128-bit accesses (load16/store16) and ldmatrix rows must be 16-byte aligned, as the hardware requires;
// * launch limits as the driver checks them (sm_90): see check_launch and set_max_dynamic_smem;
// * cp.async copies land in shared memory only at the cp_async_wait that covers their group (never
//   without one), so a missing or too-weak wait reads the fill pattern where a GPU would race.
// Misuse inside a kernel is recorded (LaunchState::fail) and raised as std::runtime_error after the
// launch instead of crashing inside a worker thread; a bad launch configuration throws before any block.
//
// Known blind spots, each covered on a GPU by `mbt-fast bench gpu` (compute-sanitizer memcheck and
// racecheck over every kernel, bench/sanitize_cuda.py) and the `gpu`-marked tests: blocks never run
// concurrently (an inter-block race shows only as an ordering dependency); no race detector inside a
// block (threads are concurrent host threads, but a missing __syncthreads may still happen to work);
// out-of-bounds shared or global accesses are not bounds-checked; 4- and 8-byte alignment is not
// checked; warps run without independent thread scheduling semantics (lanes meet at every collective);
// registers, launch bounds and occupancy are not modelled.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
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
// a slice of the launch's static arena; declare at the top of a kernel body (every thread of a block
// must take the same slices in the same order, as __shared__ declarations are per kernel on a GPU)
#define MBT_STATIC_SMEM(type, name, count) type* name = mbt_emu::static_smem<type>(count)
#define MBT_LAUNCH(kernel, grid, block, smem, stream, ...) mbt_emu::launch(kernel, grid, block, smem, __VA_ARGS__)

namespace mbt_emu {

// dim3 itself comes from CUDA's vector_types.h, which cuda_fp16.h pulls in as host code
using Dim3 = dim3;

constexpr int kWarp = 32;

// Hardware limits of sm_90 (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability").
constexpr unsigned long kMaxGridX = 2147483647ul;      // 2^31 - 1
constexpr unsigned kMaxGridYZ = 65535;
constexpr unsigned kMaxBlockXY = 1024, kMaxBlockZ = 64, kMaxBlockThreads = 1024;
constexpr size_t kStaticSmemMax = 48 * 1024;          // static __shared__ per block (ptxas rejects more)
constexpr size_t kDefaultDynSmemMax = 48 * 1024;      // dynamic, without the opt-in attribute
constexpr size_t kOptinSmemMax = 227 * 1024;          // sharedMemPerBlockOptin: static + dynamic per block

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

// How a launch runs: from the environment, read at every launch (tests switch it per call).
struct Config {
    bool shuffle = true;
    uint64_t seed = 0;
    unsigned char fill = 0xFF;
};

inline Config config_from_env() {
    Config c;
    if (const char* v = std::getenv("MBT_EMU_BLOCK_ORDER"); v && *v) {
        const std::string s(v);
        if (s != "shuffle" && s != "linear")
            throw std::runtime_error("mbt_emu: MBT_EMU_BLOCK_ORDER must be shuffle or linear, got '" + s + "'");
        c.shuffle = s == "shuffle";
    }
    if (const char* v = std::getenv("MBT_EMU_SEED"); v && *v) {
        char* end = nullptr;
        c.seed = std::strtoull(v, &end, 0);
        if (*end != '\0') throw std::runtime_error(std::string("mbt_emu: MBT_EMU_SEED must be an integer, got '") + v + "'");
    }
    if (const char* v = std::getenv("MBT_EMU_SMEM_FILL"); v && *v) {
        const std::string s(v);
        if (s != "nan" && s != "zero")
            throw std::runtime_error("mbt_emu: MBT_EMU_SMEM_FILL must be nan or zero, got '" + s + "'");
        c.fill = s == "nan" ? 0xFF : 0x00;
    }
    return c;
}

// cudaFuncAttributeMaxDynamicSharedMemorySize per kernel, as cudaFuncSetAttribute would store it.
inline std::mutex& attr_mutex() {
    static std::mutex mu;
    return mu;
}
inline std::map<const void*, size_t>& max_dyn_smem_attr() {
    static std::map<const void*, size_t> attrs;
    return attrs;
}

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes): the driver refuses a
// value above sharedMemPerBlockOptin (minus the kernel's static shared memory) with cudaErrorInvalidValue.
template <class Kernel>
void set_max_dynamic_smem(Kernel kernel, size_t bytes) {
    if (bytes > kOptinSmemMax)
        throw std::runtime_error("mbt_emu: cudaFuncSetAttribute(MaxDynamicSharedMemorySize = " + std::to_string(bytes) +
                                 ") exceeds the " + std::to_string(kOptinSmemMax) +
                                 " bytes of shared memory per block of sm_90 (cudaErrorInvalidValue on a GPU)");
    std::lock_guard<std::mutex> lock(attr_mutex());
    max_dyn_smem_attr()[reinterpret_cast<const void*>(kernel)] = bytes;
}

template <class Kernel>
size_t max_dynamic_smem(Kernel kernel) {
    std::lock_guard<std::mutex> lock(attr_mutex());
    auto it = max_dyn_smem_attr().find(reinterpret_cast<const void*>(kernel));
    return it == max_dyn_smem_attr().end() ? kDefaultDynSmemMax : it->second;
}

// The launch configuration checks of cudaLaunchKernel. A GPU returns cudaErrorInvalidConfiguration
// ("invalid configuration argument") for a grid or block dimension of 0 or past its limit and
// cudaErrorInvalidValue ("invalid argument") for more dynamic shared memory than the kernel's
// MaxDynamicSharedMemorySize attribute (48 KiB unless raised by cudaFuncSetAttribute, at most 227 KiB);
// C10_CUDA_KERNEL_LAUNCH_CHECK raises either. Here they throw before any block runs.
inline void check_launch(Dim3 grid, Dim3 block, size_t smem_bytes, size_t max_dyn_smem) {
    auto dims = [](Dim3 d) {
        return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
    };
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > kMaxGridX || grid.y > kMaxGridYZ || grid.z > kMaxGridYZ)
        throw std::runtime_error("mbt_emu: grid " + dims(grid) + " out of range: x in [1, 2^31-1], y and z in [1, 65535] "
                                 "(cudaErrorInvalidConfiguration on a GPU)");
    const unsigned long nthreads = static_cast<unsigned long>(block.x) * block.y * block.z;
    if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > kMaxBlockXY || block.y > kMaxBlockXY ||
        block.z > kMaxBlockZ || nthreads > kMaxBlockThreads)
        throw std::runtime_error("mbt_emu: block " + dims(block) + " out of range: at most 1024 threads, x and y <= 1024, "
                                 "z <= 64 (cudaErrorInvalidConfiguration on a GPU)");
    if (smem_bytes > max_dyn_smem)
        throw std::runtime_error("mbt_emu: " + std::to_string(smem_bytes) + " bytes of dynamic shared memory exceed the "
                                 "kernel's limit of " + std::to_string(max_dyn_smem) + " bytes (48 KiB unless raised "
                                 "with cudaFuncSetAttribute, at most 227 KiB on sm_90; cudaErrorInvalidValue on a GPU)");
}

// The order blocks run in: linear, or a permutation fixed by the seed and the grid shape (so that a run
// is reproducible and two launches of different shapes do not share one pattern).
inline std::vector<uint64_t> block_order(const Config& c, Dim3 grid, uint64_t nblocks) {
    std::vector<uint64_t> order(nblocks);
    std::iota(order.begin(), order.end(), uint64_t{0});
    if (c.shuffle) {
        std::seed_seq seq{static_cast<uint32_t>(c.seed), static_cast<uint32_t>(c.seed >> 32), grid.x, grid.y, grid.z};
        std::mt19937_64 rng(seq);
        std::shuffle(order.begin(), order.end(), rng);
    }
    return order;
}

// Everything a launch shares between its host threads.
struct LaunchState {
    // refills shared memory once the whole block has finished, before the next block starts
    struct Refill {
        LaunchState* st;
        void operator()() noexcept { st->fill_smem(st->static_used.load()); }
    };

    Dim3 grid, block;
    size_t dyn_bytes = 0;
    unsigned char fill = 0xFF;
    std::vector<unsigned char> smem_buf;  // [dynamic | static arena], 16-byte aligned base
    unsigned char* dyn = nullptr;
    unsigned char* stat = nullptr;
    std::atomic<size_t> static_used{0};  // high-water mark of the static arena (all blocks take the same)
    std::unique_ptr<std::barrier<>> block_bar;
    std::unique_ptr<std::barrier<Refill>> block_end_bar;
    std::vector<std::unique_ptr<WarpScratch>> warps;
    std::mutex err_mu;
    std::string error;

    void fail(const std::string& msg) {
        std::lock_guard<std::mutex> lock(err_mu);
        if (error.empty()) error = msg;
    }
    // before the first block the whole static arena, later the part the blocks declared
    void fill_smem(size_t static_bytes) {
        std::memset(dyn, fill, dyn_bytes);
        std::memset(stat, fill, static_bytes);
    }
};

// a cp.async copy in flight: the 16 source bytes, read when issued, land in shared memory at the wait
struct AsyncCopy {
    unsigned char* dst;
    unsigned char bytes[16];
};

// per host thread: the emulated CUDA thread's identity
struct ThreadState {
    Dim3 thread_idx, block_idx;
    unsigned linear = 0;     // linear thread index in the block
    unsigned phase = 0;      // collectives done by this lane (selects the scratch buffer)
    size_t static_cursor = 0;  // bytes of the static arena this block's declarations took so far
    std::vector<AsyncCopy> async_copies;  // this thread's cp.async copies not yet waited for, in issue order
    std::vector<size_t> async_groups;     // end index in async_copies of each committed group
    LaunchState* launch = nullptr;
};
inline thread_local ThreadState tls;

inline unsigned char* dynamic_smem() { return tls.launch->dyn; }
inline unsigned lane_id() { return tls.linear % kWarp; }

// "block (x, y, z) thread t", for failure messages
inline std::string where() {
    return "block (" + std::to_string(tls.block_idx.x) + ", " + std::to_string(tls.block_idx.y) + ", " +
           std::to_string(tls.block_idx.z) + ") thread " + std::to_string(tls.linear);
}

// The next `count` elements of the static arena (16-byte aligned, like the GPU build's __shared__ arrays).
template <class T>
T* static_smem(size_t count) {
    LaunchState& st = *tls.launch;
    const size_t begin = (tls.static_cursor + 15) / 16 * 16, end = begin + count * sizeof(T);
    tls.static_cursor = end;
    if (end > kStaticSmemMax || end + st.dyn_bytes > kOptinSmemMax) {
        // ptxas rejects over 48 KiB of static shared memory; over 227 KiB in all the launch fails
        // (cudaErrorInvalidValue). Hand out private memory so this block stays memory-safe until the raise.
        st.fail("static shared memory: " + std::to_string(end) + " bytes (+ " + std::to_string(st.dyn_bytes) +
                " dynamic) exceed 48 KiB static / 227 KiB in all");
        thread_local std::vector<std::vector<unsigned char>> overflow;
        overflow.emplace_back(count * sizeof(T) + 16);
        return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(overflow.back().data()) + 15) / 16 * 16);
    }
    size_t seen = st.static_used.load();
    while (end > seen && !st.static_used.compare_exchange_weak(seen, end)) {}
    return reinterpret_cast<T*>(st.stat + begin);
}

// A 128-bit access must be 16-byte aligned; the GPU faults with cudaErrorMisalignedAddress.
inline void check_aligned16(const void* p, const char* what) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
        char addr[32];
        std::snprintf(addr, sizeof addr, "%p", p);
        tls.launch->fail(std::string(what) + ": address " + addr + " not 16-byte aligned (misaligned address on a GPU), " +
                         where());
    }
}

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
    const Config cfg = config_from_env();
    check_launch(grid, block, smem_bytes, max_dynamic_smem(kernel));
    LaunchState st;
    st.grid = grid;
    st.block = block;
    st.dyn_bytes = smem_bytes;
    st.fill = cfg.fill;
    const size_t dyn_padded = (smem_bytes + 15) / 16 * 16;
    st.smem_buf.resize(dyn_padded + kStaticSmemMax + 16);
    st.dyn = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(st.smem_buf.data()) + 15) / 16 * 16);
    st.stat = st.dyn + dyn_padded;
    st.fill_smem(kStaticSmemMax);
    const unsigned nthreads = block.x * block.y * block.z;
    st.block_bar = std::make_unique<std::barrier<>>(nthreads);
    st.block_end_bar = std::make_unique<std::barrier<LaunchState::Refill>>(nthreads, LaunchState::Refill{&st});
    for (unsigned w = 0; w * kWarp < nthreads; ++w)
        st.warps.push_back(std::make_unique<WarpScratch>(std::min<unsigned>(kWarp, nthreads - w * kWarp)));
    const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
    const std::vector<uint64_t> order = block_order(cfg, grid, nblocks);
    auto body = [&](unsigned t) {
        tls = ThreadState{};
        tls.launch = &st;
        tls.linear = t;
        tls.thread_idx = Dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        for (const uint64_t b : order) {
            tls.block_idx = Dim3(b % grid.x, (b / grid.x) % grid.y, b / (static_cast<uint64_t>(grid.x) * grid.y));
            tls.static_cursor = 0;
            // copies a block never waited for never land (on a GPU they may, or not: either way a bug)
            tls.async_copies.clear();
            tls.async_groups.clear();
            kernel(args...);
            // the whole block finishes (and shared memory is refilled) before the next block starts
            st.block_end_bar->arrive_and_wait();
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

// 128-bit vector access (ld/st .v4.b32): the address must be 16-byte aligned (checked, then copied
// bytewise so that a misaligned address is reported rather than undefined behaviour here)
template <class V>
inline V load16(const V* p) {
    static_assert(sizeof(V) == 16, "load16: 16-byte vector types only");
    mbt_emu::check_aligned16(p, "16-byte load");
    V v;
    std::memcpy(&v, p, 16);
    return v;
}
template <class V>
inline void store16(V* p, const V& v) {
    static_assert(sizeof(V) == 16, "store16: 16-byte vector types only");
    mbt_emu::check_aligned16(p, "16-byte store");
    std::memcpy(p, &v, 16);
}

// cp.async: the copy is deferred until the wait that covers its group, so shared memory read before
// that wait still holds the fill pattern (NaN), where a GPU would race: a missing or too-weak wait shows.
inline void cp_async16(void* smem_dst, const void* gmem_src) {
    mbt_emu::check_aligned16(smem_dst, "cp.async shared destination");
    mbt_emu::check_aligned16(gmem_src, "cp.async global source");
    mbt_emu::AsyncCopy c;
    c.dst = static_cast<unsigned char*>(smem_dst);
    std::memcpy(c.bytes, gmem_src, 16);
    mbt_emu::tls.async_copies.push_back(c);
}
// cp.async with src-size 16 or 0: the zeros land at the wait too, like the copy they replace
inline void cp_async16_zfill(void* smem_dst, const void* gmem_src, bool valid) {
    if (valid) return cp_async16(smem_dst, gmem_src);
    mbt_emu::check_aligned16(smem_dst, "cp.async shared destination");
    mbt_emu::check_aligned16(gmem_src, "cp.async global source");
    mbt_emu::AsyncCopy c;
    c.dst = static_cast<unsigned char*>(smem_dst);
    std::memset(c.bytes, 0, 16);
    mbt_emu::tls.async_copies.push_back(c);
}
inline void cp_async_commit() { mbt_emu::tls.async_groups.push_back(mbt_emu::tls.async_copies.size()); }
template <int N>
inline void cp_async_wait() {
    auto& copies = mbt_emu::tls.async_copies;
    auto& groups = mbt_emu::tls.async_groups;
    if (groups.size() <= static_cast<size_t>(N)) return;  // at most N groups in flight already
    const size_t done_groups = groups.size() - N, done = groups[done_groups - 1];
    for (size_t i = 0; i < done; ++i) std::memcpy(copies[i].dst, copies[i].bytes, 16);
    copies.erase(copies.begin(), copies.begin() + static_cast<std::ptrdiff_t>(done));
    groups.erase(groups.begin(), groups.begin() + static_cast<std::ptrdiff_t>(done_groups));
    for (auto& g : groups) g -= done;
}

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
