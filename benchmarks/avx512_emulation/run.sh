#!/bin/sh
# Checks the LOGIC of the AVX-512 BF16 decode kernel (csrc/cpu/decode_avx512.cpp) on a CPU
# without AVX-512: the kernel is recompiled for AVX2 with the AVX-512 intrinsics it uses
# replaced by plain-C emulations (immintrin.h here), then compared item by item with the
# AVX2 kernel over block sizes, head counts, s_q, causal and partial KV chunks.
# It does not test the real instructions (encoding, denormal flushing of vdpbf16ps).
set -e
here=$(cd "$(dirname "$0")" && pwd)
src="$here/../../csrc/cpu"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed -e 's/^#pragma GCC target(.*avx512.*)$/#pragma GCC target("avx2,fma,f16c")/' "$src/decode_avx512.cpp" > "$tmp/decode_avx512_emulated.cpp"
grep -q 'pragma GCC target("avx2,fma,f16c")' "$tmp/decode_avx512_emulated.cpp"
${CXX:-g++} -O2 -std=c++17 -fwrapv -Wno-psabi -I"$here" -I"$src" "$here/test_avx512_emulated.cpp" \
  "$tmp/decode_avx512_emulated.cpp" "$src/decode_avx2.cpp" -o "$tmp/test"
if objdump -d "$tmp/test" | grep -q zmm; then echo "zmm instructions left in the emulated build" >&2; exit 1; fi
"$tmp/test"
