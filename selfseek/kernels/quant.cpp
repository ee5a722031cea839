// CPU matrix kernels over weights kept in their storage format: y = x W^T with float activations.
//
// Weight kinds (one `Mat` describes a [rows, cols] matrix or a stack of E of them):
//   f32, bf16, f16   plain rows; 16-bit rows are widened to fp32 in registers (bf16: shift, fp16: F16C)
//   q8               int8 [rows, cols], w = d * q (+ m)             (GGUF Q8_0, Q5_0, Q5_1, IQ types)
//   q4               uint8 [rows, cols/2], w = d * q + m, q in 0..15 (GGUF Q4_0/Q4_1); a 32-block's 16 bytes
//                    hold values 0..15 in the low nibbles and 16..31 in the high nibbles (GGUF's order)
// Quantized kinds have fp16 d (scales) and m (mins, optional for q8) per row and 32-block.
// Block kinds, read in the file's own encoding (no more bytes per weight than the file), decoded per unit of UNIT
// values into a small float buffer that the same register tile multiplies against MR rows of x:
//   q2_k .. q6_k     GGUF K-quant super-blocks of 256 values, bytes exactly as in the file (scales decoded per
//                    super-block in the kernel); w is bit-for-bit gguf.quants.dequantize's value
//   fp8              e4m3 bytes [rows, cols] with fp32 scales per row and 128 columns: w = e4m3 * s[n, k / 128]
//                    (DeepSeek's [128, 128] block scales, expanded to rows at load so row slices stay valid)
//   fp4              e2m1 pairs [rows, cols / 2] (low nibble = even column) with ue8m0 exponents per row and
//                    32 columns: w = e2m1 * 2^(e - 127) (DeepSeek-V4's routed experts)
// On AVX2 and AVX-512 every block kind skips the buffer and is unpacked in registers with the same values: Q4_K /
// Q5_K (tile_kq), Q6_K (tile_q6k), Q2_K / Q3_K (tile_q23): scales decoded per super-block in vectors, 2/4/6-bit
// fields by shifts and masks; fp8 (tile_fp): e4m3 bytes moved into fp16 bit positions, widened by vcvtph2ps
// (subnormals exact); fp4: a 16-entry table by vpermps (AVX-512) or pshufb (AVX2). The generic build keeps the buffer.
//
// Decode (one activation row) of the plain kinds reads one weight row after the other (row_dot): the weight is one
// sequential stream, which DRAM serves faster than NR rows interleaved block by block (q8, 129280 x 1024: 12 against
// 9.5 GB/s at 1 thread, both with prefetch). Every path prefetches PF_BYTES ahead in its row streams, but one-row
// f32 and 16-bit rows, which prefetch the line being read (row_prefetch).
// One register-tiled micro-kernel serves every kind and batch size: NR weight rows x MR activation rows per pass;
// each 32-block of a weight row is dequantized (d * q + m) in registers once and multiplied against MR rows of x,
// so the weight is read once per MR rows and never materialised (AVX-512 q4: a 16-entry table d * k + m per block,
// looked up by nibble with vpermps; one q8 row: sum q * x per block, then one multiply by d). From PANEL_MIN_ROWS
// rows on, the plain kinds widen NR_PANEL weight rows 512 columns at a time into a float panel shared by all rows
// of x instead (rows_panel: the micro-kernel then only loads and multiplies). Float activations:
// the result is the dequantized weight times x up to fp32 rounding order. Paths: AVX-512, AVX2 (+FMA, F16C),
// generic (compiler-vectorized), chosen by the build level (kernels/build.py). Threads: OpenMP over output rows
// (and (expert, row chunk) items for the fused MoE), sharing torch's libgomp pool. Large batches (prefill) are
// better served by a BLAS on dequantized tiles: selfseek/kernels/__init__.py does that from GEMM_MIN_ROWS rows on.
// Opt-in for q8/q4 and Q4_K / Q5_K / Q6_K below GEMM_MIN_ROWS rows (selfseek_linear_i8, SELFSEEK_INT8_ACTIVATIONS): x
// quantized to int8 per 32-block and integer dot products (several rows: 16 (VNNI) or 8 (AVX2 maddubs) weight rows
// transposed per block against all x rows, tile_i8_t, the K-quants unpacked to bytes per super-block first; fewer
// rows: weight row by weight row, q8_tile_i8 / kq_tile_i8 in 256-bit, q4 tile_i8 on AVX-512 block pairs; generic
// scalar), the fused MoE's experts too (selfseek_moe_int8); approximate, see there.
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "buf.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {
constexpr int64_t QK = 32;
enum Kind : int32_t { F32 = 0, BF16 = 1, F16 = 2, Q8 = 3, Q4 = 4, Q2K = 5, Q3K = 6, Q4K = 7, Q5K = 8, Q6K = 9,
                      FP8 = 10, FP4 = 11, Q8X16 = 12 };
constexpr bool blocked(int kind) { return kind >= Q2K; }
// Values per decoded unit, and bytes per unit in the data.
constexpr int unit_of(int kind) { return kind >= FP8 ? 32 : 256; }
constexpr int64_t unit_bytes(int kind) {
  switch (kind) {
    case Q2K: return 84;
    case Q3K: return 110;
    case Q4K: return 144;
    case Q5K: return 176;
    case Q6K: return 210;
    case FP8: return 32;
    case Q8X16: return 34;
    default: return 16;  // FP4
  }
}

// Q8X16: q8 weights (Q8_0's values and fp16 scales, no offsets) with each 16 rows interleaved, the layout of the
// int8 products' transposed tile stored once at start (models.quant.interleave): per group of 16 rows and 32-block, the
// 16 scales (32 bytes), then 8 x 64 bytes, where bytes 64 t + 4 j .. + 3 are values 4 t .. 4 t + 3 of row j. One
// stream per tile, no transpose and no horizontal sums: a vector of 16 rows' dot products per block.
constexpr int64_t Q8X16_BLOCK = 16 * 34;

struct Mat {
  int32_t kind;
  int64_t rows, cols;       // logical float shape of one matrix
  const uint8_t* data;      // matrix 0's values
  const uint16_t* scales;   // fp16 [rows, cols/32] (q8/q4); fp8: fp32 [rows, ceil(cols/128)]; fp4: uint8 [rows, cols/32]
  const uint16_t* mins;     // fp16 [rows, cols/32] or null
  int64_t stride;           // bytes from one expert's values to the next (stacks)
  int64_t sstride;          // bytes from one expert's scales/mins to the next
};

inline int64_t row_bytes(const Mat& w) {
  switch (w.kind) {
    case F32: return w.cols * 4;
    case BF16: case F16: return w.cols * 2;
    case Q8: return w.cols;
    case Q4: return w.cols / 2;
    default: return w.cols / unit_of(w.kind) * unit_bytes(w.kind);
  }
}

// Rows [n0, n0 + n) of w as a matrix of its own (no copy): the values and the per-row scales and mins moved down.
inline Mat rows_view(const Mat& w, int64_t n0, int64_t n) {
  const int64_t scale_row = w.kind == Q8 || w.kind == Q4 ? w.cols / 32 * 2  // fp16 per 32-block
                            : w.kind == FP8              ? (w.cols + 127) / 128 * 4  // fp32 per 128 columns
                            : w.kind == FP4              ? w.cols / 32  // ue8m0 per 32 columns
                                                         : 0;  // plain kinds and K-quants: none beside the rows
  Mat v = w;
  v.rows = n;
  v.data += n0 * row_bytes(w);
  if (v.scales) v.scales = (const uint16_t*)((const uint8_t*)v.scales + n0 * scale_row);
  if (v.mins) v.mins = (const uint16_t*)((const uint8_t*)v.mins + n0 * scale_row);
  return v;
}

inline Mat expert(const Mat& w, int64_t e) {
  Mat m = w;
  m.data += e * w.stride;
  if (m.scales) m.scales = (const uint16_t*)((const uint8_t*)m.scales + e * w.sstride);
  if (m.mins) m.mins = (const uint16_t*)((const uint8_t*)m.mins + e * w.sstride);
  return m;
}

// Software prefetch distance in a weight row stream. Decode reads each weight byte once, straight from DRAM, and the
// hardware prefetcher alone leaves the core waiting: it ramps up again at every 4 KiB page and follows only a few
// interleaved streams well. Asking for the line PF_BYTES ahead of the one being read keeps enough misses in flight
// (4 KiB: best measured of 1-8 KiB on the medium V3 lm_head).
constexpr int64_t PF_BYTES = 4096;
inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }
// One-row float32 and 16-bit rows (f32_row_dot, half_row_dot) prefetch the line being read instead: on a Zen 4 EPYC, f32
// 129280 x 1024 at 1 thread 27-31 -> 21-23 ms (AVX2 build, against its former 4 page streams: 39 -> 22), bf16
// 32768 x 2048 6.0 -> 5.1 ms (no prefetch at all: 26 ms for that f32), where q8 rows keep PF_BYTES (6.8 vs 8.5 ms).
template <int KIND>
constexpr int64_t row_prefetch() {
  return KIND == F32 || KIND == BF16 || KIND == F16 ? 0 : PF_BYTES;
}
// The lines of [p, p + n) (a short stream: a future row's scales).
inline void prefetch_range(const void* p, int64_t n) {
  const uintptr_t first = (uintptr_t)p & ~(uintptr_t)63, last = ((uintptr_t)p + n - 1) & ~(uintptr_t)63;
  for (uintptr_t a = first; a <= last; a += 64) prefetch((const void*)a);
}

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: value = mant * 2^-24
      float f = (float)mant * 5.9604644775390625e-08f;
      std::memcpy(&bits, &f, 4);
      bits |= sign;
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
#endif
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// One weight row: values, and for quantized kinds its per-block scales and mins.
struct Row {
  const uint8_t* q;
  const uint16_t* d;
  const uint16_t* m;
};

inline Row row_of(const Mat& w, int64_t n) {
  const int64_t nb = w.cols / QK;
  return {w.data + n * row_bytes(w), w.scales ? w.scales + n * nb : nullptr, w.mins ? w.mins + n * nb : nullptr};
}

// Element k of a float-kind row (the tail past the last whole block).
template <int KIND>
inline float elem(const Row& r, int64_t k) {
  if constexpr (KIND == F32) return ((const float*)r.q)[k];
  else if constexpr (KIND == BF16) return bf16_to_float(((const uint16_t*)r.q)[k]);
  else return half_to_float(((const uint16_t*)r.q)[k]);
}

// ---------------------------------------------------------------- vectors: VW floats, VPB of them per 32-block
#if defined(__AVX2__)
// 256-bit vectors, which the AVX-512 build uses too for one weight row against one x row of q8, q4, q6_k and 16-bit
// weights (q8_row_dot, q4_row_dot, q6k_rows_one, half_row_dot): such a row is bound by widening its bytes, and on a
// CPU that runs AVX-512 in 256-bit halves (AMD Zen 4) the 512-bit block loops were slower (1 thread, 32768 x 2048,
// ms, 512-bit vs these: q8 4.0 vs 3.6, q4 4.9 vs 3.7, q6_k 6.4 vs 5.6, bf16 11.6 vs 6.9).
namespace y8 {
using V = __m256;
inline V zero() { return _mm256_setzero_ps(); }
inline V set1(float f) { return _mm256_set1_ps(f); }
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline float sum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline int32_t isum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 1)));
}
}  // namespace y8
#endif

#if defined(__AVX512F__)
using V = __m512;
constexpr int VW = 16;
constexpr int MR_MAX = 4, NR_WIDE = 4;  // 16 accumulators of 32 registers
constexpr int MR_PANEL = 4, NR_PANEL = 4;  // rows_panel: x rows x weight rows per micro-tile
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset1(float f) { return _mm512_set1_ps(f); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline float vsum(V v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__)
using V = __m256;
constexpr int VW = 8;
constexpr int MR_MAX = 4, NR_WIDE = 2;  // 8 accumulators + 4 weight registers of 16
constexpr int MR_PANEL = 4, NR_PANEL = 3;  // 12 accumulators + 3 weight + 1 x register (best of 2x4 .. 6x2)
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset1(float f) { return _mm256_set1_ps(f); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline float vsum(V v) { return y8::sum(v); }
#else
struct V {
  float v[8];
};
constexpr int VW = 8;
constexpr int MR_MAX = 4, NR_WIDE = 2;
constexpr int MR_PANEL = 4, NR_PANEL = 3;
inline V vzero() { return V{}; }
inline V vset1(float f) {
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = f;
  return r;
}
inline V vload(const float* p) {
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = p[i];
  return r;
}
inline void vstore(float* p, V v) { std::memcpy(p, v.v, sizeof(v.v)); }
inline V vfma(V a, V b, V c) {
  for (int i = 0; i < 8; ++i) c.v[i] = a.v[i] * b.v[i] + c.v[i];
  return c;
}
inline V vadd(V a, V b) {
  for (int i = 0; i < 8; ++i) a.v[i] += b.v[i];
  return a;
}
inline float vsum(V a) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += a.v[i];
  return s;
}
#endif
constexpr int VPB = QK / VW;
constexpr int NR_ONE = 4;  // weight rows per pass for one activation row (block kinds, f32): 4 independent chains

// Block b of a row widened to VPB float vectors: the integers q themselves for quantized kinds (the caller
// applies d and m), the values for float kinds.
template <int KIND>
inline void load_block(const Row& r, int64_t b, V* out) {
  if constexpr (KIND == F32) {
    const float* p = (const float*)r.q + b * QK;
    for (int v = 0; v < VPB; ++v) out[v] = vload(p + v * VW);
  } else if constexpr (KIND == Q8 || KIND == Q4) {
#if defined(__AVX512F__)
    if constexpr (KIND == Q8) {
      out[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r.q + b * QK))));
      out[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r.q + b * QK + 16))));
    } else {
      const __m128i raw = _mm_loadu_si128((const __m128i*)(r.q + b * QK / 2));
      const __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
      out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
      out[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
    }
#elif defined(__AVX2__)
    if constexpr (KIND == Q8) {
      const int8_t* q = (const int8_t*)(r.q + b * QK);
      for (int v = 0; v < 4; ++v)
        out[v] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + 8 * v))));
    } else {
      const __m128i raw = _mm_loadu_si128((const __m128i*)(r.q + b * QK / 2));
      const __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
      out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
      out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
      out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
      out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
    }
#else
    for (int j = 0; j < QK; ++j) {
      float q;
      if constexpr (KIND == Q8) {
        q = (float)(int8_t)r.q[b * QK + j];
      } else {
        const uint8_t byte = r.q[b * QK / 2 + (j % 16)];
        q = (float)(j < 16 ? (byte & 0x0F) : (byte >> 4));
      }
      out[j / VW].v[j % VW] = q;
    }
#endif
  } else {  // BF16 / F16
    const uint16_t* p = (const uint16_t*)r.q + b * QK;
#if defined(__AVX512F__)
    for (int v = 0; v < 2; ++v) {
      const __m256i h = _mm256_loadu_si256((const __m256i*)(p + 16 * v));
      if constexpr (KIND == BF16) out[v] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      else out[v] = _mm512_cvtph_ps(h);
    }
#elif defined(__AVX2__)
    for (int v = 0; v < 4; ++v) {
      const __m128i h = _mm_loadu_si128((const __m128i*)(p + 8 * v));
      if constexpr (KIND == BF16) out[v] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      else out[v] = _mm256_cvtph_ps(h);
    }
#else
    for (int j = 0; j < QK; ++j) out[j / VW].v[j % VW] = KIND == BF16 ? bf16_to_float(p[j]) : half_to_float(p[j]);
#endif
  }
}

#if defined(__AVX2__)
// Vector v (values VW v .. VW v + VW - 1) of block b of a plain-kind row, as load_block widens it (q: the integers).
template <int KIND>
inline V load_vec(const Row& r, int64_t b, int v) {
  if constexpr (KIND == F32) {
    return vload((const float*)r.q + b * QK + v * VW);
#if defined(__AVX512F__)
  } else if constexpr (KIND == Q8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r.q + b * QK + 16 * v))));
  } else if constexpr (KIND == Q4) {  // vector 0: the low nibbles of bytes 0..15, 1: their high nibbles
    __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(r.q + b * QK / 2)));
    if (v) u = _mm512_srli_epi32(u, 4);
    return _mm512_cvtepi32_ps(_mm512_and_si512(u, _mm512_set1_epi32(0x0F)));
  } else {
    const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)r.q + b * QK + 16 * v));
    if constexpr (KIND == BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else return _mm512_cvtph_ps(h);
  }
#else
  } else if constexpr (KIND == Q8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(r.q + b * QK + 8 * v))));
  } else if constexpr (KIND == Q4) {  // vectors 0, 1: low nibbles of bytes 0..7, 8..15; 2, 3: their high nibbles
    __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(r.q + b * QK / 2 + 8 * (v & 1))));
    if (v >= 2) u = _mm256_srli_epi32(u, 4);
    return _mm256_cvtepi32_ps(_mm256_and_si256(u, _mm256_set1_epi32(0x0F)));
  } else {
    const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)r.q + b * QK + 8 * v));
    if constexpr (KIND == BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);
  }
#endif
}
#endif

// ---------------------------------------------------------------- block kinds: one unit of a row -> floats
// Each decoder writes the unit's UNIT values exactly as gguf.quants.dequantize (K-quants) or the plain-torch
// definitions (fp8, fp4) compute them: products of small integers and scales are exact in fp32, so the only
// rounding is the one the reference does (the min subtraction, or the one scale product).
struct Tables {
  float e8m0[256];  // ue8m0 scale byte -> 2^(e - 127) (e = 0: the subnormal 2^-127; 255: NaN)
  Tables() {
    for (int b = 0; b < 256; ++b) e8m0[b] = b == 255 ? NAN : std::ldexp(1.f, b - 127);
  }
};
const Tables kTables;

inline uint8_t k4_scale(const uint8_t* s, int j) { return j < 4 ? s[j] & 63 : (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4); }
inline uint8_t k4_min(const uint8_t* s, int j) { return j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4); }

