// Paged attention for the CPU: query rows attend to their sequence's cached keys/values read in place
// through block tables (no gathered copy of the context), with an online softmax over tiles of keys.
//
// One kernel serves every cache layout, described by strided K and V views of the pool:
//   MLA (absorbed): one KV "head", K = [c_KV; k_rope] (kv_lora_rank + rope dims), V = c_KV (the first
//                   kv_lora_rank values of the same row), queries [q_nope W^UK; q_rope]: every query head
//                   is one of the `group` heads sharing that KV head.
//   GQA:            n_kv heads, K and V head_dim each, `group` query heads per KV head.
// Rows of sequence i are cu_q[i] .. cu_q[i+1]-1 (a chunk of new tokens, or one decode row); the last of its
// n_i rows sees all context_lens[i] keys, row j sees context_lens[i] - n_i + j + 1 (causal).
// Key t of sequence i is at slot block_tables[i][t / block_size] * block_size + t % block_size.
// Queries and outputs are fp32; the cache is fp32, bf16 or fp16 (converted per tile), or fp8 e4m3
// (`--kv-cache-dtype fp8`): each slot's head values in tiles of `scale_tile`, value j of head h of a slot being
// fp8[j] x scales[slot * scale_slot_stride + h * scale_head_stride + j / scale_tile], K and V with their own
// scales (MLA passes the same scales twice: K and V read the same row).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
// GCC 12 warns about its own AVX-512 intrinsics (their `__Y = __Y` placeholders), not about this code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#endif

namespace {
enum Dtype : int32_t { F32 = 0, BF16 = 1, F16 = 2, FP8 = 3 };
constexpr int TILE = 32;  // keys per online-softmax step

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 113;
      while (!(man & 0x400)) {
        man <<= 1;
        --exp;
      }
      u = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float8_e4m3fn (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no infinities, S.1111.111 is NaN) as
// a 256-entry table, built once.
struct Fp8Table {
  float v[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) {
      const int exp = (b >> 3) & 0xf, man = b & 7;
      float x = exp == 0 ? std::ldexp(float(man), -9)  // subnormal: man / 8 x 2^-6
                         : std::ldexp(float(8 + man), exp - 10);  // (1 + man / 8) x 2^(exp - 7)
      if (exp == 15 && man == 7) x = std::numeric_limits<float>::quiet_NaN();
      v[b] = (b & 0x80) ? -x : x;
    }
  }
};
const Fp8Table kFp8;

// Vector e4m3 -> fp32 by bit manipulation, equal to the table: the 7 exponent+mantissa bits shifted into an
// fp32's (exponent bias 127 vs 7, so x 2^120, exact); exponent 0 (subnormals) as man x 2^-9, computed in
// integers so a flush-denormals mode cannot zero it; 0x7f is NaN; then the sign bit.
#if defined(__AVX512F__)
inline __m512 fp8x16_to_f32(const uint8_t* src) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  const __m512i em = _mm512_and_si512(b, _mm512_set1_epi32(0x7f));
  __m512 v = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(em, 20)), _mm512_set1_ps(0x1p120f));
  v = _mm512_mask_mul_ps(v, _mm512_cmplt_epi32_mask(em, _mm512_set1_epi32(8)), _mm512_cvtepi32_ps(em),
                         _mm512_set1_ps(0x1p-9f));
  v = _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(em, _mm512_set1_epi32(0x7f)),
                         _mm512_castsi512_ps(_mm512_set1_epi32(0x7fc00000)));
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));
}
#elif defined(__AVX2__)
inline __m256 fp8x8_to_f32(const uint8_t* src) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  const __m256i em = _mm256_and_si256(b, _mm256_set1_epi32(0x7f));
  __m256 v = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(em, 20)), _mm256_set1_ps(0x1p120f));
  const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(em), _mm256_set1_ps(0x1p-9f));
  v = _mm256_blendv_ps(v, sub, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), em)));
  v = _mm256_blendv_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)),
                       _mm256_castsi256_ps(_mm256_cmpeq_epi32(em, _mm256_set1_epi32(0x7f))));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
  return _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(v), sign));
}
#endif

