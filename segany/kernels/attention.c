/* Global attention of SAM's ViT image encoder with its decomposed relative positions, fused
   (see segany/kernels/__init__.py and segany/modeling/image_encoder.py).

   softmax(q k^T * scale + rel_h + rel_w) v over a 64x64 grid is 4096 x 4096 scores per head.
   PyTorch runs it as a GEMM writing the scores, two in-place bias adds, an in-place softmax and
   a second GEMM: five passes over multi-MB score blocks, about 40% of the encoder's time in its
   four global blocks against ~25% of its FLOPs. Here the scores of one query row of the grid
   against one key row at a time stay in the cache, with the softmax taken online (the running
   maximum and sum per query, earlier output rescaled when the maximum grows, as in
   FlashAttention). Not bit-identical to PyTorch: sums run in another order, fused
   multiply-adds, a polynomial exp (relative error ~1e-7); differences are float32 rounding.

   Layouts (row-major, contiguous), for one grid of h x w tokens, nh heads of hd channels:
     q   (B, nh, h*w, hd)   queries, already times the scale
     kt  (B, nh, h, hd, w)  keys, transposed per key row of the grid
     v   (B, nh, h*w, hd)
     rh  (B, nh, h, w, h)   rel_h: query (row, column) -> key row
     rw  (B, nh, h, w, w)   rel_w: query (row, column) -> key column
     out (B, nh, h*w, hd)
   w and hd must be multiples of LANES, w a multiple of QB. */
#include <math.h>

#include "common.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef QB
#define QB 4 /* queries per register block */
#endif
#ifndef VB
#define VB 4 /* vectors per register block (keys for the scores, channels for the output) */
#endif

/* C[m][j] (QB rows of stride c_rs, nv <= VB vectors) = (accumulate ? C * row_scale[m] : 0)
   + sum_k A[m*a_rs + k] B[k*b_rs + j] for k < K: QB x nv accumulators in registers across k. */
static inline __attribute__((always_inline)) void block_gemm(int nv, int64_t K, const float *restrict A, int64_t a_rs,
                                                             const float *restrict B, int64_t b_rs, float *restrict C,
                                                             int64_t c_rs, const float *restrict row_scale) {
    vf acc[QB][VB];
    for (int m = 0; m < QB; m++)
        for (int j = 0; j < nv; j++) acc[m][j] = row_scale ? vload(C + m * c_rs + j * LANES) * row_scale[m] : (vf){0};
    for (int64_t k = 0; k < K; k++) {
        vf b[VB];
        for (int j = 0; j < nv; j++) b[j] = vload(B + k * b_rs + j * LANES);
        for (int m = 0; m < QB; m++) {
            float a = A[m * a_rs + k];
            for (int j = 0; j < nv; j++) acc[m][j] += a * b[j];
        }
    }
    for (int m = 0; m < QB; m++)
        for (int j = 0; j < nv; j++) vstore(C + m * c_rs + j * LANES, acc[m][j]);
}

/* All n/LANES vectors of QB rows, VB at a time (constant widths: the accumulators stay in registers) */
static void rows_gemm(int64_t n, int64_t K, const float *A, int64_t a_rs, const float *B, int64_t b_rs, float *C,
                      int64_t c_rs, const float *row_scale) {
    int64_t nv = n / LANES, j = 0;
    for (; j + VB <= nv; j += VB) block_gemm(VB, K, A, a_rs, B + j * LANES, b_rs, C + j * LANES, c_rs, row_scale);
    switch (nv - j) {
    case 1: if (VB > 1) block_gemm(1, K, A, a_rs, B + j * LANES, b_rs, C + j * LANES, c_rs, row_scale); break;
    case 2: if (VB > 2) block_gemm(2, K, A, a_rs, B + j * LANES, b_rs, C + j * LANES, c_rs, row_scale); break;
    case 3: if (VB > 3) block_gemm(3, K, A, a_rs, B + j * LANES, b_rs, C + j * LANES, c_rs, row_scale); break;
    default: break;
    }
}

static inline float vmax_all(vf v) {
#if defined(__AVX512F__)
    return _mm512_reduce_max_ps((__m512)v);
#else
    float m = v[0];
    for (int l = 1; l < LANES; l++) m = v[l] > m ? v[l] : m;
    return m;
#endif
}

/* Pieces p0..p1-1 of B*nh*h: (batch and head, query row of the grid). Returns 0, or 1 when the
   per-thread buffer could not be allocated. */
