/* The token side of SAM's two-way transformer and its heads (see segany/kernels/__init__.py and
   segany/modeling/fast_decoder.py).

   A click's decoder carries ~7 prompt tokens of 256 channels through self-attention, the
   cross-attentions' token projections, two-layer MLPs, LayerNorms, the IoU head and a
   hypernetwork MLP: ~35 linear layers with 7 rows and ~13 MB of weights, and in PyTorch ~400
   small operations at a few microseconds of dispatch each, ~1.3 ms of a warm vit_b click and
   more after a pause (every operation's code and bookkeeping cold again). Here each two-way
   block's token side is two calls (segany_token_block_pre/_post) and each head one
   (segany_token_chain), each call one OpenMP region: its layers follow each other at barriers,
   every layer's output panels shared among the threads.

   Weights come packed (segany.kernels.pack_token_weight): W (O, K) as panels of TK_PW outputs,
   (ceil(O / TK_PW), K, TK_PW), zero-padded, so a panel streams from memory in one run while
   up to TK_ROWS rows x 2 vectors of accumulators stay in registers across K.

   Not bit-identical to PyTorch: sums run in another order, with fused multiply-adds, and the
   self-attention's softmax uses expf. Differences are float32 rounding (tests/test_kernels.py). */
#include <math.h>
#include <string.h>

#include "common.h"

#define TK_PW (2 * LANES)
#if LANES >= 16
#define TK_ROWS 8
#else
#define TK_ROWS 4
#endif

/* Panel width in floats, for the packing on the Python side. */
int segany_token_panel(void) { return TK_PW; }

/* acc[m][0..1] = sum_k x[m * xs + k] * pan[k * TK_PW + 0..TK_PW-1] for m < mr */
static inline __attribute__((always_inline)) void panel_block(int mr, int64_t K, const float *restrict x, int64_t xs,
                                                              const float *restrict pan, vf (*restrict acc)[2]) {
    for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = (vf){0};
    for (int64_t k = 0; k < K; k++) {
        /* 16 panel rows (2 KB) ahead: one panel is a single stream per thread, which the hardware
           prefetcher alone kept ~10% slower (a cold MLP block 152 vs 168 us, warm 102 vs 117) */
        __builtin_prefetch(pan + (k + 16) * TK_PW);
        __builtin_prefetch(pan + (k + 16) * TK_PW + LANES);
        vf b0 = vload(pan + k * TK_PW), b1 = vload(pan + k * TK_PW + LANES);
        for (int m = 0; m < mr; m++) {
            float a = x[m * xs + k];
            acc[m][0] += a * b0;
            acc[m][1] += a * b1;
        }
    }
}

/* y (M, O; row stride ys) = act(x (M, K; row stride xs) W^T + b), W packed; called inside a
   parallel region (an orphaned worksharing loop over the output panels, a barrier at its end). */
static void linear_layer(int64_t M, int64_t K, int64_t O, const float *x, int64_t xs, const float *Wp, const float *b,
                         int relu, float *y, int64_t ys) {
    const int64_t np = (O + TK_PW - 1) / TK_PW;
#pragma omp for schedule(dynamic)
    for (int64_t p = 0; p < np; p++) {
        const float *pan = Wp + p * K * TK_PW;
        const int64_t o0 = p * TK_PW, ow = O - o0 < TK_PW ? O - o0 : TK_PW;
        const vf b0 = load_part(b + o0, ow), b1 = ow > LANES ? load_part(b + o0 + LANES, ow - LANES) : (vf){0};
        for (int64_t m0 = 0; m0 < M; m0 += TK_ROWS) {
            const int mr = (int)(M - m0 < TK_ROWS ? M - m0 : TK_ROWS);
            const float *xm = x + m0 * xs;
            vf acc[TK_ROWS][2];
            switch (mr) { /* constant row counts keep the accumulators in registers */
            case TK_ROWS: panel_block(TK_ROWS, K, xm, xs, pan, acc); break;
#if TK_ROWS > 4
            case 7: panel_block(7, K, xm, xs, pan, acc); break;
            case 6: panel_block(6, K, xm, xs, pan, acc); break;
            case 5: panel_block(5, K, xm, xs, pan, acc); break;
            case 4: panel_block(4, K, xm, xs, pan, acc); break;
#endif
            case 3: panel_block(3, K, xm, xs, pan, acc); break;
            case 2: panel_block(2, K, xm, xs, pan, acc); break;
            default: panel_block(1, K, xm, xs, pan, acc); break;
            }
            for (int m = 0; m < mr; m++) {
                vf v0 = acc[m][0] + b0, v1 = acc[m][1] + b1;
                if (relu) {
                    v0 = vmax(v0, (vf){0});
                    v1 = vmax(v1, (vf){0});
                }
                float *ym = y + (m0 + m) * ys + o0;
                store_part(ym, v0, ow);
                if (ow > LANES) store_part(ym + LANES, v1, ow - LANES);
            }
        }
    }
}