// n fp8 values of one cache row, dequantized into dst with the row's scales (one per `tile` values).
inline const float* fp8_as_f32(const uint8_t* src, const float* scales, int tile, int n, float* dst) {
  for (int t0 = 0; t0 < n; t0 += tile) {
    const float sc = scales[t0 / tile];
    const int t1 = std::min(n, t0 + tile);
    int i = t0;
#if defined(__AVX512F__)
    for (; i + 16 <= t1; i += 16) _mm512_storeu_ps(dst + i, _mm512_mul_ps(fp8x16_to_f32(src + i), _mm512_set1_ps(sc)));
#elif defined(__AVX2__)
    for (; i + 8 <= t1; i += 8) _mm256_storeu_ps(dst + i, _mm256_mul_ps(fp8x8_to_f32(src + i), _mm256_set1_ps(sc)));
#endif
    for (; i < t1; ++i) dst[i] = kFp8.v[src[i]] * sc;
  }
  return dst;
}

// n values of one cache row as fp32: the row itself when the cache is fp32, else converted into dst.
inline const float* as_f32(const void* src, int32_t dtype, int n, float* dst) {
  if (dtype == F32) return static_cast<const float*>(src);
  const uint16_t* s = static_cast<const uint16_t*>(src);
  int i = 0;
  if (dtype == BF16) {
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
      __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
      _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
#elif defined(__AVX2__)
    for (; i + 8 <= n; i += 8) {
      __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
#endif
    for (; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
  } else {
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
#elif defined(__AVX2__)  // x86-64-v3 includes F16C
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
    for (; i < n; ++i) dst[i] = f16_to_f32(s[i]);
  }
  return dst;
}

// G (<= 4) query heads against one key: the key is loaded once for the G dot products, whose horizontal sums are
// done together (GQA's 3 heads per KV head took 3 single dot products, each loading the key and summing alone).
template <int G>
inline void dot_heads(const float* q, int64_t q_stride, const float* k, int n, float* out) {
  static_assert(G >= 1 && G <= 4, "one to four heads");
  int i = 0;
  float s[4] = {0.f, 0.f, 0.f, 0.f};
#if defined(__AVX512F__)
  __m512 a[G];
  for (int g = 0; g < G; ++g) a[g] = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 kv = _mm512_loadu_ps(k + i);
    for (int g = 0; g < G; ++g) a[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * q_stride + i), kv, a[g]);
  }
  for (int g = 0; g < G; ++g) s[g] = _mm512_reduce_add_ps(a[g]);
#elif defined(__AVX2__)
  __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (; i + 8 <= n; i += 8) {
    const __m256 kv = _mm256_loadu_ps(k + i);
    for (int g = 0; g < G; ++g) a[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * q_stride + i), kv, a[g]);
  }
  // the G horizontal sums at once: hadd pairs, then fold the two 128-bit halves
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#endif
  for (; i < n; ++i)
    for (int g = 0; g < G; ++g) s[g] += q[g * q_stride + i] * k[i];
  for (int g = 0; g < G; ++g) out[g] = s[g];
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// NK keys against G query heads at once (k_dim a multiple of 8): G x NK independent FMA chains, each key vector loaded
// once for the G heads and each query vector once for the NK keys. Key by key (dot_heads), a head's chain over 64
// dims waited on the FMA latency and every query vector was loaded again per key: 119 cycles per key and KV head
// (GQA 3 x 64) against ~30 for the FMAs. Each (head, key) sum is dot_heads' lanes in dot_heads' order: bit for bit.
template <int G, int NK>
inline void dot_keys(const float* q, int64_t q_stride, const float* const* k, int n, float scale,
                     float* out /* [G][TILE] */) {
  __m256 a[G][NK];
  for (int g = 0; g < G; ++g)
    for (int t = 0; t < NK; ++t) a[g][t] = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) {
    __m256 kv[NK];
    for (int t = 0; t < NK; ++t) kv[t] = _mm256_loadu_ps(k[t] + i);
    for (int g = 0; g < G; ++g) {
      const __m256 qv = _mm256_loadu_ps(q + g * q_stride + i);
      for (int t = 0; t < NK; ++t) a[g][t] = _mm256_fmadd_ps(qv, kv[t], a[g][t]);
    }
  }
  for (int g = 0; g < G; ++g) {  // dot_heads' horizontal sums, keys in the place of heads (zeros past NK)
    __m256 s4[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int t = 0; t < NK; ++t) s4[t] = a[g][t];
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s4[0], s4[1]), _mm256_hadd_ps(s4[2], s4[3]));
    const __m128 s = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)), _mm_set1_ps(scale));
    if constexpr (NK == 4) {
      _mm_storeu_ps(out + g * TILE, s);
    } else {
      float v[4];
      _mm_storeu_ps(v, s);
      for (int t = 0; t < NK; ++t) out[g * TILE + t] = v[t];
    }
  }
}
#endif

