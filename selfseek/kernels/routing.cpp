// DeepSeekMoE expert selection (models/moe.py, Gate) for rows of router scores, in one call: a decode step routes
// every MoE layer, and the torch formulation is ~15 small ops per layer. Plain C++, C ABI (see kernels/build.py).
//
// scores [n, E] float32, after softmax or sigmoid (computed by torch, so the scores are torch's own bits);
// bias [E] float32 or null (noaux_tc's aux-loss-free correction, used for selection only).
// method 0 greedy: top_k of the scores.
// method 1 group_limited_greedy: keep the topk_group groups with the largest max score, top_k among their experts.
// method 2 noaux_tc: choice = scores + bias; groups ranked by the sum of their two best choices; top_k among the
//   kept groups' choices; weights are the unbiased scores of the chosen experts.
// Then (norm) w /= sum(w) + 1e-20 when top_k > 1, and w *= route_scale.
// Out: weights [n, top_k] float32 and ids [n, top_k] int64, best first (ties: the lower index first).
// Returns 0, or -1 for bad arguments.
//
// selfseek_gate: the router whole, from the hidden rows x [n, hidden] and the router weight [E, hidden] (fp32):
// logits = x W^T, scores = softmax or sigmoid of them, then selfseek_route. Each logit is one dot product summed in a
// fixed order (16 lanes, then a fixed tree) whatever n, the thread count or the other rows: a token routes the same
// in a decode batch, alone or in a prefill, so the native decode step can route in C and agree with the module path
// (models/moe.py's Gate uses it for both). Replaced a torch product, sigmoid and the route call per layer from Python:
// 375 us a layer of a 16-row decode step on the medium V3 at 1 thread.

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "vec16.h"

namespace {

// Indices of the k largest of v[0..len) (best first, ties by lower index), written to out.
void top_indices(const float* v, int64_t len, int64_t k, int64_t* out) {
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < len; e++) {
            bool taken = false;
            for (int64_t p = 0; p < j; p++) taken |= out[p] == e;
            if (!taken && (best < 0 || v[e] > v[best])) best = e;
        }
        out[j] = best;
    }
}

// dot(x_r, w) for R rows of x (row stride ldx) against one weight row: per row 16 lane sums in order, then a fixed
// tree, so the value does not depend on R (the rows only share the weight's loads).
template <int R>
void dots(const float* x, int64_t ldx, const float* w, int64_t K, float* out, int64_t ldo) {
    constexpr int L = 16;
    Vec16f acc[R] = {};
    int64_t k = 0;
    for (; k + L <= K; k += L) {
        const Vec16f wv = load16(w + k);
        for (int r = 0; r < R; r++) acc[r] += load16(x + r * ldx + k) * wv;
    }
    for (int r = 0; r < R; r++) {
        for (int l = 0; k + l < K; l++) acc[r][l] += x[r * ldx + k + l] * w[k + l];
        for (int h = L / 2; h > 0; h /= 2)
            for (int l = 0; l < h; l++) acc[r][l] += acc[r][l + h];
        out[r * ldo] = acc[r][0];
    }
}

}  // namespace