// Unit u of weight row n (a 256-value super-block for K-quants, 32 values for fp8/fp4) into out.
template <int KIND>
inline void decode_unit(const Mat& w, int64_t n, int64_t u, float* out) {
  if constexpr (KIND == Q8X16) {  // row n % 16 of its group's block u (see Q8X16_BLOCK)
    const uint8_t* g = w.data + n / 16 * 16 * row_bytes(w) + u * Q8X16_BLOCK;
    const int64_t j = n % 16;
    const float d = half_to_float(g[2 * j] | g[2 * j + 1] << 8);
    for (int t = 0; t < 8; ++t)
      for (int i = 0; i < 4; ++i) out[4 * t + i] = d * (float)(int8_t)g[32 + 64 * t + 4 * j + i];
    return;
  }
  const uint8_t* b = w.data + n * row_bytes(w) + u * unit_bytes(KIND);
  if constexpr (KIND == Q4K || KIND == Q5K) {
    const float d = half_to_float(b[0] | b[1] << 8), dmin = half_to_float(b[2] | b[3] << 8);
    const uint8_t* sc = b + 4;
    const uint8_t* qh = b + 16;                     // Q5_K: bit g of qh[i] is value 32 g + i's fifth bit
    const uint8_t* qs = b + (KIND == Q4K ? 16 : 48);  // 64-value chunks: low nibbles, then high nibbles
    for (int g = 0; g < 8; ++g) {
      const float D = d * (float)k4_scale(sc, g), M = dmin * (float)k4_min(sc, g);
      const uint8_t* q = qs + (g / 2) * 32;
      const int shift = (g % 2) * 4;
      for (int i = 0; i < 32; ++i) {
        int v = (q[i] >> shift) & 0xF;
        if constexpr (KIND == Q5K) v |= ((qh[i] >> g) & 1) << 4;
        out[g * 32 + i] = D * (float)v - M;
      }
    }
  } else if constexpr (KIND == Q6K) {  // value 32 g + i: ql nibble, qh 2-bit field, scale per 16
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t* sc = (const int8_t*)(b + 192);
    const float d = half_to_float(b[208] | b[209] << 8);
    for (int g = 0; g < 8; ++g) {
      const uint8_t* l = ql + (g / 4) * 64 + (g % 2) * 32;
      const uint8_t* h = qh + (g / 4) * 32;
      const int ls = ((g / 2) % 2) * 4, hs = (g % 4) * 2;
      for (int half = 0; half < 2; ++half) {
        const float D = d * (float)sc[2 * g + half];
        for (int i = 16 * half; i < 16 * half + 16; ++i)
          out[g * 32 + i] = D * (float)((((l[i] >> ls) & 0xF) | (((h[i] >> hs) & 3) << 4)) - 32);
      }
    }
  } else if constexpr (KIND == Q2K) {  // value 32 g + i: 2-bit field of qs, scale and min per 16
    const uint8_t *sc = b, *qs = b + 16;
    const float d = half_to_float(b[80] | b[81] << 8), dmin = half_to_float(b[82] | b[83] << 8);
    for (int g = 0; g < 8; ++g) {
      const uint8_t* q = qs + (g / 4) * 32;
      const int shift = (g % 4) * 2;
      for (int half = 0; half < 2; ++half) {
        const uint8_t s = sc[2 * g + half];
        const float D = d * (float)(s & 0xF), M = dmin * (float)(s >> 4);
        for (int i = 16 * half; i < 16 * half + 16; ++i) out[g * 32 + i] = D * (float)((q[i] >> shift) & 3) - M;
      }
    }
  } else if constexpr (KIND == Q3K) {  // value 32 g + i: 2-bit field of qs, minus 4 where bit g of hmask[i] is 0
    const uint8_t *hm = b, *qs = b + 32, *sc = b + 96;
    const float d = half_to_float(b[108] | b[109] << 8);
    for (int g = 0; g < 8; ++g) {
      const uint8_t* q = qs + (g / 4) * 32;
      const int shift = (g % 4) * 2;
      for (int half = 0; half < 2; ++half) {
        const int k = 2 * g + half;
        const int lo = k < 8 ? sc[k] & 0xF : sc[k - 8] >> 4, hi = (sc[8 + k % 4] >> (2 * (k / 4))) & 3;
        const float D = d * (float)((lo | hi << 4) - 32);
        for (int i = 16 * half; i < 16 * half + 16; ++i)
          out[g * 32 + i] = D * (float)(((q[i] >> shift) & 3) - 4 + 4 * ((hm[i] >> g) & 1));
      }
    }
  } else if constexpr (KIND == FP8) {
    // e4m3 times 2^9 is an integer (subnormals m, normals (8 + m) << (e - 1)): converted exactly, scaled by 2^-9
    // exactly, then one rounding for the block scale as in the reference (no subnormal floats on the way: slow).
    const float s = ((const float*)w.scales)[n * ((w.cols + 127) / 128) + u * 32 / 128];
    for (int i = 0; i < 32; ++i) {  // branch-free, so it vectorizes (random bytes defeat branch prediction)
      const int e = (b[i] >> 3) & 15, m = b[i] & 7, normal = e != 0;
      const int v = (m | normal << 3) << (e - normal);
      out[i] = (float)(v * (1 - 2 * (b[i] >> 7))) * 0x1p-9f * s;
    }
  } else {  // FP4: likewise e2m1 times 2 is an integer (0, 1, 2, 3, 4, 6, 8, 12)
    const float s = kTables.e8m0[((const uint8_t*)w.scales)[n * (w.cols / 32) + u]];
    float lo[16], hi[16];  // the even and the odd columns, each loop branch-free so it vectorizes
    for (int k = 0; k < 2; ++k) {
      float* o = k ? hi : lo;
      for (int i = 0; i < 16; ++i) {
        const int nib = (b[i] >> (4 * k)) & 0xF, e = (nib >> 1) & 3, m = nib & 1, normal = e != 0;
        o[i] = (float)(((m | normal << 1) << (e - normal)) * (1 - 2 * (nib >> 3))) * 0.5f * s;
      }
    }
    for (int i = 0; i < 16; ++i) {
      out[2 * i] = lo[i];
      out[2 * i + 1] = hi[i];
    }
  }
}

#if defined(__AVX2__)
// 32 byte values (0..255) -> VPB float vectors.
inline void bytes_to_floats(__m256i u, V* out) {
#if defined(__AVX512F__)
  out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(u)));
  out[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(u, 1)));
#else
  const __m128i lo = _mm256_castsi256_si128(u), hi = _mm256_extracti128_si256(u, 1);
  out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
#endif
}

// A Q4_K / Q5_K super-block's 8 group scales times d and 8 mins times dmin into DM[0..7], DM[8..15]: the 12 packed
// 6-bit fields rearranged to 16 bytes with 32-bit masks (as llama.cpp does), then one vector conversion (exact:
// fp16 times 6 bits fits fp32's mantissa).
inline void k4_scales(const uint8_t* b, float* DM) {
  uint32_t t[4];
  std::memcpy(t, b + 4, 12);
  t[3] = ((t[2] >> 4) & 0x0F0F0F0F) | (((t[1] >> 6) & 0x03030303) << 4);  // mins 4..7
  const uint32_t mins03 = t[1] & 0x3F3F3F3F;
  t[1] = (t[2] & 0x0F0F0F0F) | (((t[0] >> 6) & 0x03030303) << 4);  // scales 4..7
  t[2] = mins03;
  t[0] &= 0x3F3F3F3F;  // scales 0..3
  const __m128i sm = _mm_loadu_si128((const __m128i*)t);
  const float d = half_to_float(b[0] | b[1] << 8), dmin = half_to_float(b[2] | b[3] << 8);
#if defined(__AVX512F__)
  const __m512 dd = _mm512_insertf32x8(_mm512_set1_ps(d), _mm256_set1_ps(dmin), 1);
  _mm512_store_ps(DM, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sm)), dd));
#else
  _mm256_store_ps(DM, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm)), _mm256_set1_ps(d)));
  _mm256_store_ps(DM + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8))),
                                        _mm256_set1_ps(dmin)));
#endif
}

// Q4_K / Q5_K in registers, no buffer: per super-block the 8 scales and mins are decoded once, then each 32-value
// group is unpacked to integer-valued floats q and turned into D q - M with one fused multiply-subtract, which is
// exact (D q is exact in fp32) and so the same value as the reference's D * q - M.
template <int KIND, int MR, int NR>
void tile_kq(const Mat& w, int64_t n0, const float* x, int64_t ldx, float* y, int64_t ldy,
             [[maybe_unused]] const float* xs = nullptr) {
  V acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = vzero();
  const int64_t units = w.cols / 256, rb = row_bytes(w);
  const __m256i low4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
  // xs (one x row, AVX2; group_sums): sum_g D_g (q_g . x_g) - M_g xs_g, 4 FMAs a group fewer than turning every
  // weight vector into D q - M first (fp32 summation order only)
  for (int64_t u = 0; u < units; ++u) {
    for (int j = 0; j < NR; ++j) {
      const uint8_t* b = w.data + (n0 + j) * rb + u * unit_bytes(KIND);
      prefetch_range(b + NR * rb, unit_bytes(KIND));  // the next tile's row j
      alignas(64) float DM[16];  // the 8 groups' D = d * scale, then their M = dmin * min
      k4_scales(b, DM);
      [[maybe_unused]] V a0 = vzero(), a1 = vzero();
      for (int g = 0; g < 8; ++g) {
        const float* xb = x + u * 256 + g * 32;
#if defined(__AVX512F__)
        if constexpr (KIND == Q4K) {  // as the q4 path: the group's 16 values D k - M as a table, looked up by nibble
          const __m512 lut = _mm512_fmadd_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_ps(DM[g]), _mm512_set1_ps(-DM[8 + g]));
          const uint8_t* qs = b + 16 + (g / 2) * 32;
          __m128i r0 = _mm_loadu_si128((const __m128i*)qs), r1 = _mm_loadu_si128((const __m128i*)(qs + 16));
          if (g % 2) {  // vpermps reads the low 4 bits of each lane: the high nibble after a shift
            r0 = _mm_srli_epi16(r0, 4);
            r1 = _mm_srli_epi16(r1, 4);
          }
          const __m512 w0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(r0), lut);
          const __m512 w1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(r1), lut);
          for (int r = 0; r < MR; ++r) {
            acc[r][j] = vfma(w0, vload(xb + r * ldx), acc[r][j]);
            acc[r][j] = vfma(w1, vload(xb + r * ldx + 16), acc[r][j]);
          }
          continue;
        }
#endif
        const uint8_t* qs = b + (KIND == Q4K ? 16 : 48) + (g / 2) * 32;
        __m256i q = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i*)qs),
                                                      _mm_cvtsi32_si128((g % 2) * 4)), low4);
        if constexpr (KIND == Q5K) {
          const __m256i qh = _mm256_loadu_si256((const __m256i*)(b + 16));
          const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(g)), one);
          q = _mm256_or_si256(q, _mm256_slli_epi16(bit, 4));
        }
        V wv[VPB];
        bytes_to_floats(q, wv);
#if defined(__AVX2__) && !defined(__AVX512F__)
        if (MR == 1 && xs) {
          const V qx = vadd(vfma(wv[1], vload(xb + 8), _mm256_mul_ps(wv[0], vload(xb))),
                            vfma(wv[3], vload(xb + 24), _mm256_mul_ps(wv[2], vload(xb + 16))));
          a0 = vfma(qx, vset1(DM[g]), a0);
          a1 = _mm256_fnmadd_ps(vset1(DM[8 + g]), vload(xs + 8 * (u * 8 + g)), a1);
          continue;
        }
#endif
        for (int v = 0; v < VPB; ++v) wv[v] = vfma(wv[v], vset1(DM[g]), vset1(-DM[8 + g]));
        for (int r = 0; r < MR; ++r)
          for (int v = 0; v < VPB; ++v) acc[r][j] = vfma(wv[v], vload(xb + r * ldx + v * VW), acc[r][j]);
      }
      if constexpr (MR == 1) acc[0][j] = vadd(acc[0][j], vadd(a0, a1));
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) y[r * ldy + j] = vsum(acc[r][j]);
}

#if defined(__AVX512F__)
// Q4_K rows against one x row without shuffles: a 64-byte load of a super-block's nibbles is 16 dwords, and nibble k
// of every dword, kept in place (dw & 15 << 4k: the nibble times 2^4k, converted exactly), is one vector of 16
// weights: lanes 0-7 of group 4h + k % 2, lanes 8-15 of group 4h + 2 + k % 2 (h: which 64 bytes), value
// 4 (l % 8) + k / 2 of its group. x is permuted into that order and scaled by 2^-4k once per call (xp), and
// sum_g D_g (q_g . x_g) - M_g sum(x_g) is taken with the D_g as two-valued vectors. tile_kq's per-value table lookup
// (vpmovzxbd + vpermps, two 512-bit shuffles per 16 values) was shuffle-bound: 129280 x 1024 at 1 thread 11.0 ->
// 7.6 ms; expert shapes (in cache) 256 x 1024 0.029 -> 0.027, 1024 x 256 0.045 -> 0.028 ms.
void q4k_rows_one(const Mat& w, int64_t n0, int64_t n1, const float* x, float* y) {
  const int64_t units = w.cols / 256, rb = row_bytes(w);
  std::vector<float> xp(w.cols), xs(units * 8);
  for (int64_t u = 0; u < units; ++u) {
    const float* xu = x + u * 256;
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 8; ++k)
        for (int l = 0; l < 16; ++l)
          xp[u * 256 + (h * 8 + k) * 16 + l] =
              std::ldexp(xu[32 * (4 * h + 2 * (l / 8) + k % 2) + 4 * (l % 8) + k / 2], -4 * k);
    for (int g = 0; g < 8; ++g) {
      float t = 0.f;
      for (int i = 0; i < 32; ++i) t += xu[32 * g + i];
      xs[u * 8 + g] = t;
    }
  }
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.data + n * rb;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m256 macc = _mm256_setzero_ps();
    for (int64_t u = 0; u < units; ++u) {
      const uint8_t* b = row + u * 144;
      prefetch_range(b + PF_BYTES, 144);
      alignas(64) float DM[16];
      k4_scales(b, DM);
      const float* xu = xp.data() + u * 256;
      for (int h = 0; h < 2; ++h) {
        const __m512i q = _mm512_loadu_si512(b + 16 + 64 * h);
        __m512 se = _mm512_setzero_ps(), so = _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int k = 0; k < 8; k += 2) {
          const __m512i ve = _mm512_and_si512(q, _mm512_set1_epi32(0xF << 4 * k));
          const __m512i vo = _mm512_and_si512(q, _mm512_set1_epi32((int)(0xFu << (4 * k + 4))));
          se = _mm512_fmadd_ps(_mm512_cvtepu32_ps(ve), _mm512_loadu_ps(xu + (h * 8 + k) * 16), se);
          so = _mm512_fmadd_ps(_mm512_cvtepu32_ps(vo), _mm512_loadu_ps(xu + (h * 8 + k + 1) * 16), so);
        }
        const __m512 de = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(DM[4 * h]), _mm512_set1_ps(DM[4 * h + 2]));
        const __m512 dn = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(DM[4 * h + 1]), _mm512_set1_ps(DM[4 * h + 3]));
        acc0 = _mm512_fmadd_ps(se, de, acc0);
        acc1 = _mm512_fmadd_ps(so, dn, acc1);
      }
      macc = _mm256_fmadd_ps(_mm256_load_ps(DM + 8), _mm256_loadu_ps(xs.data() + u * 8), macc);
    }
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) - y8::sum(macc);
  }
}
#endif

// 32 signed bytes -> VPB float vectors.
inline void sbytes_to_floats(__m256i q, V* out) {
#if defined(__AVX512F__)
  out[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
  out[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
#else
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  out[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
  out[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
  out[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
  out[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
#endif
}

// 16 e4m3 bytes -> 16 fp16 lanes holding e4m3 * 2^-8 exactly: sign to bit 15, exponent and mantissa to bits 13..7,
// so e4m3's bias 7 becomes fp16's 15 and e4m3 subnormals land on fp16 subnormals (which vcvtph2ps widens exactly).
inline __m256i e4m3_to_half(__m128i b) {
  return _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7), _mm256_set1_epi16((short)0xBF80));
}

// One 32-value unit of an fp8 / fp4 row as VPB float vectors w = value * s, the reference's one rounding.
template <int KIND>
inline void load_fp_unit(const uint8_t* b, float s, V* out) {
  if constexpr (KIND == FP8) {  // value * 2^-8 as fp16, times 256 s (exact: a power of two): the same product
    const V sc = vset1(s * 256.f);
    for (int h = 0; h < 2; ++h) {
      const __m256i f16 = e4m3_to_half(_mm_loadu_si128((const __m128i*)(b + 16 * h)));
#if defined(__AVX512F__)
      out[h] = _mm512_mul_ps(_mm512_cvtph_ps(f16), sc);
#else
      out[2 * h] = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(f16)), sc);
      out[2 * h + 1] = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(f16, 1)), sc);
#endif
    }
  } else {  // FP4: nibbles interleaved to column order and looked up
    const __m128i raw = _mm_loadu_si128((const __m128i*)b);
#if defined(__AVX512F__)
    // in a 16-entry table of e2m1 * s (exact products) by vpermps, which reads the low 4 bits of each lane
    const __m512 lut = _mm512_mul_ps(_mm512_setr_ps(0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -.5f, -1.f, -1.5f,
                                                    -2.f, -3.f, -4.f, -6.f), _mm512_set1_ps(s));
    const __m128i hi = _mm_srli_epi16(raw, 4);
    out[0] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(raw, hi)), lut);
    out[1] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(raw, hi)), lut);
#else
    // as 2 * e2m1 (a small signed integer) by pshufb, times s / 2
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(raw, m4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
    const __m128i tbl = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m256i q = _mm256_set_m128i(_mm_shuffle_epi8(tbl, _mm_unpackhi_epi8(lo, hi)),
                                       _mm_shuffle_epi8(tbl, _mm_unpacklo_epi8(lo, hi)));
    sbytes_to_floats(q, out);
    const V sc = vset1(0.5f * s);
    for (int v = 0; v < VPB; ++v) out[v] = _mm256_mul_ps(out[v], sc);
#endif
  }
}

// fp8 / fp4 in registers: each 32-value unit of NR rows converted once and multiplied against MR rows of x.
template <int KIND, int MR, int NR>
void tile_fp(const Mat& w, int64_t n0, const float* x, int64_t ldx, float* y, int64_t ldy) {
  V acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = vzero();
  const int64_t units = w.cols / 32, rb = row_bytes(w), ns = KIND == FP8 ? (w.cols + 127) / 128 : units;
  for (int64_t u = 0; u < units; ++u) {
    const float* xb = x + u * 32;
    for (int j = 0; j < NR; ++j) {
      const float s = KIND == FP8 ? ((const float*)w.scales)[(n0 + j) * ns + u / 4]
                                  : kTables.e8m0[((const uint8_t*)w.scales)[(n0 + j) * ns + u]];
      V wv[VPB];
      const uint8_t* b = w.data + (n0 + j) * rb + u * unit_bytes(KIND);
      if ((u * unit_bytes(KIND)) % 64 == 0) prefetch(b + NR * rb);  // the next tile's row j
      load_fp_unit<KIND>(b, s, wv);
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < VPB; ++v) acc[r][j] = vfma(wv[v], vload(xb + r * ldx + v * VW), acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) y[r * ldy + j] = vsum(acc[r][j]);
}

// Q6_K in registers: the 16 int8 scales times d in one vector conversion per super-block; per 128 values ql (64
// bytes) and qh (32 bytes) are loaded once and give four 32-value groups q - 32 as signed bytes; w = (q - 32) * D
// is the reference's d * sc * (q - 32) (d * sc is exact in fp32: 11-bit mantissa times 8 bits).
// Groups 4c .. 4c + 3 of the Q6_K unit at b as signed bytes q - 32: each group's ql nibbles (bytes 64c .. 64c + 63,
// low then high) with bits 4..5 from qh (bytes 128 + 32c ..): group k's are qh bits 2k..2k+1.
inline void q6k_groups(const uint8_t* b, int c, __m256i* q) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), bits45 = _mm256_set1_epi8(0x30), m32 = _mm256_set1_epi8(32);
  const __m256i l0 = _mm256_loadu_si256((const __m256i*)(b + 64 * c));
  const __m256i l1 = _mm256_loadu_si256((const __m256i*)(b + 64 * c + 32));
  const __m256i h = _mm256_loadu_si256((const __m256i*)(b + 128 + 32 * c));
  // epi16 shifts: the 0x30 mask keeps each byte's own bits
  q[0] = _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_and_si256(_mm256_slli_epi16(h, 4), bits45));
  q[1] = _mm256_or_si256(_mm256_and_si256(l1, low4), _mm256_and_si256(_mm256_slli_epi16(h, 2), bits45));
  q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4), _mm256_and_si256(h, bits45));
  q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                         _mm256_and_si256(_mm256_srli_epi16(h, 2), bits45));
  for (int k = 0; k < 4; ++k) q[k] = _mm256_sub_epi8(q[k], m32);
}

