/* The attention of SAM's ViT image encoder with its decomposed relative positions, fused (see
   segany/kernels/__init__.py and segany/modeling/image_encoder.py): global blocks first,
   windowed blocks further down.

   softmax(q k^T * scale + rel_h + rel_w) v over a 64x64 grid is 4096 x 4096 scores per head.
   PyTorch runs it as a GEMM writing the scores, two in-place bias adds, an in-place softmax and
   a second GEMM: five passes over multi-MB score blocks, about 40% of the encoder's time in its
   four global blocks against ~25% of its FLOPs. Here the scores of one query row of the grid
   against one key row at a time stay in the cache, with the softmax taken online (the running
   maximum and sum per query, earlier output rescaled when the maximum grows, as in
   FlashAttention). Not bit-identical to PyTorch: sums run in another order, fused
   multiply-adds, a polynomial exp (relative error ~1e-7); differences are float32 rounding.

   Layouts, for one grid of h x w tokens, nh heads of hd channels:
     q   (B, nh, h*w, hd)   queries (unscaled), any strides but contiguous channels
     kt  (B, nh, h, hd, w)  keys, transposed per key row of the grid (contiguous)
     v   (B, nh, h*w, hd)   like q (rel_attention passes it contiguous: see there)
     rht (h, hd, hp)        SAM's rel_pos_h picked per (query row, key row) (get_rel_pos), the
                            last two axes swapped, key rows zero-padded to hp (whole vectors):
                            rel_h[query (r, c)][key row k] = q . rht[r][:, k]
     rwt (w, hd, w)         the same for columns
     out (B, nh, h*w, hd)   contiguous
   w and hd must be multiples of LANES, w a multiple of QB. */
#include <math.h>

#include "common.h"

#define QB GEMM_QB

static inline float vmax_all(vf v) {
#if defined(__AVX512F__)
    return _mm512_reduce_max_ps((__m512)v);
#else
    float m = v[0];
    for (int l = 1; l < LANES; l++) m = v[l] > m ? v[l] : m;
    return m;
#endif
}

/* x[j] = exp(x[j] - mx) in place over n floats (a multiple of LANES); returns their sum. */
static inline float exp_sum_(float *x, int64_t n, float mx) {
    vf acc = {0};
    for (int64_t j = 0; j < n; j += LANES) {
        vf e = vexp(vload(x + j) - mx);
        vstore(x + j, e);
        acc += e;
    }
    float tot = 0.0f;
    for (int l = 0; l < LANES; l++) tot += acc[l];
    return tot;
}

/* Pieces p0..p1-1 of B*nh*h: (batch and head, query row of the grid). Returns 0, or 1 when the
   per-thread buffer could not be allocated. q and v are read with strides (batch qb/vb, head
   qhs/vhs, token qn/vn floats; channels contiguous), so that the caller passes views of the qkv
   projection; each piece copies its w query rows and takes their relative-position terms from
   RhT/RwT itself (a (w x hd) @ (hd x h) product and w (1 x hd) @ (hd x w) ones, 1/32 of the
   piece's multiply-adds), where the caller used to form rel_h and rel_w (12.6 MB each a block
   for vit_b) with two einsums. */
