// Weight-only quantized linear layers for the CPU: y = x W^T with W in 32-wide blocks.
//   q8: int8 weights, w = d * q (+ m)           (GGUF Q8_0; Q5_K/Q6_K and `selfseek quantize --bits 8`)
//   q4: 4-bit weights, two per byte, w = d * q + m  (GGUF Q4_0/Q4_1/Q4_K; `selfseek quantize --bits 4`)
// Scales and offsets are fp16 per block, as in GGUF (a q4 layer then takes 0.625 bytes per weight, q8 1.0625).
// A q4 block stores its 32 values as 16 bytes: low nibbles are values 0..15, high nibbles 16..31 (GGUF's order).
// Small batches (decode) read the packed weight once and widen it in registers against float activations
// (exact up to summation order, unlike llama.cpp's int8 activations); large batches (prefill) dequantize the
// weight once and use the BLAS sgemm.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {
constexpr int64_t QK = 32;
using half = at::Half;

// Per row of x and per block: the sum of its 32 values (what a block's offset m multiplies).
void block_sums(const float* x, int64_t M, int64_t K, float* xsum) {
  const int64_t nb = K / QK;
  for (int64_t i = 0; i < M * nb; ++i) {
    float s = 0.f;
    for (int j = 0; j < QK; ++j) s += x[i * QK + j];
    xsum[i] = s;
  }
}

#ifdef __AVX2__
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// 8 integer weights (int8 or nibbles widened to int32) times 8 float activations, accumulated.
inline __m256 fma8(__m256i q32, const float* x, __m256 acc) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(q32), _mm256_loadu_ps(x), acc);
}
#endif

// y[r, n] = sum_b d[n,b] * sum_j q[n,b,j] x[r,b,j] + m[n,b] * sum_j x[r,b,j]: float activations, so the result is
// the dequantized weight times x up to summation order (no activation rounding). Memory-bound: the weight is
// read once per row block and converted in registers.
template <bool Q4>
void qdot(const uint8_t* w, const half* ws, const half* wm, int64_t N, int64_t K, const float* x,
          const float* xsum, int64_t M, float* y) {
  const int64_t nb = K / QK, row_bytes = Q4 ? K / 2 : K;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wr = w + n * row_bytes;
      const half* d = ws + n * nb;
      const half* m = wm ? wm + n * nb : nullptr;
      for (int64_t r = 0; r < M; ++r) {
        const float* xr = x + r * K;
        float offset = 0.f;
#ifdef __AVX2__
        __m256 acc = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; ++b) {
          const float* xb = xr + b * QK;
          __m256 blk = _mm256_setzero_ps();
          if constexpr (Q4) {
            const __m128i raw = _mm_loadu_si128((const __m128i*)(wr + b * QK / 2));
            const __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
            blk = fma8(_mm256_cvtepu8_epi32(lo), xb, blk);
            blk = fma8(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), xb + 8, blk);
            blk = fma8(_mm256_cvtepu8_epi32(hi), xb + 16, blk);
            blk = fma8(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), xb + 24, blk);
          } else {
            const int8_t* q = (const int8_t*)(wr + b * QK);
            for (int k = 0; k < 4; ++k)
              blk = fma8(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + 8 * k))), xb + 8 * k, blk);
          }
          acc = _mm256_fmadd_ps(blk, _mm256_set1_ps((float)d[b]), acc);
          if (m) offset += (float)m[b] * xsum[r * nb + b];
        }
        y[r * N + n] = hsum(acc) + offset;
#else
        float acc = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
          float blk = 0.f;
          for (int j = 0; j < QK; ++j) {
            int q;
            if constexpr (Q4) {
              const uint8_t byte = wr[b * QK / 2 + (j % 16)];
              q = j < 16 ? (byte & 0x0F) : (byte >> 4);
            } else {
              q = (int8_t)wr[b * QK + j];
            }
            blk += (float)q * xr[b * QK + j];
          }
          acc += (float)d[b] * blk;
          if (m) offset += (float)m[b] * xsum[r * nb + b];
        }
        y[r * N + n] = acc + offset;