// The 16 scales of the Q6_K unit at b times its d (D[16], 64-byte aligned).
inline void q6k_scales(const uint8_t* b, float* D) {
  const __m128i sc = _mm_loadu_si128((const __m128i*)(b + 192));
#if defined(__AVX512F__)
  _mm512_store_ps(D, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)),
                                   _mm512_set1_ps(half_to_float(b[208] | b[209] << 8))));
#else
  const __m256 d = _mm256_set1_ps(half_to_float(b[208] | b[209] << 8));
  _mm256_store_ps(D, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)), d));
  _mm256_store_ps(D + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))), d));
#endif
}

// f(g, q, D) for the 8 groups g of the Q6_K unit at b: q the group's 32 bytes q - 32, D the unit's 16 scales.
template <class F>
inline void q6k_unit_groups(const uint8_t* b, F&& f) {
  alignas(64) float D[16];
  q6k_scales(b, D);
  for (int c = 0; c < 2; ++c) {
    __m256i q[4];
    q6k_groups(b, c, q);
    for (int k = 0; k < 4; ++k) f(4 * c + k, q[k], D);
  }
}

template <int MR, int NR>
void tile_q6k(const Mat& w, int64_t n0, const float* x, int64_t ldx, float* y, int64_t ldy) {
  V acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = vzero();
  const int64_t units = w.cols / 256, rb = row_bytes(w);
  for (int64_t u = 0; u < units; ++u) {
    for (int j = 0; j < NR; ++j) {
      const uint8_t* b = w.data + (n0 + j) * rb + u * 210;
      prefetch_range(b + NR * rb, 210);  // the next tile's row j
      q6k_unit_groups(b, [&](int g, __m256i q, const float* D) {
        const float* xb = x + u * 256 + g * 32;
        V wv[VPB];
        sbytes_to_floats(q, wv);
        for (int v = 0; v < VPB; ++v) wv[v] = vfma(wv[v], vset1(D[2 * g + v * VW / 16]), vzero());
        for (int r = 0; r < MR; ++r)
          for (int v = 0; v < VPB; ++v) acc[r][j] = vfma(wv[v], vload(xb + r * ldx + v * VW), acc[r][j]);
      });
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) y[r * ldy + j] = vsum(acc[r][j]);
}

#if defined(__AVX2__)
// Q6_K rows [n0, n1) against one x row, y[n] for each. Widening bytes to floats bound tile_q6k here (per 32 values
// 7 shuffles: extracts, byte shifts, pmovsxbd). Instead each 32-bit lane of a group's 32 bytes gives its 4 bytes by
// shifts alone ((v << 24) >> 24 ...), so vector m holds bytes 4l + m of lanes l: x is read in that order, made once
// per call (xp), and lanes 0-3 / 4-7 are the group's two 16-value halves, scaled by one [D0 x4, D1 x4] vector.
void q6k_rows_one(const Mat& w, int64_t n0, int64_t n1, const float* x, float* y) {
  const int64_t K = w.cols, units = K / 256, rb = row_bytes(w);
  std::vector<float> xp(K);
  for (int64_t g = 0; g < K / 32; ++g)
    for (int m = 0; m < 4; ++m)
      for (int l = 0; l < 8; ++l) xp[g * 32 + m * 8 + l] = x[g * 32 + 4 * l + m];
  for (int64_t n = n0; n < n1; ++n) {
    y8::V a0 = y8::zero(), a1 = y8::zero();
    for (int64_t u = 0; u < units; ++u) {
      const uint8_t* b = w.data + n * rb + u * 210;
      prefetch_range(b + PF_BYTES, 210);
      q6k_unit_groups(b, [&](int g, __m256i v, const float* D) {
        const float* xb = xp.data() + u * 256 + g * 32;
        const y8::V w0 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24));
        const y8::V w1 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 16), 24));
        const y8::V w2 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 8), 24));
        const y8::V w3 = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 24));
        const y8::V s = y8::add(y8::fma(w1, y8::load(xb + 8), y8::mul(w0, y8::load(xb))),
                                 y8::fma(w3, y8::load(xb + 24), y8::mul(w2, y8::load(xb + 16))));
        const y8::V dv = _mm256_set_m128(_mm_set1_ps(D[2 * g + 1]), _mm_set1_ps(D[2 * g]));
        if (g % 2) a1 = y8::fma(s, dv, a1);
        else a0 = y8::fma(s, dv, a0);
      });
    }
    y[n] = y8::sum(y8::add(a0, a1));
  }
}
#endif

// Q2_K / Q3_K in registers: per super-block the 16 scales (Q2_K: and mins) times d in vector conversions; per 128
// values the 32 bytes of 2-bit fields (Q3_K: and the 32 bytes of high bits) are loaded once and give four 32-value
// groups as bytes. Q2_K: w = D q - M by one fused multiply-subtract (D q is exact: fp16 times 4 bits times 2 bits);
// Q3_K: w = D q with q in -4..3 (exact: fp16 times 6 bits times 3 bits). Both are the reference's values.
template <int KIND, int MR, int NR>
void tile_q23(const Mat& w, int64_t n0, const float* x, int64_t ldx, float* y, int64_t ldy) {
  V acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = vzero();
  const int64_t units = w.cols / 256, rb = row_bytes(w);
  const __m256i low2 = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4), zero = _mm256_setzero_si256();
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t u = 0; u < units; ++u) {
    for (int j = 0; j < NR; ++j) {
      const uint8_t* b = w.data + (n0 + j) * rb + u * unit_bytes(KIND);
      prefetch_range(b + NR * rb, unit_bytes(KIND));  // the next tile's row j
      alignas(64) float D[16], M[16];
      __m128i sc;  // the 16 scales as bytes: Q2_K unsigned 4 bits, Q3_K signed 6 bits
      __m128i mn = _mm_setzero_si128();
      float d, dmin = 0.f;
      if constexpr (KIND == Q2K) {
        const __m128i raw = _mm_loadu_si128((const __m128i*)b);
        sc = _mm_and_si128(raw, low4);
        mn = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
        d = half_to_float(b[80] | b[81] << 8);
        dmin = half_to_float(b[82] | b[83] << 8);
      } else {  // 4 low bits and 2 high bits per scale rearranged with 32-bit masks (as llama.cpp does)
        uint32_t t[4];
        std::memcpy(t, b + 96, 12);
        const uint32_t hi = t[2];
        t[2] = ((t[0] >> 4) & 0x0F0F0F0F) | (((hi >> 4) & 0x03030303) << 4);
        t[3] = ((t[1] >> 4) & 0x0F0F0F0F) | (((hi >> 6) & 0x03030303) << 4);
        t[0] = (t[0] & 0x0F0F0F0F) | ((hi & 0x03030303) << 4);
        t[1] = (t[1] & 0x0F0F0F0F) | (((hi >> 2) & 0x03030303) << 4);
        sc = _mm_sub_epi8(_mm_loadu_si128((const __m128i*)t), _mm_set1_epi8(32));
        d = half_to_float(b[108] | b[109] << 8);
      }
#if defined(__AVX512F__)
      const __m512i si = KIND == Q2K ? _mm512_cvtepu8_epi32(sc) : _mm512_cvtepi8_epi32(sc);
      _mm512_store_ps(D, _mm512_mul_ps(_mm512_cvtepi32_ps(si), _mm512_set1_ps(d)));
      if constexpr (KIND == Q2K)
        _mm512_store_ps(M, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mn)), _mm512_set1_ps(dmin)));
#else
      for (int h = 0; h < 2; ++h) {
        const __m128i part = h ? _mm_srli_si128(sc, 8) : sc;
        const __m256i si = KIND == Q2K ? _mm256_cvtepu8_epi32(part) : _mm256_cvtepi8_epi32(part);
        _mm256_store_ps(D + 8 * h, _mm256_mul_ps(_mm256_cvtepi32_ps(si), _mm256_set1_ps(d)));
        if constexpr (KIND == Q2K)
          _mm256_store_ps(M + 8 * h, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                                       h ? _mm_srli_si128(mn, 8) : mn)), _mm256_set1_ps(dmin)));
      }
#endif
      const uint8_t* qs = b + (KIND == Q2K ? 16 : 32);
      [[maybe_unused]] const __m256i hm = _mm256_loadu_si256((const __m256i*)b);  // Q3_K: bit g = group g's high bit
      for (int c = 0; c < 2; ++c) {
        const __m256i q32 = _mm256_loadu_si256((const __m256i*)(qs + 32 * c));
        const __m256i q[4] = {_mm256_and_si256(q32, low2), _mm256_and_si256(_mm256_srli_epi16(q32, 2), low2),
                              _mm256_and_si256(_mm256_srli_epi16(q32, 4), low2),
                              _mm256_and_si256(_mm256_srli_epi16(q32, 6), low2)};
        for (int k = 0; k < 4; ++k) {
          const int g = 4 * c + k;
          const float* xb = x + u * 256 + g * 32;
          V wv[VPB];
          if constexpr (KIND == Q2K) {
            bytes_to_floats(q[k], wv);
            for (int v = 0; v < VPB; ++v) {
              const int h = 2 * g + v * VW / 16;
              wv[v] = vfma(wv[v], vset1(D[h]), vset1(-M[h]));
            }
          } else {  // minus 4 where the high bit is clear
            const __m256i clear = _mm256_cmpeq_epi8(_mm256_and_si256(hm, _mm256_set1_epi8((char)(1 << g))), zero);
            sbytes_to_floats(_mm256_sub_epi8(q[k], _mm256_and_si256(clear, four)), wv);
            for (int v = 0; v < VPB; ++v) wv[v] = vfma(wv[v], vset1(D[2 * g + v * VW / 16]), vzero());
          }
          for (int r = 0; r < MR; ++r)
            for (int v = 0; v < VPB; ++v) acc[r][j] = vfma(wv[v], vload(xb + r * ldx + v * VW), acc[r][j]);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) y[r * ldy + j] = vsum(acc[r][j]);
}
#endif

// y[r, j] = sum_k W[n0 + j, k] x[r, k] for block kinds: each unit of NR weight rows decoded once into a buffer (L1),
// then multiplied against MR rows of x.
template <int KIND, int MR, int NR>
void tile_unit(const Mat& w, int64_t n0, const float* x, int64_t ldx, float* y, int64_t ldy) {
  constexpr int U = unit_of(KIND);
  alignas(64) float buf[NR][U];
  V acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = vzero();
  const int64_t units = w.cols / U;
  for (int64_t u = 0; u < units; ++u) {
    for (int j = 0; j < NR; ++j) {
      prefetch_range(w.data + (n0 + j + NR) * row_bytes(w) + u * unit_bytes(KIND), unit_bytes(KIND));
      decode_unit<KIND>(w, n0 + j, u, buf[j]);
    }
    const float* xb = x + u * U;
    for (int v = 0; v < U / VW; ++v)
      for (int j = 0; j < NR; ++j) {
        const V wv = vload(buf[j] + v * VW);
        for (int r = 0; r < MR; ++r) acc[r][j] = vfma(wv, vload(xb + r * ldx + v * VW), acc[r][j]);
      }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) y[r * ldy + j] = vsum(acc[r][j]);
}

constexpr bool quantized(int kind) { return kind == Q8 || kind == Q4; }
constexpr int64_t BC = 64;  // blocks per chunk: scales and mins of a chunk are widened to float once per tile

// n fp16 values -> float.
inline void halves_to_floats(const uint16_t* h, int64_t n, float* out) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(h + i))));
#elif defined(__AVX2__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + i))));
#endif
  for (; i < n; ++i) out[i] = half_to_float(h[i]);
}

// Bytes per 32-block of a plain kind's row.
template <int KIND>
constexpr int64_t block_bytes() { return KIND == F32 ? 128 : KIND == Q8 ? 32 : KIND == Q4 ? 16 : 64; }

// acc[r * lda] += block b of weight row `row` (dequantized: d * q + m) . block b of x row r, for r < MR.
// MR == 1 without offsets (decode, q8): sum q * x over the block first, then scale by d once (fewer operations per
// weight byte, which is what bounds a single row; q4 rows on AVX2 do the same with an m * sum(x) term, q4_row_dot).
template <int KIND, int MR>
inline void block_fma(const Row& row, int64_t b, float d, float m, bool with_mins, const float* xb, int64_t ldx,
                      V* acc, int lda) {
  V wv[VPB];
#if defined(__AVX512F__)
  if constexpr (KIND == Q4) {  // the block's 16 weights d * k + m as a table, looked up by nibble
    const __m512 lut = _mm512_fmadd_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                       _mm512_set1_ps(d), _mm512_set1_ps(m));
    const __m128i raw = _mm_loadu_si128((const __m128i*)(row.q + b * QK / 2));
    // vpermps reads the low 4 bits of each lane: the low nibble as is, the high one after a shift
    wv[0] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(raw), lut);
    wv[1] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_srli_epi16(raw, 4)), lut);
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < VPB; ++v) acc[r * lda] = vfma(wv[v], vload(xb + r * ldx + v * VW), acc[r * lda]);
    return;
  }
#endif
  load_block<KIND>(row, b, wv);
  if constexpr (MR == 1 && KIND == Q8) {
    if (!with_mins) {
      V s = vzero();
      for (int v = 0; v < VPB; ++v) s = vfma(wv[v], vload(xb + v * VW), s);
      acc[0] = vfma(s, vset1(d), acc[0]);
      return;
    }
  }
  if constexpr (quantized(KIND)) {
    const V dv = vset1(d), mv = with_mins ? vset1(m) : vzero();
    for (int v = 0; v < VPB; ++v) wv[v] = vfma(wv[v], dv, mv);
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < VPB; ++v) acc[r * lda] = vfma(wv[v], vload(xb + r * ldx + v * VW), acc[r * lda]);
}

// y[r, j] = sum_k W[n0 + j, k] x[r, k] for r < MR, j < NR (y row stride ldy): each block is dequantized once and
// multiplied against MR rows of x. While reading row j, the same bytes of the row whole tiles (at least PF_BYTES)
// ahead are prefetched.
template <int KIND, int MR, int NR>
void tile(const Mat& w, int64_t n0, const float* x, int64_t ldx, float* y, int64_t ldy) {
  if constexpr (blocked(KIND)) {
#if defined(__AVX2__)
    if constexpr (KIND == Q4K || KIND == Q5K) {
      tile_kq<KIND, MR, NR>(w, n0, x, ldx, y, ldy);
      return;
    }
    if constexpr (KIND == Q6K) {
      tile_q6k<MR, NR>(w, n0, x, ldx, y, ldy);
      return;
    }
    if constexpr (KIND == FP8 || KIND == FP4) {
      tile_fp<KIND, MR, NR>(w, n0, x, ldx, y, ldy);
      return;
    }
    if constexpr (KIND == Q2K || KIND == Q3K) {
      tile_q23<KIND, MR, NR>(w, n0, x, ldx, y, ldy);
      return;
    }
#endif
    tile_unit<KIND, MR, NR>(w, n0, x, ldx, y, ldy);
    return;
  }
#if defined(__AVX2__)
  constexpr bool BY_VECTOR = MR > 1;  // several x rows: vector by vector below, else block_fma per weight row
#else
  constexpr bool BY_VECTOR = false;
#endif
  const int64_t K = w.cols, nb = K / QK, tb = NR * row_bytes(w), ahead = (PF_BYTES + tb - 1) / tb * tb;
  const bool with_mins = w.mins != nullptr;
  Row rows[NR];
  for (int j = 0; j < NR; ++j) rows[j] = row_of(w, n0 + j);
  if constexpr (quantized(KIND)) {  // the scales of those rows
    prefetch_range(rows[0].d + ahead / row_bytes(w) * nb, NR * nb * 2);
    if (with_mins) prefetch_range(rows[0].m + ahead / row_bytes(w) * nb, NR * nb * 2);
  }
  V acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = vzero();
  [[maybe_unused]] float dq[NR][quantized(KIND) ? BC : 1], mq[NR][quantized(KIND) ? BC : 1];
  for (int64_t b0 = 0; b0 < nb; b0 += BC) {
    const int64_t bc = std::min(BC, nb - b0);
    if constexpr (quantized(KIND)) {
      for (int j = 0; j < NR; ++j) {
        halves_to_floats(rows[j].d + b0, bc, dq[j]);
        if (with_mins) halves_to_floats(rows[j].m + b0, bc, mq[j]);
      }
    }
    for (int64_t b = b0; b < b0 + bc; ++b) {
      const float* xb = x + b * QK;
      for (int j = 0; j < NR; ++j) {
        if (block_bytes<KIND>() >= 64 || b % (64 / block_bytes<KIND>()) == 0) {
          prefetch(rows[j].q + b * block_bytes<KIND>() + ahead);
          if (block_bytes<KIND>() > 64) prefetch(rows[j].q + b * block_bytes<KIND>() + ahead + 64);
        }
        if constexpr (!BY_VECTOR) {
          const float d = quantized(KIND) ? dq[j][b - b0] : 0.f, m = quantized(KIND) && with_mins ? mq[j][b - b0] : 0.f;
          block_fma<KIND, MR>(rows[j], b, d, m, with_mins, xb, ldx, &acc[0][j], NR);
        }
      }
#if defined(__AVX2__)
      // Several x rows, vector by vector: each weight vector widened once for the MR rows and each x vector loaded
      // once for the NR rows (block_fma widens a whole block per weight row into VPB registers, which with the
      // MR x NR accumulators leaves the compiler short of registers: q8, 129280 x 1024 at 1 thread, 16 rows 121 ->
      // 94 ms, 2 rows 22.5 -> 18.6). Same operations in the same order per (r, j) as block_fma: bit for bit its result.
      if constexpr (BY_VECTOR) {
        for (int v = 0; v < VPB; ++v) {
          V wv[NR];
          for (int j = 0; j < NR; ++j) {
            wv[j] = load_vec<KIND>(rows[j], b, v);
            if constexpr (quantized(KIND))
              wv[j] = vfma(wv[j], vset1(dq[j][b - b0]), with_mins ? vset1(mq[j][b - b0]) : vzero());
          }
          for (int r = 0; r < MR; ++r) {
            const V xv = vload(xb + r * ldx + v * VW);
            for (int j = 0; j < NR; ++j) acc[r][j] = vfma(wv[j], xv, acc[r][j]);
          }
        }
      }
#endif
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) {
      float s = vsum(acc[r][j]);
      if constexpr (!quantized(KIND))
        for (int64_t k = nb * QK; k < K; ++k) s += elem<KIND>(rows[j], k) * x[r * ldx + k];
      y[r * ldy + j] = s;
    }
}

// one(b, a) over blocks 0 .. nb - 1 in 4 chains of consecutive blocks (independent FMA chains), then (a0 + a1) +
// (a2 + a3). The accumulators are values, not an array: GCC kept an array's in memory, a store and a reload per
// block (q8 rows of 1024 values 7% slower, bit for bit the same sums).
template <class Vec, class One, class Add>
inline Vec four_chains(int64_t nb, One&& one, Add&& add) {
  Vec a0{}, a1{}, a2{}, a3{};
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4) {
    a0 = one(b, a0);
    a1 = one(b + 1, a1);
    a2 = one(b + 2, a2);
    a3 = one(b + 3, a3);
  }
  for (; b < nb; ++b) a0 = one(b, a0);
  return add(add(a0, a1), add(a2, a3));
}

