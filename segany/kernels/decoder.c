/* The tail of SAM's mask decoder, fused (see segany/kernels/__init__.py and
   segany/modeling/fast_decoder.py).

   After the first 2x2 stride-2 transposed convolution of the output upscaling (a GEMM, left to
   PyTorch), every first-conv pixel goes through LayerNorm2d and GELU, then the second 2x2
   stride-2 transposed convolution gives 4 output pixels of c2 channels, each through GELU and a
   dot product with every requested mask token's hypernetwork vector. PyTorch runs those as six
   passes over multi-MB temporaries (LayerNorm, GELU, two GEMMs with GELU, a batched product,
   a copy into the mask layout); here one pass keeps a pixel's values in the cache from the
   first-conv output to the mask values.

   Unlike upscale.c this is not bit-identical to PyTorch: sums run in another order and fused
   multiply-adds are allowed, and GELU's erf is a rational approximation (max abs error 5e-7,
   about what PyTorch's own float32 GELU makes: 1.2e-6 against float64 over |x| <= 12, ours
   1.4e-6). Differences are float32 rounding (tests/test_kernels.py).

   Layouts (row-major, contiguous):
     yT   (B, 2, 2, c1, R*w)   first-conv GEMM output without its bias, channel-major: sub-pixel
                               (a, bb) of embedding pixel (i, j) -> first-conv pixel (2i+a, 2j+bb)
     bias1 (c1,)               first-conv bias, added here
     base (2, 2, c1, R*w)      optional (row stride base_stride): a per-image part of the first
                               conv's output: with it the output is alpha * (yT + base) + bias1,
                               alpha (B, R*w; row stride alpha_stride) the factored image
                               tokens' row scales
     w2   (2, c1, 2, c2)       second conv weight as [a2][c][b2][o]
     b2   (2, c2)              its bias, once per b2
     hyp  (B, M, c2)           hypernetwork outputs of the requested mask tokens
     out  (B, M, OH, 4w)       masks; embedding row i of this call writes rows 4*(row0+i)..+3 */
#include <math.h>

#define GEMM_B_IN_REGISTERS 1 /* (the tail's first-conv GEMM: see common.h) */
#include "common.h"

/* Kernels that read a block of columns from each of many rows N floats apart (the factored
   tokens' P, the per-image maps) prefetch the same block PF_AHEAD pieces ahead, the piece the
   thread most likely takes next: a stride the hardware prefetchers do not follow. After another
   process's work had emptied the caches (bench_speed's click conditions) a vit_b click took
   0.966-0.980x with the prefetches in factored_stats and the fused tail (three A/Bs); back to back,
   caches warm, 1.017x (one A/B). In factored_scores they did not pay (1.004x). */
#define PF_AHEAD 2



/* 1/q for GELU's denominator. With AVX-512 the 14-bit reciprocal estimate and one Newton step
   (relative error ~2^-27 before rounding): a vector division waits ~10 cycles for its divider,
   and GELU runs on every first- and second-conv value of the output upscaling. */
static inline vf vrecip(vf q) {
#if defined(__AVX512F__)
    vf r = (vf)_mm512_rcp14_ps((__m512)q);
    return r * (2.0f - q * r);
#else
    return 1.0f / q;
#endif
}

/* Exact GELU, x * Phi(x) = x * (1 + erf(x / sqrt 2)) / 2, with erf(z) = z P(z^2) / Q(z^2) on
   |z| <= 4 (Eigen's float erf; beyond, erf is +-1 in float32): 18 vector operations, half as
   many as the erf through exp it replaces (Abramowitz-Stegun 7.1.26, PyTorch's vectorised
   form), with which the whole tail took 13% longer (4.9 vs 4.3 ms for 8 prompts x 8 rows, one
   thread). In the far left tail 1 + erf cancels: absolute error ~1e-6, like PyTorch's. */
static inline vf vgelu(vf x) {
    vf z = x * 0.70710678118654752f;
    z = vmin((vf){0} + 4.0f, vmax((vf){0} - 4.0f, z)); /* (NaN stays NaN) */
    vf z2 = z * z;
    vf p = z2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
    p = p * z2 - 2.10102402082508e-06f;
    p = p * z2 - 5.69250639462346e-05f;
    p = p * z2 - 7.34990630326855e-04f;
    p = p * z2 - 2.95459980854025e-03f;
    p = p * z2 - 1.60960333262415e-02f;
    vf q = z2 * -1.45660718464996e-05f - 2.13374055278905e-04f;
    q = q * z2 - 1.68282697438203e-03f;
    q = q * z2 - 7.37332916720468e-03f;
    q = q * z2 - 1.42647390514189e-02f;
    return 0.5f * x * (1.0f + z * p * vrecip(q));
}

static void gelu_inplace(float *p, int64_t n) {
    int64_t i = 0;
    /* four independent vectors per step: each GELU is a ~20-deep dependency chain */
    for (; i + 4 * LANES <= n; i += 4 * LANES) {
        vf x0 = vload(p + i), x1 = vload(p + i + LANES), x2 = vload(p + i + 2 * LANES), x3 = vload(p + i + 3 * LANES);
        vstore(p + i, vgelu(x0));
        vstore(p + i + LANES, vgelu(x1));
        vstore(p + i + 2 * LANES, vgelu(x2));
        vstore(p + i + 3 * LANES, vgelu(x3));
    }
    for (; i + LANES <= n; i += LANES) {
        vf x;
        __builtin_memcpy(&x, p + i, sizeof x);
        x = vgelu(x);
        __builtin_memcpy(p + i, &x, sizeof x);
    }
    if (i < n) {
        vf x = {0};
        __builtin_memcpy(&x, p + i, sizeof(float) * (size_t)(n - i));
        x = vgelu(x);
        __builtin_memcpy(p + i, &x, sizeof(float) * (size_t)(n - i));
    }
}

/* Work is vectorised over pixels: a vector holds one channel of LANES neighbouring pixels, so
   every product is a vector times a broadcast weight and the hypernetwork dot products need no
   horizontal sums. n_pad: the row's 2w first-conv pixels rounded up to whole vectors. */

/* Second conv of one output row: zT[b2][o][X] = bias[o] + sum_c W[c][b2][o] vT[c][X]. Blocks of
   ob outputs x xv pixel vectors stay in registers across the c loop: with AVX-512 16 x 1; with
   AVX2 (16 registers) 6 x 2, where 8 x 1 loaded a broadcast weight for every multiply-add
   (9 loads per 8 FMAs, 8 per 12 now: the tail 0.96-0.97x, AVX2 emulated on the AVX-512 VM). */
#define OB (VBYTES == 64 ? 16 : 6)
#define C2_XV (VBYTES == 64 ? 1 : 2)
static inline __attribute__((always_inline)) void conv2_block(int64_t ob, int64_t xv, int64_t X, int64_t n_pad, int64_t c1,
                                                              int64_t NO, int64_t o0, const float *restrict vT,
                                                              const float *restrict W, const float *restrict bias2,
                                                              float *restrict zT) {
    vf acc[OB][C2_XV];
    for (int64_t q = 0; q < ob; q++)
        for (int64_t v = 0; v < xv; v++) acc[q][v] = (vf){0} + bias2[o0 + q];
    for (int64_t c = 0; c < c1; c++) {
        vf x[C2_XV];
        for (int64_t v = 0; v < xv; v++) __builtin_memcpy(&x[v], vT + c * n_pad + X + v * LANES, sizeof(vf));
        const float *Wc = W + c * NO + o0;
        for (int64_t q = 0; q < ob; q++)
            for (int64_t v = 0; v < xv; v++) acc[q][v] += Wc[q] * x[v];
    }
    for (int64_t q = 0; q < ob; q++)
        for (int64_t v = 0; v < xv; v++) __builtin_memcpy(zT + (o0 + q) * n_pad + X + v * LANES, &acc[q][v], sizeof(vf));
}

static inline __attribute__((always_inline)) void conv2_row(const float *restrict vT, int64_t n_pad, int64_t c1,
                                                            int64_t NO, const float *restrict W,
                                                            const float *restrict bias2, float *restrict zT) {
    int64_t X = 0;
    if (C2_XV == 2) /* (n_pad is an even number of vectors: the loop below never runs then) */
        for (; X + 2 * LANES <= n_pad; X += 2 * LANES) {
            int64_t o0 = 0;
            for (; o0 + OB <= NO; o0 += OB) conv2_block(OB, C2_XV, X, n_pad, c1, NO, o0, vT, W, bias2, zT);
            /* (SAM's 64 outputs leave 4: the last OB outputs again, a few recomputed with the same
               bits, not 1 x 2 blocks loading a broadcast weight per two multiply-adds; a 4 x 2
               block was ~3% slower on the AMD EPYC) */
            if (o0 < NO && NO >= OB) {
                conv2_block(OB, C2_XV, X, n_pad, c1, NO, NO - OB, vT, W, bias2, zT);
                o0 = NO;
            }
            for (; o0 < NO; o0++) conv2_block(1, C2_XV, X, n_pad, c1, NO, o0, vT, W, bias2, zT);
        }
    for (; X < n_pad; X += LANES) {
        int64_t o0 = 0;
        for (; o0 + OB <= NO; o0 += OB) conv2_block(OB, 1, X, n_pad, c1, NO, o0, vT, W, bias2, zT);
        for (; o0 < NO; o0++) conv2_block(1, 1, X, n_pad, c1, NO, o0, vT, W, bias2, zT);
    }
}

/* One embedding row i of one prompt: 4 output rows of 4w pixels for each of the M masks, of
   which the first 4*wc (embedding columns j < wc <= w) are computed. yT points at the prompt's
   (4*c1, N) first-conv map. Pixels are taken in the order (bb, j), each run of wc padded to
   w_pad (whole vectors); the stores put column 4j+2bb+b2 in place.
   work: n_pad * (c1 + 2*c2 + 2) floats, n_pad = 2*w_pad (at most 2w rounded up to vectors). */
