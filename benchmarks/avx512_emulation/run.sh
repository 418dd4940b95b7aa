#!/bin/sh
# Checks the LOGIC of the AVX-512 decode kernels (csrc/cpu/decode_avx512.cpp: avx512bf16 for
# bf16 and fp8 caches, avx512-fp32 for fp16 / fp32) on a CPU without AVX-512: the file is
# recompiled for AVX2 with the AVX-512 intrinsics it uses replaced by plain-C emulations
# (immintrin.h here), then compared item by item with the AVX2 kernels over block sizes,
# head counts, s_q, causal and partial KV chunks; and every fp8 code is widened bit for bit.
# It does not test the real instructions (encoding, denormal flushing of vdpbf16ps).
set -e
here=$(cd "$(dirname "$0")" && pwd)
src="$here/../../csrc/cpu"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed -e 's/^#pragma GCC target(.*avx512.*)$/#pragma GCC target("avx2,fma,f16c")/' "$src/decode_avx512.cpp" > "$tmp/decode_avx512_emulated.cpp"
if grep -q 'pragma GCC target(.*avx512' "$tmp/decode_avx512_emulated.cpp"; then echo "an AVX-512 target pragma left" >&2; exit 1; fi
${CXX:-g++} -O2 -std=c++17 -fwrapv -Wno-psabi -I"$here" -I"$src" "$here/test_avx512_emulated.cpp" \
  "$tmp/decode_avx512_emulated.cpp" "$src/decode_avx2.cpp" "$src/cpu_features.cpp" -o "$tmp/test"
if objdump -d "$tmp/test" | grep -q zmm; then echo "zmm instructions left in the emulated build" >&2; exit 1; fi
"$tmp/test"
