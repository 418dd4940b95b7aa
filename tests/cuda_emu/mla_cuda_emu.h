// Device side of the SIMT emulator: what csrc/cuda sees when it is compiled as host C++ with
// -DMLA_CUDA_EMULATION (tests/cuda_emu/build.py). common.cuh includes this header after the
// CUDA toolkit headers (which give the types: __half, __nv_bfloat16, uint4, dim3, ...).
//
// Every CUDA thread is a fiber; the kernel body runs unchanged. The built-in variables and the
// device intrinsics the kernels use become calls into the runtime (emu_runtime.cpp):
//   threadIdx / blockIdx / blockDim / gridDim   the running fiber's / block's coordinates
//   __syncthreads()                            block barrier (divergence is an error)
//   __shfl_xor_sync, ldmatrix, mma.sync        32-lane rendezvous with PTX-ISA semantics
//   cp.async (+ commit / wait_group)           lazy: the destination is poisoned at issue and
//                                              written at the wait_group covering its group
//   dynamic shared memory                      a fresh allocation per block, NaN-filled (0xff)
// Static __shared__ arrays are not supported (kernels carve everything from dynamic shared
// memory, whose size the emulator then knows and enforces).
#pragma once
#if !defined(MLA_CUDA_EMULATION)
#error "mla_cuda_emu.h is for the CPU emulation build only"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

namespace mla_emu {

struct ThreadCoords {
  uint3 thread_idx;
};
extern ThreadCoords* g_current;  // the running fiber
uint3 thread_idx();              // g_current->thread_idx, read inside the runtime (see tsan)
extern uint3 g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

// ---- Synchronisation and collectives (defined in emu_runtime.cpp, never inlined): each takes
// its caller's code address (__builtin_return_address) as the call site, since the PTX
// wrappers of common.cuh are always inlined into the kernel. All lanes of a warp must reach
// the same ldmatrix / mma instruction, and all threads of a block the same barrier.
void syncthreads();
uint32_t shfl_xor_b32(uint32_t mask, uint32_t value, int lane_mask, const void* site);
bool vote_any(uint32_t mask, bool predicate, const void* site);
void ldmatrix_x4(uint32_t (&r)[4], const void* smem_addr, bool trans);
enum class MmaKind : int { kBf16 = 0, kFp16 = 1 };
void mma_16816(MmaKind kind, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
void cp_async_16(void* smem_dst, const void* global_src, bool valid);
void cp_async_commit();
void cp_async_wait(int n);
unsigned char* dynamic_smem();

// ---- Launch: every block of the grid runs to completion, one after another.
using KernelBody = void (*)(void* ctx);
cudaError_t run_grid(const void* kernel_id, dim3 grid, dim3 block, size_t dynamic_smem_bytes, KernelBody body,
                     void* ctx);

template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args&&... args) {
  struct Ctx {
    void (*kernel)(KArgs...);
    std::tuple<std::decay_t<KArgs>...> args;
  } ctx{kernel, std::tuple<std::decay_t<KArgs>...>(std::forward<Args>(args)...)};
  auto body = [](void* c) {
    Ctx* x = static_cast<Ctx*>(c);
    std::apply(x->kernel, x->args);  // each thread gets its own copy of the by-value params
  };
  return run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, body, &ctx);
}

}  // namespace mla_emu

// cuda_runtime.h's kernel-pointer overload exists for nvcc only.
template <typename... KArgs>
cudaError_t cudaFuncSetAttribute(void (*kernel)(KArgs...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// ---- Built-in variables.
#undef __shared__
#define __shared__ MLA_EMU_static_shared_arrays_are_not_supported_use_dynamic_smem
#undef __launch_bounds__
#define __launch_bounds__(...)
#define threadIdx (::mla_emu::thread_idx())
#define blockIdx (::mla_emu::g_block_idx)
#define blockDim (::mla_emu::g_block_dim)
#define gridDim (::mla_emu::g_grid_dim)
#define __syncthreads() ::mla_emu::syncthreads()

// ---- Intrinsics with host definitions (same results as the device ones, except where
// docs/cuda-emulation.md says otherwise: __log2f / __logf / exp2f are exact-ish here).
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float __log2f(float x) { return std::log2(x); }
inline float __logf(float x) { return std::log(x); }
inline uint32_t __float_as_uint(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }
inline float __int_as_float(int32_t i) { float x; std::memcpy(&x, &i, 4); return x; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }

// Warp shuffle: one rendezvous of the lanes in `mask` (PTX shfl.sync.bfly).
__attribute__((noinline)) inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int = 32) {
  return __uint_as_float(::mla_emu::shfl_xor_b32(mask, __float_as_uint(v), lane_mask, __builtin_return_address(0)));
}
__attribute__((noinline)) inline int __shfl_xor_sync(unsigned mask, int v, int lane_mask, int = 32) {
  return static_cast<int>(::mla_emu::shfl_xor_b32(mask, static_cast<uint32_t>(v), lane_mask, __builtin_return_address(0)));
}
// Warp vote (PTX vote.sync.any): one rendezvous of the lanes in `mask`.
__attribute__((noinline)) inline int __any_sync(unsigned mask, int predicate) {
  return ::mla_emu::vote_any(mask, predicate != 0, __builtin_return_address(0)) ? 1 : 0;
}
__attribute__((noinline)) inline unsigned __shfl_xor_sync(unsigned mask, unsigned v, int lane_mask, int = 32) {
  return ::mla_emu::shfl_xor_b32(mask, v, lane_mask, __builtin_return_address(0));
}
