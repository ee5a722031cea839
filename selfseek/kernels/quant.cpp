// CPU matrix kernels over weights kept in their storage format: y = x W^T with float activations.
//
// Weight kinds (one `Mat` describes a [rows, cols] matrix or a stack of E of them):
//   f32, bf16, f16   plain rows; 16-bit rows are widened to fp32 in registers (bf16: shift, fp16: F16C)
//   q8               int8 [rows, cols], w = d * q (+ m)             (GGUF Q8_0; Q5_K/Q6_K widened to int8)
//   q4               uint8 [rows, cols/2], w = d * q + m, q in 0..15 (GGUF Q4_0/Q4_1/Q4_K); a 32-block's 16 bytes
//                    hold values 0..15 in the low nibbles and 16..31 in the high nibbles (GGUF's order)
// Quantized kinds have fp16 d (scales) and m (mins, optional for q8) per row and 32-block.
//
// One register-tiled micro-kernel serves every kind and batch size: NR weight rows x MR activation rows per pass;
// each 32-block of a weight row is dequantized (d * q + m) in registers once and multiplied against MR rows of x,
// so the weight is read once per MR rows and never materialised (AVX-512 q4: a 16-entry table d * k + m per block,
// looked up by nibble with vpermps; one q8 row: sum q * x per block, then one multiply by d). Float activations:
// the result is the dequantized weight times x up to fp32 rounding order. Paths: AVX-512, AVX2 (+FMA, F16C),
// generic (compiler-vectorized), chosen by the build level (kernels/build.py). Threads: OpenMP over output rows
// (and (expert, row chunk) items for the fused MoE), sharing torch's libgomp pool. Large batches (prefill) are
// better served by a BLAS on dequantized tiles: selfseek/kernels/__init__.py does that from GEMM_MIN_ROWS rows on.
// Opt-in for q8/q4 and a few rows (selfseek_linear_i8, SELFSEEK_INT8_ACTIVATIONS): x quantized to int8 per 32-block
// and integer dot products (AVX-512 BW/VNNI on block pairs, AVX2 maddubs, generic scalar); approximate, see there.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {
constexpr int64_t QK = 32;
enum Kind : int32_t { F32 = 0, BF16 = 1, F16 = 2, Q8 = 3, Q4 = 4 };

struct Mat {
  int32_t kind;
  int64_t rows, cols;       // logical float shape of one matrix
  const uint8_t* data;      // matrix 0's values
  const uint16_t* scales;   // fp16 [rows, cols/32] (quantized kinds)
  const uint16_t* mins;     // fp16 [rows, cols/32] or null
  int64_t stride;           // bytes from one expert's values to the next (stacks)
  int64_t sstride;          // elements from one expert's scales/mins to the next
};

inline int64_t row_bytes(const Mat& w) {
  switch (w.kind) {
    case F32: return w.cols * 4;
    case BF16: case F16: return w.cols * 2;
    case Q8: return w.cols;
    default: return w.cols / 2;
  }
}