// scores[g * TILE + t] = scale * (head g's query . key t) for G heads (queries k_dim apart) and the nt keys of a tile;
// ahead(t) is called before key t (the prefetch of a key further on).
template <int G, class Ahead>
inline void score_keys(const float* q, const float* const* krows, int nt, int k_dim, float scale, float* scores,
                       Ahead&& ahead) {
  int t0 = 0;
#if defined(__AVX2__) && !defined(__AVX512F__)
  constexpr int NK = G <= 3 ? 4 : 3;  // G x NK accumulators + NK key registers of 16
  if (k_dim % 8 == 0) {
    for (; t0 + NK <= nt; t0 += NK) {
      for (int t = t0; t < t0 + NK; ++t) ahead(t);
      dot_keys<G, NK>(q, k_dim, krows + t0, k_dim, scale, scores + t0);
    }
  }
#endif
  for (int t = t0; t < nt; ++t) {
    ahead(t);
    float s[4];
    dot_heads<G>(q, k_dim, krows[t], k_dim, s);
    for (int g = 0; g < G; ++g) scores[g * TILE + t] = s[g] * scale;
  }
}

// x[t] = exp(x[t] - m) for t < n; -> their sum. Vector paths use the Cephes exp polynomial (about 1 ulp).
inline float exp_shifted_sum(float* x, int n, float m) {
  int t = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 vsum = _mm512_setzero_ps();
  for (; t + 16 <= n; t += 16) {
    __m512 v = _mm512_sub_ps(_mm512_loadu_ps(x + t), _mm512_set1_ps(m));
    v = _mm512_max_ps(_mm512_min_ps(v, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
    __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(v, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                     _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    v = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), v);
    v = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), v);
    __m512 y = _mm512_set1_ps(1.9875691500E-4f);
    y = _mm512_fmadd_ps(y, v, _mm512_set1_ps(1.3981999507E-3f));
    y = _mm512_fmadd_ps(y, v, _mm512_set1_ps(8.3334519073E-3f));
    y = _mm512_fmadd_ps(y, v, _mm512_set1_ps(4.1665795894E-2f));
    y = _mm512_fmadd_ps(y, v, _mm512_set1_ps(1.6666665459E-1f));
    y = _mm512_fmadd_ps(y, v, _mm512_set1_ps(5.0000001201E-1f));
    y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(v, v), v), _mm512_set1_ps(1.f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
    y = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
    _mm512_storeu_ps(x + t, y);
    vsum = _mm512_add_ps(vsum, y);
  }
  sum = _mm512_reduce_add_ps(vsum);
