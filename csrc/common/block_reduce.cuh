// Block-wide sums for row kernels (LayerNorm statistics and its backward), built on the arch.cuh shfl_xor
// wrapper and static shared memory, so the same text runs on the GPU and under the emulation.
#pragma once

#include "arch.cuh"

namespace mbt {

constexpr int kMaxWarps = 32;  // 1024 threads

// Sums a and b over the whole block; every thread receives both totals. The block size must be a
// multiple of 32 (every lane of every warp takes part in the shuffles). red: 2 * kMaxWarps floats of
// shared memory. Every thread adds the warp totals in the same order, so all get bit-identical results.
MBT_DEVICE void block_sum2(float& a, float& b, float* red) {
    for (int offset = 16; offset > 0; offset >>= 1) {  // xor butterfly: every lane ends with the warp total
        a += shfl_xor(a, offset);
        b += shfl_xor(b, offset);
    }
    const unsigned warp = thread_x() / 32, lane = thread_x() % 32, n_warps = block_dim_x() / 32;
    if (lane == 0) {
        red[warp] = a;
        red[kMaxWarps + warp] = b;
    }
    sync_threads();
    a = 0.f;
    b = 0.f;
    for (unsigned w = 0; w < n_warps; ++w) {
        a += red[w];
        b += red[kMaxWarps + w];
    }
    sync_threads();  // red is reused by the next call
}

}  // namespace mbt
