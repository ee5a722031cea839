// Fused small ops of the decode step (kernels/fused_ops.py binds them): residual add + RMSNorm, rotary in place,
// SwiGLU's silu(gate) * up, DeepSeek-V4's hyper-connection (mHC) weights, Sinkhorn-Knopp projection and stream
// mixing, and its attention over one shared K = V head with per-head sinks; and the decode step of Llama-shaped
// layers as one call (selfseek_gqa_layers, models/native_step.py).
//
// A decode step of a small model is hundreds of tiny elementwise ops, each a few microseconds of dispatch for
// a few hundred floats of work; these do the same arithmetic in one call each. float32 only.
// Vector paths: the reductions keep LANES independent partial sums (lane i sums elements i, i + LANES, ...),
// which the compiler turns into AVX-512 / AVX2 registers per build level (kernels/build.py) without reassociating
// any one sum, so every level gives the same bits; the generic build runs the same loop on scalars.
// No FMA contraction: a*c - b*s rounds each product as torch's eager ops do, so rotary matches them bit for bit.

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "buf.h"
#include "vec16.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

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


// SwiGLU's silu(g) * u = g / (1 + e^-g) * u, e^-g by the Cephes polynomial (about 1 ulp, as paged attention's
// softmax). Each step is one IEEE operation, the FMAs explicit (std::fma in the scalar form), so the vector and scalar
// forms, and every build level, give the same bits.
static inline float silu_mul_one(float g, float u) {
    float v = std::fmax(std::fmin(-g, 88.3762626647949f), -88.3762626647949f);
    const float fx = std::floor(std::fma(v, 1.44269504088896341f, 0.5f));
    v = std::fma(-fx, 0.693359375f, v);
    v = std::fma(-fx, -2.12194440e-4f, v);
    float y = 1.9875691500E-4f;
    y = std::fma(y, v, 1.3981999507E-3f);
    y = std::fma(y, v, 8.3334519073E-3f);
    y = std::fma(y, v, 4.1665795894E-2f);
    y = std::fma(y, v, 1.6666665459E-1f);
    y = std::fma(y, v, 5.0000001201E-1f);
    y = std::fma(y, v * v, v) + 1.0f;
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(fx) + 127) << 23;
    float e;
    std::memcpy(&e, &bits, 4);
    return g / (1.0f + y * e) * u;
}

#if defined(__AVX2__)
static inline __m256 silu_mul8(__m256 g, __m256 u) {
    __m256 v = _mm256_max_ps(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), _mm256_set1_ps(88.3762626647949f)),
                             _mm256_set1_ps(-88.3762626647949f));
    const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(v, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    v = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), v);
    v = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), v);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    for (const float c : {1.3981999507E-3f, 8.3334519073E-3f, 4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f})
        y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(c));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(v, v), v), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
    return _mm256_mul_ps(_mm256_div_ps(g, den), u);
}
#endif