static inline __attribute__((always_inline)) void tail_row(
    const float *restrict yT, int64_t N, int64_t i, int64_t yi, int64_t w, int64_t wc, int64_t c1, int64_t c2, int64_t M,
    const float *restrict bias1, const float *restrict base, int64_t base_stride, const float *restrict alpha,
    const float *restrict ln_w, const float *restrict ln_b, float eps, const float *restrict w2,
    const float *restrict bias2, const float *restrict hyp, float *restrict out, int64_t out_plane,
    float *restrict work) {
    const int64_t w_pad = (wc + LANES - 1) / LANES * LANES, n_pad = 2 * w_pad;
    const int64_t OW = 4 * w, NO = 2 * c2;
    float *vT = work;              /* (c1, n_pad): first-conv row 2i+a, normalised, through GELU */
    float *zT = vT + c1 * n_pad;   /* (2, c2, n_pad): one output row before the dot products */
    float *d = zT + NO * n_pad;    /* (2, n_pad): one mask's values of that row, by b2 */
    const float inv_c1 = 1.0f / (float)c1;
    for (int64_t a = 0; a < 2; a++) {
        /* LayerNorm2d over channels, LANES pixels at a time */
        for (int64_t bb = 0; bb < 2; bb++) {
            const float *src = yT + (a * 2 + bb) * c1 * N + yi * w;
            const float *bs = base ? base + (a * 2 + bb) * c1 * base_stride + i * w : 0;
            float *dst = vT + bb * w_pad;
            /* the first conv's output: the GEMM's part (with the per-image part, times the row
               scales) plus the bias. Channel by channel, each channel's run of w pixels at once
               (adjacent cache lines), and the same channel's run for the next embedding row
               prefetched: across channels the reads are N floats apart, too many streams for
               the hardware prefetcher (pixel blocks outermost, these loads were a fifth of the
               kernel's time). */
            for (int64_t c = 0; c < c1; c++) {
                const float *sc = src + c * N;
                for (int64_t j = 0; j < wc; j += 64 / (int64_t)sizeof(float)) __builtin_prefetch(sc + w + j);
                if (bs) {
                    const float *bc = bs + c * base_stride;
                    for (int64_t j = 0; j < wc; j += 64 / (int64_t)sizeof(float)) __builtin_prefetch(bc + w + j);
                    for (int64_t j0 = 0; j0 < w_pad; j0 += LANES) {
                        int64_t n = wc - j0;
                        vf x = (load_part(sc + j0, n) + load_part(bc + j0, n)) * load_part(alpha + i * w + j0, n) + bias1[c];
                        __builtin_memcpy(dst + c * n_pad + j0, &x, sizeof x);
                    }
                } else {
                    for (int64_t j0 = 0; j0 < w_pad; j0 += LANES) {
                        vf x = load_part(sc + j0, wc - j0) + bias1[c];
                        __builtin_memcpy(dst + c * n_pad + j0, &x, sizeof x);
                    }
                }
            }
            for (int64_t j0 = 0; j0 < w_pad; j0 += LANES) {
                float *dj = dst + j0;
                vf s = {0};
                for (int64_t c = 0; c < c1; c++) {
                    vf x;
                    __builtin_memcpy(&x, dj + c * n_pad, sizeof x);
                    s += x;
                }
                vf mean = s * inv_c1;
                vf ss = {0};
                for (int64_t c = 0; c < c1; c++) {
                    vf e;
                    __builtin_memcpy(&e, dj + c * n_pad, sizeof e);
                    e -= mean;
                    ss += e * e;
                }
                vf var = ss * inv_c1 + eps;
                vf rstd;
                for (int64_t l = 0; l < LANES; l++) rstd[l] = 1.0f / sqrtf(var[l]);
                for (int64_t c = 0; c < c1; c++) {
                    vf x;
                    __builtin_memcpy(&x, dj + c * n_pad, sizeof x);
                    x = (x - mean) * rstd * ln_w[c] + ln_b[c];
                    __builtin_memcpy(dj + c * n_pad, &x, sizeof x);
                }
            }
        }
        gelu_inplace(vT, c1 * n_pad);
        for (int64_t a2 = 0; a2 < 2; a2++) {
            conv2_row(vT, n_pad, c1, NO, w2 + a2 * c1 * NO, bias2, zT);
            gelu_inplace(zT, NO * n_pad);
            /* masks: out[m][row][4j+2bb+b2] = hyp[m] . zT[b2][:][bb*w_pad+j] */
            int64_t row = 2 * a + a2;
            for (int64_t m = 0; m < M; m++) {
                const float *h = hyp + m * c2;
                for (int64_t b2 = 0; b2 < 2; b2++) {
                    for (int64_t X = 0; X < n_pad; X += LANES) {
                        vf acc = (vf){0};
                        for (int64_t o = 0; o < c2; o++) {
                            vf x;
                            __builtin_memcpy(&x, zT + (b2 * c2 + o) * n_pad + X, sizeof x);
                            acc += h[o] * x;
                        }
                        __builtin_memcpy(d + b2 * n_pad + X, &acc, sizeof acc);
                    }
                }
                float *o = out + m * out_plane + row * OW;
                for (int64_t j = 0; j < wc; j++) {
                    o[4 * j + 0] = d[j];
                    o[4 * j + 1] = d[n_pad + j];
                    o[4 * j + 2] = d[w_pad + j];
                    o[4 * j + 3] = d[n_pad + w_pad + j];
                }
            }
        }
    }
}

/* Pieces p0..p1-1 of B*R (prompt b, embedding row i of this call's R rows); yT (B, 4*c1, R*w);
   out rows 4*(row0+i).. of (B, M, OH, 4w). Returns 0, or 1 when out of memory. */
int segany_decoder_tail(int64_t p0, int64_t p1, int64_t R, int64_t w, int64_t c1, int64_t c2, int64_t M,
                        const float *yT, const float *bias1, const float *base, int64_t base_stride,
                        const float *alpha, int64_t alpha_stride, const float *ln_w, const float *ln_b, float eps,
                        const float *w2, const float *b2, const float *hyp, float *out, int64_t row0, int64_t OH) {
    int err = 0;
    const int64_t N = R * w, n_pad = 2 * ((w + LANES - 1) / LANES * LANES);
#pragma omp parallel for schedule(dynamic) reduction(| : err)
    for (int64_t p = p0; p < p1; p++) {
        float *work = scratch((size_t)(n_pad * (c1 + 2 * c2 + 2)));
        if (!work) {
            err |= 1;
            continue;
        }
        const unsigned int csr = ftz_begin();
        int64_t b = p / R, i = p % R;
        const float *yb = yT + b * 4 * c1 * N;
        float *op = out + b * M * OH * 4 * w + (row0 + i) * 4 * 4 * w;
        const float *hp = hyp + b * M * c2;
        const float *ab = base ? alpha + b * alpha_stride : 0;
        int64_t plane = OH * 4 * w;
        /* constant channel counts let the compiler unroll the channel loops */
        if (c1 == 64 && c2 == 32)
            tail_row(yb, N, i, i, w, w, 64, 32, M, bias1, base, base_stride, ab, ln_w, ln_b, eps, w2, b2, hp, op, plane, work);
        else if (c1 == 32 && c2 == 16)
            tail_row(yb, N, i, i, w, w, 32, 16, M, bias1, base, base_stride, ab, ln_w, ln_b, eps, w2, b2, hp, op, plane, work);
        else
            tail_row(yb, N, i, i, w, w, c1, c2, M, bias1, base, base_stride, ab, ln_w, ln_b, eps, w2, b2, hp, op, plane, work);
        ftz_end(csr);
    }
    return err;
}

/* The same with the first convolution's GEMM fused in: piece (prompt b, embedding row i) forms
   its row's (4*c1, w) block Y = A_b P_b[:, i*w : (i+1)*w] in the work buffer (A (B, 4*c1, r)
   contiguous, P (B, r, R*w) rows R*w floats apart, batch stride p_bstride) and runs the tail on
   it: the product never goes through a multi-MB buffer read back across 4*c1 channel streams.
   w must be a multiple of LANES, 4*c1 of GEMM_QB (else 2 is returned and nothing written).
   Only embedding rows i < rv and columns j < wv are computed (pieces p0..p1-1 of B*rv): the masks'
   part that the upscale to the original size reads (the rest lies in the input's padding, see
   fast_decoder._upscale_masks); the other outputs are not written. */
int segany_decoder_tail_fused(int64_t p0, int64_t p1, int64_t R, int64_t w, int64_t rv, int64_t wv, int64_t c1, int64_t c2, int64_t M,
                              int64_t r, const float *A, const float *P, int64_t p_bstride, const float *bias1,
                              const float *base, int64_t base_stride, const float *alpha, int64_t alpha_stride,
                              const float *ln_w, const float *ln_b, float eps, const float *w2, const float *b2,
                              const float *hyp, float *out, int64_t OH) {
    if (w % LANES || (4 * c1) % GEMM_QB || rv < 1 || rv > R || wv < 1 || wv > w) return 2;
    int err = 0;
    /* wv_pad: the columns the product forms, whole vectors (w is a multiple of LANES) */
    const int64_t N = R * w, n_pad = 2 * ((w + LANES - 1) / LANES * LANES), tail_work = n_pad * (c1 + 2 * c2 + 2);
    const int64_t wv_pad = (wv + LANES - 1) / LANES * LANES;
#pragma omp parallel for schedule(dynamic) reduction(| : err)
    for (int64_t p = p0; p < p1; p++) {
        float *work = scratch((size_t)(tail_work + 4 * c1 * w + r * w));
        if (!work) {
            err |= 1;
            continue;
        }
        const unsigned int csr = ftz_begin();
        int64_t b = p / rv, i = p % rv;
        float *Y = work + tail_work, *Pk = Y + 4 * c1 * w;
        if (i + PF_AHEAD < rv) {
            const float *Pn = P + b * p_bstride + (i + PF_AHEAD) * w;
            for (int64_t k = 0; k < r; k++)
                for (int64_t q = 0; q < wv_pad; q += 64 / (int64_t)sizeof(float)) __builtin_prefetch(Pn + k * N + q);
        }
        const float *Ab = A + b * 4 * c1 * r, *Pb = P + b * p_bstride + i * w;
        /* the row's block of P, side by side: read 4*c1/GEMM_QB times, and its rows N floats
           apart fall in a few L1 sets (see factored_scores) */
        for (int64_t k = 0; k < r; k++)
            for (int64_t j = 0; j < wv_pad; j += LANES) vstore(Pk + k * w + j, vload(Pb + k * N + j));
        for (int64_t c0 = 0; c0 < 4 * c1; c0 += GEMM_QB) rows_gemm(wv_pad, r, Ab + c0 * r, r, Pk, w, Y + c0 * w, w, 0);
        float *op = out + b * M * OH * 4 * w + i * 4 * 4 * w;
        const float *hp = hyp + b * M * c2;
        const float *ab = base ? alpha + b * alpha_stride : 0;
        int64_t plane = OH * 4 * w;
        if (c1 == 64 && c2 == 32)
            tail_row(Y, w, i, 0, w, wv, 64, 32, M, bias1, base, base_stride, ab, ln_w, ln_b, eps, w2, b2, hp, op, plane, work);
        else
            tail_row(Y, w, i, 0, w, wv, c1, c2, M, bias1, base, base_stride, ab, ln_w, ln_b, eps, w2, b2, hp, op, plane, work);
        ftz_end(csr);
    }
    return err;
}

/* ---------------------------------------------------------------------------------------------
   LayerNorm over rows of C channels (the two-way transformer's norm4 on the image tokens), in
   place or statistics only.

   The factored image tokens (fast_decoder.py) need the statistics of every layer's residual
   stream, and the normalised tokens only where the next layer reads them densely. PyTorch's
   native_layer_norm always writes a fresh multi-MB result (page faults on every call); here the
   rows are normalised where they are, or left as they are.

   y (rows, C); g, bb (C,); mean, rstd (rows,). */
#define ROW_NV 4                          /* independent accumulators */
#define ROW_CB (LANES * ROW_NV)           /* channels per step (at most 64: segany.kernels.rows_ok) */
#define ROW_PIECE 256                     /* rows per piece of work */
#define ROW_AHEAD 16                       /* rows prefetched ahead */


static inline float vsum(vf v) {
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += v[l];
    return s;
}

/* LayerNorm of one row (C a multiple of ROW_CB), two-pass statistics in vector lanes; o may be y */
static void normalise_row(const float *y, int64_t C, float eps, const float *g, const float *bb, float *o,
                          float *mean_out, float *rstd_out) {
    vf acc[ROW_NV];
    for (int j = 0; j < ROW_NV; j++) acc[j] = (vf){0};
    for (int64_t c = 0; c < C; c += ROW_CB)
        for (int j = 0; j < ROW_NV; j++) acc[j] += vload(y + c + j * LANES);
    for (int j = 1; j < ROW_NV; j++) acc[0] += acc[j];
    float m = vsum(acc[0]) / (float)C;
    for (int j = 0; j < ROW_NV; j++) acc[j] = (vf){0};
    for (int64_t c = 0; c < C; c += ROW_CB)
        for (int j = 0; j < ROW_NV; j++) {
            vf d = vload(y + c + j * LANES) - m;
            acc[j] += d * d;
        }
    for (int j = 1; j < ROW_NV; j++) acc[0] += acc[j];
    float rs = 1.0f / sqrtf(vsum(acc[0]) / (float)C + eps);
    *mean_out = m;
    *rstd_out = rs;
    if (o)
        for (int64_t c = 0; c < C; c += LANES) {
            vf d = (vload(y + c) - m) * rs;
            vstore(o + c, d * vload(g + c) + vload(bb + c));
        }
}

/* Pieces p0..p1-1 of ceil(rows / ROW_PIECE). C must be a multiple of ROW_CB (else 2 is
   returned and nothing is written). add (optional): row n % add_rows of add is added to row n
   of y first (in place; a residual shared by a batch's prompts), while the row is in the cache.
   normalise: 1 -> y is overwritten by LayerNorm(y). */
int segany_layer_norm_rows(int64_t p0, int64_t p1, int64_t rows, int64_t C, float *y, const float *add,
                           int64_t add_rows, const float *g, const float *bb, float eps, int normalise, float *mean,
                           float *rstd) {
    if (C % ROW_CB) return 2;
#pragma omp parallel for schedule(dynamic)
    for (int64_t p = p0; p < p1; p++) {
        const unsigned int csr = ftz_begin();
        int64_t n_hi = (p + 1) * ROW_PIECE < rows ? (p + 1) * ROW_PIECE : rows;
        for (int64_t n = p * ROW_PIECE; n < n_hi; n++) {
            float *yn = y + n * C;
            /* the row ROW_AHEAD rows on, one cache line at a time: the passes over a row wait on
               its first loads, which the hardware prefetcher starts too late (multi-MB maps from
               memory: 16 prompts' 64 MB took 3x the time a plain read of them takes) */
            if (n + ROW_AHEAD < rows)
                for (int64_t c = 0; c < C; c += 64 / (int64_t)sizeof(float)) __builtin_prefetch(yn + ROW_AHEAD * C + c, 1);
            if (add) {
                const float *an = add + (n % add_rows) * C;
                for (int64_t c = 0; c < C; c += LANES) vstore(yn + c, vload(yn + c) + vload(an + c));
            }
            normalise_row(yn, C, eps, g, bb, normalise ? yn : 0, mean + n, rstd + n);
        }
        ftz_end(csr);
    }
    return 0;
}

