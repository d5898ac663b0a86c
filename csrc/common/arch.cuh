// Every hardware-specific instruction the kernels use, behind one small wrapper each.
//
// Two definitions per wrapper: the GPU one (inline PTX / CUDA intrinsics, compiled by nvcc) and the
// emulated one (csrc/emu/emu_runtime.h, compiled by g++ for the host when MBT_EMULATE is defined).
// Kernel sources use only these wrappers, so the same kernel text runs on both targets.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" and
// "ldmatrix"), with groupID = lane >> 2 and tig = lane % 4:
//   A 16x16 (4 x b32, 2 halves each, low half first): reg r holds row groupID + 8*(r%2),
//       cols 2*tig + {0,1} + 8*(r/2)
//   B 16x8 (k x n, 2 x b32): reg r holds k = 2*tig + {0,1} + 8*r, n = groupID
//   C/D 16x8 fp32 (4 regs): c_i at row groupID + 8*(i/2), col 2*tig + (i%2)
//   ldmatrix m8n8 .b16: lanes 8j..8j+7 give the row addresses of matrix j; lane l receives row l/4,
//       cols 2*(l%4) + {0,1} of every matrix (.trans: rows 2*(l%4) + {0,1}, col l/4).
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(MBT_EMULATE)
#include "../emu/emu_runtime.h"
#elif !defined(__CUDACC__)
// a host-only translation unit of the real build (binding.cpp, compiled by the host compiler): it
// declares launchers but never sees a kernel body
#define MBT_HOST_DEVICE inline
#else

#define MBT_GLOBAL __global__
#define MBT_DEVICE __device__ __forceinline__
#define MBT_HOST_DEVICE __host__ __device__ __forceinline__
#define MBT_LAUNCH_BOUNDS(n) __launch_bounds__(n)
// dynamic shared memory: one buffer per launch, 16-byte aligned for ldmatrix
#define MBT_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) unsigned char mbt_dyn_smem_[]; \
    type* name = reinterpret_cast<type*>(mbt_dyn_smem_)
// static shared memory: __shared__ T name[count] (the emulation places it in a per-launch arena it can fill)
#define MBT_STATIC_SMEM(type, name, count) __shared__ __align__(16) type name[count]
// kernel<<<grid, block, smem, stream>>>(args...); pass a plain name (a template-id's comma splits macro args)
#define MBT_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)

namespace mbt {

MBT_DEVICE unsigned thread_x() { return threadIdx.x; }
MBT_DEVICE unsigned block_x() { return blockIdx.x; }
MBT_DEVICE unsigned block_y() { return blockIdx.y; }
MBT_DEVICE unsigned block_dim_x() { return blockDim.x; }
MBT_DEVICE void sync_threads() { __syncthreads(); }

// 128-bit vector load/store (ld/st .v4); p must be 16-byte aligned (else cudaErrorMisalignedAddress)
template <class V>
MBT_DEVICE V load16(const V* p) {
    static_assert(sizeof(V) == 16, "load16: 16-byte vector types only");
    return *p;
}
template <class V>
MBT_DEVICE void store16(V* p, const V& v) {
    static_assert(sizeof(V) == 16, "store16: 16-byte vector types only");
    *p = v;
}

template <class T>
MBT_DEVICE T shfl_xor(T v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }

MBT_DEVICE uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// cp.async (sm_80+): an asynchronous 16-byte copy global -> shared, bypassing L1 (.cg); both addresses
// 16-byte aligned. Copies issued since the last commit form one group; wait<N> blocks until at most the
// N most recent committed groups are still in flight. The data is visible to the issuing thread after
// the wait and to the rest of the block after a __syncthreads that follows it.
MBT_DEVICE void cp_async16(void* smem_dst, const void* gmem_src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src) : "memory");
}
// cp_async16, or 16 zero bytes when !valid (src-size 0: nothing is read from gmem_src, which must still be a
// valid address): one branch-free instruction for a tile's rows inside and past its end
MBT_DEVICE void cp_async16_zfill(void* smem_dst, const void* gmem_src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src),
                 "r"(valid ? 16 : 0) : "memory");
}
MBT_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
MBT_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// ldmatrix: p is this lane's row address in shared memory (16-byte aligned)
MBT_DEVICE void ldmatrix_x1(uint32_t (&r)[1], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(p)));
}
MBT_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}
MBT_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
MBT_DEVICE void ldmatrix_x1_trans(uint32_t (&r)[1], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(p)));
}
MBT_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}
MBT_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// d += a @ b on tensor cores, fp32 accumulation; T is __half or __nv_bfloat16
template <class T> MBT_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <> MBT_DEVICE void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> MBT_DEVICE void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

}  // namespace mbt
#endif  // MBT_EMULATE / __CUDACC__

namespace mbt {

// Element type helpers shared by both targets (plain conversions, no hardware-specific code).
template <class T> struct TypeOps;
template <> struct TypeOps<__half> {
    static MBT_HOST_DEVICE float to_float(__half x) { return __half2float(x); }
    static MBT_HOST_DEVICE __half from_float(float x) { return __float2half_rn(x); }
    // two floats -> one b32 register, lo in the low 16 bits (the fragment's lower-index element)
    static MBT_HOST_DEVICE uint32_t pack(float lo, float hi) {
        return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(lo))) |
               (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(hi))) << 16);
    }
};
template <> struct TypeOps<__nv_bfloat16> {
    static MBT_HOST_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
    static MBT_HOST_DEVICE __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
    static MBT_HOST_DEVICE uint32_t pack(float lo, float hi) {
        return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
               (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
    }
};
template <> struct TypeOps<float> {
    static MBT_HOST_DEVICE float to_float(float x) { return x; }
    static MBT_HOST_DEVICE float from_float(float x) { return x; }
};

}  // namespace mbt
