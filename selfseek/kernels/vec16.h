// Shared by the kernel sources (build.py hashes every header with each source).
#pragma once

#include <cstdint>
#include <cstring>

// 16 floats / int32s operated on lane by lane whatever the instruction set (GCC's vector extension: one zmm on
// AVX-512, two ymm on AVX2, four xmm in the generic build), so a loop over them gives the same values at every level
// that has FMA. Plain loops over 16-float arrays were left scalar (routing.cpp's logits).
typedef float Vec16f __attribute__((vector_size(64)));
typedef int32_t Vec16i __attribute__((vector_size(64)));

inline Vec16f load16(const float* p) {
  Vec16f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