/* o[m] = LayerNorm(y[m] + res[m]) over C channels (two-pass statistics, as PyTorch's); o may be
   y. A worksharing loop over the M rows. */
static void residual_layer_norm(int64_t M, int64_t C, const float *y, const float *res, const float *g,
                                const float *beta, float eps, float *o) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *ym = y + m * C, *rm = res ? res + m * C : 0;
        float *om = o + m * C;
        double s = 0.0;
        for (int64_t c = 0; c < C; c++) {
            float v = ym[c] + (rm ? rm[c] : 0.0f);
            om[c] = v;
            s += v;
        }
        const float mean = (float)(s / (double)C);
        double q = 0.0;
        for (int64_t c = 0; c < C; c++) {
            float d = om[c] - mean;
            q += (double)d * d;
        }
        const float rstd = 1.0f / sqrtf((float)(q / (double)C) + eps);
        for (int64_t c = 0; c < C; c++) om[c] = (om[c] - mean) * rstd * g[c] + beta[c];
    }
}

/* rows of a (M, K) plus b (M, K) into o, a worksharing loop */
static void add_rows(int64_t M, int64_t K, const float *a, const float *b, float *o) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) o[m * K + k] = a[m * K + k] + b[m * K + k];
}

/* A chain of n (1..3) linear layers over M token rows with ReLU after every layer but the last
   (the decoder's IoU head and hypernetworks): out (M, d[n]) = f_n(... f_1(x)). x and out
   contiguous and apart; W1..W3 packed, b1..b3 the biases. Returns 0, -1 when no work memory
   could be had, 2 for bad sizes. */
int segany_token_chain(int64_t M, int64_t n, int64_t d0, int64_t d1, int64_t d2, int64_t d3, const float *x,
                       const float *W1, const float *b1, const float *W2, const float *b2,
                       const float *W3, const float *b3, float *out) {
    if (n < 1 || n > 3 || M < 1) return 2;
    const int64_t d[4] = {d0, d1, d2, d3};
    const float *W[3] = {W1, W2, W3}, *b[3] = {b1, b2, b3};
    int64_t widest = 0;
    for (int64_t i = 1; i < n; i++) widest = d[i] > widest ? d[i] : widest;
    /* the hidden layers' outputs, in two alternating buffers */
    const size_t need = (size_t)M * (size_t)(2 * widest);
    float *work = need ? (float *)malloc(sizeof(float) * need) : 0;
    if (need && !work) return -1;
    float *h[2] = {work, work + M * widest};
#pragma omp parallel
    {
        const unsigned int csr = ftz_begin();
        const float *cur = x;
        for (int64_t i = 0; i < n; i++) {
            float *dst = i == n - 1 ? out : h[i & 1];
            linear_layer(M, d[i], d[i + 1], cur, d[i], W[i], b[i], i < n - 1, dst, d[i + 1]);
            cur = dst;
        }
        ftz_end(csr);
    }
    free(work);
    return 0;
}