// One weight row against one row of x (decode) for the plain kinds. Rows are read one after the other, so the weight
// is one sequential stream (the hardware prefetcher's best case, unlike rows interleaved block by block), helped by
// a software prefetch PF_BYTES ahead; ACC accumulators over consecutive blocks keep independent FMA chains.
// dq, mq: the row's scales and mins as floats (quantized kinds; mq null without mins); ahead: the prefetch distance
// in rows (rows_dot works these out once for many rows: one row at a time, they cost q8 rows of 256 values 24% of
// their time, q4 rows of 576 7%).
template <int KIND>
inline float row_dot(const Mat& w, int64_t n, const float* x, const float* dq, const float* mq, int64_t ahead) {
  constexpr int64_t BB = block_bytes<KIND>();
  const int64_t nb = w.cols / QK;
  const Row row{w.data + n * row_bytes(w), quantized(KIND) ? w.scales + n * nb : nullptr,
                quantized(KIND) && mq ? w.mins + n * nb : nullptr};
  if constexpr (quantized(KIND)) {  // the scales of the row PF_BYTES ahead
    prefetch_range(row.d + ahead * nb, nb * 2);
    if (mq) prefetch_range(row.m + ahead * nb, nb * 2);
  }
  auto one = [&](int64_t b, V a) {
    if (BB >= 64 || b % (64 / BB) == 0) {
      prefetch(row.q + b * BB + row_prefetch<KIND>());
      if (BB > 64) prefetch(row.q + b * BB + row_prefetch<KIND>() + 64);
    }
    const float d = quantized(KIND) ? dq[b] : 0.f, m = quantized(KIND) && mq ? mq[b] : 0.f;
    block_fma<KIND, 1>(row, b, d, m, mq != nullptr, x + b * QK, 0, &a, 1);
    return a;
  };
  float s = vsum(four_chains<V>(nb, one, vadd));
  if constexpr (!quantized(KIND))
    for (int64_t k = nb * QK; k < w.cols; ++k) s += elem<KIND>(row, k) * x[k];
  return s;
}

#if defined(__AVX2__)
// A q4 row against one row of x as sum_b d_b (q_b . x_b) + sum_b m_b sx_b (sx_b: the block sums of x, the same for
// every row): per block 4 conversions and 4 FMAs, where applying d and m to each weight vector first costs 4 FMAs
// more, and those conversions and FMAs are what bounds a q4 row on AVX2 (its bytes come faster than that). Rows of
// 576 values 0.77x the time, 2048 values 0.69x; summation order differs from block_fma (fp32 rounding only).
inline float q4_row_dot(const Mat& w, int64_t n, const float* x, const float* dq, const float* mq, const float* sx,
                        int64_t ahead) {
  const int64_t nb = w.cols / QK;
  const uint8_t* q = w.data + n * row_bytes(w);
  prefetch_range(w.scales + (n + ahead) * nb, nb * 2);
  prefetch_range(w.mins + (n + ahead) * nb, nb * 2);
  const __m256i low = _mm256_set1_epi32(0x0F);
  auto qx = [&](int64_t b) {  // q_b . x_b: the bytes' low nibbles are values 0..15, high nibbles 16..31
    if (b % 4 == 0) prefetch(q + b * QK / 2 + PF_BYTES);
    const __m256i u0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + b * QK / 2)));
    const __m256i u1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + b * QK / 2 + 8)));
    const float* xb = x + b * QK;
    y8::V s0 = y8::mul(_mm256_cvtepi32_ps(_mm256_and_si256(u0, low)), y8::load(xb));
    y8::V s1 = y8::mul(_mm256_cvtepi32_ps(_mm256_and_si256(u1, low)), y8::load(xb + 8));
    s0 = y8::fma(_mm256_cvtepi32_ps(_mm256_srli_epi32(u0, 4)), y8::load(xb + 16), s0);
    s1 = y8::fma(_mm256_cvtepi32_ps(_mm256_srli_epi32(u1, 4)), y8::load(xb + 24), s1);
    return y8::add(s0, s1);
  };
  y8::V a0 = y8::zero(), a1 = y8::zero(), am = y8::zero();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    a0 = y8::fma(qx(b), y8::set1(dq[b]), a0);
    a1 = y8::fma(qx(b + 1), y8::set1(dq[b + 1]), a1);
  }
  if (b < nb) a0 = y8::fma(qx(b), y8::set1(dq[b]), a0);
  int64_t c = 0;
  for (; c + 8 <= nb; c += 8) am = y8::fma(y8::load(mq + c), y8::load(sx + c), am);
  float s = y8::sum(y8::add(y8::add(a0, a1), am));
  for (; c < nb; ++c) s += mq[c] * sx[c];
  return s;
}

// A q8 row without mins against one row of x as sum_b d_b (q_b . x_b), two blocks (one cache line of q) per step with
// no branch inside: row_dot's generic loop tested for mins and for its prefetch stride at every block, and its
// blocks' products summed in one chain of 4 FMAs. 2048 x 1024 0.89x the time; fp32 summation order only.
inline float q8_row_dot(const Mat& w, int64_t n, const float* x, const float* dq, int64_t ahead) {
  const int64_t nb = w.cols / QK;
  const int8_t* q = (const int8_t*)(w.data + n * row_bytes(w));
  prefetch_range(w.scales + (n + ahead) * nb, nb * 2);
  auto qx = [&](int64_t b) {  // q_b . x_b in two partial sums
    const int8_t* qb = q + b * QK;
    const float* xb = x + b * QK;
    auto wv = [&](int v) {
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(qb + 8 * v))));
    };
    y8::V s0 = y8::mul(wv(0), y8::load(xb)), s1 = y8::mul(wv(1), y8::load(xb + 8));
    s0 = y8::fma(wv(2), y8::load(xb + 16), s0);
    s1 = y8::fma(wv(3), y8::load(xb + 24), s1);
    return y8::add(s0, s1);
  };
  y8::V a0 = y8::zero(), a1 = y8::zero();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    prefetch(q + b * QK + PF_BYTES);
    a0 = y8::fma(qx(b), y8::set1(dq[b]), a0);
    a1 = y8::fma(qx(b + 1), y8::set1(dq[b + 1]), a1);
  }
  if (b < nb) a0 = y8::fma(qx(b), y8::set1(dq[b]), a0);
  return y8::sum(y8::add(a0, a1));
}

// A q8 row without mins against MR (2 .. PANEL_MIN_ROWS - 1) rows of x: one weight row after the other, as for one
// row (a single sequential stream; `tile` reads NR rows block by block, which DRAM serves slower), each block widened
// and scaled by d once for the MR rows. The experts of a batched MoE step get 2-5 tokens each: q8, 16384 x 1024 at 1
// thread, 2 rows 2.0 -> 1.2 ms (one row: 0.9).
template <int MR>
inline void q8_rows_few(const Mat& w, int64_t n, const float* x, int64_t ldx, const float* dq, float* y,
                        int64_t ldy, int64_t ahead) {
  const int64_t nb = w.cols / QK;
  const int8_t* q = (const int8_t*)(w.data + n * row_bytes(w));
  prefetch_range(w.scales + (n + ahead) * nb, nb * 2);
  y8::V acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = y8::zero();
  for (int64_t b = 0; b < nb; ++b) {
    if (b % 2 == 0) prefetch(q + b * QK + PF_BYTES);
    const y8::V d = y8::set1(dq[b]);
    y8::V wv[4];
    for (int v = 0; v < 4; ++v) {
      const __m128i q8 = _mm_loadl_epi64((const __m128i*)(q + b * QK + 8 * v));
      wv[v] = y8::mul(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), d);
    }
    for (int r = 0; r < MR; ++r) {
      const float* xb = x + r * ldx + b * QK;
      for (int v = 0; v < 4; ++v) acc[r][v % 2] = y8::fma(wv[v], y8::load(xb + 8 * v), acc[r][v % 2]);
    }
  }
  for (int r = 0; r < MR; ++r) y[r * ldy + n] = y8::sum(y8::add(acc[r][0], acc[r][1]));
}

// A bf16 / f16 row against one row of x: row_dot's loop (a chain of 4 FMAs per block, 4 blocks' chains in parallel,
// the same order, so on AVX2 bit for bit row_dot's sums) in 256-bit vectors for the AVX-512 build as well.
template <int KIND>
inline float half_row_dot(const Mat& w, int64_t n, const float* x) {
  const uint16_t* p = (const uint16_t*)(w.data + n * row_bytes(w));
  auto one = [&](int64_t b, y8::V a) {
    prefetch(p + b * QK + row_prefetch<KIND>() / 2);  // a block is one line
    for (int v = 0; v < 4; ++v) {
      const __m128i h = _mm_loadu_si128((const __m128i*)(p + b * QK + 8 * v));
      const y8::V wv = KIND == BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                                    : _mm256_cvtph_ps(h);
      a = y8::fma(wv, y8::load(x + b * QK + 8 * v), a);
    }
    return a;
  };
  const int64_t nb = w.cols / QK;
  float s = y8::sum(four_chains<y8::V>(nb, one, y8::add));
  for (int64_t k = nb * QK; k < w.cols; ++k) s += elem<KIND>(Row{(const uint8_t*)p, nullptr, nullptr}, k) * x[k];
  return s;
}
#endif

#if defined(__AVX2__)
// One f32 row against x with ACC vector accumulators: a one-row f32 product is bound by the loads and FMAs in flight,
// not by DRAM. The medium V3 head (129280 x 1024) at 1 thread on a Zen 4 EPYC, in a microbenchmark interleaving the
// variants: four chains of 32-float blocks (row_dot's shape) 20-21 GB/s, 8 zmm accumulators 25-26, 16 zmm 28-31
// (a plain sum of the same bytes: 28-30). AVX2 has 16 ymm registers: 8 accumulators.
inline float f32_row_dot(const float* w, const float* x, int64_t K) {
  constexpr int ACC = VW == 16 ? 16 : 8, LINE = 16 / VW;  // LINE: vectors per 64-byte line
  V a[ACC];
#pragma GCC unroll 16
  for (int i = 0; i < ACC; ++i) a[i] = vzero();
  int64_t k = 0;
  for (; k + ACC * VW <= K; k += ACC * VW) {
#pragma GCC unroll 16
    for (int i = 0; i < ACC; ++i) {
      if (i % LINE == 0) prefetch(w + k + i * VW);  // the line being read (row_prefetch)
      a[i] = vfma(vload(w + k + i * VW), vload(x + k + i * VW), a[i]);
    }
  }
  V t = vzero();
  for (; k + VW <= K; k += VW) t = vfma(vload(w + k), vload(x + k), t);
  // (every loop over a unrolled: else the array lives in memory, zero-filled and spilled each row)
#pragma GCC unroll 16
  for (int i = 0; i < ACC / 2; ++i) a[i] = vadd(a[i], a[i + ACC / 2]);
#pragma GCC unroll 16
  for (int i = 0; i < ACC / 4; ++i) a[i] = vadd(a[i], a[i + ACC / 4]);
#pragma GCC unroll 16
  for (int i = 0; i < ACC / 8; ++i) a[i] = vadd(a[i], a[i + ACC / 8]);
  if constexpr (ACC == 16) a[0] = vadd(a[0], a[1]);
  float s = vsum(vadd(a[0], t));
  for (; k < K; ++k) s += w[k] * x[k];
  return s;
}
#endif

// fn(n, d, m) for the rows n in [n0, n1) of a quantized weight, d / m (null without mins) their scales and mins
// widened to float, several rows' (up to SC blocks) together: no further ahead than their lines were prefetched.
template <class Fn>
void with_row_scales(const Mat& w, int64_t n0, int64_t n1, int64_t ahead, Fn&& fn) {
  constexpr int64_t SC = 1024;
  const int64_t nb = w.cols / QK, per = std::max<int64_t>(1, std::min(SC / nb, ahead));
  float dq_stack[SC], mq_stack[SC];
  std::vector<float> heap(nb > SC ? 2 * nb : 0);  // rows over SC blocks (K > 32768): one at a time, on the heap
  float* dq = nb > SC ? heap.data() : dq_stack;
  float* mq = nb > SC ? heap.data() + nb : mq_stack;
  for (int64_t a = n0; a < n1; a += per) {
    const int64_t e = std::min(n1, a + per);
    halves_to_floats(w.scales + a * nb, (e - a) * nb, dq);
    if (w.mins) halves_to_floats(w.mins + a * nb, (e - a) * nb, mq);
    for (int64_t n = a; n < e; ++n) fn(n, dq + (n - a) * nb, w.mins ? mq + (n - a) * nb : nullptr);
  }
}

// y[n] = row_dot(row n) for n in [n0, n1) (quantized kinds: with_row_scales).
template <int KIND>
void rows_dot(const Mat& w, int64_t n0, int64_t n1, const float* x, float* y) {
  const int64_t ahead = std::max<int64_t>(1, PF_BYTES / row_bytes(w));
  if constexpr (!quantized(KIND)) {
#if defined(__AVX2__)
    if constexpr (KIND == BF16 || KIND == F16) {
      for (int64_t n = n0; n < n1; ++n) y[n] = half_row_dot<KIND>(w, n, x);
      return;
    }
    if constexpr (KIND == F32) {
      for (int64_t n = n0; n < n1; ++n) y[n] = f32_row_dot((const float*)(w.data + n * row_bytes(w)), x, w.cols);
      return;
    }
#endif
    for (int64_t n = n0; n < n1; ++n) y[n] = row_dot<KIND>(w, n, x, nullptr, nullptr, ahead);
  } else {
#if defined(__AVX2__)
    std::vector<float> sx(KIND == Q4 ? w.cols / QK : 0);
    for (int64_t c = 0; c < (int64_t)sx.size(); ++c) {
      const float* xb = x + c * QK;
      sx[c] = y8::sum(y8::add(y8::add(y8::load(xb), y8::load(xb + 8)),
                              y8::add(y8::load(xb + 16), y8::load(xb + 24))));
    }
#endif
    with_row_scales(w, n0, n1, ahead, [&](int64_t n, const float* d, const float* m) {
#if defined(__AVX2__)
      if constexpr (KIND == Q4) {
        y[n] = q4_row_dot(w, n, x, d, m, sx.data(), ahead);
        return;
      }
      if constexpr (KIND == Q8) {
        if (!m) {
          y[n] = q8_row_dot(w, n, x, d, ahead);
          return;
        }
      }
#endif
      y[n] = row_dot<KIND>(w, n, x, d, m, ahead);
    });
  }
}

// The last `rem` (< MR_MAX) rows of x: one tile of exactly that many rows.
template <int KIND, int NR, int R = MR_MAX - 1>
void tail_tile(int64_t rem, const Mat& w, int64_t n0, const float* x, int64_t ldx, float* y, int64_t ldy) {
  if constexpr (R > 0) {
    if (rem == R) tile<KIND, R, NR>(w, n0, x, ldx, y, ldy);
    else tail_tile<KIND, NR, R - 1>(rem, w, n0, x, ldx, y, ldy);
  }
}

// Weight rows n0 .. n0 + NR against all M rows of x, MR_MAX rows at a time.
template <int KIND, int NR>
void rows_tile(const Mat& w, int64_t n0, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy) {
  int64_t r = 0;
  for (; r + MR_MAX <= M; r += MR_MAX) tile<KIND, MR_MAX, NR>(w, n0, x + r * ldx, ldx, y + r * ldy + n0, ldy);
  tail_tile<KIND, NR>(M - r, w, n0, x + r * ldx, ldx, y + r * ldy + n0, ldy);
}

// ---------------------------------------------------------------- several rows of x: float weight panels
// From PANEL_MIN_ROWS rows of x on, the plain kinds dequantize NR_PANEL weight rows KC columns at a time into a float
// panel (a few KiB, L1-resident) once for all M rows, and the micro-kernel does loads and FMAs only. `tile` widens
// and scales every weight vector again for each MR_MAX rows of x, a conversion and a multiply per 4 FMAs, which held
// q8 at 16 rows to ~60% of FMA peak. Same weight values and the same per-lane order of sums as `tile`: bit for bit.
constexpr int64_t KC = 512;          // columns per panel: NR_PANEL x KC weights and MR_PANEL x KC of x per pass
constexpr int64_t PANEL_M = 64;      // rows of x per group (accumulators for them kept in a stack buffer)
constexpr int64_t PANEL_MIN_ROWS = 6;

// Blocks [b0, b1) of a plain-kind row as floats (d * q + m for the quantized kinds).
template <int KIND>
inline void dequantize_blocks(const Row& r, int64_t b0, int64_t b1, float* out) {
  for (int64_t b = b0; b < b1; ++b) {
    V wv[VPB];
    load_block<KIND>(r, b, wv);
    if constexpr (quantized(KIND)) {
      const V d = vset1(half_to_float(r.d[b])), m = r.m ? vset1(half_to_float(r.m[b])) : vzero();
      for (int v = 0; v < VPB; ++v) wv[v] = vfma(wv[v], d, m);
    }
    for (int v = 0; v < VPB; ++v) vstore(out + (b - b0) * QK + v * VW, wv[v]);
  }
}