inline Mat expert(const Mat& w, int64_t e) {
  Mat m = w;
  m.data += e * w.stride;
  if (m.scales) m.scales += e * w.sstride;
  if (m.mins) m.mins += e * w.sstride;
  return m;
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
#if defined(__AVX512F__)
using V = __m512;
constexpr int VW = 16;
constexpr int MR_MAX = 4, NR_WIDE = 4;  // 16 accumulators of 32 registers
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset1(float f) { return _mm512_set1_ps(f); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(V v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__)
using V = __m256;
constexpr int VW = 8;
constexpr int MR_MAX = 4, NR_WIDE = 2;  // 8 accumulators + 4 weight registers of 16
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset1(float f) { return _mm256_set1_ps(f); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
struct V {
  float v[8];
};
constexpr int VW = 8;
constexpr int MR_MAX = 4, NR_WIDE = 2;
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
inline V vfma(V a, V b, V c) {
  for (int i = 0; i < 8; ++i) c.v[i] = a.v[i] * b.v[i] + c.v[i];
  return c;
}
inline float vsum(V a) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += a.v[i];
  return s;
}
#endif
constexpr int VPB = QK / VW;
constexpr int NR_ONE = 4;  // weight rows per pass for a single activation row (decode): 4 independent chains

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

// y[r, j] = sum_k W[n0 + j, k] x[r, k] for r < MR, j < NR (y row stride ldy).
// MR > 1 or offsets m: each block is dequantized (d * q + m) once and multiplied against MR rows of x.
// MR == 1 without offsets (decode, q8): sum q * x over the block first, then scale by d once (fewer operations
// per weight byte, which is what bounds a single row; an m * sum(x) term per block measured slower for q4).
template <int KIND, int MR, int NR>
void tile(const Mat& w, int64_t n0, const float* x, int64_t ldx, float* y, int64_t ldy) {
  const int64_t K = w.cols, nb = K / QK;
  const bool with_mins = w.mins != nullptr;
  Row rows[NR];
  for (int j = 0; j < NR; ++j) rows[j] = row_of(w, n0 + j);
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
        V wv[VPB];
#if defined(__AVX512F__)
        if constexpr (KIND == Q4) {  // the block's 16 weights d * k + m as a table, looked up by nibble
          const __m512 lut = _mm512_fmadd_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_ps(dq[j][b - b0]), _mm512_set1_ps(mq[j][b - b0]));
          const __m128i raw = _mm_loadu_si128((const __m128i*)(rows[j].q + b * QK / 2));
          // vpermps reads the low 4 bits of each lane: the low nibble as is, the high one after a shift
          wv[0] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(raw), lut);
          wv[1] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_srli_epi16(raw, 4)), lut);
          for (int r = 0; r < MR; ++r)
            for (int v = 0; v < VPB; ++v) acc[r][j] = vfma(wv[v], vload(xb + r * ldx + v * VW), acc[r][j]);
          continue;
        }
#endif
        load_block<KIND>(rows[j], b, wv);
        if constexpr (MR == 1 && KIND == Q8) {
          if (!with_mins) {
            V s = vzero();
            for (int v = 0; v < VPB; ++v) s = vfma(wv[v], vload(xb + v * VW), s);
            acc[0][j] = vfma(s, vset1(dq[j][b - b0]), acc[0][j]);
            continue;
          }
        }
        if constexpr (quantized(KIND)) {
          const V d = vset1(dq[j][b - b0]), m = with_mins ? vset1(mq[j][b - b0]) : vzero();
          for (int v = 0; v < VPB; ++v) wv[v] = vfma(wv[v], d, m);
        }
        for (int r = 0; r < MR; ++r)
          for (int v = 0; v < VPB; ++v) acc[r][j] = vfma(wv[v], vload(xb + r * ldx + v * VW), acc[r][j]);
      }
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

// Output columns [n0, n1) of y = x W^T for M rows of x, on the calling thread.
template <int KIND>
void gemm_range_kind(const Mat& w, int64_t n0, int64_t n1, const float* x, int64_t M, int64_t ldx, float* y,
                     int64_t ldy) {
  int64_t n = n0;
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
    default: gemm_range_kind<Q4>(w, n0, n1, x, M, ldx, y, ldy); break;
  }
}

constexpr int64_t ROW_CHUNK = 16;  // output rows per parallel work item (a multiple of NR_ONE and NR_WIDE)

bool valid(const Mat& w) {
  if (w.kind < F32 || w.kind > Q4 || w.rows < 0 || w.cols <= 0 || !w.data) return false;
  if (w.kind >= Q8) return w.cols % QK == 0 && w.scales && (w.kind == Q8 || w.mins);
  return true;
}

