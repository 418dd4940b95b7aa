// Launcher of the Hopper decode kernel (decode_sm90.cuh, the design and its limits).
#include "decode_sm90.cuh"
#include "decode_sm90.h"

namespace mla::cuda::sm90 {

static_assert(kDecodeSmemBytes == kSmemBytes && kDecodeBlockM == kBlockM && kDecodeBlockN == kBlockN,
              "decode_sm90.h mirrors the kernel's configuration");

namespace {
template <bool kFp8>
cudaError_t launch(const DecodeParams& p, cudaStream_t stream) {
  auto kernel = decode_sm90_kernel<kFp8>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes));
  if (err != cudaSuccess) return err;
  // Persistent CTAs: the schedule (schedule.cuh, filled on the device) says what each one does.
  if (p.sched == nullptr || p.sched_ctas <= 0) return cudaErrorInvalidValue;
  MLA_LAUNCH(kernel, dim3(static_cast<uint32_t>(p.sched_ctas)), kThreads, kSmemBytes, stream, p);
  return cudaGetLastError();
}
}  // namespace

cudaError_t launch_decode_sm90_bf16(const DecodeParams& p, cudaStream_t stream) {
  if (p.q_dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  if (p.cache_dtype == DType::kBFloat16) return launch<false>(p, stream);
  if (p.cache_dtype == DType::kFloat8E4M3 && p.kv_scale != nullptr) return launch<true>(p, stream);
  return cudaErrorInvalidValue;
}

#if !defined(MLA_CUDA_EMULATION)
bool decode_sm90_available(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess || major != 9 ||
      minor != 0)
    return false;
  // The sm_90a body needs well over 100 registers; the stub another sm_90 image holds (the
  // kernel compiled without __CUDA_ARCH_FEAT_SM90_ALL) only traps and needs a handful.
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, decode_sm90_kernel<false>) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.numRegs >= 64;
}
#endif

}  // namespace mla::cuda::sm90