// acc[r * NR + j] += panel row j . x row r over kc columns (panel rows kc floats apart), r < MR, j < NR; first: the
// first panel, acc not yet set (zeroing all of it up front was a 16 KiB memset per 4 weight rows, 4% of a prefill).
template <int MR, int NR>
inline void panel_tile(const float* wp, int64_t kc, const float* x, int64_t ldx, V* acc, bool first) {
  V a[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) a[r][j] = first ? vzero() : acc[r * NR + j];
  for (int64_t k = 0; k < kc; k += VW) {
    V wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = vload(wp + j * kc + k);
    for (int r = 0; r < MR; ++r) {
      const V xv = vload(x + r * ldx + k);
      for (int j = 0; j < NR; ++j) a[r][j] = vfma(wv[j], xv, a[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r * NR + j] = a[r][j];
}

template <int NR, int R = MR_PANEL - 1>
inline void panel_tail(int64_t rem, const float* wp, int64_t kc, const float* x, int64_t ldx, V* acc, bool first) {
  if constexpr (R > 0) {
    if (rem == R) panel_tile<R, NR>(wp, kc, x, ldx, acc, first);
    else panel_tail<NR, R - 1>(rem, wp, kc, x, ldx, acc, first);
  }
}

// y[r, n0 + j] for r < M (<= PANEL_M), j < NR: weight rows n0 .. n0 + NR through panels of KC columns.
template <int KIND, int NR>
void rows_panel(const Mat& w, int64_t n0, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy) {
  const int64_t K = w.cols;
  alignas(64) float wp[NR * KC];
  V acc[PANEL_M * NR];
  Row rows[NR];
  for (int j = 0; j < NR; ++j) rows[j] = row_of(w, n0 + j);
  const int64_t rb = row_bytes(w);
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    for (int j = 0; j < NR; ++j) {
      // the same columns of the next panel's row j, while this one is multiplied
      prefetch_range(rows[j].q + k0 * rb / K + NR * rb, kc * rb / K);
      dequantize_blocks<KIND>(rows[j], k0 / QK, (k0 + kc) / QK, wp + j * kc);
    }
    int64_t r = 0;
    for (; r + MR_PANEL <= M; r += MR_PANEL)
      panel_tile<MR_PANEL, NR>(wp, kc, x + r * ldx + k0, ldx, acc + r * NR, k0 == 0);
    panel_tail<NR>(M - r, wp, kc, x + r * ldx + k0, ldx, acc + r * NR, k0 == 0);
  }
  for (int64_t r = 0; r < M; ++r)
    for (int j = 0; j < NR; ++j) y[r * ldy + n0 + j] = vsum(acc[r * NR + j]);
}

// Output columns [n0, n1) of y = x W^T for M rows of x, on the calling thread.
#if defined(__AVX2__)
// Rows [n0, n1) of a q8 weight without mins against 2 .. PANEL_MIN_ROWS - 1 rows of x (q8_rows_few).
void q8_few_range(const Mat& w, int64_t n0, int64_t n1, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy) {
  const int64_t ahead = std::max<int64_t>(1, PF_BYTES / row_bytes(w));
  static_assert(PANEL_MIN_ROWS == 6, "q8_rows_few is instantiated for 2 .. 5 rows");
  with_row_scales(w, n0, n1, ahead, [&](int64_t n, const float* d, const float*) {
    switch (M) {
      case 2: q8_rows_few<2>(w, n, x, ldx, d, y, ldy, ahead); break;
      case 3: q8_rows_few<3>(w, n, x, ldx, d, y, ldy, ahead); break;
      case 4: q8_rows_few<4>(w, n, x, ldx, d, y, ldy, ahead); break;
      default: q8_rows_few<5>(w, n, x, ldx, d, y, ldy, ahead); break;
    }
  });
}
#endif

template <int KIND>
void gemm_range_kind(const Mat& w, int64_t n0, int64_t n1, const float* x, int64_t M, int64_t ldx, float* y,
                     int64_t ldy) {
  int64_t n = n0;
  // One row of x: plain-kind weight rows one after the other (rows_dot). f32 rows on AVX2 read faster as NR_ONE page
  // streams on Zen 3 while they prefetched 4 KiB ahead; prefetching the line being read (row_prefetch), one by one
  // is faster on Zen 4 in both builds (AVX2: 129280 x 1024 at 1 thread 39 -> 22 ms, 21 -> 12.5 at 2).
  constexpr bool ROW_BY_ROW = !blocked(KIND);
  if (M == 1 && ROW_BY_ROW) {
    rows_dot<KIND>(w, n0, n1, x, y);
    return;
  }
#if defined(__AVX2__)
  if (M == 1 && KIND == Q6K) {
    q6k_rows_one(w, n0, n1, x, y);
    return;
  }
#endif
#if defined(__AVX512F__)
  if (M == 1 && KIND == Q4K) {
    q4k_rows_one(w, n0, n1, x, y);
    return;
  }
#endif
#if defined(__AVX2__) && !defined(__AVX512F__)  // AVX-512: tile_kq's table lookup measured faster
  if (M == 1 && (KIND == Q4K || KIND == Q5K)) {  // the group sums of x once for all rows (tile_kq)
    std::vector<float> xs(w.cols / 4);
    for (int64_t g = 0; g < w.cols / 32; ++g)
      _mm256_storeu_ps(xs.data() + 8 * g, vadd(vadd(vload(x + 32 * g), vload(x + 32 * g + 8)),
                                              vadd(vload(x + 32 * g + 16), vload(x + 32 * g + 24))));
    for (; n + NR_ONE <= n1; n += NR_ONE) tile_kq<KIND, 1, NR_ONE>(w, n, x, ldx, y + n, ldy, xs.data());
    for (; n < n1; ++n) tile_kq<KIND, 1, 1>(w, n, x, ldx, y + n, ldy, xs.data());
    return;
  }
#endif
#if defined(__AVX2__)
  if constexpr (KIND == Q8) {
    if (M >= 2 && M < PANEL_MIN_ROWS && !w.mins) {
      q8_few_range(w, n0, n1, x, M, ldx, y, ldy);
      return;
    }
  }
#endif
  if constexpr (KIND == Q8 || KIND == Q4 || KIND == BF16 || KIND == F16) {
    if (M >= PANEL_MIN_ROWS && w.cols % QK == 0) {
      for (int64_t r0 = 0; r0 < M; r0 += PANEL_M) {
        const int64_t m = std::min(PANEL_M, M - r0);
        const float* xr = x + r0 * ldx;
        float* yr = y + r0 * ldy;
        int64_t i = n0;
        for (; i + NR_PANEL <= n1; i += NR_PANEL) rows_panel<KIND, NR_PANEL>(w, i, xr, m, ldx, yr, ldy);
        for (; i < n1; ++i) rows_panel<KIND, 1>(w, i, xr, m, ldx, yr, ldy);
      }
      return;
    }
  }
  if (M == 1) {
    for (; n + NR_ONE <= n1; n += NR_ONE) tile<KIND, 1, NR_ONE>(w, n, x, ldx, y + n, ldy);
  } else {
    for (; n + NR_WIDE <= n1; n += NR_WIDE) rows_tile<KIND, NR_WIDE>(w, n, x, M, ldx, y, ldy);
  }
  for (; n < n1; ++n) rows_tile<KIND, 1>(w, n, x, M, ldx, y, ldy);
}

void gemm_range(const Mat& w, int64_t n0, int64_t n1, const float* x, int64_t M, int64_t ldx, float* y,
                int64_t ldy) {
  switch (w.kind) {
    case F32: gemm_range_kind<F32>(w, n0, n1, x, M, ldx, y, ldy); break;
    case BF16: gemm_range_kind<BF16>(w, n0, n1, x, M, ldx, y, ldy); break;
    case F16: gemm_range_kind<F16>(w, n0, n1, x, M, ldx, y, ldy); break;
    case Q8: gemm_range_kind<Q8>(w, n0, n1, x, M, ldx, y, ldy); break;
    case Q4: gemm_range_kind<Q4>(w, n0, n1, x, M, ldx, y, ldy); break;
    case Q2K: gemm_range_kind<Q2K>(w, n0, n1, x, M, ldx, y, ldy); break;
    case Q3K: gemm_range_kind<Q3K>(w, n0, n1, x, M, ldx, y, ldy); break;
    case Q4K: gemm_range_kind<Q4K>(w, n0, n1, x, M, ldx, y, ldy); break;
    case Q5K: gemm_range_kind<Q5K>(w, n0, n1, x, M, ldx, y, ldy); break;
    case Q6K: gemm_range_kind<Q6K>(w, n0, n1, x, M, ldx, y, ldy); break;
    case FP8: gemm_range_kind<FP8>(w, n0, n1, x, M, ldx, y, ldy); break;
    case Q8X16: gemm_range_kind<Q8X16>(w, n0, n1, x, M, ldx, y, ldy); break;
    default: gemm_range_kind<FP4>(w, n0, n1, x, M, ldx, y, ldy); break;
  }
}

constexpr int64_t ROW_CHUNK = 16;  // output rows per parallel work item (a multiple of NR_ONE and NR_WIDE)

bool valid(const Mat& w) {
  if (w.kind < F32 || w.kind > Q8X16 || w.rows < 0 || w.cols <= 0 || !w.data) return false;
  if (w.kind == Q8X16) return w.cols % QK == 0 && w.rows % 16 == 0;
  if (blocked(w.kind)) return w.cols % unit_of(w.kind) == 0 && (w.kind < FP8 || w.scales);
  if (w.kind >= Q8) return w.cols % QK == 0 && w.scales && (w.kind == Q8 || w.mins);
  return true;
}

template <int KIND>
void dequantize_rows_kind(const Mat& w, int64_t n0, int64_t n1, float* out) {
  const int64_t K = w.cols, nb = K / QK;
  if constexpr (blocked(KIND)) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t u = 0; u < K / unit_of(KIND); ++u) decode_unit<KIND>(w, n, u, out + (n - n0) * K + u * unit_of(KIND));
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const Row r = row_of(w, n);
    float* o = out + (n - n0) * K;
    dequantize_blocks<KIND>(r, 0, nb, o);
    if constexpr (KIND == F32 || KIND == BF16 || KIND == F16)
      for (int64_t k = nb * QK; k < K; ++k) o[k] = elem<KIND>(r, k);
  }
}

void dequantize_rows(const Mat& w, int64_t n0, int64_t n1, float* out) {
  switch (w.kind) {
    case F32: dequantize_rows_kind<F32>(w, n0, n1, out); break;
    case BF16: dequantize_rows_kind<BF16>(w, n0, n1, out); break;
    case F16: dequantize_rows_kind<F16>(w, n0, n1, out); break;
    case Q8: dequantize_rows_kind<Q8>(w, n0, n1, out); break;
    case Q4: dequantize_rows_kind<Q4>(w, n0, n1, out); break;
    case Q2K: dequantize_rows_kind<Q2K>(w, n0, n1, out); break;
    case Q3K: dequantize_rows_kind<Q3K>(w, n0, n1, out); break;
    case Q4K: dequantize_rows_kind<Q4K>(w, n0, n1, out); break;
    case Q5K: dequantize_rows_kind<Q5K>(w, n0, n1, out); break;
    case Q6K: dequantize_rows_kind<Q6K>(w, n0, n1, out); break;
    case FP8: dequantize_rows_kind<FP8>(w, n0, n1, out); break;
    case Q8X16: dequantize_rows_kind<Q8X16>(w, n0, n1, out); break;
    default: dequantize_rows_kind<FP4>(w, n0, n1, out); break;
  }
}

// ---------------------------------------------------------------- int8 activations (opt-in, decode)
// Each row of x is quantized per 32-block to int8 (d_x = max|x| / 127, round to nearest even) with the block's
// float sum kept, so y = sum_b d_w d_x idot_b (+ m_b sum_b x): integer dot products instead of widening every
// weight to float, which is what bounds the one-row product. Not exact: x is rounded to 8 bits.
struct XQ {
  const int8_t* q;  // [M, K]
  const float* d;   // [M, K/32] scales
  const float* s;   // [M, K/32] float block sums (for the offsets m)
  const int32_t* c; // [M, K/32] -128 * the block's sum of q (q8 weights offset by 128, see tile_i8_t)
  int64_t K, nb;
  const int32_t* c4 = nullptr;  // [M, K/4] -32 * the sums of q's 4-value groups (Q6_K's offset, kq_tile_i8)
};

void quantize_rows_i8(const float* x, int64_t M, int64_t ldx, int64_t K, int8_t* q, float* d, float* s, int32_t* c) {
  const int64_t nb = K / QK;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + r * ldx + b * QK;
      int8_t* qb = q + r * K + b * QK;
#if defined(__AVX2__)  // the same values (cvtps rounds half to even, as nearbyint); the float sum in another order
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v[i]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      const float am = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
      const float dx = am / 127.f, inv = am > 0.f ? 1.f / dx : 0.f;
      __m256i qi[4];
      for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)));
      const __m256i q8 = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
      // packs works within 128-bit lanes: dwords 0, 4, 1, 5, ... hold values 0-3, 4-7, ...
      _mm256_storeu_si256((__m256i*)qb, _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
      const int32_t qsum = y8::isum(_mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3])));
      const float sum = y8::sum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
#else
      float amax = 0.f, sum = 0.f;
      for (int j = 0; j < QK; ++j) {
        amax = std::max(amax, std::fabs(xb[j]));
        sum += xb[j];
      }
      const float dx = amax / 127.f, inv = amax > 0.f ? 1.f / dx : 0.f;
      int32_t qsum = 0;
      for (int j = 0; j < QK; ++j) {
        qb[j] = (int8_t)std::nearbyint(xb[j] * inv);
        qsum += qb[j];
      }
#endif
      c[r * nb + b] = -128 * qsum;
      d[r * nb + b] = dx;
      s[r * nb + b] = sum;
    }
}

#if defined(__AVX2__)
// One q4 block as the unsigned operand of u8 x s8 dot products: the nibbles as they are (0..15). (q8 takes
// q8_tile_i8: its 256-bit loop beat these tiles' sign handling, 1 row at 1 thread 17.5 -> 9.0 ms at 129280 x 1024.)
struct WBlock {
  __m256i u;
};
using IAcc = __m256;
inline IAcc iacc_zero() { return _mm256_setzero_ps(); }
inline float iacc_sum(IAcc v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline WBlock wblock(const Row& r, int64_t b) {
  const __m128i raw = _mm_loadu_si128((const __m128i*)(r.q + b * QK / 2));
  const __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
  return {_mm256_set_m128i(hi, lo)};
}
// acc += s * (the block's integer dot product, as 8 partial sums)
inline IAcc idot_fma(const WBlock& w, const int8_t* xq, float s, IAcc acc) {
  const __m256i x = _mm256_loadu_si256((const __m256i*)xq);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w.u, x);
#else  // |products| <= 2 * 15 * 127: the 16-bit pair sums never saturate
  const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w.u, x), _mm256_set1_epi16(1));
#endif
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(s), acc);
}
#else
struct WBlock {
  int16_t v[QK];
};
using IAcc = float;
inline IAcc iacc_zero() { return 0.f; }
inline float iacc_sum(IAcc v) { return v; }
inline WBlock wblock(const Row& r, int64_t b) {
  WBlock w;
  for (int j = 0; j < QK; ++j) w.v[j] = j < 16 ? (r.q[b * QK / 2 + j] & 0x0F) : (r.q[b * QK / 2 + j - 16] >> 4);
  return w;
}
inline IAcc idot_fma(const WBlock& w, const int8_t* xq, float s, IAcc acc) {
  int32_t dot = 0;
  for (int j = 0; j < QK; ++j) dot += w.v[j] * xq[j];
  return acc + s * (float)dot;
}
#endif

#if defined(__AVX512BW__)
// Two consecutive q4 blocks in one 512-bit register (lanes 0..7 of the dot products: block b, 8..15: block b + 1).
inline __m512i wpair(const Row& r, int64_t b) {
  const __m256i raw = _mm256_loadu_si256((const __m256i*)(r.q + b * QK / 2));
  const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
  // 128-bit lanes low b, low b+1, high b, high b+1 -> b's values 0..15, 16..31, then b+1's
  return _mm512_and_si512(_mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(3, 1, 2, 0)), _mm512_set1_epi8(0x0F));
}
// acc += the pair's integer dot products, each block's lanes times its scale (sc[0], sc[1])
inline __m512 ipair_fma(__m512i u, const int8_t* xq, const float* sc, __m512 acc) {
  const __m512i x = _mm512_loadu_si512(xq);
#if defined(__AVX512VNNI__)
  const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, x);
#else
  const __m512i dot = _mm512_madd_epi16(_mm512_maddubs_epi16(u, x), _mm512_set1_epi16(1));
#endif
  const __m512 s = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                         _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double*)sc))));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc);
}
#endif

inline float dot_floats(const float* a, const float* b, int64_t n) {
  V s = vzero();
  int64_t i = 0;
  for (; i + VW <= n; i += VW) s = vfma(vload(a + i), vload(b + i), s);
  float t = vsum(s);
  for (; i < n; ++i) t += a[i] * b[i];
  return t;
}

// q4: y[r, j] for x rows r0 .. r0 + MR and weight rows n0 .. n0 + NR: each weight block unpacked once per MR rows
// (512-bit block pairs on AVX-512: 9.1 ms for one row of 129280 x 1024 at 1 thread, against 12.0 in q8_tile_i8's
// loop shape; equal on AVX2).
template <int KIND, int MR, int NR>
void tile_i8(const Mat& w, int64_t n0, const XQ& x, int64_t r0, float* y, int64_t ldy) {
  const bool with_mins = w.mins != nullptr;
  Row rows[NR];
  for (int j = 0; j < NR; ++j) rows[j] = row_of(w, n0 + j);
  IAcc acc[MR][NR];
  float off[MR][NR] = {};
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = iacc_zero();
#if defined(__AVX512BW__)
  __m512 acc2[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc2[r][j] = _mm512_setzero_ps();
#endif
  // Per chunk of blocks, vectorized: the combined scales d_w d_x, and the offsets' whole share sum_b m_b sum_b x.
  float dq[NR][BC], mq[NR][BC], sc[MR][NR][BC];
  // As in tile: while reading row j, the same bytes of a row whole tiles (at least PF_BYTES) ahead are prefetched.
  constexpr int64_t BB = block_bytes<KIND>();
  const int64_t tb = NR * row_bytes(w), ahead = (PF_BYTES + tb - 1) / tb * tb;
  prefetch_range(rows[0].d + ahead / row_bytes(w) * x.nb, NR * x.nb * 2);
  if (with_mins) prefetch_range(rows[0].m + ahead / row_bytes(w) * x.nb, NR * x.nb * 2);
  for (int64_t b0 = 0; b0 < x.nb; b0 += BC) {
    const int64_t bc = std::min(BC, x.nb - b0);
    for (int j = 0; j < NR; ++j) {
      halves_to_floats(rows[j].d + b0, bc, dq[j]);
      if (with_mins) halves_to_floats(rows[j].m + b0, bc, mq[j]);
      for (int r = 0; r < MR; ++r) {
        const float* dx = x.d + (r0 + r) * x.nb + b0;
        for (int64_t i = 0; i < bc; ++i) sc[r][j][i] = dq[j][i] * dx[i];
        if (with_mins) off[r][j] += dot_floats(mq[j], x.s + (r0 + r) * x.nb + b0, bc);
      }
    }
    int64_t b = b0;
#if defined(__AVX512BW__)
    for (; b + 2 <= b0 + bc; b += 2)
      for (int j = 0; j < NR; ++j) {
        if (BB == 32 || b % 4 == 0) prefetch(rows[j].q + b * BB + ahead);
        const __m512i wp = wpair(rows[j], b);
        for (int r = 0; r < MR; ++r)
          acc2[r][j] = ipair_fma(wp, x.q + (r0 + r) * x.K + b * QK, &sc[r][j][b - b0], acc2[r][j]);
      }
#endif
    for (; b < b0 + bc; ++b)
      for (int j = 0; j < NR; ++j) {
        if (b % (64 / BB) == 0) prefetch(rows[j].q + b * BB + ahead);
        const WBlock wb = wblock(rows[j], b);
        for (int r = 0; r < MR; ++r)
          acc[r][j] = idot_fma(wb, x.q + (r0 + r) * x.K + b * QK, sc[r][j][b - b0], acc[r][j]);
      }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) {
#if defined(__AVX512BW__)
      off[r][j] += _mm512_reduce_add_ps(acc2[r][j]);
#endif
      y[(r0 + r) * ldy + n0 + j] = iacc_sum(acc[r][j]) + off[r][j];
    }
}

template <int KIND, int NR>
void rows_tile_i8(const Mat& w, int64_t n0, const XQ& x, int64_t M, float* y, int64_t ldy) {
  int64_t r = 0;
  for (; r + 4 <= M; r += 4) tile_i8<KIND, 4, NR>(w, n0, x, r, y, ldy);
  switch (M - r) {
    case 3: tile_i8<KIND, 3, NR>(w, n0, x, r, y, ldy); break;
    case 2: tile_i8<KIND, 2, NR>(w, n0, x, r, y, ldy); break;
    case 1: tile_i8<KIND, 1, NR>(w, n0, x, r, y, ldy); break;
    default: break;
  }
}

// ---------------------------------------------------------------- int8 activations: Q4_K, Q5_K, Q6_K
// The K-quants in the same definition (W as gguf dequantizes it, x rounded per 32-block; mins times x's float block
// sums): per 32 values of a super-block one integer dot product of the values as unsigned bytes (Q4_K / Q5_K q,
// Q6_K q + 32) with x's int8 block, as 8 sums of 4 (AVX-512 VNNI vpdpbusd, else maddubs + madd), converted once and
// scaled by the float d * scale (Q6_K: one scale per 16 values, so per 4 of the 8 sums) times d_x. Q6_K's offset:
// sum (q + 32) x = sum q x + 32 sum x, corrected by XQ::c4 = -32 * the sums of x's 4-value groups, which starts the
// accumulator. Measured on a Zen 4 EPYC, 129280 x 1024, one row at 1 thread (kernels.bench): Q6_K 13.5 -> 8.6 ms,
// Q4_K 11.6 -> 6.8 against the float path (a 256-bit loop: in a C++ microbenchmark it beat the same work in 512-bit
// registers, 7.1 against 8.4 ms for Q6_K, on this double-pumped core).
constexpr bool kq_i8(int kind) { return kind == Q4K || kind == Q5K || kind == Q6K; }

#if defined(__AVX2__)
// Lane j: the sum of v[j]'s 8 lanes (two levels of hadd leave v0..v3's low and high 4-lane sums in one vector).
inline __m256i sum8(const __m256i* v) {
  const __m256i ab = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i cd = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(ab, cd, 0x20), _mm256_permute2x128_si256(ab, cd, 0x31));
}