/* Row statistics of Y = X + A^T U without forming Y (the last image-token update of the
   decoder, whose rows are needed only for their LayerNorm statistics): X (B or 1, N, C) with
   x_bstride = N*C or 0, A (B, k, N) with batch stride a_bstride, its columns times ascale (B, N)
   where given, U (B, k, C); mean, rstd (B, N) as normalise_row computes
   them from Y's values. Blocks of UR rows x UV vectors of channels stay in registers across the
   k terms (AVX-512: 16 of its 32 registers; AVX2 and narrower: 8 of 16);
   each row's C values go to a small buffer for the two-pass statistics. Pieces p0..p1-1 of
   B * ceil(N / ROW_PIECE). Returns 0, 2 when C is not a multiple of ROW_CB, -1 when the row
   buffer could not be allocated. */
#if VBYTES == 64
#define UR 4
#define UV 4
#else
#define UR 4
#define UV 2
#endif
int segany_update_row_stats(int64_t p0, int64_t p1, int64_t N, int64_t C, int64_t k, const float *X,
                            int64_t x_bstride, const float *A, int64_t a_bstride, const float *ascale, const float *U,
                            float eps, float *mean, float *rstd) {
    if (C % ROW_CB) return 2;
    const int64_t npc = (N + ROW_PIECE - 1) / ROW_PIECE;
    int err = 0;
#pragma omp parallel for schedule(dynamic) reduction(| : err)
    for (int64_t p = p0; p < p1; p++) {
        int64_t b = p / npc, n_lo = (p % npc) * ROW_PIECE;
        int64_t n_hi = n_lo + ROW_PIECE < N ? n_lo + ROW_PIECE : N;
        float *tmp = scratch((size_t)(UR * C));
        if (!tmp) {
            err |= 1;
            continue;
        }
        const unsigned int csr = ftz_begin();
        const float *Xb = X + b * x_bstride, *Ab = A + b * a_bstride, *Ub = U + b * k * C;
        const float *sb = ascale ? ascale + b * N : 0;
        for (int64_t n = n_lo; n < n_hi; n += UR) {
            int64_t rb = n_hi - n < UR ? n_hi - n : UR;
            for (int64_t c = 0; c < C; c += UV * LANES) {
                vf acc[UR][UV];
                for (int64_t r = 0; r < UR; r++)
                    for (int v = 0; v < UV; v++)
                        acc[r][v] = r < rb && !sb ? vload(Xb + (n + r) * C + c + v * LANES) : (vf){0};
                for (int64_t j = 0; j < k; j++) {
                    const float *aj = Ab + j * N + n, *uj = Ub + j * C + c;
                    vf u[UV];
                    for (int v = 0; v < UV; v++) u[v] = vload(uj + v * LANES);
                    for (int64_t r = 0; r < UR; r++) {
                        float a = r < rb ? aj[r] : 0.0f;
                        for (int v = 0; v < UV; v++) acc[r][v] += a * u[v];
                    }
                }
                if (sb) /* the update's rows times their scales, then X */
                    for (int64_t r = 0; r < rb; r++)
                        for (int v = 0; v < UV; v++) acc[r][v] = acc[r][v] * sb[n + r] + vload(Xb + (n + r) * C + c + v * LANES);
                for (int64_t r = 0; r < rb; r++)
                    for (int v = 0; v < UV; v++) vstore(tmp + r * C + c + v * LANES, acc[r][v]);
            }
            for (int64_t r = 0; r < rb; r++)
                normalise_row(tmp + r * C, C, eps, 0, 0, 0, mean + b * N + n + r, rstd + b * N + n + r);
        }
        ftz_end(csr);
    }
    return err ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------
   SAM's mask embedding up to its last 1x1 convolution (fast_decoder.mask_prompt_factor):
   conv 2x2 stride 2 (1 -> c1 channels), LayerNorm2d, GELU, conv 2x2 stride 2 (c1 -> c2),
   LayerNorm2d, GELU, for a (B, 1, 4h, 4w) mask into out (B, c2 + 1, h*w) (batch stride
   out_bstride): the c2 channels, then a row of ones. PyTorch ran that as ~15 operations on
   (B, c, 2h, 2w) temporaries (a refinement click's ~1.5 ms for ~0.5 M multiply-adds); here each
   output pixel's 4x4 input patch goes through all of it in registers, 16 pixels a vector.

     w1 (c1, 2, 2), b1 (c1,), g1, e1 (c1,) LayerNorm2d weight and bias, eps1
     w2 (c2, c1, 2, 2), b2 (c2,), g2, e2 (c2,), eps2
   Pieces: B * h (one output row each). c1 <= MD_C1, c2 <= MD_C2. */
#define MD_C1 16
#define MD_C2 64

static inline void layer_norm_vec(vf *x, int64_t c, const float *g, const float *e, float eps) {
    vf m = (vf){0};
    for (int64_t i = 0; i < c; i++) m += x[i];
    m = m * (1.0f / (float)c);
    vf v = (vf){0};
    for (int64_t i = 0; i < c; i++) {
        const vf d = x[i] - m;
        v += d * d;
    }
    v = v * (1.0f / (float)c) + eps;
    float vs[LANES];
    vstore(vs, v);
    for (int l = 0; l < LANES; l++) vs[l] = 1.0f / sqrtf(vs[l]);
    const vf rs = vload(vs);
    for (int64_t i = 0; i < c; i++) x[i] = (x[i] - m) * rs * g[i] + e[i];
}

int segany_mask_downscale(int64_t p0, int64_t p1, int64_t h, int64_t w, int64_t c1, int64_t c2, const float *mask,
                          const float *w1, const float *b1, const float *g1, const float *e1, float eps1,
                          const float *w2, const float *b2, const float *g2, const float *e2, float eps2,
                          float *out, int64_t out_bstride) {
    if (c1 > MD_C1 || c2 > MD_C2) return 2;
    const int64_t W = 4 * w, N = h * w;
#pragma omp parallel for schedule(dynamic)
    for (int64_t p = p0; p < p1; p++) {
        const int64_t b = p / h, i = p % h;
        const unsigned int csr = ftz_begin();
        const float *rows = mask + (b * 4 * h + 4 * i) * W; /* the output row's four input rows */
        float *ob = out + b * out_bstride + i * w;
        for (int64_t j0 = 0; j0 < w; j0 += LANES) {
            const int64_t nj = w - j0 < LANES ? w - j0 : LANES;
            /* the 16 phases (a, bb) of the 4x4 patches, one vector of pixels each */
            vf x[4][4];
            for (int a = 0; a < 4; a++)
                for (int bb = 0; bb < 4; bb++) {
                    float t[LANES] = {0};
                    for (int64_t l = 0; l < nj; l++) t[l] = rows[a * W + 4 * (j0 + l) + bb];
                    x[a][bb] = vload(t);
                }
            /* first conv at the 2x2 positions of the patch, LayerNorm2d, GELU */
            vf y[2][2][MD_C1];
            for (int pa = 0; pa < 2; pa++)
                for (int pb = 0; pb < 2; pb++) {
                    for (int64_t c = 0; c < c1; c++) {
                        const float *k = w1 + c * 4;
                        y[pa][pb][c] = b1[c] + k[0] * x[2 * pa][2 * pb] + k[1] * x[2 * pa][2 * pb + 1] + k[2] * x[2 * pa + 1][2 * pb]
                                       + k[3] * x[2 * pa + 1][2 * pb + 1];
                    }
                    layer_norm_vec(y[pa][pb], c1, g1, e1, eps1);
                    for (int64_t c = 0; c < c1; c++) y[pa][pb][c] = vgelu(y[pa][pb][c]);
                }
            /* second conv, LayerNorm2d, GELU */
            vf z[MD_C2];
            for (int64_t o = 0; o < c2; o++) {
                vf acc = (vf){0} + b2[o];
                for (int64_t c = 0; c < c1; c++) {
                    const float *k = w2 + (o * c1 + c) * 4;
                    acc += k[0] * y[0][0][c] + k[1] * y[0][1][c] + k[2] * y[1][0][c] + k[3] * y[1][1][c];
                }
                z[o] = acc;
            }
            layer_norm_vec(z, c2, g2, e2, eps2);
            for (int64_t o = 0; o < c2; o++) store_part(ob + o * N + j0, vgelu(z[o]), nj);
            store_part(ob + c2 * N + j0, (vf){0} + 1.0f, nj);
        }
        ftz_end(csr);
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
   LayerNorm statistics of factored image tokens without forming them (fast_decoder._factored_stats).

   Per prompt b and pixel n the row z = S_n + sum_j P[b][j][n] Q[b][j] (C channels) is never
   formed; with qbar the row means of Q, Q' = Q - qbar, G = Q' Q'^T (symmetric) and R = Q S^T:
     mean_n  = sbar[n] + sum_j P[j][n] qbar[j]
     C var_n = sq[n] + 2 sum_j P[j][n] (T[j][n] + sum_{k<j} G[j][k] P[k][n] + G[j][j] P[j][n] / 2)
   with T[j][n] = R[j][n] - C qbar[j] sbar[n]; then mean * alpha, var * alpha^2 (alpha NULL: one),
   rstd = 1 / sqrt(var + eps). O(r^2) per pixel where forming the row is O(r C).

   R's rows come in groups, in P's row order, each described by 6 int64s in desc:
     kind 0 (fixed rows): {0, rows, ptr (rows, N) shared by the prompts, 0, 0, 0}
     kind 1 (an image->token update's reduced value rows, fast_decoder._reduced_values):
       {1, nh, maps: out_proj's per-head slices against S, bias (N,): its bias against S,
        v (B, t, nh*hd): the layer's values, tile * 2^40 + t * 65536 + hd}
       rows (h, k < t-1): (v[k,h] - v[t-1,h]) . maps[h][:, n]; then one row
       sum_h v[t-1,h] . maps[h][:, n] + bias[n]   (nh*(t-1) + 1 rows)
       maps is (nh, hd, N) where tile is 0, else in tiles of `tile` pixels (a multiple of
       FS_BLOCK), (ceil(N / tile), nh, hd, tile): a piece's 128-256 rows of the maps then lie in
       one contiguous block instead of one cache line in each of as many pages (perf: a fifth of
       the kernel's samples on the prefetches of those lines, their page walks).

     P (B, r, N), batch stride p_bstride (rows contiguous, N floats apart); G (B, r, r);
     qbar (B, r); sbar, sq (N,); alpha (B, N) or NULL; mean, rstd (B, N)
   Pieces: B * ceil(N / FS_BLOCK). A piece copies its block of P and forms its block of T in
   contiguous memory (rows N floats apart fall in few L1 sets, see factored_scores), then takes
   rows FS_ROWS at a time against all earlier ones (FS_ROWS x FS_V accumulators: each P load
   feeds FS_ROWS multiply-adds). Returns -1 when that memory cannot be had. */
#define FS_V 2
#define FS_BLOCK (FS_V * LANES)
#define FS_ROWS (VBYTES == 64 ? 8 : 4) /* rows of the quadratic form per register block (AVX-512: 16 accumulators, each P load feeding 8) */
#define FS_MAXHD 64 /* the widest head of a value group */
#define FS_MAXT 64  /* the most tokens of a value group */

static inline vf load_upto(const float *p, int64_t n) { return n <= 0 ? (vf){0} : load_part(p, n); }

/* pixels per piece, which the per-image maps' tiles must be a multiple of (segany.kernels.stats_block) */
int segany_stats_block(void) { return FS_BLOCK; }

int segany_factored_stats(int64_t p0, int64_t p1, int64_t B, int64_t r, int64_t N, int64_t C, const float *P,
                          int64_t p_bstride, int64_t n_groups, const int64_t *desc, const float *G, const float *qbar,
                          const float *sbar, const float *sq, const float *alpha, float eps, float *mean, float *rstd) {
    const int64_t npc = (N + FS_BLOCK - 1) / FS_BLOCK;
    const int64_t r4 = (r + FS_ROWS - 1) / FS_ROWS * FS_ROWS;
    int err = 0;
    (void)B;
#pragma omp parallel for schedule(dynamic) reduction(| : err)
    for (int64_t p = p0; p < p1; p++) {
        const int64_t b = p / npc, n0 = (p % npc) * FS_BLOCK;
        const int64_t nn = N - n0 < FS_BLOCK ? N - n0 : FS_BLOCK;
        if (n0 + PF_AHEAD * FS_BLOCK < N) { /* P's rows and the groups' rows of that piece */
            const int64_t na = n0 + PF_AHEAD * FS_BLOCK;
            for (int64_t j = 0; j < r; j++)
                for (int64_t q = 0; q < FS_BLOCK; q += 64 / (int64_t)sizeof(float)) __builtin_prefetch(P + b * p_bstride + j * N + na + q);
            for (int64_t g = 0; g < n_groups; g++) {
                const int64_t *d = desc + 6 * g;
                const int64_t rows = d[0] == 0 ? d[1] : d[1] * (d[5] & 0xffff), tile = d[0] == 0 ? 0 : d[5] >> 40;
                const int64_t ms = tile ? tile : N;
                const float *m = (const float *)(intptr_t)d[2] + (tile ? na / tile * rows * tile + na % tile : na);
                for (int64_t i = 0; i < rows; i++)
                    for (int64_t q = 0; q < FS_BLOCK; q += 64 / (int64_t)sizeof(float)) __builtin_prefetch(m + i * ms + q);
            }
        }
        /* pk, tk: (r4, FS_BLOCK); zero: a row of r zeros for G's rows past r */
        float *pk = scratch((size_t)(2 * r4 * FS_BLOCK + r));
        if (!pk) {
            err |= 1;
            continue;
        }
        float *tk = pk + r4 * FS_BLOCK, *zero = tk + r4 * FS_BLOCK;
        float mk[FS_MAXHD * FS_BLOCK];
        const unsigned int csr = ftz_begin();
        const float *Pb = P + b * p_bstride + n0, *Gb = G + b * r * r, *qb = qbar + b * r;
        const float cf = (float)C;
        vf sb[FS_V], quad[FS_V], mn[FS_V];
        for (int v = 0; v < FS_V; v++) {
            sb[v] = load_upto(sbar + n0 + v * LANES, nn - v * LANES);
            quad[v] = (vf){0};
            mn[v] = (vf){0};
        }
        for (int64_t j = 0; j < r; j++)
            for (int v = 0; v < FS_V; v++) vstore(pk + j * FS_BLOCK + v * LANES, load_upto(Pb + j * N + v * LANES, nn - v * LANES));
        for (int64_t j = r; j < r4; j++)
            for (int v = 0; v < FS_V; v++) vstore(pk + j * FS_BLOCK + v * LANES, (vf){0}), vstore(tk + j * FS_BLOCK + v * LANES, (vf){0});
        for (int64_t j = 0; j < r; j++) zero[j] = 0.0f;
        /* T's block, group by group */
        int64_t j = 0;
        for (int64_t g = 0; g < n_groups; g++) {
            const int64_t *d = desc + 6 * g;
            if (d[0] == 0) {
                const float *rows = (const float *)(intptr_t)d[2] + n0;
                for (int64_t i = 0; i < d[1]; i++, j++)
                    for (int v = 0; v < FS_V; v++)
                        vstore(tk + j * FS_BLOCK + v * LANES, load_upto(rows + i * N + v * LANES, nn - v * LANES));
                continue;
            }
            const int64_t nh = d[1], t = (d[5] >> 16) & 0xffffff, hd = d[5] & 0xffff, I = nh * hd, tile = d[5] >> 40;
            const int64_t ms = tile ? tile : N; /* the maps' row stride */
            const float *maps = (const float *)(intptr_t)d[2] + (tile ? n0 / tile * I * tile + n0 % tile : n0);
            const float *bias = (const float *)(intptr_t)d[3] + n0;
            if (tile % FS_BLOCK) {
                err |= 2;
                break;
            }
            const float *vb = (const float *)(intptr_t)d[4] + b * t * I, *vlast = vb + (t - 1) * I;
            if (hd > FS_MAXHD) {
                err |= 2;
                break;
            }
            if (t > FS_MAXT) {
                err |= 2;
                break;
            }
            /* per token row its coefficients: the difference to the last token's values, and for
               the last row the last token's values themselves (summed over the heads below) */
            float coef[FS_MAXT * FS_MAXHD];
            vf last[FS_V];
            for (int v = 0; v < FS_V; v++) last[v] = load_upto(bias + v * LANES, nn - v * LANES);
            for (int64_t h = 0; h < nh; h++) {
                const float *mh = maps + h * hd * ms, *vl = vlast + h * hd;
                for (int64_t k = 0; k < t; k++)
                    for (int64_t e = 0; e < hd; e++) coef[k * hd + e] = k + 1 < t ? vb[k * I + h * hd + e] - vl[e] : vl[e];
                /* the head's block of the map, once, to contiguous memory */
                for (int64_t e = 0; e < hd; e++)
                    for (int v = 0; v < FS_V; v++) vstore(mk + e * FS_BLOCK + v * LANES, load_upto(mh + e * ms + v * LANES, nn - v * LANES));
                for (int64_t k0 = 0; k0 < t; k0 += 4) {
                    const int64_t kn = t - k0 < 4 ? t - k0 : 4;
                    vf acc[4][FS_V];
                    for (int i = 0; i < 4; i++)
                        for (int v = 0; v < FS_V; v++) acc[i][v] = (vf){0};
                    for (int64_t e = 0; e < hd; e++) {
                        vf m[FS_V];
                        for (int v = 0; v < FS_V; v++) {
                            m[v] = vload(mk + e * FS_BLOCK + v * LANES);
                            PIN_REGISTER(m[v]);
                        }
                        for (int i = 0; i < 4; i++) {
                            const float x = i < kn ? coef[(k0 + i) * hd + e] : 0.0f;
                            for (int v = 0; v < FS_V; v++) acc[i][v] += x * m[v];
                        }
                    }
                    for (int i = 0; i < kn; i++) {
                        const int64_t k = k0 + i;
                        if (k + 1 < t)
                            for (int v = 0; v < FS_V; v++) vstore(tk + (j + h * (t - 1) + k) * FS_BLOCK + v * LANES, acc[i][v]);
                        else
                            for (int v = 0; v < FS_V; v++) last[v] += acc[i][v];
                    }
                }
            }
            for (int v = 0; v < FS_V; v++) vstore(tk + (j + nh * (t - 1)) * FS_BLOCK + v * LANES, last[v]);
            j += nh * (t - 1) + 1;
        }
        if (j != r) { /* the groups must describe exactly P's rows */
            err |= 2;
            ftz_end(csr);
            continue;
        }
        for (int64_t i = 0; i < r; i++)
            for (int v = 0; v < FS_V; v++) {
                float *tv = tk + i * FS_BLOCK + v * LANES;
                vstore(tv, vload(tv) - (cf * qb[i]) * sb[v]);
            }
        /* the quadratic form, FS_ROWS rows at a time */
        for (int64_t j0 = 0; j0 < r; j0 += FS_ROWS) {
            const float *g[FS_ROWS];
            for (int i = 0; i < FS_ROWS; i++) g[i] = j0 + i < r ? Gb + (j0 + i) * r : zero;
            vf acc[FS_ROWS][FS_V];
            for (int i = 0; i < FS_ROWS; i++)
                for (int v = 0; v < FS_V; v++) acc[i][v] = (vf){0};
            for (int64_t k = 0; k < j0; k++) {
                const float *pkv = pk + k * FS_BLOCK;
                vf q[FS_V];
                for (int v = 0; v < FS_V; v++) q[v] = vload(pkv + v * LANES);
                for (int i = 0; i < FS_ROWS; i++) {
                    const float x = g[i][k];
                    for (int v = 0; v < FS_V; v++) acc[i][v] += x * q[v];
                }
            }
            /* within the four: earlier rows, and half the diagonal */
            for (int i = 0; i < FS_ROWS && j0 + i < r; i++) {
                for (int i2 = 0; i2 <= i; i2++) {
                    const float x = i2 == i ? 0.5f * g[i][j0 + i] : g[i][j0 + i2];
                    for (int v = 0; v < FS_V; v++) acc[i][v] += x * vload(pk + (j0 + i2) * FS_BLOCK + v * LANES);
                }
                for (int v = 0; v < FS_V; v++) {
                    const vf q = vload(pk + (j0 + i) * FS_BLOCK + v * LANES);
                    quad[v] += q * (vload(tk + (j0 + i) * FS_BLOCK + v * LANES) + acc[i][v]);
                    mn[v] += qb[j0 + i] * q;
                }
            }
        }
        for (int v = 0; v < FS_V && v * LANES < nn; v++) {
            const int64_t m = nn - v * LANES, n = n0 + v * LANES;
            float mv[LANES], vv[LANES];
            vstore(mv, sb[v] + mn[v]);
            vstore(vv, (load_upto(sq + n, m) + 2.0f * quad[v]) * (1.0f / cf));
            for (int64_t i = 0; i < (m < LANES ? m : LANES); i++) {
                const float a = alpha ? alpha[b * N + n + i] : 1.0f;
                float var = vv[i] * a * a;
                if (var < 0.0f) var = 0.0f; /* (rounding; a NaN stays NaN, as the formed rows would give) */
                mean[b * N + n + i] = mv[i] * a;
                rstd[b * N + n + i] = 1.0f / sqrtf(var + eps);
            }
        }
        ftz_end(csr);
    }
    return err & 1 ? -1 : err ? -2 : 0;
}

/* ---------------------------------------------------------------------------------------------
   Attention scores against factored image tokens (fast_decoder._factored_scores), optionally
   with the softmax over the tokens (the image->token attention's).

   Per head hh, prompt b, token k, pixel n:
     s = alpha[b][n] * (sum_d q[hh][b*t+k][d] base[hh][d][n] + sum_j low[b][hh][k][j] P[b][j][n])
         + sum_d q[hh][b*t+k][d] pe[hh][d][n]
   PyTorch ran that as five kernels with K = 16 (heads' width) or r (the factored rank), each a
   pass over multi-MB maps; here pixel blocks go through all heads and tokens while their P rows
   stay in the cache.

     q     (nh, B*t, hd)   token queries (scaled)
     base  (nh, hd, N)     per-image projection of the image tokens' base, per head
     pe    (nh, hd, N)     the positional share (bias included); NULL: none (base holds it, and
                           alpha is one)
     alpha (B, N)          the row scales of the factored tokens
     low   (B, nh, t, r)   the tokens against the low-rank part's projection
     P     (B, r, N), batch stride P_bstride
     out   layout 0: (nh, B, t, N) scores; layout 1: (B, nh, t, N) scores, or with softmax, per
           pixel and head the softmax over the t tokens
     red   optional, with softmax: the softmax goes there instead, in segany_softmax_tokens's
           reduced layout (B, nh*(t-1) + 1, N; batch stride red_bstride), times red_scale
           (B, N) where given (the ones row too); out then only holds the scores. */


/* For the nn pixels at n (one vector), the softmax over t rows of stride N, from src into o
   (which may be src): its first t_out rows (t_out = t - 1: the reduced layout, see
   segany_softmax_tokens), times scale[n] where given. */
static inline void softmax_over_rows(const float *src, float *o, int64_t t, int64_t t_out, int64_t N, int64_t n,
                                     int64_t nn, const float *scale) {
    vf m = load_part(src + n, nn);
    for (int64_t k = 1; k < t; k++) {
        vf x = load_part(src + k * N + n, nn);
        m = vmax(x, m);
    }
    vf z = {0};
    for (int64_t k = 0; k < t; k++) {
        vf e = vexp(load_part(src + k * N + n, nn) - m);
        if (k < t_out) store_part(o + k * N + n, e, nn);
        z += e;
    }
    vf inv = 1.0f / z;
    if (scale) inv *= load_part(scale + n, nn);
    for (int64_t k = 0; k < t_out; k++) store_part(o + k * N + n, load_part(o + k * N + n, nn) * inv, nn);
}

/* the reduced layout's last row: ones, or the scales where given */
static inline void fill_row(float *o, int64_t n, const float *scale) {
    for (int64_t i = 0; i < n; i++) o[i] = scale ? scale[i] : 1.0f;
}

/* The largest of the n floats at x (-inf for n = 0). */
static inline float row_max(const float *x, int64_t n) {
    vf m = (vf){0} - INFINITY;
    for (int64_t i = 0; i < n; i += LANES) {
        const int64_t nn = n - i < LANES ? n - i : LANES;
        vf v = nn == LANES ? vload(x + i) : load_part(x + i, nn);
        if (nn < LANES)
            for (int64_t l = nn; l < LANES; l++) v[l] = -INFINITY;
        m = vmax(v, m);
    }
    float M = m[0];
    for (int l = 1; l < LANES; l++) M = m[l] > M ? m[l] : M;
    return M;
}

/* e = exp(x - M) for the n floats at x, stored to dst (which may be x) times mul[i] where mul is
   given; returns the sum of the e (without mul): a softmax's numerators and denominator. */
static inline float exp_row(const float *x, float M, int64_t n, float *dst, const float *mul) {
    vf z = {0};
    for (int64_t i = 0; i < n; i += LANES) {
        const int64_t nn = n - i < LANES ? n - i : LANES;
        vf e = vexp(load_part(x + i, nn) - M);
        if (nn < LANES)
            for (int64_t l = nn; l < LANES; l++) e[l] = 0.0f;
        z += e;
        store_part(dst + i, mul ? e * load_part(mul + i, nn) : e, nn);
    }
    return vsum(z);
}

/* The token->image attention's softmax over the N pixels, fused with the two layouts its value
   side reads (fast_decoder._t2i_factored): for each row (hh, b, k) of the scores s (nh, B, t, N),
   a = softmax(s) times alpha[b] goes to a_bt (B, nh, t, N) and to w (nh, B, t, N), which may be s
   itself. Three passes over one row (max; exp and sum; scale), where PyTorch made a softmax, a
   transposing copy and a product over the whole map. Pieces p0..p1-1 of nh * B * t rows. */
void segany_softmax_pixels(int64_t p0, int64_t p1, int64_t B, int64_t nh, int64_t t, int64_t N, const float *s,
                           const float *alpha, float *a_bt, float *w) {
#pragma omp parallel for schedule(dynamic)
    for (int64_t p = p0; p < p1; p++) {
        const unsigned int csr = ftz_begin();
        int64_t hh = p / (B * t), b = (p / t) % B, k = p % t;
        const float *row = s + p * N;
        float *arow = a_bt + ((b * nh + hh) * t + k) * N, *wrow = w + p * N;
        const float *al = alpha + b * N;
        float inv = 1.0f / exp_row(row, row_max(row, N), N, arow, 0);
        for (int64_t n = 0; n < N; n += LANES) {
            int64_t nn = N - n < LANES ? N - n : LANES;
            vf a = load_part(arow + n, nn) * inv * load_part(al + n, nn);
            store_part(arow + n, a, nn);
            if (wrow != arow) store_part(wrow + n, a, nn); /* (one prompt: the same rows) */
        }
        ftz_end(csr);
    }
}

/* The image->token attention's softmax over the t tokens, per pixel and head, from scores s
   (nh, B, t, N) into out (B, nh, t, N), the layout its update reads: one pass, where PyTorch
   made a softmax along a strided axis and a transposing copy (~4x the time). Pieces p0..p1-1 of
   nh * B * ceil(N / 256).

   reduced: out is (B, nh*(t-1) + 1, N) instead (batch stride out_bstride): per head the first
   t-1 tokens' rows, then one row of ones. A head's t weights sum to one, so its last token's share of the update is
   implied (fast_decoder._reduced_update): the update's rank drops from nh*t to nh*(t-1) + 1. */
void segany_softmax_tokens(int64_t p0, int64_t p1, int64_t nh, int64_t B, int64_t t, int64_t N, const float *s,
                           float *out, int reduced, int64_t out_bstride) {
    const int64_t nblk = (N + 255) / 256, K = nh * (t - 1) + 1;
#pragma omp parallel for schedule(dynamic)
    for (int64_t p = p0; p < p1; p++) {
        const unsigned int csr = ftz_begin();
        int64_t hh = p / (B * nblk), b = (p / nblk) % B, n0 = (p % nblk) * 256;
        int64_t n1 = n0 + 256 < N ? n0 + 256 : N;
        const float *src = s + (hh * B + b) * t * N;
        float *o = reduced ? out + b * out_bstride + hh * (t - 1) * N : out + (b * nh + hh) * t * N;
        for (int64_t n = n0; n < n1; n += LANES)
            softmax_over_rows(src, o, t, reduced ? t - 1 : t, N, n, n1 - n < LANES ? n1 - n : LANES, 0);
        if (reduced && hh == 0) fill_row(out + b * out_bstride + (K - 1) * N + n0, n1 - n0, 0);
        ftz_end(csr);
    }
}

/* Token->image attention against per-image keys and values: the first two-way block's, whose
   image tokens are the embedding itself (fast_decoder._t2i_cached). Per head hh and query j:
     out[j][hh*hd:(hh+1)*hd] = softmax_n(scale * q[j][hh] . kT[hh][:][n]) @ v[hh][n][:]
     q (Q, nh*hd), kT (nh, hd, N), v (nh, N, hd), out (Q, nh*hd)
   One piece is a head and up to T2I_QC queries: their scores (T2I_QC rows of N, in L2) in one
   pass over the keys, the softmax along them, one pass over the values. PyTorch's fused
   attention took 0.43-0.55 ms for a click's 7 queries (8 heads, 4096 pixels); this ~0.15.
   hd a multiple of LANES, at most 2 vectors, N a multiple of LANES (else 2 is returned). */
#define T2I_QC 8 /* queries per piece */
#define T2I_QB 6 /* queries per register block: 6 x 2 accumulators, 2 loads, 1 broadcast (7: no faster) */

static inline __attribute__((always_inline)) void t2i_scores_block(int64_t qb, int64_t xv, const float *restrict qs,
                                                                   int64_t hd, const float *restrict kT, int64_t N,
                                                                   int64_t n, float *restrict s, int64_t n_stride) {
    vf acc[T2I_QB][2];
    for (int64_t j = 0; j < qb; j++)
        for (int64_t v = 0; v < xv; v++) acc[j][v] = (vf){0};
    for (int64_t d = 0; d < hd; d++) {
        vf k[2];
        for (int64_t v = 0; v < xv; v++) k[v] = vload(kT + d * N + n + v * LANES);
        for (int64_t j = 0; j < qb; j++)
            for (int64_t v = 0; v < xv; v++) acc[j][v] += qs[j * hd + d] * k[v];
    }
    for (int64_t j = 0; j < qb; j++)
        for (int64_t v = 0; v < xv; v++) vstore(s + j * n_stride + n + v * LANES, acc[j][v]);
}

static inline __attribute__((always_inline)) void t2i_values_block(int64_t qb, int64_t hv, const float *restrict s,
                                                                   int64_t n_stride, const float *restrict vh, int64_t N,
                                                                   const float *restrict inv, float *restrict o, int64_t o_stride) {
    vf acc[T2I_QB][2];
    for (int64_t j = 0; j < qb; j++)
        for (int64_t v = 0; v < hv; v++) acc[j][v] = (vf){0};
    for (int64_t n = 0; n < N; n++) {
        vf x[2];
        for (int64_t v = 0; v < hv; v++) x[v] = vload(vh + n * hv * LANES + v * LANES);
        for (int64_t j = 0; j < qb; j++)
            for (int64_t v = 0; v < hv; v++) acc[j][v] += s[j * n_stride + n] * x[v];
    }
    for (int64_t j = 0; j < qb; j++)
        for (int64_t v = 0; v < hv; v++) vstore(o + j * o_stride + v * LANES, acc[j][v] * inv[j]);
}

int segany_t2i_attention(int64_t p0, int64_t p1, int64_t nh, int64_t Q, int64_t hd, int64_t N, float scale,
                         const float *q, const float *kT, const float *v, float *out) {
    if (hd % LANES || hd > 2 * LANES || N % LANES) return 2;
    const int64_t nqc = (Q + T2I_QC - 1) / T2I_QC, hv = hd / LANES, I = nh * hd;
    int err = 0;
#pragma omp parallel for schedule(dynamic) reduction(| : err)
    for (int64_t p = p0; p < p1; p++) {
        int64_t hh = p / nqc, q0 = (p % nqc) * T2I_QC, nq = Q - q0 < T2I_QC ? Q - q0 : T2I_QC;
        float *s = scratch((size_t)(T2I_QC * (N + hd + 1)));
        if (!s) {
            err |= 1;
            continue;
        }
        const unsigned int csr = ftz_begin();
        float *qs = s + T2I_QC * N, *inv = qs + T2I_QC * hd;
        for (int64_t j = 0; j < nq; j++)
            for (int64_t d = 0; d < hd; d++) qs[j * hd + d] = q[(q0 + j) * I + hh * hd + d] * scale;
        const float *kh = kT + hh * hd * N, *vh = v + hh * N * hd;
        for (int64_t j0 = 0; j0 < nq; j0 += T2I_QB) {
            int64_t qb = nq - j0 < T2I_QB ? nq - j0 : T2I_QB;
            int64_t n = 0;
            for (; n + 2 * LANES <= N; n += 2 * LANES) {
                if (qb == T2I_QB) t2i_scores_block(T2I_QB, 2, qs + j0 * hd, hd, kh, N, n, s + j0 * N, N);
                else t2i_scores_block(qb, 2, qs + j0 * hd, hd, kh, N, n, s + j0 * N, N);
            }
            for (; n < N; n += LANES) t2i_scores_block(qb, 1, qs + j0 * hd, hd, kh, N, n, s + j0 * N, N);
        }
        for (int64_t j = 0; j < nq; j++) {
            float *row = s + j * N;
            inv[j] = 1.0f / exp_row(row, row_max(row, N), N, row, 0);
        }
        for (int64_t j0 = 0; j0 < nq; j0 += T2I_QB) {
            int64_t qb = nq - j0 < T2I_QB ? nq - j0 : T2I_QB;
            float *o = out + (q0 + j0) * I + hh * hd;
            if (hv == 2 && qb == T2I_QB) t2i_values_block(T2I_QB, 2, s + j0 * N, N, vh, N, inv + j0, o, I);
            else if (hv == 2) t2i_values_block(qb, 2, s + j0 * N, N, vh, N, inv + j0, o, I);
            else t2i_values_block(qb, 1, s + j0 * N, N, vh, N, inv + j0, o, I);
        }
        ftz_end(csr);
    }
    return err;
}

/* The value side of token->image attention on factored image tokens (fast_decoder._t2i_factored)
   for one prompt, from its scores s (nh, t, N): with a = softmax_n(s) * alpha,
     o[hh][k]  = sum_n a[hh][k][n] v[hh][n][:]     (nh, t, hd)   the per-image values' share
     aP[hh][k] = sum_n a[hh][k][n] P[:, n]         (nh, t, r)    the low-rank part's
   Split over pixel ranges of AV_NR (split-K, as flash-decoding): each piece keeps its ranges'
   exp(s - its own max) in L2 and multiplies them with the values and a transposed copy of P's
   columns there, writing per row its max, sum and the unscaled products; segany_attend_combine
   rescales and adds the pieces. PyTorch made a softmax pass (two layouts) and two GEMMs with
   K = N over multi-MB maps.
     part  per piece: m (R), z (R), C (R, hd + rp); R = nh * tp rows (each head's t rows padded
           to whole GEMM_QB blocks), rp = r rounded up to whole vectors
   hd a multiple of LANES (else 2 is returned). */
#define AV_NR 256

/* dst (n, rp) = src (rows, n; row stride s_rs) transposed, zero past the rows (rows <= rp). 8 x 8
   blocks in registers with AVX: element by element, reading down P's columns (rows N floats
   apart, all in a few L1 sets) took 90% of segany_attend_values. */
static void transpose_block(const float *src, int64_t s_rs, int64_t rows, int64_t n, float *dst, int64_t rp) {
    int64_t j0 = 0;
#if defined(__AVX__)
    for (; j0 + 8 <= rows; j0 += 8) {
        int64_t c = 0;
        for (; c + 8 <= n; c += 8) {
            const float *a = src + j0 * s_rs + c;
            __m256 r0 = _mm256_loadu_ps(a), r1 = _mm256_loadu_ps(a + s_rs), r2 = _mm256_loadu_ps(a + 2 * s_rs),
                   r3 = _mm256_loadu_ps(a + 3 * s_rs), r4 = _mm256_loadu_ps(a + 4 * s_rs), r5 = _mm256_loadu_ps(a + 5 * s_rs),
                   r6 = _mm256_loadu_ps(a + 6 * s_rs), r7 = _mm256_loadu_ps(a + 7 * s_rs);
            __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
                   t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                   t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
            __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                   u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                   u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                   u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float *d = dst + c * rp + j0;
            _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_storeu_ps(d + rp, _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_storeu_ps(d + 2 * rp, _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_storeu_ps(d + 3 * rp, _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_storeu_ps(d + 4 * rp, _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_storeu_ps(d + 5 * rp, _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_storeu_ps(d + 6 * rp, _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_storeu_ps(d + 7 * rp, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
        for (int64_t j = j0; j < j0 + 8; j++)
            for (int64_t cc = c; cc < n; cc++) dst[cc * rp + j] = src[j * s_rs + cc];
    }
#endif
    for (int64_t j = j0; j < rows; j++)
        for (int64_t c = 0; c < n; c++) dst[c * rp + j] = src[j * s_rs + c];
    for (int64_t c = 0; c < n; c++)
        for (int64_t j = rows; j < rp; j++) dst[c * rp + j] = 0.0f;
}

static inline int64_t av_tp(int64_t t) { return (t + GEMM_QB - 1) / GEMM_QB * GEMM_QB; }

int64_t segany_attend_pieces(int64_t N) { return (N + AV_NR - 1) / AV_NR; }

int64_t segany_attend_part_floats(int64_t nh, int64_t t, int64_t r, int64_t hd, int64_t N) {
    const int64_t R = nh * av_tp(t), rp = (r + LANES - 1) / LANES * LANES;
    return ((N + AV_NR - 1) / AV_NR) * R * (2 + hd + rp);
}

int segany_attend_values(int64_t p0, int64_t p1, int64_t nh, int64_t t, int64_t N, int64_t r, int64_t hd,
                         const float *s, const float *alpha, const float *v, const float *P, float *part) {
    if (hd % LANES) return 2;
    const int64_t tp = av_tp(t), R = nh * tp, rp = (r + LANES - 1) / LANES * LANES, W = hd + rp;
    int err = 0;
#pragma omp parallel for schedule(dynamic) reduction(| : err)
    for (int64_t p = p0; p < p1; p++) {
        float *E = scratch((size_t)(R * AV_NR + AV_NR * rp));
        if (!E) {
            err |= 1;
            continue;
        }
        const unsigned int csr = ftz_begin();
        const int64_t n0 = p * AV_NR, nn = N - n0 < AV_NR ? N - n0 : AV_NR;
        float *PT = E + R * AV_NR, *mp = part + p * R * (2 + W), *zp = mp + R, *C = zp + R;
        const float *al = alpha + n0;
        for (int64_t hh = 0; hh < nh; hh++)
            for (int64_t k = 0; k < tp; k++) {
                const int64_t row = hh * tp + k;
                float *e = E + row * AV_NR;
                if (k >= t) { /* padding rows: zero weights, nothing to add */
                    for (int64_t n = 0; n < nn; n++) e[n] = 0.0f;
                    mp[row] = 0.0f;
                    zp[row] = 0.0f;
                    continue;
                }
                const float *src = s + (hh * t + k) * N + n0;
                mp[row] = row_max(src, nn);
                zp[row] = exp_row(src, mp[row], nn, e, al);
            }
        transpose_block(P + n0, N, r, nn, PT, rp);
        for (int64_t g = 0; g < R; g += GEMM_QB) rows_gemm(rp, nn, E + g * AV_NR, AV_NR, PT, rp, C + g * W + hd, W, 0);
        for (int64_t hh = 0; hh < nh; hh++)
            for (int64_t k = 0; k < tp; k += GEMM_QB)
                rows_gemm(hd, nn, E + (hh * tp + k) * AV_NR, AV_NR, v + (hh * N + n0) * hd, hd, C + (hh * tp + k) * W, W, 0);
        ftz_end(csr);
    }
    return err;
}

/* The pieces of segany_attend_values added up: o (nh, t, hd), aP (nh, t, r). */
void segany_attend_combine(int64_t pieces, int64_t nh, int64_t t, int64_t r, int64_t hd, const float *part, float *o,
                           float *aP) {
    const int64_t tp = av_tp(t), R = nh * tp, rp = (r + LANES - 1) / LANES * LANES, W = hd + rp, PS = R * (2 + W);
    float *acc = scratch((size_t)W);
    if (!acc) return;
    for (int64_t hh = 0; hh < nh; hh++)
        for (int64_t k = 0; k < t; k++) {
            const int64_t row = hh * tp + k;
            float M = -INFINITY;
            for (int64_t p = 0; p < pieces; p++) M = part[p * PS + row] > M ? part[p * PS + row] : M;
            float Z = 0.0f;
            for (int64_t j = 0; j < W; j++) acc[j] = 0.0f;
            for (int64_t p = 0; p < pieces; p++) {
                const float *mp = part + p * PS;
                const float wgt = expf(mp[row] - M);
                Z += wgt * mp[R + row];
                const float *C = mp + 2 * R + row * W;
                for (int64_t j = 0; j < W; j++) acc[j] += wgt * C[j];
            }
            const float inv = 1.0f / Z;
            float *oo = o + (hh * t + k) * hd, *ap = aP + (hh * t + k) * r;
            for (int64_t d = 0; d < hd; d++) oo[d] = acc[d] * inv;
            for (int64_t j = 0; j < r; j++) ap[j] = acc[hd + j] * inv;
        }
}

#define SC_TB (VBYTES == 64 ? 8 : 4) /* tokens per register block (2 x 8 accumulators: 18 of AVX-512's 32 registers) */
#define SC_BLOCK 64              /* pixels per piece of work (segany.kernels.factored_scores) */
int segany_scores_block(void) { return SC_BLOCK; } /* (the maps' tile width: segany.kernels.scores_tiles) */

/* Image->token attention against per-image queries (the first two-way block's: its image tokens
   are the embedding itself; fast_decoder._i2t_cached): per head hh, prompt b, pixel n the scores
   s[k] = scale * keys[b][k][hh] . q[hh][:][n] over the t tokens and their softmax, into out in
   segany_softmax_tokens's reduced layout (B, nh*(t-1)+1, N; batch stride out_bstride). In one
   pass per pixel vector, where a GEMM wrote the (nh, B*t, N) scores for the softmax to read.
     keys (B, t, nh*hd) the tokens' projected keys, times scale here; q (nh, hd, N), or tiled: in segany.kernels.scores_tiles' pixel tiles
   Pieces p0..p1-1 of nh * B * ceil(N / 256); t at most I2T_TMAX, hd at most I2T_HDMAX (else 2 is
   returned). */
#define I2T_TMAX 16
#define I2T_HDMAX 64

/* one pixel vector of one head: t (a constant where inlined, so the scores stay in registers) */
static inline __attribute__((always_inline)) void i2t_vector(int64_t t, int64_t hd, int64_t qs, const float *restrict qn,
                                                              int64_t nn, const float *restrict hk, float *restrict o,
                                                              int64_t N) {
    vf sc[I2T_TMAX];
    for (int64_t k = 0; k < t; k++) sc[k] = (vf){0};
    for (int64_t d = 0; d < hd; d++) {
        vf x = nn == LANES ? vload(qn + d * qs) : load_part(qn + d * qs, nn);
        for (int64_t k = 0; k < t; k++) sc[k] += hk[k * hd + d] * x;
    }
    vf m = sc[0];
    for (int64_t k = 1; k < t; k++) m = vmax(sc[k], m);
    vf z = {0};
    for (int64_t k = 0; k < t; k++) {
        sc[k] = vexp(sc[k] - m);
        z += sc[k];
    }
    vf inv = 1.0f / z;
    for (int64_t k = 0; k + 1 < t; k++) store_part(o + k * N, sc[k] * inv, nn);
}

int segany_i2t_softmax(int64_t p0, int64_t p1, int64_t nh, int64_t B, int64_t t, int64_t hd, int64_t N,
                       const float *keys, float scale, const float *q, int tiled, float *out, int64_t out_bstride) {
    if (t < 1 || t > I2T_TMAX || hd > I2T_HDMAX) return 2;
    const int64_t nblk = (N + 255) / 256, K = nh * (t - 1) + 1;
#pragma omp parallel for schedule(dynamic)
    for (int64_t p = p0; p < p1; p++) {
        const unsigned int csr = ftz_begin();
        const int64_t hh = p / (B * nblk), b = (p / nblk) % B, n0 = (p % nblk) * 256;
        const int64_t n1 = n0 + 256 < N ? n0 + 256 : N;
        float hk[I2T_TMAX * I2T_HDMAX]; /* the head's slice of the prompt's keys, scaled */
        for (int64_t k = 0; k < t; k++)
            for (int64_t d = 0; d < hd; d++) hk[k * hd + d] = keys[(b * t + k) * nh * hd + hh * hd + d] * scale;
        float *o = out + b * out_bstride + hh * (t - 1) * N;
        for (int64_t n = n0; n < n1; n += LANES) {
            const int64_t nn = n1 - n < LANES ? n1 - n : LANES;
            /* untiled: the pixel's column of the head's (hd, N) map; tiled: of its tile's (hd, SC_BLOCK) */
            const float *qn = tiled ? q + ((n / SC_BLOCK * nh + hh) * hd) * SC_BLOCK + n % SC_BLOCK : q + hh * hd * N + n;
            const int64_t qs = tiled ? SC_BLOCK : N;
            switch (t) {
#define I2T_CASE(T) case T: i2t_vector(T, hd, qs, qn, nn, hk, o + n, N); break;
                I2T_CASE(1) I2T_CASE(2) I2T_CASE(3) I2T_CASE(4) I2T_CASE(5) I2T_CASE(6) I2T_CASE(7) I2T_CASE(8)
                I2T_CASE(9) I2T_CASE(10) I2T_CASE(11) I2T_CASE(12) I2T_CASE(13) I2T_CASE(14) I2T_CASE(15) I2T_CASE(16)
#undef I2T_CASE
            }
        }
        if (hh == 0) fill_row(out + b * out_bstride + (K - 1) * N + n0, n1 - n0, 0);
        ftz_end(csr);
    }
    return 0;
}


/* acc[k][v] += sum_d c[k * cs + d] * rows[d * N + n + v * LANES] for d < nd, k < kb, v < 2
   (one broadcast of a token's weight serves two vectors) */
static inline __attribute__((always_inline)) void accumulate2(vf (*restrict acc)[2], const float *restrict rows,
                                                              int64_t nd, int64_t N, int64_t n,
                                                              const float *restrict c, int64_t cs, int64_t kb) {
    for (int64_t d = 0; d < nd; d++) {
        vf x0 = vload(rows + d * N + n), x1 = vload(rows + d * N + n + LANES);
        PIN_REGISTER(x0);
        PIN_REGISTER(x1);
        for (int64_t k = 0; k < kb; k++) {
            float w = c[k * cs + d];
            acc[k][0] += w * x0;
            acc[k][1] += w * x1;
        }
    }
}

static inline __attribute__((always_inline)) void scores_block(
    int64_t n0, int64_t nv, const float *restrict qk, int64_t hd, const float *restrict bh,
    const float *restrict ph, const float *restrict al, const float *restrict lk, int64_t r,
    const float *restrict Pb, int64_t N, int64_t kb, float *const *restrict orow) {
    /* kb tokens (<= SC_TB) at vectors nv, nv+1 of the block starting at n0 */
    int64_t n = n0 + nv * LANES;
    vf acc[SC_TB][2];
    for (int64_t k = 0; k < SC_TB; k++) acc[k][0] = acc[k][1] = (vf){0};
    accumulate2(acc, bh, hd, N, n, qk, hd, kb);
    accumulate2(acc, Pb, r, N, n, lk, r, kb);
    vf a0 = vload(al + n), a1 = vload(al + n + LANES);
    for (int64_t k = 0; k < kb; k++) {
        acc[k][0] *= a0;
        acc[k][1] *= a1;
    }
    if (ph) accumulate2(acc, ph, hd, N, n, qk, hd, kb);
    for (int64_t k = 0; k < kb; k++) {
        vstore(orow[k] + n, acc[k][0]);
        vstore(orow[k] + n + LANES, acc[k][1]);
    }
}

static float scores_scalar(int64_t n, int64_t k, const float *q, int64_t hd, const float *bh, const float *ph,
                           int64_t ms, int64_t mn, const float *al, const float *lk, int64_t r, const float *Pb, int64_t N) {
    /* the maps' rows ms floats apart, pixel n at mn in them */
    float s = 0.0f, sp = 0.0f;
    for (int64_t d = 0; d < hd; d++) {
        s += q[k * hd + d] * bh[d * ms + mn];
        if (ph) sp += q[k * hd + d] * ph[d * ms + mn];
    }
    for (int64_t j = 0; j < r; j++) s += lk[k * r + j] * Pb[j * N + n];
    return s * al[n] + sp;
}

/* n floats (at most SC_BLOCK) of one row into a packed block; whole blocks as fixed-size moves */
static inline void copy_block(float *restrict dst, const float *restrict src, int64_t n) {
    if (n == SC_BLOCK)
        __builtin_memcpy(dst, src, sizeof(float) * SC_BLOCK);
    else
        for (int64_t i = 0; i < n; i++) dst[i] = src[i];
}

/* Pieces p0..p1-1 of ceil(N / SC_BLOCK) pixel blocks, each for all B prompts. base and pe
   (nh, hd, N), or with tiled in blocks of SC_BLOCK pixels, (ceil(N / SC_BLOCK), nh, hd,
   SC_BLOCK): a block's rows of them are then one contiguous run (256 rows of a head's maps
   otherwise lie in as many pages, 16 KB apart). */
void segany_factored_scores(int64_t p0, int64_t p1, int64_t B, int64_t nh, int64_t t, int64_t hd, int64_t r,
                            int64_t N, const float *q, const float *base, const float *pe, int tiled, const float *alpha,
                            const float *low, const float *P, int64_t P_bstride, float *out, int layout, int softmax,
                            float *red, int64_t red_bstride, const float *red_scale) {
#pragma omp parallel for schedule(dynamic)
    for (int64_t p = p0; p < p1; p++) {
        const unsigned int csr = ftz_begin();
        int64_t n0 = p * SC_BLOCK;
        int64_t n1 = n0 + SC_BLOCK < N ? n0 + SC_BLOCK : N;
        /* the maps: row stride, this block's first pixel in a row, the block's start */
        const int64_t ms = tiled ? SC_BLOCK : N, mo = tiled ? 0 : n0;
        const float *base_b = tiled ? base + p * nh * hd * SC_BLOCK : base;
        const float *pe_b = pe && tiled ? pe + p * nh * hd * SC_BLOCK : pe;
        /* The block's rows packed side by side: rows N floats apart (16 KB at SAM's 64x64) fall in
           one L1 set, so the rows that every head and token group re-reads missed L1 each time
           (the kernel ran at a fifth of the FMA rate). Only the whole vector pairs read them.
           Every prompt's P rows are packed first, then each head's base and pe rows once for all
           prompts (packed per prompt, those copies took a third of the kernel's time). */
        const int64_t nw = (n1 - n0) / (2 * LANES) * 2 * LANES;
        float *pk = nw ? scratch((size_t)((B * r + 2 * hd) * SC_BLOCK)) : 0;
        if (pk)
            for (int64_t b = 0; b < B; b++)
                for (int64_t j = 0; j < r; j++) copy_block(pk + (b * r + j) * SC_BLOCK, P + b * P_bstride + j * N + n0, nw);
        float *bk = pk ? pk + B * r * SC_BLOCK : 0, *ek = pk ? bk + hd * SC_BLOCK : 0;
        const int64_t nfull = pk || !tiled ? nw / LANES : 0; /* (unpacked, tiled maps and P differ in stride: scalar) */
        for (int64_t hh = 0; hh < nh; hh++) {
            const float *bh = base_b + hh * hd * ms, *ph = pe_b ? pe_b + hh * hd * ms : 0;
            if (pk)
                for (int64_t d = 0; d < hd; d++) {
                    copy_block(bk + d * SC_BLOCK, bh + d * ms + mo, nw);
                    if (ph) copy_block(ek + d * SC_BLOCK, ph + d * ms + mo, nw);
                }
            for (int64_t b = 0; b < B; b++) {
                const float *al = alpha + b * N, *Pb = P + b * P_bstride;
                for (int64_t k0 = 0; k0 < t; k0 += SC_TB) {
                    int64_t kb = t - k0 < SC_TB ? t - k0 : SC_TB;
                    const float *qk = q + (hh * B * t + b * t + k0) * hd;
                    const float *lk = low + ((b * nh + hh) * t + k0) * r;
                    float *orow[SC_TB];
                    for (int64_t k = 0; k < SC_TB; k++) {
                        int64_t kk = k0 + (k < kb ? k : 0);
                        orow[k] = out + (layout ? (b * nh + hh) * t + kk : (hh * B + b) * t + kk) * N;
                    }
                    /* constant token counts keep the accumulators in registers; packed rows are
                       SC_BLOCK apart and start at the block (n0 = 0 there, outputs and alpha moved) */
                    float *orel[SC_TB];
                    for (int64_t k = 0; k < SC_TB; k++) orel[k] = orow[k] + n0;
                    const float *rb = pk ? bk : bh, *re = pk && ph ? ek : ph, *rp = pk ? pk + b * r * SC_BLOCK : Pb;
                    const float *ra = pk ? al + n0 : al;
                    const int64_t rs = pk ? SC_BLOCK : N, rn = pk ? 0 : n0;
                    float *const *ro = pk ? orel : orow;
                    for (int64_t v = 0; v < nfull; v += 2) switch (kb) {
#if VBYTES == 64
                        case 8: scores_block(rn, v, qk, hd, rb, re, ra, lk, r, rp, rs, 8, ro); break;
                        case 7: scores_block(rn, v, qk, hd, rb, re, ra, lk, r, rp, rs, 7, ro); break;
                        case 6: scores_block(rn, v, qk, hd, rb, re, ra, lk, r, rp, rs, 6, ro); break;
                        case 5: scores_block(rn, v, qk, hd, rb, re, ra, lk, r, rp, rs, 5, ro); break;
#endif
                        case 4: scores_block(rn, v, qk, hd, rb, re, ra, lk, r, rp, rs, 4, ro); break;
                        case 3: scores_block(rn, v, qk, hd, rb, re, ra, lk, r, rp, rs, 3, ro); break;
                        case 2: scores_block(rn, v, qk, hd, rb, re, ra, lk, r, rp, rs, 2, ro); break;
                        default: scores_block(rn, v, qk, hd, rb, re, ra, lk, r, rp, rs, 1, ro); break;
                    }
                    for (int64_t n = n0 + nfull * LANES; n < n1; n++)
                        for (int64_t k = 0; k < kb; k++)
                            orow[k][n] = scores_scalar(n, k, qk, hd, bh, ph, ms, n - n0 + mo, al, lk, r, Pb, N);
                }
                if (softmax) { /* over the t tokens of this head, LANES pixels at a time (layout 1) */
                    float *o = out + (b * nh + hh) * t * N;
                    float *ro = red ? red + b * red_bstride + hh * (t - 1) * N : o;
                    const float *sc = red && red_scale ? red_scale + b * N : 0;
                    for (int64_t n = n0; n < n1; n += LANES)
                        softmax_over_rows(o, ro, t, red ? t - 1 : t, N, n, n1 - n < LANES ? n1 - n : LANES, sc);
                }
            }
        }
        if (softmax && red)
            for (int64_t b = 0; b < B; b++)
                fill_row(red + b * red_bstride + nh * (t - 1) * N + n0, n1 - n0, red_scale ? red_scale + b * N + n0 : 0);
        ftz_end(csr);
    }
}

static inline float hsum(vf v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v); /* (a tree of shuffles: vsum's chain of 16 adds waits ~4x longer) */
#elif defined(__AVX__)
    __m128 x = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
#else
    return vsum(v);
#endif
}

/* ---------------------------------------------------------------------------------------------
   The factored image tokens' small per-prompt algebra (fast_decoder._layers_cached on SAM's
   two-layer decoder), each in one call on the calling thread: for a click ~20 PyTorch
   operations apiece on (r x C) matrices (r ~ 50-100, C = 256), whose dispatch cost more than
   their arithmetic (a click's three of them: ~200 us of ~7 ms).

   segany_value_rows: an image->token update's reduced value rows (fast_decoder._reduced_values
   of _value_update): v (B, t, nh*hd) the layer's projected values, wo (nh, hd, C) out_proj's
   per-head slices (its weight transposed), bo (C,) its bias -> out (B, nh*(t-1)+1, C), batch
   stride out_bstride:
     row h*(t-1)+k, k < t-1:  (v[k,h] - v[t-1,h]) wo[h]
     the last row:            sum_h v[t-1,h] wo[h] + bo
   C a multiple of LANES; hd at most 64. Returns 0, or 2 for sizes it does not take. */
#define VR_CV 4 /* vectors of channels per block */
int segany_value_rows(int64_t B, int64_t t, int64_t nh, int64_t hd, int64_t C, const float *v, const float *wo,
                      const float *bo, float *out, int64_t out_bstride) {
    if (C % LANES || hd > 64 || hd < 1 || t < 1) return 2;
    const int64_t I = nh * hd, cb = VR_CV * LANES;
    const unsigned int csr = ftz_begin();
    for (int64_t b = 0; b < B; b++) {
        const float *vb = v + b * t * I, *vl = vb + (t - 1) * I;
        float *ob = out + b * out_bstride, *last = ob + nh * (t - 1) * C;
        for (int64_t c = 0; c < C; c++) last[c] = bo[c];
        for (int64_t h = 0; h < nh; h++) {
            const float *wh = wo + h * hd * C, *vlh = vl + h * hd;
            for (int64_t c0 = 0; c0 < C; c0 += cb) {
                const int64_t nv = (C - c0 < cb ? C - c0 : cb) / LANES;
                for (int64_t k = 0; k < t; k++) {
                    /* k = t-1: the last token's own values, summed into the last row */
                    vf acc[VR_CV];
                    for (int j = 0; j < VR_CV; j++) acc[j] = (vf){0};
                    for (int64_t e = 0; e < hd; e++) {
                        const float x = k + 1 < t ? vb[k * I + h * hd + e] - vlh[e] : vlh[e];
                        for (int j = 0; j < nv; j++) acc[j] += x * vload(wh + e * C + c0 + j * LANES);
                    }
                    float *o = k + 1 < t ? ob + (h * (t - 1) + k) * C : last;
                    for (int j = 0; j < nv; j++)
                        vstore(o + c0 + j * LANES, k + 1 < t ? acc[j] : vload(o + c0 + j * LANES) + acc[j]);
                }
            }
        }
    }
    ftz_end(csr);
    return 0;
}

/* dst (C, rp) = src (rows, C) transposed, zero past the rows (rows <= rp, rp a multiple of LANES).
   With AVX-512 a gather collects each column's LANES rows for one vector store: scalar stores
   LANES*C floats apart were three fifths of centered_gram's time. */
static void transpose_rows(const float *src, int64_t rows, int64_t C, float *dst, int64_t rp) {
#if defined(__AVX512F__)
    if (C <= (1 << 26)) {
        const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32((int)C));
        for (int64_t i0 = 0; i0 < rp; i0 += LANES) {
            const int64_t n = rows - i0;
            const __mmask16 m = n >= LANES ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
            for (int64_t c = 0; c < C; c++)
                _mm512_storeu_ps(dst + c * rp + i0, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, src + i0 * C + c, 4));
        }
        return;
    }
#endif
    for (int64_t c = 0; c < C; c++)
        for (int64_t i = 0; i < rp; i++) dst[c * rp + i] = i < rows ? src[i * C + c] : 0.0f;
}

/* segany_centered_gram: qbar (B, r) the means of Q's rows and G (B, r, r) = Qc Qc^T, Qc = Q - qbar
   (fast_decoder._factored_stats). Q's r = r1 + r2 rows (C channels, a multiple of LANES) come in
   two parts: rows 0..r1-1 from Q1 (batch stride q1_bstride), the rest from Q2 (q2_bstride), so
   the caller needs no concatenation. G is formed below its diagonal by blocks of GEMM_QB rows
   against the centred rows transposed (C, r rounded up to whole vectors) and mirrored. Returns 0,
   2 when C is not a multiple of LANES, -1 when the scratch memory cannot be had. */
int segany_centered_gram(int64_t B, int64_t r1, int64_t r2, int64_t C, const float *Q1, int64_t q1_bstride,
                         const float *Q2, int64_t q2_bstride, float *qbar, float *G) {
    if (C % LANES) return 2;
    const int64_t r = r1 + r2, rp = (r + LANES - 1) / LANES * LANES, rq = (r + GEMM_QB - 1) / GEMM_QB * GEMM_QB;
    float *qc = scratch((size_t)(rq * C + C * rp + GEMM_QB * rp));
    if (!qc) return -1;
    float *qt = qc + rq * C, *blk = qt + C * rp;
    const unsigned int csr = ftz_begin();
    for (int64_t b = 0; b < B; b++) {
        float *qb = qbar + b * r, *Gb = G + b * r * r;
        for (int64_t i = 0; i < rq; i++) {
            float *row = qc + i * C;
            if (i >= r) {
                for (int64_t c = 0; c < C; c++) row[c] = 0.0f;
                continue;
            }
            const float *src = i < r1 ? Q1 + b * q1_bstride + i * C : Q2 + b * q2_bstride + (i - r1) * C;
            vf s[4] = {(vf){0}, (vf){0}, (vf){0}, (vf){0}}; /* (four chains: a single one waits on each add) */
            int64_t c = 0;
            for (; c + 4 * LANES <= C; c += 4 * LANES)
                for (int j = 0; j < 4; j++) s[j] += vload(src + c + j * LANES);
            for (; c < C; c += LANES) s[0] += vload(src + c);
            const float m = hsum((s[0] + s[1]) + (s[2] + s[3])) / (float)C;
            qb[i] = m;
            for (c = 0; c < C; c += LANES) vstore(row + c, vload(src + c) - m);
        }
        transpose_rows(qc, rq, C, qt, rp);
        for (int64_t i0 = 0; i0 < r; i0 += GEMM_QB) {
            /* rows i0..i0+3 against columns 0..(i0+3) rounded up to whole vectors */
            const int64_t n = (i0 + GEMM_QB + LANES - 1) / LANES * LANES;
            rows_gemm(n < rp ? n : rp, C, qc + i0 * C, C, qt, rp, blk, rp, 0);
            for (int64_t i = i0; i < i0 + GEMM_QB && i < r; i++)
                for (int64_t j = 0; j <= i; j++) Gb[i * r + j] = Gb[j * r + i] = blk[(i - i0) * rp + j];
        }
    }
    ftz_end(csr);
    return 0;
}

/* segany_normed_rows: the LayerNorm of factored image tokens as new factors (fast_decoder._normed):
     Qout (B, r1+k+2, C) = [Q1 g; U g; g; bias]   (Q1 (B, r1, C), batch stride q1_bstride; r1 may be 0)
   and the same transposed, QT (B, C, rp) (rp >= r1+k+2, a multiple of LANES, zeros past the rows:
   factored_low's operand), and per pixel, from the statistics mean, rstd (B, N) and the input's
   row scales alpha (B, N; NULL: one): P's rows row0 and row0+1 (P (B, ., N), batch stride
   p_bstride) get -mean/alpha and 1/(alpha rstd), alpha_out (B, N) alpha rstd. */
void segany_normed_rows(int64_t B, int64_t r1, int64_t k, int64_t C, int64_t N, const float *Q1, int64_t q1_bstride,
                        const float *U, int64_t u_bstride, const float *g, const float *bias, float *Qout, float *QT,
                        int64_t rp, const float *mean, const float *rstd, const float *alpha, float *P, int64_t p_bstride,
                        int64_t row0, float *alpha_out) {
    const int64_t rows = r1 + k + 2;
    for (int64_t b = 0; b < B; b++) {
        float *qo = Qout + b * rows * C;
        for (int64_t i = 0; i < rows; i++) {
            const float *src = i < r1 ? Q1 + b * q1_bstride + i * C : i < r1 + k ? U + b * u_bstride + (i - r1) * C : 0;
            for (int64_t c = 0; c < C; c++) qo[i * C + c] = src ? src[c] * g[c] : i == r1 + k ? g[c] : bias[c];
        }
        transpose_rows(qo, rows, C, QT + b * C * rp, rp);
        float *pm = P + b * p_bstride + row0 * N, *ps = pm + N, *ao = alpha_out + b * N;
        const float *mb = mean + b * N, *sb = rstd + b * N, *ab = alpha ? alpha + b * N : 0;
        for (int64_t n = 0; n < N; n += LANES) {
            const int64_t m = N - n;
            const vf a = ab ? load_part(ab + n, m) : (vf){0} + 1.0f, mv = load_part(mb + n, m);
            const vf an = a * load_part(sb + n, m);
            store_part(pm + n, ab ? -(mv / a) : -mv, m);
            store_part(ps + n, 1.0f / an, m);
            store_part(ao + n, an, m);
        }
    }
}

/* segany_factored_low: the token side of attention scores against factored image tokens
   (fast_decoder._factored_scores), from a projection's outputs x (B, t, nh*hd) of the tokens:
     h (nh, B*t, hd)        x split by head, times scale
     low (B, nh, t, r)      low[b][hh][k][j] = h[hh][b*t+k] . (Q[b][j] W_hh^T) = Q[b][j] . z,
                            z = h[hh][b*t+k] W_hh (C,), W_hh rows hh*hd.. of W (nh*hd, C)
   with Q given transposed, QT (B, C, rp) (batch stride qt_bstride, rp a multiple of LANES, r <= rp
   columns used): z QT is a GEMM in registers. Forming z first takes a sixth of the multiply-adds
   of Q W^T at a click's sizes (r ~ 50-100 rows against hd = 16). Pieces p0..p1-1 of B * nh; C and
   rp multiples of LANES. Returns 0, 2 for sizes it does not take, -1 without memory. */
int segany_factored_low(int64_t p0, int64_t p1, int64_t B, int64_t t, int64_t nh, int64_t hd, int64_t C, int64_t r,
                        const float *x, float scale, const float *W, const float *QT, int64_t rp, int64_t qt_bstride,
                        float *h, float *low) {
    if (C % LANES || rp % LANES || r > rp) return 2;
    int err = 0;
    (void)B;
    const int64_t tq = (t + GEMM_QB - 1) / GEMM_QB * GEMM_QB;
#pragma omp parallel for schedule(dynamic) reduction(| : err)
    for (int64_t p = p0; p < p1; p++) {
        const int64_t b = p / nh, hh = p % nh, I = nh * hd;
        /* hp (tq, hd): the head's rows of h, zero past t; z (tq, C); blk (tq, rp) */
        float *hp = scratch((size_t)(tq * hd + tq * C + tq * rp));
        if (!hp) {
            err |= 1;
            continue;
        }
        float *z = hp + tq * hd, *blk = z + tq * C;
        const unsigned int csr = ftz_begin();
        for (int64_t k = 0; k < tq; k++) {
            float *hk = k < t ? h + (hh * B * t + b * t + k) * hd : 0;
            for (int64_t d = 0; d < hd; d++) {
                const float v = k < t ? x[(b * t + k) * I + hh * hd + d] * scale : 0.0f;
                hp[k * hd + d] = v;
                if (hk) hk[d] = v;
            }
        }
        for (int64_t k0 = 0; k0 < t; k0 += GEMM_QB) rows_gemm(C, hd, hp + k0 * hd, hd, W + hh * hd * C, C, z + k0 * C, C, 0);
        for (int64_t k0 = 0; k0 < t; k0 += GEMM_QB) rows_gemm(rp, C, z + k0 * C, C, QT + b * qt_bstride, rp, blk + k0 * rp, rp, 0);
        float *lb = low + (b * nh + hh) * t * r;
        for (int64_t k = 0; k < t; k++)
            for (int64_t j = 0; j < r; j++) lb[k * r + j] = blk[k * rp + j];
        ftz_end(csr);
    }
    return err ? -1 : 0;
}

/* segany_factored_values: the heads' outputs of token->image attention over factored image tokens
   (fast_decoder._t2i_factored), out (B, t, nh*hd):
     out[b][k][hh*hd + d] = o[hh][b*t+k][d] + (sum_j aP[b][hh][k][j] Q[b][j]) . W[hh*hd+d] + bias[hh*hd+d]
   with o (nh, B*t, hd) the attention against the per-image map, aP (B, nh, t, r) the attention
   against P's rows, Q (B, r, C) (rows contiguous, batch stride q_bstride), the value projection
   given transposed, WT (C, nh*hd), bias (nh*hd,) or NULL. (aP Q) W^T takes a sixth of the
   multiply-adds of aP (Q W^T) at a click's sizes. Pieces p0..p1-1 of B * nh; C a multiple of
   LANES. Returns 0, 2 for sizes it does not take, -1 without memory. */
#define FV_T 8 /* tokens per block of accumulators */
int segany_factored_values(int64_t p0, int64_t p1, int64_t B, int64_t t, int64_t nh, int64_t hd, int64_t C, int64_t r,
                           const float *o, const float *aP, const float *Q, int64_t q_bstride, const float *WT,
                           const float *bias, float *out) {
    if (C % LANES) return 2;
    int err = 0;
    (void)B;
#pragma omp parallel for schedule(dynamic) reduction(| : err)
    for (int64_t p = p0; p < p1; p++) {
        const int64_t b = p / nh, hh = p % nh, I = nh * hd, tq = (t + GEMM_QB - 1) / GEMM_QB * GEMM_QB;
        /* ap (tq, r): the head's attention rows, zero past t; y (tq, C); blk (tq, hd) */
        float *ap = scratch((size_t)(tq * r + tq * C + tq * hd));
        if (!ap) {
            err |= 1;
            continue;
        }
        float *y = ap + tq * r, *blk = y + tq * C;
        const unsigned int csr = ftz_begin();
        const float *Qb = Q + b * q_bstride, *ab = aP + (b * nh + hh) * t * r;
        for (int64_t i = 0; i < tq * r; i++) ap[i] = i < t * r ? ab[i] : 0.0f;
        for (int64_t k0 = 0; k0 < t; k0 += GEMM_QB) rows_gemm(C, r, ap + k0 * r, r, Qb, C, y + k0 * C, C, 0);
        if (hd % LANES == 0) { /* y W_hh^T as a GEMM against WT's columns hh*hd.. */
            for (int64_t k0 = 0; k0 < t; k0 += GEMM_QB) rows_gemm(hd, C, y + k0 * C, C, WT + hh * hd, I, blk + k0 * hd, hd, 0);
            for (int64_t k = 0; k < t; k++) {
                const float *oh = o + (hh * B * t + b * t + k) * hd;
                float *ok = out + (b * t + k) * I + hh * hd;
                for (int64_t d = 0; d < hd; d++) ok[d] = blk[k * hd + d] + oh[d] + (bias ? bias[hh * hd + d] : 0.0f);
            }
            ftz_end(csr);
            continue;
        }
        /* y W_hh^T with the head's hd outputs along the vectors (WT's columns hh*hd..) */
        for (int64_t d0 = 0; d0 < hd; d0 += LANES) {
            const int64_t nd = hd - d0 < LANES ? hd - d0 : LANES;
            const float *wcol = WT + hh * hd + d0;
            for (int64_t k0 = 0; k0 < t; k0 += FV_T) {
                const int64_t kn = t - k0 < FV_T ? t - k0 : FV_T;
                vf acc[FV_T];
                for (int i = 0; i < FV_T; i++) acc[i] = (vf){0};
                for (int64_t c = 0; c < C; c++) {
                    const vf w = load_part(wcol + c * I, nd);
                    for (int64_t i = 0; i < kn; i++) acc[i] += y[(k0 + i) * C + c] * w;
                }
                for (int64_t i = 0; i < kn; i++) {
                    const int64_t k = k0 + i;
                    vf res = acc[i] + load_part(o + (hh * B * t + b * t + k) * hd + d0, nd);
                    if (bias) res += load_part(bias + hh * hd + d0, nd);
                    store_part(out + (b * t + k) * I + hh * hd + d0, res, nd);
                }
            }
        }
        ftz_end(csr);
    }
    return err ? -1 : 0;
}