template <int KIND>
void dequantize_rows_kind(const Mat& w, int64_t n0, int64_t n1, float* out) {
  const int64_t K = w.cols, nb = K / QK;
  for (int64_t n = n0; n < n1; ++n) {
    const Row r = row_of(w, n);
    float* o = out + (n - n0) * K;
    for (int64_t b = 0; b < nb; ++b) {
      V wv[VPB];
      load_block<KIND>(r, b, wv);
      if constexpr (quantized(KIND)) {
        const V d = vset1(half_to_float(r.d[b])), m = r.m ? vset1(half_to_float(r.m[b])) : vzero();
        for (int v = 0; v < VPB; ++v) wv[v] = vfma(wv[v], d, m);
      }
      std::memcpy(o + b * QK, wv, sizeof(wv));
    }
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
    default: dequantize_rows_kind<Q4>(w, n0, n1, out); break;
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
  int64_t K, nb;
};

void quantize_rows_i8(const float* x, int64_t M, int64_t ldx, int64_t K, int8_t* q, float* d, float* s) {
  const int64_t nb = K / QK;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + r * ldx + b * QK;
      float amax = 0.f, sum = 0.f;
      for (int j = 0; j < QK; ++j) {
        amax = std::max(amax, std::fabs(xb[j]));
        sum += xb[j];
      }
      const float dx = amax / 127.f, inv = amax > 0.f ? 1.f / dx : 0.f;
      for (int j = 0; j < QK; ++j) q[r * K + b * QK + j] = (int8_t)std::nearbyint(xb[j] * inv);
      d[r * nb + b] = dx;
      s[r * nb + b] = sum;
    }
}

#if defined(__AVX2__)
// One weight block as the unsigned operand of u8 x s8 dot products: q4 nibbles as they are (0..15); q8 |w|,
// with w's sign moved onto x (`sgn`) since the instructions take only one signed operand.
struct WBlock {
  __m256i u, sgn;
};
using IAcc = __m256;
inline IAcc iacc_zero() { return _mm256_setzero_ps(); }
inline float iacc_sum(IAcc v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
template <int KIND>
inline WBlock wblock(const Row& r, int64_t b) {
  if constexpr (KIND == Q4) {
    const __m128i raw = _mm_loadu_si128((const __m128i*)(r.q + b * QK / 2));
    const __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
    return {_mm256_set_m128i(hi, lo), _mm256_setzero_si256()};
  } else {
    const __m256i w = _mm256_loadu_si256((const __m256i*)(r.q + b * QK));
    return {_mm256_sign_epi8(w, w), w};
  }
}
// acc += s * (the block's integer dot product, as 8 partial sums)
template <int KIND>
inline IAcc idot_fma(const WBlock& w, const int8_t* xq, float s, IAcc acc) {
  __m256i x = _mm256_loadu_si256((const __m256i*)xq);
  if constexpr (KIND == Q8) x = _mm256_sign_epi8(x, w.sgn);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w.u, x);
#else  // |products| <= 2 * 128 * 127: the 16-bit pair sums never saturate
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
template <int KIND>
inline WBlock wblock(const Row& r, int64_t b) {
  WBlock w;
  for (int j = 0; j < QK; ++j) {
    if constexpr (KIND == Q8) w.v[j] = (int8_t)r.q[b * QK + j];
    else w.v[j] = j < 16 ? (r.q[b * QK / 2 + j] & 0x0F) : (r.q[b * QK / 2 + j - 16] >> 4);
  }
  return w;
}
template <int KIND>
inline IAcc idot_fma(const WBlock& w, const int8_t* xq, float s, IAcc acc) {
  int32_t dot = 0;
  for (int j = 0; j < QK; ++j) dot += w.v[j] * xq[j];
  return acc + s * (float)dot;
}
#endif

#if defined(__AVX512BW__)
// Two consecutive blocks in one 512-bit register (lanes 0..7 of the dot products: block b, 8..15: block b + 1).
struct WPair {
  __m512i u;
  __mmask64 neg;  // q8: the negative weights, whose x is negated (no 512-bit vpsignb)
};
template <int KIND>
inline WPair wpair(const Row& r, int64_t b) {
  if constexpr (KIND == Q4) {
    const __m256i raw = _mm256_loadu_si256((const __m256i*)(r.q + b * QK / 2));
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
    // 128-bit lanes low b, low b+1, high b, high b+1 -> b's values 0..15, 16..31, then b+1's
    return {_mm512_and_si512(_mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(3, 1, 2, 0)), _mm512_set1_epi8(0x0F)), 0};
  } else {
    const __m512i w = _mm512_loadu_si512(r.q + b * QK);
    return {_mm512_abs_epi8(w), _mm512_movepi8_mask(w)};
  }
}
// acc += the pair's integer dot products, each block's lanes times its scale (sc[0], sc[1])
template <int KIND>
inline __m512 ipair_fma(const WPair& w, const int8_t* xq, const float* sc, __m512 acc) {
  __m512i x = _mm512_loadu_si512(xq);
  if constexpr (KIND == Q8) x = _mm512_mask_sub_epi8(x, w.neg, _mm512_setzero_si512(), x);
#if defined(__AVX512VNNI__)
  const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.u, x);