#elif defined(__AVX2__)
  __m256 vsum = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + t), _mm256_set1_ps(m));
    v = _mm256_max_ps(_mm256_min_ps(v, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(v, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    v = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), v);
    v = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), v);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(v, v), v), _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    _mm256_storeu_ps(x + t, y);
    vsum = _mm256_add_ps(vsum, y);
  }
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(vsum), _mm256_extractf128_ps(vsum, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  sum = _mm_cvtss_f32(h);
#endif
  for (; t < n; ++t) {
    x[t] = std::exp(x[t] - m);
    sum += x[t];
  }
  return sum;
}

// acc[g][d] += sum_t p[g][t] * v[t][d] for G query heads (acc rows `acc_stride` apart, p rows TILE apart): a chunk
// of each head's acc stays in registers across the tile, and each chunk of a V row is loaded once for all G heads.
// (One head at a time loaded it once per head: MLA's 16 heads over a tile of 512-wide rows, 64 KiB, read V from L2
// 16 times per tile.) The sums per head and value are the same FMAs in the same order either way.
#if defined(__AVX512F__)
using VF = __m512;
constexpr int VWF = 16;
inline VF vf_load(const float* p) { return _mm512_loadu_ps(p); }
inline void vf_store(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VF vf_fma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF vf_set1(float f) { return _mm512_set1_ps(f); }
constexpr int PV_HEADS = 12;  // 24 accumulators + 2 V + 1 p of 32 registers
#elif defined(__AVX2__)
using VF = __m256;
constexpr int VWF = 8;
inline VF vf_load(const float* p) { return _mm256_loadu_ps(p); }
inline void vf_store(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline VF vf_fma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF vf_set1(float f) { return _mm256_set1_ps(f); }
constexpr int PV_HEADS = 6;  // 12 accumulators + 2 V + 1 p of 16 registers
#else
constexpr int PV_HEADS = 4;
#endif

template <int G>
inline void pv_heads(float* acc, int64_t acc_stride, const float* p, const float* const* v, int nt, int n) {
  int d = 0;
#if defined(__AVX2__) || defined(__AVX512F__)
  for (; d + 2 * VWF <= n; d += 2 * VWF) {
    VF a[G][2];
    for (int g = 0; g < G; ++g) {
      a[g][0] = vf_load(acc + g * acc_stride + d);
      a[g][1] = vf_load(acc + g * acc_stride + d + VWF);
    }
    for (int t = 0; t < nt; ++t) {
      const VF v0 = vf_load(v[t] + d), v1 = vf_load(v[t] + d + VWF);
      for (int g = 0; g < G; ++g) {
        const VF pt = vf_set1(p[g * TILE + t]);
        a[g][0] = vf_fma(pt, v0, a[g][0]);
        a[g][1] = vf_fma(pt, v1, a[g][1]);
      }
    }
    for (int g = 0; g < G; ++g) {
      vf_store(acc + g * acc_stride + d, a[g][0]);
      vf_store(acc + g * acc_stride + d + VWF, a[g][1]);
    }
  }
  for (; d + VWF <= n; d += VWF) {
    VF a[G];
    for (int g = 0; g < G; ++g) a[g] = vf_load(acc + g * acc_stride + d);
    for (int t = 0; t < nt; ++t) {
      const VF v0 = vf_load(v[t] + d);
      for (int g = 0; g < G; ++g) a[g] = vf_fma(vf_set1(p[g * TILE + t]), v0, a[g]);
    }
    for (int g = 0; g < G; ++g) vf_store(acc + g * acc_stride + d, a[g]);
  }
#endif
  for (; d < n; ++d)
    for (int g = 0; g < G; ++g) {
      float s = acc[g * acc_stride + d];
      for (int t = 0; t < nt; ++t) s += p[g * TILE + t] * v[t][d];
      acc[g * acc_stride + d] = s;
    }
}

// pv_heads over ng heads, PV_HEADS at a time.
template <int G = PV_HEADS>
inline void pv_accumulate(float* acc, int64_t acc_stride, const float* p, const float* const* v, int nt, int n, int ng) {
  if constexpr (G > 0) {
    for (; ng >= G; ng -= G, acc += G * acc_stride, p += G * TILE) pv_heads<G>(acc, acc_stride, p, v, nt, n);
    if (ng > 0) pv_accumulate<G - 1>(acc, acc_stride, p, v, nt, n, ng);
  }
}

inline int64_t element_size(int32_t dtype) { return dtype == F32 ? 4 : dtype == FP8 ? 1 : 2; }

// A decode step reads each layer's cache rows once, after the layer's weights have pushed them out of cache, and
// the rows of one KV head are strided (GQA: a slot holds every head's K and V) and scattered over blocks: the
// hardware prefetcher stops at each 4 KiB page, so without asking a tile ahead the loop waits on DRAM latency per key
// (measured: GQA 3 x 64 heads at 512 keys, 536 us per layer with the caches cold against 111 us warm).
// Through asm on x86: GCC at -O2 and above dropped every __builtin_prefetch of this file (found in the objdump of
// the built library; -fno-finite-loops kept them, so its forward-progress assumption let it treat them as dead).
inline void prefetch_line(const char* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht1 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 1);
#endif
}
inline void prefetch_bytes(const char* p, int64_t n) {
  const char* first = p - (reinterpret_cast<uintptr_t>(p) & 63);
  const int64_t lines = (p + n - first + 63) / 64;
  for (int64_t i = 0; i < lines; ++i) prefetch_line(first + 64 * i);
}
}  // namespace