/* One two-way block's token side, around its two cross-attentions (fast_decoder._token_steps),
   or the final attention's (its q projection, then its out-projection and LayerNorm). All
   weights packed, as segany.kernels.TokenBlock lays this struct out; a NULL part is skipped. */
typedef struct {
    int64_t C, sa_I, sa_nh, x_I, mlp; /* channels; self-attention width and heads; cross-attention width; MLP width */
    const float *sa_wqk, *sa_bqk, *sa_wv, *sa_bv, *sa_wo, *sa_bo, *ln1_g, *ln1_b; /* self-attention ([Wq; Wk]) + norm1 */
    const float *q_w, *q_b;                                                   /* token->image q projection */
    const float *o_w, *o_b, *ln2_g, *ln2_b;                                   /* its out-projection + norm2 */
    const float *mlp_w1, *mlp_b1, *mlp_w2, *mlp_b2, *ln3_g, *ln3_b;           /* MLP (ReLU) + norm3 */
    const float *k_w, *k_b, *v_w, *v_b;                                       /* image->token k and v projections */
    float ln1_eps, ln2_eps, ln3_eps;
} token_block;

/* out (M, C) = LN(x (M, C) [+ attention]) of B prompts of t tokens: q = k = x + pe (pe
   optional), v = x, nh heads of I / nh channels; work: M * (3I + I) + B*nh*t*t floats. A part of
   a parallel region. */
static void self_attention(const token_block *tb, int64_t B, int64_t t, const float *x, const float *xq, int residual,
                           float *work, float *out) {
    const int64_t M = B * t, I = tb->sa_I, nh = tb->sa_nh, hd = I / nh, C = tb->C;
    float *qk = work, *v = qk + M * 2 * I, *o = v + M * I, *s = o + M * I;
    const float scale = 1.0f / sqrtf((float)hd);
    linear_layer(M, C, 2 * I, xq, C, tb->sa_wqk, tb->sa_bqk, 0, qk, 2 * I);
    linear_layer(M, C, I, x, C, tb->sa_wv, tb->sa_bv, 0, v, I);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * nh; bh++) {
        const int64_t bb = bh / nh, hh = bh % nh;
        float *sc = s + bh * t * t;
        for (int64_t i = 0; i < t; i++) {
            const float *qi = qk + (bb * t + i) * 2 * I + hh * hd;
            float mx = -INFINITY;
            for (int64_t j = 0; j < t; j++) {
                const float *kj = qk + (bb * t + j) * 2 * I + I + hh * hd;
                float dot = 0.0f;
                for (int64_t c = 0; c < hd; c++) dot += qi[c] * kj[c];
                sc[i * t + j] = dot * scale;
                mx = sc[i * t + j] > mx ? sc[i * t + j] : mx;
            }
            float z = 0.0f;
            for (int64_t j = 0; j < t; j++) {
                sc[i * t + j] = expf(sc[i * t + j] - mx);
                z += sc[i * t + j];
            }
            float *oi = o + (bb * t + i) * I + hh * hd;
            for (int64_t c = 0; c < hd; c++) oi[c] = 0.0f;
            for (int64_t j = 0; j < t; j++) {
                const float a = sc[i * t + j] / z, *vj = v + (bb * t + j) * I + hh * hd;
                for (int64_t c = 0; c < hd; c++) oi[c] += a * vj[c];
            }
        }
    }
    linear_layer(M, I, C, o, I, tb->sa_wo, tb->sa_bo, 0, out, C);
    residual_layer_norm(M, C, out, residual ? x : 0, tb->ln1_g, tb->ln1_b, tb->ln1_eps, out);
}