extern "C" {

int selfseek_route(const float* scores, const float* bias, int64_t n, int64_t n_experts, int32_t method,
                   int64_t n_group, int64_t topk_group, int64_t top_k, int32_t norm, float route_scale,
                   float* weights, int64_t* ids) {
    if (n < 0 || n_experts <= 0 || top_k <= 0 || top_k > n_experts || method < 0 || method > 2) return -1;
    if (method > 0 && (n_group <= 0 || n_experts % n_group || topk_group <= 0 || topk_group > n_group)) return -1;
    if (method == 2 && (bias == nullptr || n_experts / n_group < 2)) return -1;
    const int64_t per = method > 0 ? n_experts / n_group : n_experts;
    const float neg_inf = -std::numeric_limits<float>::infinity();
#pragma omp parallel for if (n >= 64)
    for (int64_t r = 0; r < n; r++) {
        const float* s = scores + r * n_experts;
        float* w = weights + r * top_k;
        int64_t* id = ids + r * top_k;
        std::vector<float> choice(s, s + n_experts);
        if (method == 2)
            for (int64_t e = 0; e < n_experts; e++) choice[e] = s[e] + bias[e];
        if (method > 0 && topk_group < n_group) {
            std::vector<float> group_score(n_group);
            for (int64_t g = 0; g < n_group; g++) {
                const float* c = choice.data() + g * per;
                if (method == 2) {
                    int64_t two[2];
                    top_indices(c, per, 2, two);
                    group_score[g] = c[two[0]] + c[two[1]];
                } else {
                    float m = c[0];
                    for (int64_t e = 1; e < per; e++) m = c[e] > m ? c[e] : m;
                    group_score[g] = m;
                }
            }
            std::vector<int64_t> keep(topk_group);
            top_indices(group_score.data(), n_group, topk_group, keep.data());
            for (int64_t g = 0; g < n_group; g++) {
                bool kept = false;
                for (int64_t j = 0; j < topk_group; j++) kept |= keep[j] == g;
                if (!kept)
                    for (int64_t e = 0; e < per; e++) choice[g * per + e] = neg_inf;
            }
        }
        top_indices(choice.data(), n_experts, top_k, id);
        for (int64_t j = 0; j < top_k; j++) w[j] = s[id[j]];
        if (norm && top_k > 1) {
            float sum = 0.0f;
            for (int64_t j = 0; j < top_k; j++) sum += w[j];
            const float denom = sum + 1e-20f;
            for (int64_t j = 0; j < top_k; j++) w[j] = w[j] / denom;
        }
        for (int64_t j = 0; j < top_k; j++) w[j] = w[j] * route_scale;
    }
    return 0;
}

// scoring 0 softmax, 1 sigmoid; the rest as selfseek_route. Returns 0, or -1 for bad arguments.
int selfseek_gate(const float* x, int64_t n, int64_t hidden, const float* w, int32_t scoring, const float* bias,
                  int64_t n_experts, int32_t method, int64_t n_group, int64_t topk_group, int64_t top_k, int32_t norm,
                  float route_scale, float* weights, int64_t* ids) {
    if (n < 0 || hidden <= 0 || n_experts <= 0 || scoring < 0 || scoring > 1) return -1;
    std::vector<float> scores(n * n_experts);
    // (four rows, expert) items: the four rows stay in L1 while the router's rows go by (expert-major, a 512-row
    // prefill read x from memory once per expert: 20 ms of an 890 ms 16-prompt prefill at 1 thread)
    const int64_t groups = (n + 3) / 4;
#pragma omp parallel for schedule(static) collapse(2) if (n * n_experts * hidden >= (1 << 18))
    for (int64_t g = 0; g < groups; g++)
        for (int64_t e = 0; e < n_experts; e++) {
            const float *xg = x + 4 * g * hidden, *we = w + e * hidden;
            float* out = &scores[4 * g * n_experts + e];
            if (4 * g + 4 <= n) {
                dots<4>(xg, hidden, we, hidden, out, n_experts);
            } else {
                for (int64_t t = 0; t < n - 4 * g; t++)
                    dots<1>(xg + t * hidden, hidden, we, hidden, out + t * n_experts, n_experts);
            }
        }
#pragma omp parallel for if (n >= 64)
    for (int64_t t = 0; t < n; t++) {
        float* s = &scores[t * n_experts];
        if (scoring == 1) {
            for (int64_t e = 0; e < n_experts; e++) s[e] = 1.0f / (1.0f + std::exp(-s[e]));
        } else {
            float m = s[0], sum = 0.0f;
            for (int64_t e = 1; e < n_experts; e++) m = s[e] > m ? s[e] : m;
            for (int64_t e = 0; e < n_experts; e++) sum += s[e] = std::exp(s[e] - m);
            for (int64_t e = 0; e < n_experts; e++) s[e] /= sum;
        }
    }
    return selfseek_route(scores.data(), bias, n, n_experts, method, n_group, topk_group, top_k, norm, route_scale,
                          weights, ids);
}

}  // extern "C"