extern "C" {

// The kernel's fp8 dequantization of one row (n values, a scale per `tile`), exported for the tests.
void selfseek_fp8_dequantize(const uint8_t* src, const float* scales, int32_t tile, int32_t n, float* dst) {
  fp8_as_f32(src, scales, tile, n, dst);
}

// Returns 0, or a negative code for bad arguments (checked by the Python wrapper first):
// -1 unknown dtype (or fp8 without scales), -2 row counts disagree with cu_q, -3 a row's context is empty or
// exceeds its sequence's. k_scales, v_scales / scale_slot_stride / scale_head_stride / scale_tile: fp8 only
// (else null, null / 0 / 0 / 0).
int32_t selfseek_paged_attention(const float* q, float* out, int64_t num_rows, const void* k_cache,
                                 int64_t k_slot_stride, int64_t k_head_stride, const void* v_cache,
                                 int64_t v_slot_stride, int64_t v_head_stride, int32_t dtype,
                                 const int32_t* block_tables, int64_t table_stride, int32_t block_size,
                                 const int32_t* cu_q, const int32_t* context_lens, int32_t num_seqs, int32_t n_kv,
                                 int32_t group, int32_t k_dim, int32_t v_dim, float scale, int32_t n_threads,
                                 const float* k_scales, const float* v_scales, int64_t scale_slot_stride,
                                 int64_t scale_head_stride, int32_t scale_tile) {
  if (dtype != F32 && dtype != BF16 && dtype != F16 && dtype != FP8) return -1;
  if (dtype == FP8 && (k_scales == nullptr || v_scales == nullptr || scale_tile <= 0)) return -1;
  if (cu_q[0] != 0 || cu_q[num_seqs] != num_rows) return -2;
  std::vector<int32_t> row_seq(num_rows);
  for (int32_t s = 0; s < num_seqs; ++s) {
    const int32_t n = cu_q[s + 1] - cu_q[s];
    if (n < 0 || n > context_lens[s]) return -3;
    for (int32_t r = cu_q[s]; r < cu_q[s + 1]; ++r) row_seq[r] = s;
  }
  // Work items: (row, run of KV heads, slice of a KV head's query heads). With rows enough for the threads an item
  // takes all of a row's KV heads: GQA keeps every head's K and V in one slot, so key by key the item reads whole
  // slots, one sequential stream per cache block, where one head per item read a 1/n_kv part of each slot and came
  // back for the rest (GQA 3 x 64 at 512 keys: 24% -> 22% of a default-model decode step). Runs are shortened, then
  // query heads sliced, only when the rows alone would leave threads idle (one MLA decode has a single KV head).
  // Fewer rows than threads with a context of a few tiles or more (a decode of one or a few sequences): each row's
  // keys are cut into `n_chunks` ranges instead, each item all of the row's heads over one range, and the ranges'
  // softmax states merged at the end. Every thread then reads its own part of the cache once: splitting 3 GQA heads
  // over 2 threads gave one thread 2 heads (the other idled a third of the time), and slicing MLA's 16 query heads
  // had both threads read the whole latent cache.
  const int64_t threads = std::max<int32_t>(n_threads, 1);
  const int64_t per_row = (threads + num_rows - 1) / num_rows;  // items wanted per row
  int32_t longest = 0;
  for (int32_t s = 0; s < num_seqs; ++s) longest = std::max(longest, context_lens[s]);
  const int32_t n_chunks = static_cast<int32_t>(
      std::max<int64_t>(1, std::min<int64_t>(num_rows < threads ? per_row : 1, longest / (2 * TILE))));
  const bool chunked = n_chunks > 1;
  const int64_t cut = chunked ? 1 : per_row;  // items per row still wanted from heads
  const int32_t run = cut < n_kv ? static_cast<int32_t>((n_kv + cut - 1) / cut) : 1;
  const int32_t runs = chunked ? 1 : (n_kv + run - 1) / run;
  const int64_t per_head = (cut + n_kv - 1) / n_kv;  // items wanted per KV head
  const int32_t splits = static_cast<int32_t>(std::min<int64_t>(group, std::max<int64_t>(1, per_head)));
  const int32_t per_split = (group + splits - 1) / splits;
  const int64_t items = num_rows * runs * splits * n_chunks;
  // chunked: each item's softmax state per head, [item][run heads][per_split] x (v_dim acc, m, l)
  const int64_t state = v_dim + 2;
  std::vector<float> part(chunked ? static_cast<size_t>(items) * run * per_split * state : 0);
  const int64_t esize = element_size(dtype);
  const char* kc = static_cast<const char*>(k_cache);
  const char* vc = static_cast<const char*>(v_cache);
  const int64_t k_bytes = k_dim * esize, v_bytes = v_dim * esize;
  const bool v_apart = vc < kc || vc >= kc + k_bytes;  // V inside K's row (MLA) needs no prefetch of its own
  // A key's bytes for a run of heads: from the first head's row to the end of the last's.
  const int64_t k_span = (run - 1) * k_head_stride * esize + k_bytes;
  const int64_t v_span = (run - 1) * v_head_stride * esize + v_bytes;
  // Keys ahead to prefetch: about 4 KiB of rows in flight (a whole tile ahead measured slower: too many at once).
  const int64_t ahead = std::clamp<int64_t>(4096 / (k_span + (v_apart ? v_span : 0)), 2, 16);

#pragma omp parallel num_threads(static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(items, 1))))
  {
    std::vector<float> acc(static_cast<size_t>(run) * per_split * v_dim), m(run * per_split), l(run * per_split);
    std::vector<float> scores(static_cast<size_t>(per_split) * TILE);
    std::vector<float> kbuf(dtype == F32 ? 0 : static_cast<size_t>(TILE) * k_dim);
    std::vector<float> vbuf(dtype == F32 ? 0 : static_cast<size_t>(TILE) * v_dim);
    const float* vrows[TILE];
    int64_t slots[TILE];
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t r = item / (runs * splits * n_chunks), c = item % n_chunks, rs = item / n_chunks;
      const int32_t h0 = static_cast<int32_t>((rs / splits) % runs) * run, h1 = std::min(n_kv, h0 + run);
      const int32_t g0 = static_cast<int32_t>(rs % splits) * per_split, g1 = std::min(group, g0 + per_split);
      if (g0 >= g1) continue;
      const int32_t ng = g1 - g0, s = row_seq[r];
      const int64_t keys = context_lens[s] - (cu_q[s + 1] - 1 - r);  // causal: keys up to this row's own
      // this item's keys [first, ctx): the row's c-th range of whole tiles
      const int64_t span = (keys + n_chunks - 1) / n_chunks, len = (span + TILE - 1) / TILE * TILE;
      const int64_t first = std::min(keys, c * len), ctx = std::min(keys, first + len);
      const int32_t* table = block_tables + s * table_stride;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      // The rows of the next key for the run's heads, asked for `ahead` keys before their scores are computed: keys
      // are prefetched in order, so a (block, offset) cursor finds their slots without a division per key (two
      // integer divisions per key, here and for `slots`, cost about a fifth of a warm GQA step).
      int64_t pf_pos = first, pf_block = first / block_size, pf_off = first % block_size;
      auto prefetch_next = [&]() {
        if (pf_pos >= ctx) return;
        const int64_t slot = static_cast<int64_t>(table[pf_block]) * block_size + pf_off;
        prefetch_bytes(kc + (slot * k_slot_stride + h0 * k_head_stride) * esize, k_span);
        if (v_apart) prefetch_bytes(vc + (slot * v_slot_stride + h0 * v_head_stride) * esize, v_span);
        ++pf_pos;
        if (++pf_off == block_size) pf_off = 0, ++pf_block;
      };
      for (int64_t pos = 0; pos < ahead; ++pos) prefetch_next();
      for (int64_t t0 = first; t0 < ctx; t0 += TILE) {
        const int nt = static_cast<int>(std::min<int64_t>(TILE, ctx - t0));
        for (int64_t t = 0, b = t0 / block_size, o = t0 % block_size; t < nt; ++t) {
          slots[t] = static_cast<int64_t>(table[b]) * block_size + o;
          if (++o == block_size) o = 0, ++b;
        }
        for (int32_t h = h0; h < h1; ++h) {
          const float* qh = q + ((r * n_kv + h) * group + g0) * static_cast<int64_t>(k_dim);
          float* acc_h = acc.data() + static_cast<int64_t>(h - h0) * per_split * v_dim;
          float* m_h = m.data() + (h - h0) * per_split;
          float* l_h = l.data() + (h - h0) * per_split;
          const float* krows[TILE];
          for (int t = 0; t < nt; ++t) {
            const int64_t slot = slots[t];
            const char* ksrc = kc + (slot * k_slot_stride + h * k_head_stride) * esize;
            const int64_t sc_off = slot * scale_slot_stride + h * scale_head_stride;
            float* kdst = kbuf.data() + static_cast<int64_t>(t) * k_dim;
            krows[t] = dtype == FP8 ? fp8_as_f32(reinterpret_cast<const uint8_t*>(ksrc), k_scales + sc_off,
                                                 scale_tile, k_dim, kdst)
                                    : as_f32(ksrc, dtype, k_dim, kdst);
            const char* vsrc = vc + (slot * v_slot_stride + h * v_head_stride) * esize;
            float* vdst = vbuf.data() + static_cast<int64_t>(t) * v_dim;
            vrows[t] = dtype == FP8 ? fp8_as_f32(reinterpret_cast<const uint8_t*>(vsrc), v_scales + sc_off,
                                                 scale_tile, v_dim, vdst)
                                    : as_f32(vsrc, dtype, v_dim, vdst);
          }
          const bool first = h == h0;  // the run's first head asks for the keys ahead
          // Scores four heads at a time over the tile's keys: those heads' queries stay in L1 while each key row
          // is read once per four heads (key by key over all heads read every query from L2 for each key: MLA's 16).
          for (int g = 0; g < ng; g += 4) {
            const float* qg = qh + static_cast<int64_t>(g) * k_dim;
            float* sg = scores.data() + g * TILE;
            const bool pf = first && g == 0;
            auto ahead_of = [&](int) {  // key t0 + t + ahead: the cursor's next
              if (pf) prefetch_next();
            };
            switch (std::min(4, ng - g)) {
              case 4: score_keys<4>(qg, krows, nt, k_dim, scale, sg, ahead_of); break;
              case 3: score_keys<3>(qg, krows, nt, k_dim, scale, sg, ahead_of); break;
              case 2: score_keys<2>(qg, krows, nt, k_dim, scale, sg, ahead_of); break;
              default: score_keys<1>(qg, krows, nt, k_dim, scale, sg, ahead_of); break;
            }
          }
          for (int g = 0; g < ng; ++g) {
            float* sg = scores.data() + g * TILE;
            float mt = m_h[g];
            for (int t = 0; t < nt; ++t) mt = std::max(mt, sg[t]);
            const float corr = std::exp(m_h[g] - mt);  // 0 on the first tile (m = -inf)
            float* ag = acc_h + static_cast<int64_t>(g) * v_dim;
            if (corr != 1.f)
              for (int d = 0; d < v_dim; ++d) ag[d] *= corr;
            l_h[g] = l_h[g] * corr + exp_shifted_sum(sg, nt, mt);
            m_h[g] = mt;
          }
          pv_accumulate(acc_h, v_dim, scores.data(), vrows, nt, v_dim, ng);
        }
      }
      for (int32_t h = h0; h < h1; ++h) {
        const float* acc_h = acc.data() + static_cast<int64_t>(h - h0) * per_split * v_dim;
        const float* m_h = m.data() + (h - h0) * per_split;
        const float* l_h = l.data() + (h - h0) * per_split;
        if (chunked) {  // the state, merged below
          float* st = part.data() + ((item * run + (h - h0)) * per_split) * state;
          for (int g = 0; g < ng; ++g, st += state) {
            std::copy(acc_h + static_cast<int64_t>(g) * v_dim, acc_h + static_cast<int64_t>(g + 1) * v_dim, st);
            st[v_dim] = m_h[g];
            st[v_dim + 1] = l_h[g];
          }
          continue;
        }
        float* oh = out + ((r * n_kv + h) * group + g0) * static_cast<int64_t>(v_dim);
        for (int g = 0; g < ng; ++g) {
          const float inv = 1.f / l_h[g];
          for (int d = 0; d < v_dim; ++d)
            oh[static_cast<int64_t>(g) * v_dim + d] = acc_h[static_cast<int64_t>(g) * v_dim + d] * inv;
        }
      }
    }
    if (chunked) {
      // out = sum_c acc_c e^(m_c - M) / sum_c l_c e^(m_c - M), M the largest m_c (an empty range: m = -inf, weight 0)
#pragma omp for schedule(static)
      for (int64_t rh = 0; rh < num_rows * n_kv * group; ++rh) {
        const int64_t r = rh / (n_kv * group), h = rh / group % n_kv, g = rh % group;
        auto at = [&](int64_t c) { return part.data() + (((r * n_chunks + c) * run + h) * per_split + g) * state; };
        float big = -std::numeric_limits<float>::infinity(), sum = 0.f;
        for (int64_t c = 0; c < n_chunks; ++c) big = std::max(big, at(c)[v_dim]);
        float* o = out + rh * static_cast<int64_t>(v_dim);
        std::fill(o, o + v_dim, 0.f);
        for (int64_t c = 0; c < n_chunks; ++c) {
          const float* st = at(c);
          const float w = st[v_dim] == big ? 1.f : std::exp(st[v_dim] - big);
          sum += st[v_dim + 1] * w;
          for (int d = 0; d < v_dim; ++d) o[d] += st[d] * w;
        }
        const float inv = 1.f / sum;
        for (int d = 0; d < v_dim; ++d) o[d] *= inv;
      }
    }
  }
  return 0;
}
}
