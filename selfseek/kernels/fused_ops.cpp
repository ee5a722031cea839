// Fused small ops of the decode step (kernels/fused_ops.py binds them): residual add + RMSNorm, rotary in place, and
// DeepSeek-V4's hyper-connection (mHC) weights, Sinkhorn-Knopp projection and stream mixing, and its attention
// over one shared K = V head with per-head sinks.
//
// A decode step of a small model is hundreds of tiny elementwise ops, each a few microseconds of dispatch for
// a few hundred floats of work; these do the same arithmetic in one call each. float32 only.
// Vector paths: the reductions keep LANES independent partial sums (lane i sums elements i, i + LANES, ...),
// which the compiler turns into AVX-512 / AVX2 registers per build level (kernels/build.py) without reassociating
// any one sum, so every level gives the same bits; the generic build runs the same loop on scalars.
// No FMA contraction: a*c - b*s rounds each product as torch's eager ops do, so rotary matches them bit for bit.

#include <cmath>
#include <cstdint>
#include <vector>

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

// dot product of a[0..n) and b[0..n) in LANES partial sums (as sum_squares)
static inline float dot(const float* a, const float* b, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    for (int l = 0; i + l < n; l++) acc[l] += a[i + l] * b[i + l];
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


static inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

static constexpr int64_t HC_MAX = 16;  // streams (hc_mult) the hyper-connection kernels take; the wrapper checks

// mHC weights of `rows` rows of n streams of m floats (streams [rows, n, m] contiguous) from mix [rows, (2 + n) n],
// the streams' flattened rows times fn^T BEFORE the unweighted RMSNorm (its factor is applied here):
//   pre = sigmoid(mix_pre s0 + b) + hc_eps,  post = 2 sigmoid(mix_post s1 + b),
//   comb = softmax_k(mix_comb[j, k] s2 + b) + hc_eps, then Sinkhorn-Knopp: columns, then (rows, columns) x (iters - 1),
//   each divided by (its sum + hc_eps);  collapsed = sum_j pre_j X_j.
// Writes post [rows, n], comb [rows, n, n] (row j: from stream j) and collapsed [rows, m].
void selfseek_hc_pre(const float* mix, const float* streams, const float* base, const float* scale, int64_t rows,
                     int64_t n, int64_t m, float norm_eps, float hc_eps, int64_t iters, float* post, float* comb,
                     float* collapsed) {
    const int64_t width = (2 + n) * n;
#pragma omp parallel for if (rows >= 16)
    for (int64_t r = 0; r < rows; r++) {
        const float* x = streams + r * n * m;
        const float* z = mix + r * width;
        const float norm = 1.0f / std::sqrt(sum_squares(x, n * m) / (float)(n * m) + norm_eps);
        float pre[HC_MAX];
        float* p = post + r * n;
        for (int64_t i = 0; i < n; i++) {
            pre[i] = sigmoid(z[i] * norm * scale[0] + base[i]) + hc_eps;
            p[i] = 2.0f * sigmoid(z[n + i] * norm * scale[1] + base[n + i]);
        }
        float* c = comb + r * n * n;
        for (int64_t j = 0; j < n; j++) {  // softmax over each row j
            float* cj = c + j * n;
            float mx = -INFINITY;
            for (int64_t k = 0; k < n; k++) {
                cj[k] = z[2 * n + j * n + k] * norm * scale[2] + base[2 * n + j * n + k];
                mx = cj[k] > mx ? cj[k] : mx;
            }
            float sum = 0.0f;
            for (int64_t k = 0; k < n; k++) sum += (cj[k] = std::exp(cj[k] - mx));
            for (int64_t k = 0; k < n; k++) cj[k] = cj[k] / sum + hc_eps;
        }
        for (int64_t it = 0; it < (iters > 1 ? iters : 1); it++) {  // columns first even with iters < 1, as torch
            if (it > 0)
                for (int64_t j = 0; j < n; j++) {
                    float s = 0.0f;
                    for (int64_t k = 0; k < n; k++) s += c[j * n + k];
                    for (int64_t k = 0; k < n; k++) c[j * n + k] /= s + hc_eps;
                }
            for (int64_t k = 0; k < n; k++) {
                float s = 0.0f;
                for (int64_t j = 0; j < n; j++) s += c[j * n + k];
                for (int64_t j = 0; j < n; j++) c[j * n + k] /= s + hc_eps;
            }
        }
        float* o = collapsed + r * m;
        for (int64_t i = 0; i < m; i++) o[i] = 0.0f;
        for (int64_t j = 0; j < n; j++)
            for (int64_t i = 0; i < m; i++) o[i] += pre[j] * x[j * m + i];
    }
}

// The streams after a block: out[r, k] = post[r, k] y[r] + sum_j comb[r, j, k] X[r, j] (streams, out [rows, n, m]
// contiguous, y [rows, m] at row stride y_stride; out may not alias streams).
void selfseek_hc_post(const float* post, const float* comb, const float* streams, const float* y, int64_t y_stride,
                      int64_t rows, int64_t n, int64_t m, float* out) {
#pragma omp parallel for if (rows >= 16)
    for (int64_t r = 0; r < rows; r++) {
        const float* x = streams + r * n * m;
        const float* c = comb + r * n * n;
        const float* yr = y + r * y_stride;
        for (int64_t k = 0; k < n; k++) {
            float* o = out + (r * n + k) * m;
            for (int64_t i = 0; i < m; i++) o[i] = 0.0f;
            for (int64_t j = 0; j < n; j++) {
                const float w = c[j * n + k];
                const float* xj = x + j * m;
                for (int64_t i = 0; i < m; i++) o[i] += w * xj[i];
            }
            const float pk = post[r * n + k];
            for (int64_t i = 0; i < m; i++) o[i] = pk * yr[i] + o[i];
        }
    }
}


// Attention of `rows` query rows of `heads` heads (q [rows, heads, dim]) over one shared K = V head: kv [t, dim] for
// every row where visible[r, j] (uint8 [rows, t]; null: everywhere), plus each row's own keys own [rows, k, dim]
// where valid[r, j] (null own: none; null valid: all). Per-head sinks join each softmax's denominator:
//   a_j = exp(s z_j - M) / (sum_j' exp(s z_j' - M) + exp(sink_h - M)),  out = sum_j a_j v_j  (M: the largest term).
// All contiguous float32; out [rows, heads, dim].
void selfseek_sink_attention(const float* q, int64_t rows, int64_t heads, int64_t dim, const float* kv, int64_t t,
                             const uint8_t* visible, const float* own, int64_t k, const uint8_t* valid,
                             const float* sinks, float scale, float* out) {
#pragma omp parallel for if (rows * heads >= 16)
    for (int64_t rh = 0; rh < rows * heads; rh++) {
        const int64_t r = rh / heads, h = rh % heads;
        const float* qv = q + rh * dim;
        const float* mine = own == nullptr ? nullptr : own + r * k * dim;
        const int64_t n = t + (own == nullptr ? 0 : k);
        std::vector<float> z(n);
        float mx = sinks[h];
        for (int64_t j = 0; j < n; j++) {
            const bool seen = j < t ? visible == nullptr || visible[r * t + j]
                                    : valid == nullptr || valid[r * k + j - t];
            z[j] = seen ? dot(qv, j < t ? kv + j * dim : mine + (j - t) * dim, dim) * scale : -INFINITY;
            mx = z[j] > mx ? z[j] : mx;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < n; j++) sum += (z[j] = std::exp(z[j] - mx));
        sum += std::exp(sinks[h] - mx);
        float* o = out + rh * dim;
        for (int64_t i = 0; i < dim; i++) o[i] = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            if (z[j] == 0.0f) continue;  // masked (or underflowed): adds nothing
            const float a = z[j] / sum;
            const float* v = j < t ? kv + j * dim : mine + (j - t) * dim;
            for (int64_t i = 0; i < dim; i++) o[i] += a * v[i];
        }
    }
}

}  // extern "C"