int segany_rel_attention(int64_t p0, int64_t p1, int64_t nh, int64_t h, int64_t w, int64_t hd, const float *q,
                         const float *kt, const float *v, const float *rh, const float *rw, float *out) {
    int err = 0;
    const int64_t N = h * w;
#pragma omp parallel for schedule(static) reduction(| : err)
    for (int64_t p = p0; p < p1; p++) {
        /* scores (w, w); per query the running maximum, the rescale of this key row, and the
           running sum in vector lanes (reduced once at the end) */
        float *S = scratch((size_t)(w * w + 2 * w + w * LANES));
        if (!S) {
            err |= 1;
            continue;
        }
        float *mx = S + w * w, *corr = mx + w, *sum = corr + w;
        const int64_t bh = p / h, qh = p % h;
        const float *Q = q + (bh * N + qh * w) * hd;
        float *O = out + (bh * N + qh * w) * hd;
        const float *RH = rh + (bh * h + qh) * w * h, *RW = rw + (bh * h + qh) * w * w;
        for (int64_t i = 0; i < w; i++) {
            mx[i] = -INFINITY;
            vstore(sum + i * LANES, (vf){0});
        }
        for (int64_t kh = 0; kh < h; kh++) {
            const float *KT = kt + (bh * h + kh) * hd * w, *V = v + (bh * N + kh * w) * hd;
            for (int64_t i = 0; i < w; i += QB) rows_gemm(w, hd, Q + i * hd, hd, KT, w, S + i * w, w, 0);
            for (int64_t i = 0; i < w; i++) {
                float *s = S + i * w;
                const float *bw = RW + i * w;
                const float bh_ = RH[i * h + kh];
                vf m = (vf){0} - INFINITY;
                for (int64_t j = 0; j < w; j += LANES) {
                    vf x = vload(s + j) + vload(bw + j) + bh_;
                    vstore(s + j, x);
                    m = vselect(x > m, x, m);
                }
                float m_new = vmax_all(m);
                /* the maximum rarely grows after the first key rows: no exp, no rescale then */
                if (m_new > mx[i]) {
                    corr[i] = expf(mx[i] - m_new); /* 0 on the first key row */
                    mx[i] = m_new;
                } else {
                    corr[i] = 1.0f;
                    m_new = mx[i];
                }
                vf acc = vload(sum + i * LANES) * corr[i];
                for (int64_t j = 0; j < w; j += LANES) {
                    vf e = vexp(vload(s + j) - m_new);
                    vstore(s + j, e);
                    acc += e;
                }
                vstore(sum + i * LANES, acc);
            }
            for (int64_t i = 0; i < w; i += QB) rows_gemm(hd, w, S + i * w, w, V, hd, O + i * hd, hd, kh ? corr + i : 0);
        }
        for (int64_t i = 0; i < w; i++) {
            vf acc = vload(sum + i * LANES);
            float t = 0.0f;
            for (int l = 0; l < LANES; l++) t += acc[l];
            vf inv = (vf){0} + 1.0f / t;
            for (int64_t c = 0; c < hd; c += LANES) vstore(O + i * hd + c, vload(O + i * hd + c) * inv);
        }
    }
    return err;
}

/* ---------------------------------------------------------------------------------------------
   Windowed attention (the encoder's other blocks): ws x ws windows of the token grid, each token
   attending to its window's ws*ws tokens, with the same decomposed relative positions. PyTorch
   gathers the windows (padding the grid to whole windows), runs the two GEMMs, both bias adds
   and the softmax on (heads, ws*ws, ws*ws) blocks, and scatters the result back; here each
   (window, head) is one piece read straight from the qkv projection and written straight to
   the (B, H, W, C) output.

     qkv   (B, H, W, 3C)  the qkv projection, channels (q|k|v, head, hd); C = nh * hd
     pad   (3C)           what a token of the padding holds: the qkv bias (the reference pads the
                          normalised tokens with zeros before qkv), zeros without one
     Rh    (ws, ws, hd)   rel_pos_h picked per (query row, key row) in the window, Rw likewise
     out   (B, H, W, C)
   The rel-pos terms use the unscaled queries, the scores the scaled ones, as SAM does. */