#else
  const __m512i dot = _mm512_madd_epi16(_mm512_maddubs_epi16(w.u, x), _mm512_set1_epi16(1));
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

// y[r, j] for x rows r0 .. r0 + MR and weight rows n0 .. n0 + NR: each weight block unpacked once per MR rows.
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
        const WPair wp = wpair<KIND>(rows[j], b);
        for (int r = 0; r < MR; ++r)
          acc2[r][j] = ipair_fma<KIND>(wp, x.q + (r0 + r) * x.K + b * QK, &sc[r][j][b - b0], acc2[r][j]);
      }
#endif
    for (; b < b0 + bc; ++b)
      for (int j = 0; j < NR; ++j) {
        const WBlock wb = wblock<KIND>(rows[j], b);
        for (int r = 0; r < MR; ++r)
          acc[r][j] = idot_fma<KIND>(wb, x.q + (r0 + r) * x.K + b * QK, sc[r][j][b - b0], acc[r][j]);
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

template <int KIND>
void gemm_range_i8(const Mat& w, int64_t n0, int64_t n1, const XQ& x, int64_t M, float* y, int64_t ldy) {
  int64_t n = n0;
  if (M == 1) {
    for (; n + NR_ONE <= n1; n += NR_ONE) tile_i8<KIND, 1, NR_ONE>(w, n, x, 0, y, ldy);
  } else {
    for (; n + 2 <= n1; n += 2) rows_tile_i8<KIND, 2>(w, n, x, M, y, ldy);
  }
  for (; n < n1; ++n) rows_tile_i8<KIND, 1>(w, n, x, M, y, ldy);
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }
}  // namespace

extern "C" {

// y [M, N] (row stride ldy) = x [M, K] (row stride ldx) W^T. Returns 0, or -1 for a malformed weight.
int selfseek_linear(const Mat* w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy) {
  if (!valid(*w)) return -1;
  const int64_t N = w->rows, chunks = (N + ROW_CHUNK - 1) / ROW_CHUNK;
  // Small products are not worth waking the pool for.
  const bool par = M * N * w->cols >= (1 << 16) && chunks > 1;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t c = 0; c < chunks; ++c)
    gemm_range(*w, c * ROW_CHUNK, std::min(N, (c + 1) * ROW_CHUNK), x, M, ldx, y, ldy);
  return 0;
}

