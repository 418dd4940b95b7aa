// Tensor-core decode with a float8_e4m3fn cache and fp16 queries (see decode_tc.cuh).
#include "decode_tc.cuh"

namespace mla::cuda {

static_assert(TcFp8ConfigL::kSmemBytes <= 232448, "sm_90 allows 227 KB of shared memory per block");
static_assert(TcFp8ConfigM::kSmemBytes <= 166912, "sm_80 allows 163 KB of shared memory per block");
static_assert(TcFp8ConfigS::kSmemBytes <= 101376, "sm_86 / sm_89 allow 99 KB of shared memory per block");

cudaError_t launch_decode_tc_fp8_fp16(const DecodeParams& p, int config, cudaStream_t stream) {
  return launch_decode_tc_fp8_config<__half>(p, config, stream);
}

}  // namespace mla::cuda