// out[r, i] = silu(gu[r, i]) * gu[r, inter + i] for `rows` rows of gu (row stride gu_stride), out [rows, inter].
static void silu_mul_rows(const float* gu, int64_t gu_stride, float* out, int64_t rows, int64_t inter) {
    for (int64_t r = 0; r < rows; r++) {
        const float* g = gu + r * gu_stride;
        const float* u = g + inter;
        float* o = out + r * inter;
        int64_t i = 0;
#if defined(__AVX2__)
        for (; i + 8 <= inter; i += 8) _mm256_storeu_ps(o + i, silu_mul8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
#endif
        for (; i < inter; i++) o[i] = silu_mul_one(g[i], u[i]);
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

void selfseek_silu_mul(const float* gu, int64_t gu_stride, float* out, int64_t rows, int64_t inter) {
    silu_mul_rows(gu, gu_stride, out, rows, inter);
}

// ---------------------------------------------------------------- a decode step's layers, one call
// models/native_step.py's layer loop (_GQA.run or _MLA.run, then _Dense.run or _MoE.run: the same kernels with the same
// arguments in the same order), here so that a step is one call instead of ten to thirty per layer from Python, each
// with its tensor views: ~90 us of glue per Llama layer, a sixth of the default model's step at 1 thread. The router
// is routing.cpp's selfseek_gate, which models/moe.py's Gate calls too (the same sums, so the same experts). The
// products, per-head products, router, fused experts and attention are the other libraries' kernels, reached through
// the pointers the caller passes. Errors: -(1000000 + layer) where a kernel refused its arguments.
typedef int32_t (*LinearFn)(const void* mat, const float* x, int64_t rows, int64_t ldx, float* y, int64_t ldy);
typedef int32_t (*HeadsFn)(const void* mat, const float* x, int64_t rows, int64_t heads, int64_t per_head, int64_t off,
                           int64_t n, int32_t transposed, float* y);
typedef int32_t (*MoeFn)(const float* x, int64_t rows, int64_t hidden, const int64_t* ids, const float* weights,
                         int64_t k, int64_t n_experts, const void* gate, const void* up, const void* down, float* y,
                         float limit);
typedef int32_t (*GateFn)(const float* x, int64_t n, int64_t hidden, const float* w, int32_t scoring,
                          const float* bias, int64_t n_experts, int32_t method, int64_t n_group, int64_t topk_group,
                          int64_t top_k, int32_t norm, float route_scale, float* weights, int64_t* ids);
typedef int32_t (*AttentionFn)(const float* q, float* out, int64_t num_rows, const void* k_cache, int64_t k_slot_stride,
                               int64_t k_head_stride, const void* v_cache, int64_t v_slot_stride, int64_t v_head_stride,
                               int32_t dtype, const int32_t* block_tables, int64_t table_stride, int32_t block_size,
                               const int32_t* cu_q, const int32_t* context_lens, int32_t num_seqs, int32_t n_kv,
                               int32_t group, int32_t k_dim, int32_t v_dim, float scale, int32_t n_threads,
                               const float* k_scales, const float* v_scales, int64_t scale_slot_stride,
                               int64_t scale_head_stride, int32_t scale_tile);

struct HeadProduct {  // mla.py's HeadProduct: head h uses rows h * per_head + off .. + n of the view
    const void* view;
    int64_t per_head, off, n;
    int32_t transposed;
};

struct DecodeLayer {
    const float *in_norm, *post_norm;
    float in_eps, post_eps;
    float* pool;  // fp32 cache rows: GQA [slots, 2, n_kv, head_dim], MLA [slots, latent + rope]
    int32_t mla, moe;
    float scale;
    int32_t interleaved;
    // GQA: [q; k; v] rows and o; heads, KV heads and head dim
    const void *qkv, *o;
    int64_t heads, n_kv, head_dim;
    // MLA: [q_a; c_KV; k_rope] rows (down), q_b, the two norms, W^UK and W^UV per head; o above
    const void *down, *q_b;
    const float *q_norm, *kv_norm;
    float q_eps, kv_eps;
    HeadProduct uk, uv;
    int64_t nope, rope, v_dim, latent, q_lora;
    // SwiGLU MLP (the dense layer, or the routed layer's shared experts when gate_up is set)
    const void *gate_up, *mlp_down;
    int64_t inter;
    // routed experts: stacks, count, top-k; the router (selfseek_gate's arguments: weight [n_experts, hidden], noaux_tc's
    // bias or null, scoring 0 softmax / 1 sigmoid, routing.cpp's method code)
    const void *e_gate, *e_up, *e_down;
    int64_t n_experts, top_k;
    const float *router, *router_bias;
    int32_t scoring, method;
    int64_t n_group, topk_group;
    int32_t norm;
    float route_scale;
};

struct DecodeStep {
    LinearFn linear;
    AttentionFn attention;
    HeadsFn heads;
    MoeFn moe;
    GateFn gate;
    double* timings;  // null, or seconds added per layer: [attention, router, MLP or experts] (bench --profile)
    int64_t rows, hidden;
    const float *cos, *sin;  // [rows, rotary dim / 2]
    const int64_t* slots;    // each row's cache slot
    const int32_t *block_tables, *cu_q, *context_lens;
    int64_t table_stride;
    int32_t block_size, num_seqs, n_threads;
    // the attention kernel's view of every layer's pool (they share shapes): floats from the pool's start
    int64_t k_slot_stride, k_head_stride, v_offset, v_slot_stride, v_head_stride;
};

namespace {
struct Fail {};  // a kernel refused its arguments: unwinds to the exported function, which returns the code

void ok(int32_t rc) {
    if (rc != 0) throw Fail{};
}

// q [T, n_kv, group, k_dim] against layer L's pool -> out [T, n_kv, group, v_dim]
void attend(const DecodeStep& s, const DecodeLayer& L, const float* q, float* out, int64_t n_kv, int64_t group,
            int64_t k_dim, int64_t v_dim) {
    ok(s.attention(q, out, s.rows, L.pool, s.k_slot_stride, s.k_head_stride, L.pool + s.v_offset, s.v_slot_stride,
                   s.v_head_stride, 0, s.block_tables, s.table_stride, s.block_size, s.cu_q, s.context_lens,
                   s.num_seqs, static_cast<int32_t>(n_kv), static_cast<int32_t>(group), static_cast<int32_t>(k_dim),
                   static_cast<int32_t>(v_dim), L.scale, s.n_threads, nullptr, nullptr, 0, 0, 0));
}

void store_rows(const DecodeStep& s, float* pool, const float* rows, int64_t stride, int64_t n) {
    for (int64_t t = 0; t < s.rows; t++) std::memcpy(pool + s.slots[t] * n, rows + t * stride, n * sizeof(float));
}

// _GQA.run: x [T, hidden] -> a [T, hidden]
void gqa(const DecodeStep& s, const DecodeLayer& L, const float* x, float* a) {
    const int64_t T = s.rows, H = L.heads, K = L.n_kv, d = L.head_dim, nqkv = (H + 2 * K) * d;
    Buf<float> qkv(T * nqkv), q(T > 1 ? T * H * d : 0), o(T * H * d);
    ok(s.linear(L.qkv, x, T, s.hidden, qkv.data(), nqkv));
    selfseek_rope(qkv.data(), nqkv, d, qkv.data(), nqkv, d, T, H + K, d, s.cos, s.sin, L.interleaved);  // q and k
    store_rows(s, L.pool, qkv.data() + H * d, nqkv, 2 * K * d);  // k, v
    const float* qp = qkv.data();
    if (T > 1) {  // the kernel takes q contiguous
        for (int64_t t = 0; t < T; t++) std::memcpy(q.data() + t * H * d, qkv.data() + t * nqkv, H * d * sizeof(float));
        qp = q.data();
    }
    attend(s, L, qp, o.data(), K, H / K, d, d);
    ok(s.linear(L.o, o.data(), T, H * d, a, s.hidden));
}

// _MLA.run: x [T, hidden] -> a [T, hidden]
void mla(const DecodeStep& s, const DecodeLayer& L, const float* x, float* a) {
    const int64_t T = s.rows, h = L.heads, d = L.nope, r = L.rope, c = L.latent, ql = L.q_lora, nd = ql + c + r;
    Buf<float> down(T * nd), q_c(T * ql), q(T * h * (d + r)), q_rope(T * h * r), latent(T * c),
        kv(T * (c + r)), q_nope(T * h * d), q_lat(T * h * c), q_att(T * h * (c + r)), o_lat(T * h * c),
        o(T * h * L.v_dim);
    ok(s.linear(L.down, x, T, s.hidden, down.data(), nd));  // [q_a; c_KV; k_rope]
    selfseek_add_rms_norm(down.data(), nd, nullptr, 0, L.q_norm, q_c.data(), T, ql, L.q_eps);
    ok(s.linear(L.q_b, q_c.data(), T, ql, q.data(), h * (d + r)));
    selfseek_rope(q.data() + d, h * (d + r), d + r, q_rope.data(), h * r, r, T, h, r, s.cos, s.sin, L.interleaved);
    selfseek_add_rms_norm(down.data() + ql, nd, nullptr, 0, L.kv_norm, latent.data(), T, c, L.kv_eps);
    for (int64_t t = 0; t < T; t++) std::memcpy(kv.data() + t * (c + r), latent.data() + t * c, c * sizeof(float));
    selfseek_rope(down.data() + ql + c, nd, r, kv.data() + c, c + r, r, T, 1, r, s.cos, s.sin, L.interleaved);
    store_rows(s, L.pool, kv.data(), c + r, c + r);
    for (int64_t i = 0; i < T * h; i++) std::memcpy(q_nope.data() + i * d, q.data() + i * (d + r), d * sizeof(float));
    ok(s.heads(L.uk.view, q_nope.data(), T, h, L.uk.per_head, L.uk.off, L.uk.n, L.uk.transposed, q_lat.data()));
    for (int64_t i = 0; i < T * h; i++) {  // [q_latent; q_rope]
        std::memcpy(q_att.data() + i * (c + r), q_lat.data() + i * c, c * sizeof(float));
        std::memcpy(q_att.data() + i * (c + r) + c, q_rope.data() + i * r, r * sizeof(float));
    }
    attend(s, L, q_att.data(), o_lat.data(), 1, h, c + r, c);
    ok(s.heads(L.uv.view, o_lat.data(), T, h, L.uv.per_head, L.uv.off, L.uv.n, L.uv.transposed, o.data()));
    ok(s.linear(L.o, o.data(), T, h * L.v_dim, a, s.hidden));
}

// _Dense.run: y = down(silu(gate x) * up x)
void dense(const DecodeStep& s, const DecodeLayer& L, const float* x, float* y) {
    const int64_t T = s.rows;
    Buf<float> gu(T * 2 * L.inter), act(T * L.inter);
    ok(s.linear(L.gate_up, x, T, s.hidden, gu.data(), 2 * L.inter));
    silu_mul_rows(gu.data(), 2 * L.inter, act.data(), T, L.inter);
    ok(s.linear(L.mlp_down, act.data(), T, L.inter, y, s.hidden));
}

// x = post_norm(residual += attention(in_norm(residual += ffn))), ffn null for the first layer
void attention_block(const DecodeStep& s, const DecodeLayer& L, float* residual, const float* ffn, float* x) {
    const int64_t T = s.rows, m = s.hidden;
    Buf<float> a(T * m);
    selfseek_add_rms_norm(residual, m, ffn, m, L.in_norm, x, T, m, L.in_eps);
    if (L.mla) mla(s, L, x, a.data());
    else gqa(s, L, x, a.data());
    selfseek_add_rms_norm(residual, m, a.data(), m, L.post_norm, x, T, m, L.post_eps);
}

// the layer's MLP, or its routed experts plus the shared experts; the router's seconds in *routed when timed
void ffn_block(const DecodeStep& s, const DecodeLayer& L, const float* x, float* y, double* routed) {
    if (!L.moe) return dense(s, L, x, y);
    const double t0 = s.timings ? omp_get_wtime() : 0.0;
    Buf<float> weights(s.rows * L.top_k);
    Buf<int64_t> ids(s.rows * L.top_k);
    ok(s.gate(x, s.rows, s.hidden, L.router, L.scoring, L.router_bias, L.n_experts, L.method, L.n_group, L.topk_group,
              L.top_k, L.norm, L.route_scale, weights.data(), ids.data()));
    if (s.timings) *routed = omp_get_wtime() - t0;
    ok(s.moe(x, s.rows, s.hidden, ids.data(), weights.data(), L.top_k, L.n_experts, L.e_gate, L.e_up, L.e_down, y,
             0.0f));
    if (L.gate_up == nullptr) return;
    Buf<float> shared(s.rows * s.hidden);
    dense(s, L, x, shared.data());
    for (int64_t i = 0; i < s.rows * s.hidden; i++) y[i] += shared[i];
}
}  // namespace

// Layers [0, n): residual [rows, hidden] -> the hidden states after them (before the final norm), in place.
int32_t selfseek_decode_layers(const DecodeStep* s, const DecodeLayer* layers, int64_t n, float* residual) {
    const int64_t size = s->rows * s->hidden;
    Buf<float> x(size), ffn(size);
    for (int64_t l = 0; l < n; l++) {
        try {
            const double t0 = s->timings ? omp_get_wtime() : 0.0;  // bench --profile only: no clock reads else
            attention_block(*s, layers[l], residual, l ? ffn.data() : nullptr, x.data());
            const double t1 = s->timings ? omp_get_wtime() : 0.0;
            double routed = 0.0;
            ffn_block(*s, layers[l], x.data(), ffn.data(), &routed);
            if (s->timings) {
                double* t = s->timings + 3 * l;
                t[0] += t1 - t0;
                t[1] += routed;
                t[2] += omp_get_wtime() - t1 - routed;
            }
        } catch (const Fail&) {
            return static_cast<int32_t>(-(1000000 + l));
        }
    }
    for (int64_t i = 0; i < size && n; i++) residual[i] += ffn[i];
    return 0;
}

// ---------------------------------------------------------------- greedy sampling
// out[r] = torch.max(x[r], dim=-1).indices for rows [rows, n] (row stride ld): the first index of the largest value,
// or of the first NaN where the row has one (torch's rule; -0 equals +0). One pass per row in 16 lanes, each keeping
// its largest value and where it first saw it (vec16.h: the same on every level); the lanes holding
// the row's maximum then give the smallest index. torch's reduction ran at ~0.7 G values/s here: a 16-row step's
// argmax over a 129k vocabulary took 2.9 ms at 1 thread.
static int64_t argmax_row(const float* x, int64_t n) {
    int64_t i = 0, best = 0;
    float m = -INFINITY;
    bool nan = false;
    if (n >= 16 && n < INT32_MAX) {
        Vec16f mv = load16(x);
        Vec16i at = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, cur = at + 16, bad = mv != mv;
        for (i = 16; i + 16 <= n; i += 16, cur += 16) {
            const Vec16f v = load16(x + i);
            const Vec16i gt = v > mv;
            mv = gt ? v : mv;
            at = gt ? cur : at;
            bad |= v != v;
        }
        best = INT64_MAX;
        for (int l = 0; l < 16; l++) nan |= bad[l] != 0;
        for (int l = 0; l < 16; l++) m = mv[l] > m ? mv[l] : m;
        for (int l = 0; l < 16; l++)
            if (mv[l] == m && at[l] < best) best = at[l];
    }
    for (; i < n; i++) {
        nan |= x[i] != x[i];
        if (x[i] > m) m = x[i], best = i;
    }
    if (nan)
        for (i = 0; i < n; i++)
            if (x[i] != x[i]) return i;
    return best;
}

void selfseek_argmax_rows(const float* x, int64_t rows, int64_t n, int64_t ld, int64_t* out) {
#pragma omp parallel for schedule(static) if (rows > 1 && rows * n >= (1 << 18))
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_row(x + r * ld, n);
}

}  // extern "C"