inline __m256i kq_dot(__m256i u, const int8_t* xq, __m256i start) {
  const __m256i x = _mm256_loadu_si256((const __m256i*)xq);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(start, u, x);
#else  // |pair sums| <= 2 * 63 * 127: no saturation
  return _mm256_add_epi32(start, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)));
#endif
}

// One super-block's 8 groups of 32 values as unsigned bytes (group g: values 32 g .. 32 g + 31).
template <int KIND>
inline void kq_unit_bytes(const uint8_t* b, __m256i* u) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  if constexpr (KIND == Q6K) {
    const __m256i bits45 = _mm256_set1_epi8(0x30);
    for (int c = 0; c < 2; ++c) {  // as q6k_groups, without the - 32
      const __m256i l0 = _mm256_loadu_si256((const __m256i*)(b + 64 * c));
      const __m256i l1 = _mm256_loadu_si256((const __m256i*)(b + 64 * c + 32));
      const __m256i h = _mm256_loadu_si256((const __m256i*)(b + 128 + 32 * c));
      u[4 * c] = _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_and_si256(_mm256_slli_epi16(h, 4), bits45));
      u[4 * c + 1] = _mm256_or_si256(_mm256_and_si256(l1, low4), _mm256_and_si256(_mm256_slli_epi16(h, 2), bits45));
      u[4 * c + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4), _mm256_and_si256(h, bits45));
      u[4 * c + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                                     _mm256_and_si256(_mm256_srli_epi16(h, 2), bits45));
    }
  } else {
    const uint8_t* qs = b + (KIND == Q4K ? 16 : 48);
    for (int j = 0; j < 4; ++j) {
      const __m256i raw = _mm256_loadu_si256((const __m256i*)(qs + 32 * j));
      u[2 * j] = _mm256_and_si256(raw, low4);
      u[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
    }
    if constexpr (KIND == Q5K) {  // bit g of qh[i]: value 32 g + i's fifth bit
      const __m256i qh = _mm256_loadu_si256((const __m256i*)(b + 16)), one = _mm256_set1_epi8(1);
      for (int g = 0; g < 8; ++g)
        u[g] = _mm256_or_si256(u[g], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, g), one), 4));
    }
  }
}

// y[r0 + r, n] for MR rows of x and weight row n: each super-block unpacked once for all MR rows.
template <int KIND, int MR>
void kq_tile_i8(const Mat& w, int64_t n, const XQ& x, int64_t r0, float* y, int64_t ldy) {
  const int64_t units = w.cols / 256;
  const uint8_t* row = w.data + n * row_bytes(w);
  __m256 acc[MR][2], macc[MR];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = macc[r] = _mm256_setzero_ps();
  for (int64_t un = 0; un < units; ++un) {
    const uint8_t* b = row + un * unit_bytes(KIND);
    prefetch_range(b + PF_BYTES, unit_bytes(KIND));
    __m256i u[8];
    kq_unit_bytes<KIND>(b, u);
    // Q6_K: the 16 scales times d (D6[0], D6[1]); Q4_K / Q5_K: 8 scales times d, then 8 mins times dmin (DM)
    alignas(64) float DM[16];
    __m256 D6[2];
    if constexpr (KIND == Q6K) {
      const __m128i sc = _mm_loadu_si128((const __m128i*)(b + 192));
      const __m256 d = _mm256_set1_ps(half_to_float(b[208] | b[209] << 8));
      D6[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)), d);
      D6[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))), d);
    } else {
      k4_scales(b, DM);
    }
    // The 8 groups' dot products gathered into lanes (as q8_tile_i8), converted once and scaled together. Q6_K:
    // two levels of hadd leave groups 4h .. 4h + 3's first 16 values in lanes 0-3 and their second 16 in lanes 4-7,
    // so its scales are taken in that order (scale 2g, then 2g + 1) and x's d per lane as 4 values twice.
    __m256 S6[2];
    if constexpr (KIND == Q6K) {
      const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
      for (int h = 0; h < 2; ++h) S6[h] = _mm256_permutevar8x32_ps(D6[h], order);
    }
    for (int r = 0; r < MR; ++r) {
      const int64_t k = un * 256, xb = (r0 + r) * x.nb + un * 8;
      __m256i dots[8];
      for (int g = 0; g < 8; ++g) {
        __m256i start = _mm256_setzero_si256();  // Q6_K: its +32 offset, -32 * x's 4-value group sums
        if constexpr (KIND == Q6K)
          start = _mm256_loadu_si256((const __m256i*)(x.c4 + (r0 + r) * (x.K / 4) + (k + 32 * g) / 4));
        dots[g] = kq_dot(u[g], x.q + (r0 + r) * x.K + k + 32 * g, start);
      }
      if constexpr (KIND == Q6K) {
        for (int h = 0; h < 2; ++h) {
          const __m256i* v = dots + 4 * h;
          const __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
          const __m256 dx = _mm256_broadcast_ps((const __m128*)(x.d + xb + 4 * h));
          acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(S6[h], dx), acc[r][h]);
        }
      } else {
        const __m256 scale = _mm256_mul_ps(_mm256_load_ps(DM), _mm256_loadu_ps(x.d + xb));
        acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum8(dots)), scale, acc[r][0]);
      }
    }
    if constexpr (KIND != Q6K)  // the mins times x's float block sums
      for (int r = 0; r < MR; ++r)
        macc[r] = _mm256_fmadd_ps(_mm256_load_ps(DM + 8), _mm256_loadu_ps(x.s + (r0 + r) * x.nb + un * 8), macc[r]);
  }
  for (int r = 0; r < MR; ++r)  // the mins' sums subtracted lane by lane: one horizontal sum a row
    y[(r0 + r) * ldy + n] = y8::sum(_mm256_sub_ps(_mm256_add_ps(acc[r][0], acc[r][1]), macc[r]));
}

// q8 along one weight row, 256-bit, 8 blocks at a time: each block's integer dot product with each row of x, the 8
// blocks' sums gathered into one vector (sum8), converted once and scaled by the 8 d_w d_x together (+ m sum x with
// mins). Scaling block by block cost 4 instructions a block and row on top of the dot product: one row of a
// 65536 x 256 expert-shaped weight at 1 thread took 2.7 ms against 1.0 for the float row. VNNI: w + 128 as the
// unsigned operand, XQ::c = -128 sum q_x added per block; else |w| with w's sign moved onto x, since maddubs would
// saturate w + 128's 16-bit pair sums. Blocks past the last 8 one at a time.
template <int MR>
void q8_tile_i8(const Mat& w, int64_t n, const XQ& x, int64_t r0, float* y, int64_t ldy) {
  const Row row = row_of(w, n);
  const bool with_mins = row.m != nullptr;
  __m256 acc[MR], macc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = macc[r] = _mm256_setzero_ps();
  const auto dot = [](__m256i wq, __m256i u, const int8_t* xq, int32_t c) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    (void)wq;
    return kq_dot(u, xq, _mm256_zextsi128_si256(_mm_cvtsi32_si128(c)));
#else
    (void)c;
    const __m256i xs = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)xq), wq);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, xs), _mm256_set1_epi16(1));
#endif
  };
  const auto unsigned_of = [](__m256i wq) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_xor_si256(wq, _mm256_set1_epi8((char)0x80));
#else
    return _mm256_sign_epi8(wq, wq);
#endif
  };
  int64_t b = 0;
  for (; b + 8 <= x.nb; b += 8) {
    prefetch_range(row.q + b * QK + PF_BYTES, 8 * QK);
    __m256i wq[8], u[8];
    for (int j = 0; j < 8; ++j) {
      wq[j] = _mm256_loadu_si256((const __m256i*)(row.q + (b + j) * QK));
      u[j] = unsigned_of(wq[j]);
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(row.d + b)));
    for (int r = 0; r < MR; ++r) {
      const int64_t xb = (r0 + r) * x.nb + b;
      __m256i dots[8];
      for (int j = 0; j < 8; ++j) dots[j] = dot(wq[j], u[j], x.q + (r0 + r) * x.K + (b + j) * QK, 0);
      __m256i sums = sum8(dots);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
      sums = _mm256_add_epi32(sums, _mm256_loadu_si256((const __m256i*)(x.c + xb)));
#endif
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(dw, _mm256_loadu_ps(x.d + xb)), acc[r]);
      if (with_mins)
        macc[r] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(row.m + b))),
                                  _mm256_loadu_ps(x.s + xb), macc[r]);
    }
  }
  float tail[MR] = {};
  for (; b < x.nb; ++b) {
    const __m256i wq = _mm256_loadu_si256((const __m256i*)(row.q + b * QK)), u = unsigned_of(wq);
    const float dw = half_to_float(row.d[b]), mw = with_mins ? half_to_float(row.m[b]) : 0.f;
    for (int r = 0; r < MR; ++r) {
      const int64_t xb = (r0 + r) * x.nb + b;
      const __m256i d = dot(wq, u, x.q + (r0 + r) * x.K + b * QK, x.c[xb]);
      tail[r] += (float)y8::isum(d) * dw * x.d[xb] + mw * x.s[xb];
    }
  }
  for (int r = 0; r < MR; ++r)  // one horizontal sum a row (short expert rows pay it per 8 blocks)
    y[(r0 + r) * ldy + n] = y8::sum(with_mins ? _mm256_add_ps(acc[r], macc[r]) : acc[r]) + tail[r];
}
#else
// Without AVX2: the same sums in scalar code, one super-block decoded to its integers per row.
template <int KIND, int MR>
void kq_tile_i8(const Mat& w, int64_t n, const XQ& x, int64_t r0, float* y, int64_t ldy) {
  const int64_t units = w.cols / 256, rb = row_bytes(w);
  float acc[MR] = {};
  for (int64_t un = 0; un < units; ++un) {
    const uint8_t* b = w.data + n * rb + un * unit_bytes(KIND);
    int q[256];
    float D[16], M[8] = {};
    if constexpr (KIND == Q6K) {
      const float d = half_to_float(b[208] | b[209] << 8);
      for (int g = 0; g < 8; ++g) {
        const uint8_t* l = b + (g / 4) * 64 + (g % 2) * 32;
        const uint8_t* h = b + 128 + (g / 4) * 32;
        const int ls = ((g / 2) % 2) * 4, hs = (g % 4) * 2;
        for (int i = 0; i < 32; ++i) q[32 * g + i] = (((l[i] >> ls) & 0xF) | (((h[i] >> hs) & 3) << 4)) - 32;
      }
      for (int i = 0; i < 16; ++i) D[i] = d * (float)(int8_t)b[192 + i];
    } else {
      const float d = half_to_float(b[0] | b[1] << 8), dmin = half_to_float(b[2] | b[3] << 8);
      const uint8_t* qs = b + (KIND == Q4K ? 16 : 48);
      for (int g = 0; g < 8; ++g) {
        for (int i = 0; i < 32; ++i) {
          q[32 * g + i] = (qs[(g / 2) * 32 + i] >> ((g % 2) * 4)) & 0xF;
          if constexpr (KIND == Q5K) q[32 * g + i] |= ((b[16 + i] >> g) & 1) << 4;
        }
        D[2 * g] = D[2 * g + 1] = d * (float)k4_scale(b + 4, g);
        M[g] = dmin * (float)k4_min(b + 4, g);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int g = 0; g < 8; ++g) {
        const int64_t xb = (r0 + r) * x.nb + un * 8 + g;
        const int8_t* xq = x.q + (r0 + r) * x.K + un * 256 + 32 * g;
        int32_t s0 = 0, s1 = 0;
        for (int i = 0; i < 16; ++i) {
          s0 += q[32 * g + i] * xq[i];
          s1 += q[32 * g + 16 + i] * xq[16 + i];
        }
        acc[r] += (D[2 * g] * (float)s0 + D[2 * g + 1] * (float)s1) * x.d[xb] - M[g] * x.s[xb];
      }
  }
  for (int r = 0; r < MR; ++r) y[(r0 + r) * ldy + n] = acc[r];
}

template <int MR>
void q8_tile_i8(const Mat& w, int64_t n, const XQ& x, int64_t r0, float* y, int64_t ldy) {
  const Row row = row_of(w, n);
  float acc[MR] = {};
  for (int64_t b = 0; b < x.nb; ++b) {
    const int8_t* q = (const int8_t*)row.q + b * QK;
    const float d = half_to_float(row.d[b]), m = row.m ? half_to_float(row.m[b]) : 0.f;
    for (int r = 0; r < MR; ++r) {
      const int64_t xb = (r0 + r) * x.nb + b;
      const int8_t* xq = x.q + (r0 + r) * x.K + b * QK;
      int32_t dot = 0;
      for (int i = 0; i < QK; ++i) dot += q[i] * xq[i];
      acc[r] += d * x.d[xb] * (float)dot + m * x.s[xb];
    }
  }
  for (int r = 0; r < MR; ++r) y[(r0 + r) * ldy + n] = acc[r];
}
#endif

// All M rows of x against weight row n (q8, K-quants), two at a time.
template <int KIND>
void rows_i8(const Mat& w, int64_t n, const XQ& x, int64_t M, float* y, int64_t ldy) {
  int64_t r = 0;
  for (; r + 2 <= M; r += 2) {
    if constexpr (KIND == Q8) q8_tile_i8<2>(w, n, x, r, y, ldy);
    else kq_tile_i8<KIND, 2>(w, n, x, r, y, ldy);
  }
  if (r == M) return;  // an odd count's last row: the weight row is in L1 by now (three rows in one pass: 1.7 ms
  // against 1.4 for 2 + 1, q8 16384 x 1024 at 1 thread)
  if constexpr (KIND == Q8) q8_tile_i8<1>(w, n, x, r, y, ldy);
  else kq_tile_i8<KIND, 1>(w, n, x, r, y, ldy);
}

#if defined(__AVX2__)
// The K-quants in the transposed tile: super-block un of the TJ rows from n0 unpacked to bytes (kq_unit_bytes) in
// ub[j], and their scales transposed, one vector of TJ rows per 16-value half (dT[2g], dT[2g + 1]; the same value
// for Q4_K / Q5_K) and, for Q4_K / Q5_K, -mins (mT[g]).
template <int KIND, int NJ>
inline void kq_stage(const Mat& w, int64_t n0, int64_t un, uint8_t (*ub)[256], float (*dT)[NJ], float (*mT)[NJ]) {
  const int64_t rb = row_bytes(w);
  for (int j = 0; j < NJ; ++j) {
    const uint8_t* b = w.data + (n0 + j) * rb + un * unit_bytes(KIND);
    prefetch_range(b + NJ * rb, unit_bytes(KIND));  // the next tile's row j
    __m256i u[8];
    kq_unit_bytes<KIND>(b, u);
    for (int g = 0; g < 8; ++g) _mm256_store_si256((__m256i*)(ub[j] + 32 * g), u[g]);
    if constexpr (KIND == Q6K) {
      const float d = half_to_float(b[208] | b[209] << 8);
      for (int i = 0; i < 16; ++i) dT[i][j] = d * (float)(int8_t)b[192 + i];
    } else {
      alignas(64) float DM[16];
      k4_scales(b, DM);
      for (int g = 0; g < 8; ++g) {
        dT[2 * g][j] = dT[2 * g + 1][j] = DM[g];
        mT[g][j] = -DM[8 + g];
      }
    }
  }
}

// -32 * the sum of x row r's 16 values from k (Q6_K's offset for a 16-value half; XQ::c4 in 4-value groups).
inline int32_t kq_c16(const XQ& x, int64_t r, int64_t k) {
  const int32_t* c = x.c4 + r * (x.K / 4) + k / 4;
  return c[0] + c[1] + c[2] + c[3];
}
#endif

#if defined(__AVX512VNNI__)
// Several rows of x: 16 weight rows per tile, lane j of a vector = weight row j. Each 32-block of the 16
// rows is transposed in registers into 8 vectors of 4-byte groups (q4 nibbles, q8 bytes + 128 as unsigned), then
// every x row's 4-byte groups are broadcast into vpdpbusd: one int32 per weight row per block, fully reduced, so
// the float work (convert, scale, accumulate) is one vector per (x row, block) instead of one per (row, row, block
// pair). The transpose is paid once per block for all x rows. q8: (w + 128) . x = w . x + 128 sum x, corrected
// by XQ::c = -128 sum x started in the accumulator.
constexpr int TJ = 16;
constexpr int I8T_MR = 16;  // x rows per pass
// From this many x rows on it beats the row-by-row kernels (measured, 129280x1024 at 1 thread: q4 from 2 rows, the
// K-quants from 4 (below that the transpose costs more than it saves: Q6_K 2 rows 16.6 ms here against 12.2 in
// kq_tile_i8); 16 rows: q8 54 -> 23 ms, Q6_K 31 ms, Q4_K 24 ms against their float 75 and 91); q8 from 5 (16384 x
// 1024, 4 rows: 2.2 ms here against 1.7 in q8_tile_i8).
template <int KIND>
constexpr int64_t i8t_min_rows() { return KIND == Q4 ? 2 : KIND == Q8 ? 5 : 4; }

// The dwords g .. g + 3 of the 16 rows' bytes at p[j] + off as 4 vectors, lane j = row j (4x4 transposes in lanes).
inline void transpose16x4(const uint8_t* const* p, int64_t off, __m512i* t) {
  __m512i z[4];
  for (int i = 0; i < 4; ++i) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)(p[i] + off)));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(p[i + 4] + off)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(p[i + 8] + off)), 2);
    z[i] = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(p[i + 12] + off)), 3);
  }
  const __m512i a = _mm512_unpacklo_epi32(z[0], z[1]), b = _mm512_unpackhi_epi32(z[0], z[1]);
  const __m512i c = _mm512_unpacklo_epi32(z[2], z[3]), d = _mm512_unpackhi_epi32(z[2], z[3]);
  t[0] = _mm512_unpacklo_epi64(a, c);
  t[1] = _mm512_unpackhi_epi64(a, c);
  t[2] = _mm512_unpacklo_epi64(b, d);
  t[3] = _mm512_unpackhi_epi64(b, d);
}