// selfseek_linear with int8 activations (see quantize_rows_i8) for q8/q4 weights: meant for a few rows (decode).
int selfseek_linear_i8(const Mat* w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy) {
  if (!valid(*w) || (w->kind != Q8 && w->kind != Q4)) return -1;
  const int64_t N = w->rows, K = w->cols, nb = K / QK, chunks = (N + ROW_CHUNK - 1) / ROW_CHUNK;
  std::vector<int8_t> q(M * K);
  std::vector<float> d(M * nb), s(M * nb);
  quantize_rows_i8(x, M, ldx, K, q.data(), d.data(), s.data());
  const XQ xq{q.data(), d.data(), s.data(), K, nb};
  const bool par = M * N * K >= (1 << 16) && chunks > 1;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n0 = c * ROW_CHUNK, n1 = std::min(N, n0 + ROW_CHUNK);
    if (w->kind == Q8) gemm_range_i8<Q8>(*w, n0, n1, xq, M, y, ldy);
    else gemm_range_i8<Q4>(*w, n0, n1, xq, M, y, ldy);
  }
  return 0;
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

// Fused routed experts (DeepSeekMoE): y[t] = sum_j weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)),
// e = ids[t, j]. Token-choice slots are grouped by expert with a counting sort; each active expert's gate and up
// rows are read once for all its tokens, SwiGLU is applied in place, then its down rows once; work items are
// (expert, chunk of output rows), balanced dynamically. gate/up: E x [inter, hidden], down: E x [hidden, inter].
// Returns 0, -1 for a malformed weight or shape, -2 for an expert id out of range.
int selfseek_moe(const float* x, int64_t n, int64_t hidden, const int64_t* ids, const float* weights, int64_t k,
                 int64_t n_experts, const Mat* gate, const Mat* up, const Mat* down, float* y) {
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
  std::vector<float> xs(S * hidden), h(S * inter), u(S * inter), d(S * hidden);
#pragma omp parallel for schedule(static) if (S * hidden >= (1 << 16))
  for (int64_t p = 0; p < S; ++p) std::memcpy(&xs[p * hidden], x + (order[p] / k) * hidden, hidden * 4);

  // Work items: (expert, first output row) over the active experts.
  auto items_for = [&](int64_t rows) {
    std::vector<std::pair<int64_t, int64_t>> items;
    const int64_t chunk = std::max<int64_t>(ROW_CHUNK, (rows / 8 + ROW_CHUNK - 1) / ROW_CHUNK * ROW_CHUNK);
    for (int64_t e = 0; e < n_experts; ++e)
      if (offset[e + 1] > offset[e])
        for (int64_t r = 0; r < rows; r += chunk) items.emplace_back(e, r);
    return std::make_pair(items, chunk);
  };
  auto [up_items, up_chunk] = items_for(inter);
  const int64_t n_up = (int64_t)up_items.size();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n_up; ++i) {
    const auto [e, r0] = up_items[i];
    const int64_t r1 = std::min(inter, r0 + up_chunk), p0 = offset[e], cnt = offset[e + 1] - p0;
    const Mat g = expert(*gate, e), uu = expert(*up, e);
    gemm_range(g, r0, r1, &xs[p0 * hidden], cnt, hidden, &h[p0 * inter], inter);
    gemm_range(uu, r0, r1, &xs[p0 * hidden], cnt, hidden, &u[p0 * inter], inter);
    for (int64_t p = p0; p < p0 + cnt; ++p)
      for (int64_t c = r0; c < r1; ++c) h[p * inter + c] = silu(h[p * inter + c]) * u[p * inter + c];
  }
  auto [down_items, down_chunk] = items_for(hidden);
  const int64_t n_down = (int64_t)down_items.size();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n_down; ++i) {
    const auto [e, r0] = down_items[i];
    const int64_t r1 = std::min(hidden, r0 + down_chunk), p0 = offset[e], cnt = offset[e + 1] - p0;
    gemm_range(expert(*down, e), r0, r1, &h[p0 * inter], cnt, inter, &d[p0 * hidden], hidden);
  }
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

}  // extern "C"