#endif
      }
    }
  });
}

template <bool Q4>
void dequantize_into(const uint8_t* w, const half* ws, const half* wm, int64_t N, int64_t K, float* out) {
  const int64_t nb = K / QK, row_bytes = Q4 ? K / 2 : K;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < nb; ++b) {
        const float d = ws[n * nb + b], m = wm ? (float)wm[n * nb + b] : 0.f;
        float* o = out + n * K + b * QK;
        for (int j = 0; j < QK; ++j) {
          int q;
          if constexpr (Q4) {
            const uint8_t byte = w[n * row_bytes + b * QK / 2 + (j % 16)];
            q = j < 16 ? (byte & 0x0F) : (byte >> 4);
          } else {
            q = (int8_t)w[n * row_bytes + b * QK + j];
          }
          o[j] = d * (float)q + m;
        }
      }
  });
}

void check(const torch::Tensor& w, const torch::Tensor& scales, const c10::optional<torch::Tensor>& mins,
           int64_t K, bool q4) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && (q4 ? w.scalar_type() == torch::kUInt8
                                                      : w.scalar_type() == torch::kInt8),
              "quantized weight must be a contiguous 2-D ", q4 ? "uint8" : "int8", " tensor");
  TORCH_CHECK(K % QK == 0, "in_features must be a multiple of 32");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous() && scales.size(0) == w.size(0) &&
              scales.size(1) == K / QK, "scales must be contiguous float16 [out, in/32]");
  if (mins) TORCH_CHECK(mins->sizes() == scales.sizes() && mins->scalar_type() == torch::kHalf &&
                        mins->is_contiguous(), "mins must match scales");
}
}  // namespace

torch::Tensor dequantize(torch::Tensor w, torch::Tensor scales, c10::optional<torch::Tensor> mins, bool q4) {
  const int64_t N = w.size(0), K = q4 ? w.size(1) * 2 : w.size(1);
  check(w, scales, mins, K, q4);
  auto out = torch::empty({N, K}, torch::kFloat);
  const half* wm = mins ? mins->data_ptr<half>() : nullptr;
  if (q4) dequantize_into<true>(w.data_ptr<uint8_t>(), scales.data_ptr<half>(), wm, N, K, out.data_ptr<float>());
  else dequantize_into<false>((const uint8_t*)w.data_ptr<int8_t>(), scales.data_ptr<half>(), wm, N, K,
                              out.data_ptr<float>());
  return out;
}

torch::Tensor linear(torch::Tensor x, torch::Tensor w, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                     bool q4, int64_t gemm_min_rows) {
  const int64_t N = w.size(0), K = q4 ? w.size(1) * 2 : w.size(1);
  check(w, scales, mins, K, q4);
  TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " features, the weight ", K);
  auto x2 = x.reshape({-1, K}).to(torch::kFloat).contiguous();
  const int64_t M = x2.size(0);
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  if (M >= gemm_min_rows)  // compute-bound: dequantize once, then BLAS
    return torch::mm(x2, dequantize(w, scales, mins, q4).t()).reshape(out_shape);
  auto xsum = torch::empty({M, K / QK}, torch::kFloat);
  const half* wm = mins ? mins->data_ptr<half>() : nullptr;
  if (wm) block_sums(x2.data_ptr<float>(), M, K, xsum.data_ptr<float>());
  auto y = torch::empty({M, N}, torch::kFloat);
  const uint8_t* wp = q4 ? w.data_ptr<uint8_t>() : (const uint8_t*)w.data_ptr<int8_t>();
  if (q4) qdot<true>(wp, scales.data_ptr<half>(), wm, N, K, x2.data_ptr<float>(), xsum.data_ptr<float>(), M,
                     y.data_ptr<float>());
  else qdot<false>(wp, scales.data_ptr<half>(), wm, N, K, x2.data_ptr<float>(), xsum.data_ptr<float>(), M,
                   y.data_ptr<float>());
  return y.reshape(out_shape);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x W^T for a block-quantized W (q8 or q4)");
  m.def("dequantize", &dequantize, "block-quantized W -> float32");
}
