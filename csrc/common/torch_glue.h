// Torch-side glue shared by the two builds of the same sources: the real extension (nvcc, CUDA tensors,
// ops torch.ops.mbt_fast.*) and the emulated one (g++ with MBT_EMULATE, CPU tensors, torch.ops.mbt_fast_emu.*).
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include "arch.cuh"

#ifdef MBT_EMULATE
#define MBT_NS mbt_fast_emu
#define MBT_DISPATCH CPU
#define MBT_STREAM 0
#define MBT_DEVICE_GUARD(t)
#define MBT_CHECK_LAUNCH()
#define MBT_DEVICE_NAME "cpu (cuda-emu)"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#define MBT_NS mbt_fast
#define MBT_DISPATCH CUDA
#define MBT_STREAM at::cuda::getCurrentCUDAStream()
#define MBT_DEVICE_GUARD(t) const at::cuda::OptionalCUDAGuard mbt_device_guard_(t.device())
#define MBT_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define MBT_DEVICE_NAME "cuda"
#endif

// one more expansion level so MBT_NS is expanded before TORCH_LIBRARY pastes it
#define MBT_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define MBT_TORCH_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

namespace MBT_NS {

// The kernel's cudaFuncAttributeMaxDynamicSharedMemorySize (48 KiB by default): the emulation records it
// and refuses a launch above it, as the driver does.
template <class Kernel>
inline void set_dynamic_smem_attribute(Kernel kernel, size_t bytes) {
#ifndef MBT_EMULATE
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
#else
    mbt_emu::set_max_dynamic_smem(kernel, bytes);
#endif
}

// Opt a kernel into more than 48 KiB of dynamic shared memory when it needs it.
template <class Kernel>
inline void set_max_dynamic_smem(Kernel kernel, size_t bytes) {
    if (bytes > 48 * 1024) set_dynamic_smem_attribute(kernel, bytes);
}

// tensors must live where this build runs: CUDA for the real extension, CPU for the emulated one
inline void check_device(const at::Tensor& t, const char* name) {
#ifdef MBT_EMULATE
    TORCH_CHECK(t.device().is_cpu(), name, ": cuda-emu runs on CPU tensors, got ", t.device());
#else
    TORCH_CHECK(t.device().is_cuda(), name, ": the cuda backend needs CUDA tensors, got ", t.device());
#endif
}

// Streaming multiprocessors of t's device: deterministic backward kernels split their rows into a few
// chunks per SM (one partial sum per chunk, added on the host). The emulation runs blocks one after
// another; two "SMs" still exercise the chunking.
inline int multiprocessor_count(const at::Tensor& t) {
#ifdef MBT_EMULATE
    (void)t;
    return 2;
#else
    return at::cuda::getDeviceProperties(t.device().index())->multiProcessorCount;
#endif
}

}  // namespace MBT_NS