/* Before the token->image attention, for B prompts of t tokens x (B*t, C), pe (B*t, C):
     x_out = norm1(self-attention of x (q = k = x + pe unless skip_pe, with the residual unless skip_pe))
             (x itself where the block has no self-attention: the final attention's),
     q_out = (x_out + pe) Wq^T + bq   (M, x_I)
   x_out must not overlap x or pe. Returns 0, -1 when no work memory could be had, 2 for bad sizes. */
int segany_token_block_pre(const token_block *tb, int64_t B, int64_t t, const float *x, const float *pe, int skip_pe,
                           float *x_out, float *q_out) {
    const int64_t M = B * t, C = tb->C, I = tb->sa_I;
    if (M < 1 || (tb->sa_wqk && (tb->sa_nh < 1 || I % tb->sa_nh))) return 2;
    const size_t need = (size_t)M * (size_t)(C + (tb->sa_wqk ? 4 * I : 0)) + (tb->sa_wqk ? (size_t)(B * tb->sa_nh * t * t) : 0);
    float *work = (float *)malloc(sizeof(float) * need);
    if (!work) return -1;
    float *xp = work, *sa_work = work + M * C;
#pragma omp parallel
    {
        const unsigned int csr = ftz_begin();
        const float *xs = x;
        if (tb->sa_wqk) {
            if (!skip_pe) add_rows(M, C, x, pe, xp);
            self_attention(tb, B, t, x, skip_pe ? x : xp, !skip_pe, sa_work, x_out);
            xs = x_out;
        }
        add_rows(M, C, xs, pe, xp); /* (the worksharing loop's barrier: xp was the attention's input) */
        linear_layer(M, C, tb->x_I, xp, C, tb->q_w, tb->q_b, 0, q_out, tb->x_I);
        ftz_end(csr);
    }
    free(work);
    return 0;
}

/* After the token->image attention: heads (M, x_I) its heads' outputs before out_proj, x (M, C)
   the tokens before it, pe (M, C):
     x_out = norm2(x + heads Wo^T + bo), then where the block has them
     x_out = norm3(x_out + MLP(x_out)),
     k_out = (x_out + pe) Wk^T + bk,  v_out = x_out Wv^T + bv   (M, x_I) each.
   x_out must not overlap the inputs. Returns as segany_token_block_pre. */
int segany_token_block_post(const token_block *tb, int64_t M, const float *heads, const float *x, const float *pe,
                            float *x_out, float *k_out, float *v_out) {
    const int64_t C = tb->C;
    if (M < 1) return 2;
    const size_t need = (size_t)M * (size_t)(C + (tb->mlp_w1 ? tb->mlp + C : 0));
    float *work = (float *)malloc(sizeof(float) * need);
    if (!work) return -1;
    float *xp = work, *hid = work + M * C, *y = hid + (tb->mlp_w1 ? M * tb->mlp : 0);
#pragma omp parallel
    {
        const unsigned int csr = ftz_begin();
        linear_layer(M, tb->x_I, C, heads, tb->x_I, tb->o_w, tb->o_b, 0, x_out, C);
        residual_layer_norm(M, C, x_out, x, tb->ln2_g, tb->ln2_b, tb->ln2_eps, x_out);
        if (tb->mlp_w1) {
            linear_layer(M, C, tb->mlp, x_out, C, tb->mlp_w1, tb->mlp_b1, 1, hid, tb->mlp);
            linear_layer(M, tb->mlp, C, hid, tb->mlp, tb->mlp_w2, tb->mlp_b2, 0, y, C);
            residual_layer_norm(M, C, y, x_out, tb->ln3_g, tb->ln3_b, tb->ln3_eps, x_out);
        }
        if (tb->k_w) {
            add_rows(M, C, x_out, pe, xp);
            linear_layer(M, C, tb->x_I, xp, C, tb->k_w, tb->k_b, 0, k_out, tb->x_I);
            linear_layer(M, C, tb->x_I, x_out, C, tb->v_w, tb->v_b, 0, v_out, tb->x_I);
        }
        ftz_end(csr);
    }
    free(work);
    return 0;
}
