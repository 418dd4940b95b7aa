// fp16 instantiations of the tensor-core decode kernel (see decode_tc.cuh).
#include "decode_tc.cuh"

namespace mla::cuda {

cudaError_t launch_decode_tc_fp16(const DecodeParams& p, int config, cudaStream_t stream) {
  return launch_decode_tc_config<__half>(p, config, stream);
}

}  // namespace mla::cuda