// kq_tile_i8_t's vectors in this tile: lane j = weight row j of TJ.
using TI = __m512i;
using TF = __m512;
inline TI ti_set1(int32_t v) { return _mm512_set1_epi32(v); }
inline TI ti_add(TI a, TI b) { return _mm512_add_epi32(a, b); }
inline TI ti_dot4(TI acc, TI w, int32_t x4) { return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(x4)); }
inline TF tf_load(const float* p) { return _mm512_load_ps(p); }
inline TF tf_set1(float v) { return _mm512_set1_ps(v); }
inline TF tf_fma_i(TI s, TF d, TF acc) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, acc); }
inline TF tf_fma(TF a, TF b, TF acc) { return _mm512_fmadd_ps(a, b, acc); }
inline TF tf_mul(TF a, TF b) { return _mm512_mul_ps(a, b); }
inline TF tf_zero() { return _mm512_setzero_ps(); }
inline void tf_store(float* p, TF v) { _mm512_storeu_ps(p, v); }
inline void transpose_tile(const uint8_t* const* p, int64_t off, TI* t) { transpose16x4(p, off, t); }
template <int KIND, int MR>
void tile_i8_t(const Mat& w, int64_t n0, const XQ& x, int64_t r0, float* y, int64_t ldy) {
  constexpr int64_t BB = block_bytes<KIND>();
  const bool with_mins = w.mins != nullptr;
  const uint8_t* p[TJ];
  Row rows[TJ];
  for (int j = 0; j < TJ; ++j) {
    rows[j] = row_of(w, n0 + j);
    p[j] = rows[j].q;
  }
  const int64_t tb = TJ * row_bytes(w), ahead = (PF_BYTES + tb - 1) / tb * tb;
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  alignas(64) float dT[BC][TJ], mT[BC][TJ];
  float tmp[BC];
  for (int64_t b0 = 0; b0 < x.nb; b0 += BC) {
    const int64_t bc = std::min(BC, x.nb - b0);
    for (int j = 0; j < TJ; ++j) {  // the chunk's scales (and mins), transposed: one vector of 16 rows per block
      halves_to_floats(rows[j].d + b0, bc, tmp);
      for (int64_t i = 0; i < bc; ++i) dT[i][j] = tmp[i];
      if (with_mins) {
        halves_to_floats(rows[j].m + b0, bc, tmp);
        for (int64_t i = 0; i < bc; ++i) mT[i][j] = tmp[i];
      }
    }
    for (int64_t b = b0; b < b0 + bc; ++b) {
      if (BB == 64 || b % (64 / BB) == 0)
        for (int j = 0; j < TJ; ++j) prefetch(p[j] + b * BB + ahead);
      __m512i W[8];
      if constexpr (KIND == Q4) {
        transpose16x4(p, b * BB, W);
        const __m512i m4 = _mm512_set1_epi8(0x0F);
        for (int t = 0; t < 4; ++t) {
          W[t + 4] = _mm512_and_si512(_mm512_srli_epi16(W[t], 4), m4);
          W[t] = _mm512_and_si512(W[t], m4);
        }
      } else {
        transpose16x4(p, b * BB, W);
        transpose16x4(p, b * BB + 16, W + 4);
        const __m512i flip = _mm512_set1_epi8((char)0x80);
        for (int t = 0; t < 8; ++t) W[t] = _mm512_xor_si512(W[t], flip);
      }
      const __m512 dw = _mm512_load_ps(dT[b - b0]);
      for (int r = 0; r < MR; ++r) {
        const int64_t xr = (r0 + r) * x.nb + b;
        const int32_t* xg = (const int32_t*)(x.q + (r0 + r) * x.K + b * QK);
        __m512i s0 = KIND == Q8 ? _mm512_set1_epi32(x.c[xr]) : _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
        for (int t = 0; t < 8; t += 2) {
          s0 = _mm512_dpbusd_epi32(s0, W[t], _mm512_set1_epi32(xg[t]));
          s1 = _mm512_dpbusd_epi32(s1, W[t + 1], _mm512_set1_epi32(xg[t + 1]));
        }
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
        acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dw, _mm512_set1_ps(x.d[xr])), acc[r]);
        if (with_mins) acc[r] = _mm512_fmadd_ps(_mm512_load_ps(mT[b - b0]), _mm512_set1_ps(x.s[xr]), acc[r]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(y + (r0 + r) * ldy + n0, acc[r]);
}
#elif defined(__AVX2__)
// The same tile in 256 bits for AVX2 without VNNI: 8 weight rows per tile, maddubs + madd for the dot products.
// maddubs saturates its 16-bit pair sums, so q8 keeps |w| unsigned with w's sign moved onto x (not w + 128), and
// only q4 (pairs <= 2 * 15 * 127) may add eight of them in 16 bits before widening.
constexpr int TJ = 8;
constexpr int I8T_MR = 8;  // x rows per pass: 16 registers hold the 8 transposed vectors and the accumulators
// 16 rows, q8: 114 -> 55 ms, q4: 84 -> 40 ms (AVX2 level); q8 2 rows 1.9 ms here against 1.3 in q8_tile_i8
// (16384 x 1024)
template <int KIND>
constexpr int64_t i8t_min_rows() { return KIND == Q8 ? 3 : 2; }

// The dwords g .. g + 3 of the 8 rows' bytes at p[j] + off as 4 vectors, lane j = row j (4x4 transposes in lanes).
inline void transpose8x4(const uint8_t* const* p, int64_t off, __m256i* t) {
  __m256i z[4];
  for (int i = 0; i < 4; ++i)
    z[i] = _mm256_set_m128i(_mm_loadu_si128((const __m128i*)(p[i + 4] + off)),
                            _mm_loadu_si128((const __m128i*)(p[i] + off)));
  const __m256i a = _mm256_unpacklo_epi32(z[0], z[1]), b = _mm256_unpackhi_epi32(z[0], z[1]);
  const __m256i c = _mm256_unpacklo_epi32(z[2], z[3]), d = _mm256_unpackhi_epi32(z[2], z[3]);
  t[0] = _mm256_unpacklo_epi64(a, c);
  t[1] = _mm256_unpackhi_epi64(a, c);
  t[2] = _mm256_unpacklo_epi64(b, d);
  t[3] = _mm256_unpackhi_epi64(b, d);
}

// kq_tile_i8_t's vectors in this tile: lane j = weight row j of TJ; maddubs + madd per 4-value group (|pair sums|
// <= 2 * 63 * 127: each madd'ed before adding).
using TI = __m256i;
using TF = __m256;
inline TI ti_set1(int32_t v) { return _mm256_set1_epi32(v); }
inline TI ti_add(TI a, TI b) { return _mm256_add_epi32(a, b); }
inline TI ti_dot4(TI acc, TI w, int32_t x4) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_set1_epi32(x4)), _mm256_set1_epi16(1)));
}
inline TF tf_load(const float* p) { return _mm256_load_ps(p); }
inline TF tf_set1(float v) { return _mm256_set1_ps(v); }
inline TF tf_fma_i(TI s, TF d, TF acc) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc); }
inline TF tf_fma(TF a, TF b, TF acc) { return _mm256_fmadd_ps(a, b, acc); }
inline TF tf_mul(TF a, TF b) { return _mm256_mul_ps(a, b); }
inline TF tf_zero() { return _mm256_setzero_ps(); }
inline void tf_store(float* p, TF v) { _mm256_storeu_ps(p, v); }
inline void transpose_tile(const uint8_t* const* p, int64_t off, TI* t) { transpose8x4(p, off, t); }
template <int KIND, int MR>
void tile_i8_t(const Mat& w, int64_t n0, const XQ& x, int64_t r0, float* y, int64_t ldy) {
  constexpr int64_t BB = block_bytes<KIND>();
  const bool with_mins = w.mins != nullptr;
  const uint8_t* p[TJ];
  Row rows[TJ];
  for (int j = 0; j < TJ; ++j) {
    rows[j] = row_of(w, n0 + j);
    p[j] = rows[j].q;
  }
  const int64_t tb = TJ * row_bytes(w), ahead = (PF_BYTES + tb - 1) / tb * tb;
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  alignas(32) float dT[BC][TJ], mT[BC][TJ];
  float tmp[BC];
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b0 = 0; b0 < x.nb; b0 += BC) {
    const int64_t bc = std::min(BC, x.nb - b0);
    for (int j = 0; j < TJ; ++j) {
      halves_to_floats(rows[j].d + b0, bc, tmp);
      for (int64_t i = 0; i < bc; ++i) dT[i][j] = tmp[i];
      if (with_mins) {
        halves_to_floats(rows[j].m + b0, bc, tmp);
        for (int64_t i = 0; i < bc; ++i) mT[i][j] = tmp[i];
      }
    }
    for (int64_t b = b0; b < b0 + bc; ++b) {
      if (BB == 64 || b % (64 / BB) == 0)
        for (int j = 0; j < TJ; ++j) prefetch(p[j] + b * BB + ahead);
      __m256i W[8];
      transpose8x4(p, b * BB, W);
      if constexpr (KIND == Q4) {
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        for (int t = 0; t < 4; ++t) {
          W[t + 4] = _mm256_and_si256(_mm256_srli_epi16(W[t], 4), m4);
          W[t] = _mm256_and_si256(W[t], m4);
        }
      } else {
        transpose8x4(p, b * BB + 16, W + 4);
      }
      const __m256 dw = _mm256_load_ps(dT[b - b0]);
      for (int r = 0; r < MR; ++r) {
        const int64_t xr = (r0 + r) * x.nb + b;
        const int32_t* xg = (const int32_t*)(x.q + (r0 + r) * x.K + b * QK);
        __m256i dot;
        if constexpr (KIND == Q4) {
          __m256i s16 = _mm256_maddubs_epi16(W[0], _mm256_set1_epi32(xg[0]));
          for (int t = 1; t < 8; ++t) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(W[t], _mm256_set1_epi32(xg[t])));
          dot = _mm256_madd_epi16(s16, ones);
        } else {
          dot = _mm256_setzero_si256();
          for (int t = 0; t < 8; ++t) {
            const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(xg[t]), W[t]);
            dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(W[t], W[t]), xs), ones));
          }
        }
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(dw, _mm256_set1_ps(x.d[xr])), acc[r]);
        if (with_mins) acc[r] = _mm256_fmadd_ps(_mm256_load_ps(mT[b - b0]), _mm256_set1_ps(x.s[xr]), acc[r]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(y + (r0 + r) * ldy + n0, acc[r]);
}
#endif

#if defined(__AVX2__)
// The K-quants in the transposed tile (int8 activations, Q4_K / Q5_K / Q6_K): per super-block the TJ rows are
// unpacked to bytes once (kq_stage), then each 32-value group goes as in tile_i8_t, with one integer sum per 16-value
// half for Q6_K's two scales (its +32 offset started in the accumulator).
template <int KIND, int MR>
void kq_tile_i8_t(const Mat& w, int64_t n0, const XQ& x, int64_t r0, float* y, int64_t ldy) {
  alignas(64) uint8_t ub[TJ][256];
  alignas(64) float dT[16][TJ], mT[8][TJ];
  const uint8_t* p[TJ];
  for (int j = 0; j < TJ; ++j) p[j] = ub[j];
  TF acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = tf_zero();
  for (int64_t un = 0; un < w.cols / 256; ++un) {
    kq_stage<KIND, TJ>(w, n0, un, ub, dT, mT);
    for (int g = 0; g < 8; ++g) {
      TI W[8];
      transpose_tile(p, 32 * g, W);
      transpose_tile(p, 32 * g + 16, W + 4);
      const TF d0 = tf_load(dT[2 * g]), d1 = tf_load(dT[2 * g + 1]);
      for (int r = 0; r < MR; ++r) {
        const int64_t k = un * 256 + 32 * g, xb = (r0 + r) * x.nb + k / 32;
        const int32_t* xg = (const int32_t*)(x.q + (r0 + r) * x.K + k);
        TI s0 = ti_set1(KIND == Q6K ? kq_c16(x, r0 + r, k) : 0);
        TI s1 = ti_set1(KIND == Q6K ? kq_c16(x, r0 + r, k + 16) : 0);
        for (int t = 0; t < 4; ++t) {
          s0 = ti_dot4(s0, W[t], xg[t]);
          s1 = ti_dot4(s1, W[t + 4], xg[t + 4]);
        }
        const TF dx = tf_set1(x.d[xb]);
        if constexpr (KIND == Q6K) {
          acc[r] = tf_fma_i(s0, tf_mul(d0, dx), acc[r]);
          acc[r] = tf_fma_i(s1, tf_mul(d1, dx), acc[r]);
        } else {
          acc[r] = tf_fma_i(ti_add(s0, s1), tf_mul(d0, dx), acc[r]);
          acc[r] = tf_fma(tf_load(mT[g]), tf_set1(x.s[xb]), acc[r]);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r) tf_store(y + (r0 + r) * ldy + n0, acc[r]);
}
#endif

#if defined(__AVX2__)
// All M rows of x against weight rows n0 .. n0 + TJ, at most I8T_MR x rows per pass (tile_i8_t, the K-quants
// kq_tile_i8_t).
template <int KIND>
void rows_tile_i8_t(const Mat& w, int64_t n0, const XQ& x, int64_t M, float* y, int64_t ldy) {
  for (int64_t r = 0; r < M; r += I8T_MR) {
    switch (std::min<int64_t>(I8T_MR, M - r)) {
#define SELFSEEK_I8T(n)                                                      \
  case n:                                                                    \
    if constexpr (n <= I8T_MR) {                                             \
      if constexpr (kq_i8(KIND)) kq_tile_i8_t<KIND, n>(w, n0, x, r, y, ldy); \
      else tile_i8_t<KIND, n>(w, n0, x, r, y, ldy);                          \
    }                                                                        \
    break;
      SELFSEEK_I8T(1) SELFSEEK_I8T(2) SELFSEEK_I8T(3) SELFSEEK_I8T(4) SELFSEEK_I8T(5) SELFSEEK_I8T(6)
      SELFSEEK_I8T(7) SELFSEEK_I8T(8) SELFSEEK_I8T(9) SELFSEEK_I8T(10) SELFSEEK_I8T(11) SELFSEEK_I8T(12)
      SELFSEEK_I8T(13) SELFSEEK_I8T(14) SELFSEEK_I8T(15) SELFSEEK_I8T(16)
#undef SELFSEEK_I8T
      default: break;
    }
  }
}
#endif

template <int KIND>
void gemm_range_i8(const Mat& w, int64_t n0, int64_t n1, const XQ& x, int64_t M, float* y, int64_t ldy) {
  int64_t n = n0;
#if defined(__AVX2__)
  if (M >= i8t_min_rows<KIND>())
    for (; n + TJ <= n1; n += TJ) rows_tile_i8_t<KIND>(w, n, x, M, y, ldy);
#endif
  if constexpr (KIND == Q4) {
    if (M == 1) {
      for (; n + NR_ONE <= n1; n += NR_ONE) tile_i8<KIND, 1, NR_ONE>(w, n, x, 0, y, ldy);
    } else {
      for (; n + 2 <= n1; n += 2) rows_tile_i8<KIND, 2>(w, n, x, M, y, ldy);
    }
    for (; n < n1; ++n) rows_tile_i8<KIND, 1>(w, n, x, M, y, ldy);
  } else {
    for (; n < n1; ++n) rows_i8<KIND>(w, n, x, M, y, ldy);
  }
}

constexpr bool int8_kind(int kind) { return kind == Q8 || kind == Q4 || kind == Q8X16 || kq_i8(kind); }
// The most rows of x the int8 products take (selfseek_int8_max_rows, kernels.int8_max_rows). With VNNI, any count:
// 512 rows (prefill) of q8 / q4 / Q4_K / Q6_K weights ran 1.8-2.6x faster than the float path (panels or BLAS) at 1
// thread. Without it (maddubs), from 64 rows on the float path is as fast (q8 0.9-1.1x, Q4_K 1.1x, Q6_K 0.9x):
// decode batches only.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
constexpr int64_t INT8_MAX_ROWS = INT64_MAX;
#else
constexpr int64_t INT8_MAX_ROWS = 63;
#endif
// Whether rows rows of x against a weight of this kind take int8 activations (when they are on): the one rule of
// selfseek_linear_int8, W^UV's heads and the MoE's experts (kernels.takes_int8 in Python).
constexpr bool takes_i8(int kind, int64_t rows) { return rows <= INT8_MAX_ROWS && int8_kind(kind); }

// Q8X16 with int8 activations: rows [n0, n1) (whole groups of 16: every caller splits rows by ROW_CHUNK) against
// the M rows of x.
static_assert(ROW_CHUNK % 16 == 0, "Q8X16 row ranges are whole 16-row groups");
#if defined(__AVX512VNNI__)
// MR rows of x against the 16 rows of the group at g: per block the 8 vectors of 4-byte groups are loaded as they
// are stored, made unsigned (w + 128, corrected by XQ::c as in tile_i8_t) and broadcast-multiplied with x's 4-byte
// groups (vpdpbusd): tile_i8_t's arithmetic in the same order, without its transposes.
template <int MR>
void x16_tile_i8(const uint8_t* g, const XQ& x, int64_t r0, float* y, int64_t ldy) {
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  for (int64_t b = 0; b < x.nb; ++b) {
    // One stream: up to 4 rows the hardware prefetcher alone keeps up (software prefetches PF_BYTES ahead were 0-20%
    // slower); with more rows' compute between the loads it does not (129280 x 1024, 8 rows: 19 -> 10 ms with them).
    const uint8_t* o = g + b * Q8X16_BLOCK;
    if (MR > 4) prefetch_range(o + PF_BYTES, Q8X16_BLOCK);
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)o));
    __m512i W[8];
    for (int t = 0; t < 8; ++t) W[t] = _mm512_xor_si512(_mm512_loadu_si512(o + 32 + 64 * t), flip);
    for (int r = 0; r < MR; ++r) {
      const int64_t xr = (r0 + r) * x.nb + b;
      const int32_t* xg = (const int32_t*)(x.q + (r0 + r) * x.K + b * QK);
      __m512i s0 = _mm512_set1_epi32(x.c[xr]), s1 = _mm512_setzero_si512();
      for (int t = 0; t < 8; t += 2) {
        s0 = _mm512_dpbusd_epi32(s0, W[t], _mm512_set1_epi32(xg[t]));
        s1 = _mm512_dpbusd_epi32(s1, W[t + 1], _mm512_set1_epi32(xg[t + 1]));
      }
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
      acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dw, _mm512_set1_ps(x.d[xr])), acc[r]);
    }
  }
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(y + (r0 + r) * ldy, acc[r]);
}

// x16_tile_i8<m> for m = 1 .. 16 rows of x: every row count in one pass over the group's weights (a second pass
// re-reads them from cache but, with nothing streaming meanwhile, costs its whole compute again: 129280 x 1024, 1
// thread, 8 rows as 4 + 4 14.5 ms, in one pass 10.6).
template <int... I>
constexpr std::array<void (*)(const uint8_t*, const XQ&, int64_t, float*, int64_t), sizeof...(I)> x16_tiles(
    std::integer_sequence<int, I...>) {
  return {&x16_tile_i8<I + 1>...};
}
constexpr auto X16_TILES = x16_tiles(std::make_integer_sequence<int, 16>());

void x16_range_i8(const Mat& w, int64_t n0, int64_t n1, const XQ& x, int64_t M, float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; n += 16)
    for (int64_t r = 0; r < M; r += 16)
      X16_TILES[std::min<int64_t>(16, M - r) - 1](w.data + n * row_bytes(w), x, r, y + n, ldy);
}
#else
// Without VNNI (models.quant.interleave_q8_weights makes the layout only where the loaded level has it): the same sums
// in scalar code, for correctness.
void x16_range_i8(const Mat& w, int64_t n0, int64_t n1, const XQ& x, int64_t M, float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* g = w.data + n / 16 * 16 * row_bytes(w);
    const int64_t j = n % 16;
    for (int64_t r = 0; r < M; ++r) {
      float acc = 0.f;
      for (int64_t b = 0; b < x.nb; ++b) {
        const uint8_t* o = g + b * Q8X16_BLOCK;
        const int8_t* xq = x.q + r * x.K + b * QK;
        int32_t dot = 0;
        for (int t = 0; t < 8; ++t)
          for (int i = 0; i < 4; ++i) dot += (int8_t)o[32 + 64 * t + 4 * j + i] * xq[4 * t + i];
        acc += half_to_float(o[2 * j] | o[2 * j + 1] << 8) * x.d[r * x.nb + b] * (float)dot;
      }
      y[r * ldy + n] = acc;
    }
  }
}
#endif

// gemm_range_i8 for w's kind (one of int8_kind's).
void gemm_i8(const Mat& w, int64_t n0, int64_t n1, const XQ& x, int64_t M, float* y, int64_t ldy) {
  switch (w.kind) {
    case Q8X16: x16_range_i8(w, n0, n1, x, M, y, ldy); break;
    case Q8: gemm_range_i8<Q8>(w, n0, n1, x, M, y, ldy); break;
    case Q4: gemm_range_i8<Q4>(w, n0, n1, x, M, y, ldy); break;
    case Q4K: gemm_range_i8<Q4K>(w, n0, n1, x, M, y, ldy); break;
    case Q5K: gemm_range_i8<Q5K>(w, n0, n1, x, M, y, ldy); break;
    default: gemm_range_i8<Q6K>(w, n0, n1, x, M, y, ldy); break;
  }
}

