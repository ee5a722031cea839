// Fused small ops of the decode step (kernels/fused_ops.py binds them): residual add + RMSNorm and rotary in place.
//
// A decode step of a small model is hundreds of tiny elementwise ops, each a few microseconds of dispatch for
// a few hundred floats of work; these do the same arithmetic in one call each. float32 only.
// Vector paths: the reductions keep LANES independent partial sums (lane i sums elements i, i + LANES, ...),
// which the compiler turns into AVX-512 / AVX2 registers per build level (kernels/build.py) without reassociating
// any one sum, so every level gives the same bits; the generic build runs the same loop on scalars.
// No FMA contraction: a*c - b*s rounds each product as torch's eager ops do, so rotary matches them bit for bit.

#include <cmath>
#include <cstdint>

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

static constexpr int LANES = 16;  // one AVX-512 register, two AVX2 ones: the same partial sums on every level

// sum of squares of v[0..n) in LANES partial sums, then the partials added in order
static inline float sum_squares(const float* v, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += v[i + l] * v[i + l];
    for (int l = 0; i + l < n; l++) acc[l] += v[i + l] * v[i + l];
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

extern "C" {

// For each of `rows` rows of `dim` floats: h = residual (+ x when x is not null), written back to residual
// when x is given; out = h * (1 / sqrt(mean(h^2) + eps)) * w. Row strides in floats (out's is `dim`).
// out may be x (in place) but not residual.
void selfseek_add_rms_norm(float* residual, int64_t res_stride, const float* x, int64_t x_stride, const float* w,
                           float* out, int64_t rows, int64_t dim, float eps) {
#pragma omp parallel for if (rows >= 16)
    for (int64_t r = 0; r < rows; r++) {
        float* h = residual + r * res_stride;
        if (x != nullptr) {
            const float* xr = x + r * x_stride;
            for (int64_t i = 0; i < dim; i++) h[i] += xr[i];
        }
        const float scale = 1.0f / std::sqrt(sum_squares(h, dim) / (float)dim + eps);
        float* o = out + r * dim;
        for (int64_t i = 0; i < dim; i++) o[i] = h[i] * scale * w[i];
    }
}

// Rotary embedding on `rows` rows of `heads` heads of `dim` floats; x at row stride xs_r and head stride xs_h (each
// head's values contiguous), the result written to y at ys_r / ys_h (y may be x: in place). cos/sin [rows, dim/2].
// interleaved: pairs (x[2i], x[2i+1]) (DeepSeek MLA); else rotate-half pairs (x[i], x[i + dim/2]) (Llama):
//   y1 = x1 cos - x2 sin,  y2 = x2 cos + x1 sin.
void selfseek_rope(const float* x, int64_t xs_r, int64_t xs_h, float* y, int64_t ys_r, int64_t ys_h, int64_t rows,
                   int64_t heads, int64_t dim, const float* cos, const float* sin, int32_t interleaved) {
    const int64_t half = dim / 2;
    const int64_t step = interleaved ? 2 : 1, off = interleaved ? 1 : half;  // where pair i's two values sit
#pragma omp parallel for if (rows >= 16)
    for (int64_t r = 0; r < rows; r++) {
        const float* c = cos + r * half;
        const float* s = sin + r * half;
        for (int64_t h = 0; h < heads; h++) {
            const float* xh = x + r * xs_r + h * xs_h;
            float* yh = y + r * ys_r + h * ys_h;
            for (int64_t i = 0; i < half; i++) {
                const float a = xh[i * step], b = xh[i * step + off];
                yh[i * step] = a * c[i] - b * s[i];
                yh[i * step + off] = b * c[i] + a * s[i];
            }
        }
    }
}

}  // extern "C"