int segany_rel_attention(int64_t p0, int64_t p1, int64_t nh, int64_t h, int64_t w, int64_t hd, const float *q,
                         int64_t qb, int64_t qhs, int64_t qn, const float *kt, const float *v, int64_t vb, int64_t vhs,
                         int64_t vn, const float *rht, int64_t hp, const float *rwt, float scale, float *out) {
    int err = 0;
    const int64_t N = h * w;
#pragma omp parallel for schedule(dynamic) reduction(| : err)
    for (int64_t p = p0; p < p1; p++) {
        /* scores (w, w); per query the running maximum, the rescale of this key row, and the
           running sum in vector lanes (reduced once at the end); the queries unscaled and
           scaled (w, hd); their rel_h (w, hp) and rel_w (w, w) */
        float *S = scratch((size_t)(w * w + 2 * w + w * LANES + 2 * w * hd + w * hp + w * w));
        if (!S) {
            err |= 1;
            continue;
        }
        const unsigned int csr = ftz_begin();
        float *mx = S + w * w, *corr = mx + w, *sum = corr + w, *Qu = sum + w * LANES, *Q = Qu + w * hd;
        float *RH = Q + w * hd, *RW = RH + w * hp;
        const int64_t bh = p / h, qh = p % h, b = bh / nh, hh = bh % nh;
        const float *qp = q + b * qb + hh * qhs + qh * w * qn, *vp = v + b * vb + hh * vhs;
        float *O = out + (bh * N + qh * w) * hd;
        const vf sc = (vf){0} + scale;
        for (int64_t i = 0; i < w; i++)
            for (int64_t c = 0; c < hd; c += LANES) {
                vf x = vload(qp + i * qn + c);
                vstore(Qu + i * hd + c, x);
                vstore(Q + i * hd + c, x * sc);
            }
        /* the relative positions take the unscaled queries, as SAM's do */
        for (int64_t i = 0; i < w; i += QB) rows_gemm(hp, hd, Qu + i * hd, hd, rht + qh * hd * hp, hp, RH + i * hp, hp, 0);
        for (int64_t i = 0; i < w; i++) {
            const float *R = rwt + i * hd * w, *qi = Qu + i * hd;
            for (int64_t j = 0; j < w; j += LANES) {
                vf acc = {0};
                for (int64_t c = 0; c < hd; c++) acc += qi[c] * vload(R + c * w + j);
                vstore(RW + i * w + j, acc);
            }
        }
        for (int64_t i = 0; i < w; i++) {
            mx[i] = -INFINITY;
            vstore(sum + i * LANES, (vf){0});
        }
        for (int64_t kh = 0; kh < h; kh++) {
            const float *KT = kt + (bh * h + kh) * hd * w, *V = vp + kh * w * vn;
            for (int64_t i = 0; i < w; i += QB) rows_gemm(w, hd, Q + i * hd, hd, KT, w, S + i * w, w, 0);
            for (int64_t i = 0; i < w; i++) {
                float *s = S + i * w;
                const float *bw = RW + i * w;
                const float bh_ = RH[i * hp + kh];
                vf m = (vf){0} - INFINITY;
                for (int64_t j = 0; j < w; j += LANES) {
                    vf x = vload(s + j) + vload(bw + j) + bh_;
                    vstore(s + j, x);
                    m = vmax(x, m);
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
            for (int64_t i = 0; i < w; i += QB) rows_gemm(hd, w, S + i * w, w, V, vn, O + i * hd, hd, kh ? corr + i : 0);
        }
        for (int64_t i = 0; i < w; i++) {
            vf acc = vload(sum + i * LANES);
            float t = 0.0f;
            for (int l = 0; l < LANES; l++) t += acc[l];
            vf inv = (vf){0} + 1.0f / t;
            for (int64_t c = 0; c < hd; c += LANES) vstore(O + i * hd + c, vload(O + i * hd + c) * inv);
        }
        ftz_end(csr);
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
     RhT   (ws, hd, wsp)  rel_pos_h picked per (query row, key row) in the window, transposed, the
                          key rows padded with zeros to wsp (whole vectors, at most 4); RwT likewise
     out   (B, H, W, C)
   The rel-pos terms use the unscaled queries, the scores the scaled ones, as SAM does. */
#ifndef WIN_AHEAD
#define WIN_AHEAD 6 /* tokens prefetched ahead */
#endif
int segany_window_attention(int64_t p0, int64_t p1, int64_t H, int64_t W, int64_t nh, int64_t hd, int64_t ws,
                            const float *qkv, const float *pad, const float *RhT, const float *RwT, float scale,
                            float *out) {
    int err = 0;
    const int64_t C = nh * hd, n = ws * ws, np_ = (n + LANES - 1) / LANES * LANES;
    const int64_t nwy = (H + ws - 1) / ws, nwx = (W + ws - 1) / ws;
    const int64_t nq = (n + QB - 1) / QB * QB; /* queries rounded up to whole register blocks */
    const int64_t wsp = (ws + LANES - 1) / LANES * LANES; /* a window side in whole vectors (at most 4) */
    const int nvw = (int)(wsp / LANES);
    if (nvw > 4) return 2;
#if defined(__AVX512F__)
    /* per vector of scores: each lane's key row and column in the window (for the permutes) */
    __m512i kh_idx[(64 * 64 + LANES - 1) / LANES], kw_idx[(64 * 64 + LANES - 1) / LANES];
    if (np_ > 64 * 64) return 2;
    for (int64_t j = 0; j < np_; j += LANES) {
        int32_t a[LANES], c[LANES];
        for (int l = 0; l < LANES; l++) {
            a[l] = j + l < n ? (int32_t)((j + l) / ws) : 0;
            c[l] = j + l < n ? (int32_t)((j + l) % ws) : 0;
        }
        kh_idx[j / LANES] = _mm512_loadu_si512(a);
        kw_idx[j / LANES] = _mm512_loadu_si512(c);
    }
    const __mmask16 tail_mask = (__mmask16)((n % LANES) ? (1u << (n % LANES)) - 1 : 0xffffu);
#endif
#pragma omp parallel for schedule(dynamic) reduction(| : err)
    for (int64_t p = p0; p < p1; p++) {
        /* Q (nq, hd) scaled, KT (hd, np) and its rows Kb (np, hd), V (np, hd), rel (nq, 2*wsp) for
           rel_h | rel_w, S (QB, np), O (QB, hd) */
        float *Qs = scratch((size_t)(nq * hd + 2 * hd * np_ + np_ * hd + nq * 2 * wsp + QB * np_ + QB * hd));
        if (!Qs) {
            err |= 1;
            continue;
        }
        const unsigned int csr = ftz_begin();
        float *KT = Qs + nq * hd, *Kb = KT + hd * np_, *V = Kb + np_ * hd, *rel = V + np_ * hd, *S = rel + nq * 2 * wsp,
              *O = S + QB * np_;
        const int64_t hh = p % nh, win = p / nh, wx = win % nwx, wy = (win / nwx) % nwy, b = win / (nwx * nwy);
        for (int64_t t = 0; t < nq; t++) {
            if (t >= n) {
                for (int64_t d = 0; d < hd; d++) Qs[t * hd + d] = 0.0f;
                for (int64_t j = 0; j < 2 * wsp; j++) rel[t * 2 * wsp + j] = 0.0f;
                continue;
            }
            const int64_t y = wy * ws + t / ws, x = wx * ws + t % ws;
            const float *src = (y < H && x < W) ? qkv + ((b * H + y) * W + x) * 3 * C : pad;
            const float *qv = src + hh * hd, *kv = src + C + hh * hd, *vv = src + 2 * C + hh * hd;
            if (t + WIN_AHEAD < n) { /* tokens are 3C floats apart, window rows W*3C: no stream the hardware follows */
                const int64_t ya = wy * ws + (t + WIN_AHEAD) / ws, xa = wx * ws + (t + WIN_AHEAD) % ws;
                if (ya < H && xa < W) {
                    const float *sa = qkv + ((b * H + ya) * W + xa) * 3 * C + hh * hd;
                    for (int64_t d = 0; d < hd; d += 64 / (int64_t)sizeof(float)) {
                        __builtin_prefetch(sa + d);
                        __builtin_prefetch(sa + C + d);
                        __builtin_prefetch(sa + 2 * C + d);
                    }
                }
            }
            /* rel_h[t][kh] = q . Rh[t / ws][kh], rel_w[t][kw] = q . Rw[t % ws][kw]: vectors over kh
               (kw), the query's channels broadcast */
            if (nvw == 1) { /* (a window side in one vector: registers, not an array in memory) */
                /* four chains each: one would wait on its own multiply-add latency */
                vf ah[4] = {{0}}, aw[4] = {{0}};
                const float *rh = RhT + (t / ws) * hd * wsp, *rw = RwT + (t % ws) * hd * wsp;
                for (int64_t d = 0; d < hd; d += 4)
                    for (int u = 0; u < 4; u++) {
                        ah[u] += qv[d + u] * vload(rh + (d + u) * wsp);
                        aw[u] += qv[d + u] * vload(rw + (d + u) * wsp);
                    }
                vstore(rel + t * 2 * wsp, (ah[0] + ah[1]) + (ah[2] + ah[3]));
                vstore(rel + t * 2 * wsp + wsp, (aw[0] + aw[1]) + (aw[2] + aw[3]));
            } else {
                vf ah[4], aw[4];
                for (int v = 0; v < nvw; v++) ah[v] = aw[v] = (vf){0};
                const float *rh = RhT + (t / ws) * hd * wsp, *rw = RwT + (t % ws) * hd * wsp;
                for (int64_t d = 0; d < hd; d++) {
                    const float qd = qv[d];
                    for (int v = 0; v < nvw; v++) {
                        ah[v] += qd * vload(rh + d * wsp + v * LANES);
                        aw[v] += qd * vload(rw + d * wsp + v * LANES);
                    }
                }
                for (int v = 0; v < nvw; v++) {
                    vstore(rel + t * 2 * wsp + v * LANES, ah[v]);
                    vstore(rel + t * 2 * wsp + wsp + v * LANES, aw[v]);
                }
            }
            for (int64_t d = 0; d < hd; d += LANES) {
                vstore(Qs + t * hd + d, vload(qv + d) * scale);
                vstore(V + t * hd + d, vload(vv + d));
                vstore(Kb + t * hd + d, vload(kv + d));
            }
        }
        for (int64_t t = n; t < np_; t++) /* padding keys: zero values, scores masked below */
            for (int64_t d = 0; d < hd; d++) V[t * hd + d] = Kb[t * hd + d] = 0.0f;
        /* KT = Kb^T, LANES keys at a time */
#if defined(__AVX512F__)
        const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32((int)hd));
        for (int64_t t0 = 0; t0 < np_; t0 += LANES)
            for (int64_t d = 0; d < hd; d++) _mm512_storeu_ps(KT + d * np_ + t0, _mm512_i32gather_ps(rows, Kb + t0 * hd + d, 4));
#else
        for (int64_t t = 0; t < np_; t++)
            for (int64_t d = 0; d < hd; d++) KT[d * np_ + t] = Kb[t * hd + d];
#endif
        for (int64_t i = 0; i < nq; i += QB) {
            rows_gemm(np_, hd, Qs + i * hd, hd, KT, np_, S, np_, 0);
            float inv[QB];
            for (int m = 0; m < QB; m++) {
                float *s = S + m * np_;
                const float *rh = rel + (i + m) * 2 * wsp, *rw = rh + wsp;
                vf mv = (vf){0} - INFINITY;
#if defined(__AVX512F__)
                if (nvw == 1) {
                    /* score j gets rel_h[j / ws] + rel_w[j % ws]: both picked from one vector by a
                       lane permutation (the partial-row adds below stall on store forwarding) */
                    const __m512 rhv = _mm512_loadu_ps(rh), rwv = _mm512_loadu_ps(rw);
                    for (int64_t j = 0; j < np_; j += LANES) {
                        vf bias = (vf)_mm512_permutexvar_ps(kh_idx[j / LANES], rhv) + (vf)_mm512_permutexvar_ps(kw_idx[j / LANES], rwv);
                        vf x = vload(s + j) + bias;
                        if (j + LANES > n) x = (vf)_mm512_mask_blend_ps(tail_mask, (__m512)((vf){0} - INFINITY), (__m512)x);
                        vstore(s + j, x);
                        mv = vmax(mv, x);
                    }
                } else
#endif
                {
                    for (int64_t kh = 0; kh < ws; kh++) /* in order: each row's partial store precedes the next row */
                        for (int v = 0; v < nvw; v++) {
                            float *sk = s + kh * ws + v * LANES;
                            const int64_t nv_ = ws - v * LANES;
                            store_part(sk, load_part(sk, nv_) + vload(rw + v * LANES) + rh[kh], nv_);
                        }
                    for (int64_t j = 0; j < np_; j += LANES) {
                        vf x = vload(s + j);
                        if (j + LANES > n)
                            for (int l = 0; l < LANES; l++)
                                if (j + l >= n) x[l] = -INFINITY;
                        vstore(s + j, x);
                        mv = vmax(mv, x);
                    }
                }
                inv[m] = 1.0f / exp_sum_(s, np_, vmax_all(mv));
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
        ftz_end(csr);
    }
    return err;
}

/* ---------------------------------------------------------------------------------------------
   The int8 mode's bfloat16 global attention (segany/quantize.py): its scores come from oneDNN's
   bfloat16 matmul in pieces of query rows, and PyTorch added the two relative-position terms
   and took the softmax as three more passes over each 4 MB piece (with a rounding to bfloat16
   after each add): ~45% of the int8 encoder's time. Here one pass per query: the bfloat16
   scores plus rel_h[key row] + rel_w[key column] in float32, the softmax in float32 (the
   polynomial exp above), probabilities rounded to bfloat16 (to nearest even, as PyTorch's
   conversion) in place.

   s (R, h*w) bfloat16 bits, R queries, keys in (row, column) order; rh (R, h) and rw (R, w)
   bfloat16 bits. Pieces p0..p1-1 of ceil(R / RS_ROWS). w a multiple of LANES. */
#define RS_ROWS 16

typedef uint16_t vh __attribute__((vector_size(VBYTES / 2)));
typedef uint32_t vu __attribute__((vector_size(VBYTES)));

static inline vf bf16_load(const uint16_t *p) {
    vh x;
    __builtin_memcpy(&x, p, sizeof x);
    vu u = __builtin_convertvector(x, vu) << 16;
    vf f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
}

static inline void bf16_store(uint16_t *p, vf f) {
    vu u;
    __builtin_memcpy(&u, &f, sizeof u);
    vu nan = (vu)((u & 0x7fffffffu) > 0x7f800000u); /* all ones where NaN: keep it a (quiet) NaN */
    vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    r = (r & ~nan) | (((u >> 16) | 0x40u) & nan);
    vh x = __builtin_convertvector(r, vh);
    __builtin_memcpy(p, &x, sizeof x);
}

static inline float bf16_scalar(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
}

int segany_rel_softmax_bf16(int64_t p0, int64_t p1, int64_t R, int64_t h, int64_t w, uint16_t *s, const uint16_t *rh,
                            const uint16_t *rw) {
    if (w % LANES) return 2;
    int err = 0;
    const int64_t n = h * w;
#pragma omp parallel for schedule(dynamic, 8) reduction(| : err)
    for (int64_t p = p0; p < p1; p++) {
        float *row = scratch((size_t)(n + w));
        if (!row) {
            err |= 1;
            continue;
        }
        const unsigned int csr = ftz_begin();
        float *rwf = row + n;
        int64_t r1 = (p + 1) * RS_ROWS < R ? (p + 1) * RS_ROWS : R;
        for (int64_t r = p * RS_ROWS; r < r1; r++) {
            uint16_t *sr = s + r * n;
            for (int64_t x = 0; x < w; x += LANES) vstore(rwf + x, bf16_load(rw + r * w + x));
            vf mv = (vf){0} - INFINITY;
            for (int64_t kh = 0; kh < h; kh++) {
                const float b = bf16_scalar(rh[r * h + kh]);
                for (int64_t x = 0; x < w; x += LANES) {
                    vf v = bf16_load(sr + kh * w + x) + (vload(rwf + x) + b);
                    vstore(row + kh * w + x, v);
                    mv = vmax(mv, v);
                }
            }
            const vf inv = (vf){0} + 1.0f / exp_sum_(row, n, vmax_all(mv));
            for (int64_t j = 0; j < n; j += LANES) bf16_store(sr + j, vload(row + j) * inv);
        }
        ftz_end(csr);
    }
    return err;
}