// M rows of x quantized for the int8 products (the arrays an XQ views); c4 (Q6_K's offsets) when asked for.
struct XQBuf {
  Buf<int8_t> q;
  Buf<float> d, s;
  Buf<int32_t> c, c4;
  int64_t K, nb;
  // x null: rows to fill with copy_row.
  XQBuf(const float* x, int64_t M, int64_t ldx, int64_t K, bool with_c4)
      : q(M * K), d(M * K / QK), s(M * K / QK), c(M * K / QK), c4(with_c4 ? M * K / 4 : 0), K(K), nb(K / QK) {
    if (!x) return;
    quantize_rows_i8(x, M, ldx, K, q.data(), d.data(), s.data(), c.data());
    for (int64_t i = 0; i < (int64_t)c4.size(); ++i)
      c4[i] = -32 * (q[4 * i] + q[4 * i + 1] + q[4 * i + 2] + q[4 * i + 3]);
  }
  // Rows r0.. as an XQ.
  XQ rows(int64_t r0) const {
    return XQ{q.data() + r0 * K, d.data() + r0 * nb, s.data() + r0 * nb, c.data() + r0 * nb, K, nb,
              c4.empty() ? nullptr : c4.data() + r0 * K / 4};
  }
  // Row `from` of src copied into row `to` (the same values quantize the same way).
  void copy_row(const XQBuf& src, int64_t from, int64_t to) {
    std::memcpy(&q[to * K], &src.q[from * K], K);
    std::memcpy(&d[to * nb], &src.d[from * nb], nb * 4);
    std::memcpy(&s[to * nb], &src.s[from * nb], nb * 4);
    std::memcpy(&c[to * nb], &src.c[from * nb], nb * 4);
    if (!c4.empty()) std::memcpy(&c4[to * K / 4], &src.c4[from * K / 4], K);
  }
};

// y[r, k] = sum_j W[j, k] x[r, j] over the n rows of a plain-kind W (K = W.cols), for R <= 2 rows of x (row
// strides ldx, ldy): one 32-column block at a time, its R x VPB sums in registers while the n rows go by, each
// row's block widened in registers. The float tile's FMAs in the same order (bit for bit), without writing the
// tile and reading it back: MLA's W^UK for one decode row was ~3x the time its weight bytes take.
template <int KIND>
void transposed_rows(const Mat& w, int64_t n, const float* x, int64_t ldx, int64_t R, float* y, int64_t ldy) {
  const int64_t K = w.cols, nb = K / QK;
  for (int64_t b = 0; b < nb; ++b) {
    V acc[2][VPB];
    for (int r = 0; r < 2; ++r)
      for (int v = 0; v < VPB; ++v) acc[r][v] = vzero();
    for (int64_t j = 0; j < n; ++j) {
      const Row row = row_of(w, j);
      V wv[VPB];
      load_block<KIND>(row, b, wv);
      if constexpr (quantized(KIND)) {
        const V dv = vset1(half_to_float(row.d[b])), mv = row.m ? vset1(half_to_float(row.m[b])) : vzero();
        for (int v = 0; v < VPB; ++v) wv[v] = vfma(wv[v], dv, mv);
      }
      for (int r = 0; r < 2; ++r) {
        if (r == R) break;
        const V a = vset1(x[r * ldx + j]);
        for (int v = 0; v < VPB; ++v) acc[r][v] = vfma(a, wv[v], acc[r][v]);
      }
    }
    for (int64_t r = 0; r < R; ++r)
      for (int v = 0; v < VPB; ++v) std::memcpy(y + r * ldy + b * QK + v * VW, &acc[r][v], sizeof(V));
  }
  if constexpr (!quantized(KIND))  // columns past the last whole block
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = nb * QK; k < K; ++k) {
        float s = 0.f;
        for (int64_t j = 0; j < n; ++j) s += x[r * ldx + j] * elem<KIND>(row_of(w, j), k);
        y[r * ldy + k] = s;
      }
}

// transposed_rows for w's kind; false for the kinds it does not take (blocked ones).
bool transposed_rows_any(const Mat& w, int64_t n, const float* x, int64_t ldx, int64_t R, float* y, int64_t ldy) {
  switch (w.kind) {
    case F32: transposed_rows<F32>(w, n, x, ldx, R, y, ldy); return true;
    case BF16: transposed_rows<BF16>(w, n, x, ldx, R, y, ldy); return true;
    case F16: transposed_rows<F16>(w, n, x, ldx, R, y, ldy); return true;
    case Q8: transposed_rows<Q8>(w, n, x, ldx, R, y, ldy); return true;
    case Q4: transposed_rows<Q4>(w, n, x, ldx, R, y, ldy); return true;
    default: return false;
  }
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// MLA's absorbed decode products, per head, read from kv_b_proj's rows in their stored format (never a float copy
// of W^UK or W^UV). W: [H * per_head, K]; head h uses rows h * per_head + off .. + n. x, y: [R, H, *] row-major.
// transposed == 0 (W^UV): y[r, h, j] = sum_k W_h[j, k] x[r, h, k]   (x width K, y width n)
// transposed == 1 (W^UK): y[r, h, k] = sum_j W_h[j, k] x[r, h, j]   (x width n, y width K): the head's n rows are
// widened once into a float tile (n x K, cache-sized) and summed row by row for every r.
// i8: W^UV with int8 activations where selfseek_linear_int8's rule would take them (W^UK stays float).
int heads(const Mat* w, const float* x, int64_t R, int64_t H, int64_t per_head, int64_t off, int64_t n,
          int32_t transposed, float* y, bool i8) {
  if (!valid(*w) || R < 0 || H <= 0 || n <= 0 || off < 0 || off + n > per_head || H * per_head != w->rows) return -1;
  const int64_t K = w->cols;
#pragma omp parallel if (H > 1 && R * H * n * K >= (1 << 16))
  {
    std::vector<float> tile;  // the float tile of a head's rows, for those transposed_rows does not take
#pragma omp for schedule(static)
    for (int64_t h = 0; h < H; ++h) {
      const Mat wh = rows_view(*w, h * per_head + off, n);
      if (!transposed) {
        if (i8 && takes_i8(w->kind, R))
          gemm_i8(wh, 0, n, XQBuf(x + h * K, R, H * K, K, w->kind == Q6K).rows(0), R, y + h * n, H * n);
        else
          gemm_range(wh, 0, n, x + h * K, R, H * K, y + h * n, H * n);
        continue;
      }
      if (R <= 2 && transposed_rows_any(wh, n, x + h * n, H * n, R, y + h * K, H * K)) continue;
      if (tile.empty()) tile.resize(n * K);
      dequantize_rows(wh, 0, n, tile.data());
      for (int64_t r = 0; r < R; ++r) {
        const float* xr = x + (r * H + h) * n;
        float* yr = y + (r * H + h) * K;
        std::fill(yr, yr + K, 0.f);
        for (int64_t j = 0; j < n; ++j) {
          const float a = xr[j], *t = tile.data() + j * K;
          for (int64_t k = 0; k < K; ++k) yr[k] += a * t[k];
        }
      }
    }
  }
  return 0;
}

// Fused routed experts (DeepSeekMoE): y[t] = sum_j weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)),
// e = ids[t, j]. Token-choice slots are grouped by expert with a counting sort; each active expert's gate and up
// rows are read once for all its tokens, SwiGLU is applied in place, then its down rows once; work items are
// (expert, chunk of output rows), balanced dynamically. gate/up: E x [inter, hidden], down: E x [hidden, inter].
// limit > 0 clamps SwiGLU's inputs first (DeepSeek-V4's swiglu_limit, as transformers does): gate at most limit,
// up within [-limit, limit]. i8: int8 activations where selfseek_linear_int8 would take them (an int8_kind stack, an
// expert's at most INT8_MAX_ROWS tokens). Returns 0, -1 for a malformed weight or shape, -2 for an expert id out of
// range.
int moe(const float* x, int64_t n, int64_t hidden, const int64_t* ids, const float* weights, int64_t k,
        int64_t n_experts, const Mat* gate, const Mat* up, const Mat* down, float* y, float limit, bool i8) {
  if (!valid(*gate) || !valid(*up) || !valid(*down)) return -1;
  const int64_t inter = gate->rows;
  if (gate->cols != hidden || up->cols != hidden || up->rows != inter || down->rows != hidden ||
      down->cols != inter)
    return -1;
  const int64_t S = n * k;
  std::vector<int64_t> offset(n_experts + 1, 0);
  for (int64_t s = 0; s < S; ++s) {
    if (ids[s] < 0 || ids[s] >= n_experts) return -2;
    ++offset[ids[s] + 1];
  }
  for (int64_t e = 0; e < n_experts; ++e) offset[e + 1] += offset[e];
  std::vector<int64_t> order(S), pos(S);  // order[p]: the slot at sorted position p; pos: its inverse
  {
    std::vector<int64_t> next(offset.begin(), offset.end() - 1);
    for (int64_t s = 0; s < S; ++s) {
      order[next[ids[s]]] = s;
      pos[s] = next[ids[s]]++;
    }
  }
  int64_t most = 0;  // the most tokens an expert has
  for (int64_t e = 0; e < n_experts; ++e) most = std::max(most, offset[e + 1] - offset[e]);
  // x's rows in slot order as floats, unless every gate and up product takes them as int8 (xq below)
  const bool float_x = !(i8 && takes_i8(gate->kind, most) && takes_i8(up->kind, most));
  Buf<float> xs(float_x ? S * hidden : 0), h(S * inter), u(S * inter), d(S * hidden);
  if (float_x) {
#pragma omp parallel for schedule(static) if (S * hidden >= (1 << 16))
    for (int64_t p = 0; p < S; ++p) std::memcpy(&xs[p * hidden], x + (order[p] / k) * hidden, hidden * 4);
  }
  // Rows [r0, r1) of one expert's w for its cnt tokens from sorted position p0: x's rows as int8 (q) or float (xf, K
  // wide).
  const auto product = [&](const Mat& w, int64_t r0, int64_t r1, int64_t p0, int64_t cnt,
                           const std::optional<XQBuf>& q, const float* xf, int64_t K, float* yo, int64_t ldy) {
    if (i8 && takes_i8(w.kind, cnt))
      gemm_i8(w, r0, r1, q->rows(p0), cnt, yo, ldy);
    else
      gemm_range(w, r0, r1, xf + p0 * K, cnt, K, yo, ldy);
  };
  // With int8 activations, an expert's rows of x (and of h) as int8, for the stacks int8_kind takes and experts with
  // at most INT8_MAX_ROWS tokens: x's n rows quantized once, then copied into slot order.
  std::optional<XQBuf> xq;
  if (i8 && (int8_kind(gate->kind) || int8_kind(up->kind))) {
    const bool c4 = gate->kind == Q6K || up->kind == Q6K;
    const XQBuf rows(x, n, hidden, hidden, c4);
    xq.emplace(nullptr, S, hidden, hidden, c4);
    for (int64_t p = 0; p < S; ++p) xq->copy_row(rows, order[p] / k, p);
  }

  // fn(e, r0, r1, p0, cnt) for work items (expert, rows [r0, r1) of `rows`) over the active experts, balanced
  // dynamically; the expert's cnt tokens sit from sorted position p0. With plenty of active experts (a decode batch),
  // whole experts: each weight one stream start to end (16-stream medium V3 step's experts, 11 layers: 37 -> 33 ms at
  // 1 thread, 20.4 -> 17.6 at 2); few experts: row chunks, so every thread has work.
  int64_t active = 0;
  for (int64_t e = 0; e < n_experts; ++e) active += offset[e + 1] > offset[e];
  const bool whole_experts = active >= 4 * omp_get_max_threads();
  const auto for_items = [&](int64_t rows, auto&& fn) {
    std::vector<std::pair<int64_t, int64_t>> items;
    const int64_t chunk = whole_experts ? rows
        : std::max<int64_t>(ROW_CHUNK, (rows / 8 + ROW_CHUNK - 1) / ROW_CHUNK * ROW_CHUNK);
    for (int64_t e = 0; e < n_experts; ++e)
      if (offset[e + 1] > offset[e])
        for (int64_t r = 0; r < rows; r += chunk) items.emplace_back(e, r);
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < (int64_t)items.size(); ++i) {
      const int64_t e = items[i].first, r0 = items[i].second;
      fn(e, r0, std::min(rows, r0 + chunk), offset[e], offset[e + 1] - offset[e]);
    }
  };
  for_items(inter, [&](int64_t e, int64_t r0, int64_t r1, int64_t p0, int64_t cnt) {
    product(expert(*gate, e), r0, r1, p0, cnt, xq, xs.data(), hidden, &h[p0 * inter], inter);
    product(expert(*up, e), r0, r1, p0, cnt, xq, xs.data(), hidden, &u[p0 * inter], inter);
    for (int64_t p = p0; p < p0 + cnt; ++p)
      if (limit > 0.f)
        for (int64_t c = r0; c < r1; ++c)
          h[p * inter + c] = silu(std::min(h[p * inter + c], limit)) * std::clamp(u[p * inter + c], -limit, limit);
      else
        for (int64_t c = r0; c < r1; ++c) h[p * inter + c] = silu(h[p * inter + c]) * u[p * inter + c];
  });
  std::optional<XQBuf> hq;
  if (i8 && int8_kind(down->kind)) hq.emplace(h.data(), S, inter, inter, down->kind == Q6K);
  for_items(hidden, [&](int64_t e, int64_t r0, int64_t r1, int64_t p0, int64_t cnt) {
    product(expert(*down, e), r0, r1, p0, cnt, hq, h.data(), inter, &d[p0 * hidden], hidden);
  });
  // Weighted sum per token over its k slots, in slot order.
#pragma omp parallel for schedule(static) if (S * hidden >= (1 << 16))
  for (int64_t t = 0; t < n; ++t) {
    float* yt = y + t * hidden;
    for (int64_t c = 0; c < hidden; ++c) yt[c] = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      const float wt = weights[t * k + j];
      const float* dp = &d[pos[t * k + j] * hidden];
      for (int64_t c = 0; c < hidden; ++c) yt[c] += wt * dp[c];
    }
  }
  return 0;
}
}  // namespace

extern "C" {

// y [M, N] (row stride ldy) = x [M, K] (row stride ldx) W^T. Returns 0, or -1 for a malformed weight.
int selfseek_linear(const Mat* w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy) {
  if (!valid(*w)) return -1;
  const int64_t N = w->rows, chunks = (N + ROW_CHUNK - 1) / ROW_CHUNK;
  // Small products are not worth waking the pool for.
  const bool par = M * N * w->cols >= (1 << 16) && chunks > 1;
  // Each thread one contiguous run of chunks (as schedule(static) would split them), in one call: what a call
  // works out once (the block sums of x for q4 rows, the scales widened together) is worked out once per thread.
#pragma omp parallel if (par)
  {
    const int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t c0 = chunks * t / T, c1 = chunks * (t + 1) / T;
    if (c0 < c1) gemm_range(*w, c0 * ROW_CHUNK, std::min(N, c1 * ROW_CHUNK), x, M, ldx, y, ldy);
  }
  return 0;
}

// selfseek_linear with int8 activations (see quantize_rows_i8) for q8/q4 weights and the K-quants Q4_K / Q5_K / Q6_K
// (kq_tile_i8): meant for a few rows (decode).
int selfseek_linear_i8(const Mat* w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy) {
  if (!valid(*w) || !int8_kind(w->kind)) return -1;
  const int64_t N = w->rows, K = w->cols, chunks = (N + ROW_CHUNK - 1) / ROW_CHUNK;
  const XQBuf buf(x, M, ldx, K, w->kind == Q6K);
  const XQ xq = buf.rows(0);
  const bool par = M * N * K >= (1 << 16) && chunks > 1;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n0 = c * ROW_CHUNK;
    gemm_i8(*w, n0, std::min(N, n0 + ROW_CHUNK), xq, M, y, ldy);
  }
  return 0;
}

// The row kernel with int8 activations on (kernels.entry; the native decode step's products): selfseek_linear_i8
// for its kinds up to INT8_MAX_ROWS rows of x, else selfseek_linear, so a layer's rows take one rule wherever they
// run.
int selfseek_linear_int8(const Mat* w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy) {
  const bool i8 = takes_i8(w->kind, M);
  return i8 ? selfseek_linear_i8(w, x, M, ldx, y, ldy) : selfseek_linear(w, x, M, ldx, y, ldy);
}

// The most rows of x the int8 products take at this level (INT8_MAX_ROWS).
int64_t selfseek_int8_max_rows() { return INT8_MAX_ROWS; }

// Whether this level reads Q8X16 in vectors (kernels.interleaves_q8).
int selfseek_q8x16_native() {
#if defined(__AVX512VNNI__)
  return 1;
#else
  return 0;
#endif
}

// Rows [n0, n1) of W as float32 into out [n1 - n0, K].
int selfseek_dequantize(const Mat* w, int64_t n0, int64_t n1, float* out) {
  if (!valid(*w) || n0 < 0 || n1 > w->rows || n0 > n1) return -1;
  const int64_t chunks = (n1 - n0 + ROW_CHUNK - 1) / ROW_CHUNK;
#pragma omp parallel for schedule(static) if (chunks > 1 && (n1 - n0) * w->cols >= (1 << 16))
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t a = n0 + c * ROW_CHUNK, b = std::min(n1, a + ROW_CHUNK);
    dequantize_rows(*w, a, b, out + (a - n0) * w->cols);
  }
  return 0;
}

// Rows ids[i] of W as float32 into out [n, K] (embedding lookup). Returns -2 for an id out of range.
int selfseek_gather_rows(const Mat* w, const int64_t* ids, int64_t n, float* out) {
  if (!valid(*w)) return -1;
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= w->rows) return -2;
#pragma omp parallel for schedule(static) if (n * w->cols >= (1 << 16))
  for (int64_t i = 0; i < n; ++i) dequantize_rows(*w, ids[i], ids[i] + 1, out + i * w->cols);
  return 0;
}

// heads (above) with float activations, and with int8 ones (SELFSEEK_INT8_ACTIVATIONS).
int selfseek_heads(const Mat* w, const float* x, int64_t R, int64_t H, int64_t per_head, int64_t off, int64_t n,
                   int32_t transposed, float* y) {
  return heads(w, x, R, H, per_head, off, n, transposed, y, false);
}
int selfseek_heads_int8(const Mat* w, const float* x, int64_t R, int64_t H, int64_t per_head, int64_t off, int64_t n,
                        int32_t transposed, float* y) {
  return heads(w, x, R, H, per_head, off, n, transposed, y, true);
}

// moe (above) with float activations, and with int8 ones (SELFSEEK_INT8_ACTIVATIONS: the stacks selfseek_linear_int8
// would take, for experts with at most INT8_MAX_ROWS tokens).
int selfseek_moe(const float* x, int64_t n, int64_t hidden, const int64_t* ids, const float* weights, int64_t k,
                 int64_t n_experts, const Mat* gate, const Mat* up, const Mat* down, float* y, float limit) {
  return moe(x, n, hidden, ids, weights, k, n_experts, gate, up, down, y, limit, false);
}
int selfseek_moe_int8(const float* x, int64_t n, int64_t hidden, const int64_t* ids, const float* weights, int64_t k,
                      int64_t n_experts, const Mat* gate, const Mat* up, const Mat* down, float* y, float limit) {
  return moe(x, n, hidden, ids, weights, k, n_experts, gate, up, down, y, limit, true);
}

}  // extern "C"