int segany_window_attention(int64_t p0, int64_t p1, int64_t H, int64_t W, int64_t nh, int64_t hd, int64_t ws,
                            const float *qkv, const float *pad, const float *Rh, const float *Rw, float scale,
                            float *out) {
    int err = 0;
    const int64_t C = nh * hd, n = ws * ws, np_ = (n + LANES - 1) / LANES * LANES;
    const int64_t nwy = (H + ws - 1) / ws, nwx = (W + ws - 1) / ws;
    const int64_t nq = (n + QB - 1) / QB * QB; /* queries rounded up to whole register blocks */
#pragma omp parallel for schedule(static) reduction(| : err)
    for (int64_t p = p0; p < p1; p++) {
        /* Q (nq, hd) scaled, KT (hd, np), V (np, hd), rel (nq, 2*ws) for rel_h | rel_w,
           S (QB, np), O (QB, hd) */
        float *Qs = scratch((size_t)(nq * hd + hd * np_ + np_ * hd + nq * 2 * ws + QB * np_ + QB * hd));
        if (!Qs) {
            err |= 1;
            continue;
        }
        float *KT = Qs + nq * hd, *V = KT + hd * np_, *rel = V + np_ * hd, *S = rel + nq * 2 * ws, *O = S + QB * np_;
        const int64_t hh = p % nh, win = p / nh, wx = win % nwx, wy = (win / nwx) % nwy, b = win / (nwx * nwy);
        for (int64_t t = 0; t < nq; t++) {
            if (t >= n) {
                for (int64_t d = 0; d < hd; d++) Qs[t * hd + d] = 0.0f;
                for (int64_t j = 0; j < 2 * ws; j++) rel[t * 2 * ws + j] = 0.0f;
                continue;
            }
            const int64_t y = wy * ws + t / ws, x = wx * ws + t % ws;
            const float *src = (y < H && x < W) ? qkv + ((b * H + y) * W + x) * 3 * C : pad;
            const float *qv = src + hh * hd, *kv = src + C + hh * hd, *vv = src + 2 * C + hh * hd;
            /* rel_h[t][kh] = q . Rh[t / ws][kh], rel_w[t][kw] = q . Rw[t % ws][kw] */
            for (int64_t j = 0; j < ws; j++) {
                const float *rh = Rh + ((t / ws) * ws + j) * hd, *rw = Rw + ((t % ws) * ws + j) * hd;
                vf ah = {0}, aw = {0};
                for (int64_t d = 0; d < hd; d += LANES) {
                    vf qd = vload(qv + d);
                    ah += qd * vload(rh + d);
                    aw += qd * vload(rw + d);
                }
                float sh = 0.0f, sw = 0.0f;
                for (int l = 0; l < LANES; l++) {
                    sh += ah[l];
                    sw += aw[l];
                }
                rel[t * 2 * ws + j] = sh;
                rel[t * 2 * ws + ws + j] = sw;
            }
            for (int64_t d = 0; d < hd; d += LANES) {
                vstore(Qs + t * hd + d, vload(qv + d) * scale);
                vstore(V + t * hd + d, vload(vv + d));
            }
            for (int64_t d = 0; d < hd; d++) KT[d * np_ + t] = kv[d];
        }
        for (int64_t t = n; t < np_; t++) { /* padding keys: zero values, scores masked below */
            for (int64_t d = 0; d < hd; d++) {
                V[t * hd + d] = 0.0f;
                KT[d * np_ + t] = 0.0f;
            }
        }
        for (int64_t i = 0; i < nq; i += QB) {
            rows_gemm(np_, hd, Qs + i * hd, hd, KT, np_, S, np_, 0);
            float inv[QB];
            for (int m = 0; m < QB; m++) {
                float *s = S + m * np_;
                const float *rh = rel + (i + m) * 2 * ws, *rw = rh + ws;
                for (int64_t kh = 0; kh < ws; kh++)
                    for (int64_t kw = 0; kw < ws; kw++) s[kh * ws + kw] += rh[kh] + rw[kw];
                vf mv = (vf){0} - INFINITY;
                for (int64_t j = 0; j < np_; j += LANES) {
                    vf x = vload(s + j);
                    if (j + LANES > n)
                        for (int l = 0; l < LANES; l++)
                            if (j + l >= n) x[l] = -INFINITY;
                    vstore(s + j, x);
                    mv = vselect(mv > x, mv, x);
                }
                float mx = vmax_all(mv);
                vf acc = {0};
                for (int64_t j = 0; j < np_; j += LANES) {
                    vf e = vexp(vload(s + j) - mx);
                    vstore(s + j, e);
                    acc += e;
                }
                float tot = 0.0f;
                for (int l = 0; l < LANES; l++) tot += acc[l];
                inv[m] = 1.0f / tot;
            }
            rows_gemm(hd, np_, S, np_, V, hd, O, hd, 0);
            for (int m = 0; m < QB && i + m < n; m++) {
                const int64_t t = i + m, y = wy * ws + t / ws, x = wx * ws + t % ws;
                if (y >= H || x >= W) continue;
                float *o = out + ((b * H + y) * W + x) * C + hh * hd;
                vf s = (vf){0} + inv[m];
                for (int64_t d = 0; d < hd; d += LANES) vstore(o + d, vload(O + m * hd + d) * s);
            }
        }
    }
    return err;
}
