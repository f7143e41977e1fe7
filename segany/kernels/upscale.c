/* Fused separable mask upscaling for segany (see segany/kernels/__init__.py).

   SAM's low-res mask logits go to the original image size through a separable map: every output
   value is a column pass (S taps along a low-res row) followed by a row pass (S taps over the
   column-passed rows). The PyTorch code in segany/upscale.py computes each tap as a multiply and
   then an add, in tap order; so does this file, compiled with -ffp-contract=off (no fused
   multiply-add), so that both give the same float32 values bit for bit. What this adds is
   fusion: one pass over the output computes the values and, in the same loop, the thresholded
   bytes, the counts above two thresholds and the row/column extents, where PyTorch needs a
   separate pass (and a full-size temporary) for each.

   All arrays are row-major and contiguous. Tap tables: for output row y, taps s = 0..S-1 read
   low-res row ridx[y*S+s] with weight rw[y*S+s]; for output column x, taps read low-res column
   cidx[x*S+t] with weight cw[x*S+t]. */
#include <alloca.h>
#include <math.h>
#include <string.h>

#include "common.h"

/* The column taps in blocks of LANES output columns, for column_rows. An upscale's columns read
   neighbouring low-res columns, so a block's taps fall in a window of fewer than LANES low-res
   values starting at base[b] (fits[b]); then each tap of the block is one in-register permute of
   that window (gathers are several times slower, and slower still on CPUs with the Gather Data
   Sampling mitigation). idx/wt (nblk, S, LANES): the tap's offset in the window and its weight
   (0 past W). Blocks whose taps spread wider (strong downscaling) take the scalar loop. */
typedef struct {
    int64_t nblk;
    int32_t *base, *fits, *idx;
    float *wt;
} col_blocks;

/* Floats of memory the column blocks of a W x S tap table take (segany.kernels.Taps keeps them). */
int64_t segany_column_blocks_floats(int64_t W, int64_t S) {
    int64_t nblk = (W + LANES - 1) / LANES;
    return 2 * nblk + 2 * nblk * S * LANES;
}

static col_blocks col_blocks_view(float *mem, int64_t W, int64_t S) {
    col_blocks cb;
    cb.nblk = (W + LANES - 1) / LANES;
    cb.base = (int32_t *)mem;
    cb.fits = cb.base + cb.nblk;
    cb.idx = cb.fits + cb.nblk;
    cb.wt = (float *)(cb.idx + cb.nblk * S * LANES);
    return cb;
}

/* The column blocks of the tap table cidx/cw (W x S) into mem (segany_column_blocks_floats):
   built once per table, read by every upscale with it. */
void segany_column_blocks(const int64_t *cidx, const float *cw, int64_t W, int64_t S, float *mem) {
    col_blocks cb = col_blocks_view(mem, W, S);
    for (int64_t b = 0; b < cb.nblk; b++) {
        int64_t x0 = b * LANES, x1 = x0 + LANES < W ? x0 + LANES : W;
        int64_t lo = cidx[x0 * S], hi = lo;
        for (int64_t i = x0 * S; i < x1 * S; i++) {
            lo = cidx[i] < lo ? cidx[i] : lo;
            hi = cidx[i] > hi ? cidx[i] : hi;
        }
        cb.base[b] = (int32_t)lo;
        cb.fits[b] = hi - lo < LANES;
        for (int64_t t = 0; t < S; t++)
            for (int64_t l = 0; l < LANES; l++) {
                int64_t x = x0 + l, o = (b * S + t) * LANES + l;
                cb.idx[o] = x < x1 ? (int32_t)(cidx[x * S + t] - lo) : 0;
                cb.wt[o] = x < x1 ? cw[x * S + t] : 0.0f;
            }
    }
}

/* Column pass of low-res rows ra..rb (inclusive) of one map L (n_low x n_low), output columns
   x0..x1-1 (x0 a multiple of LANES), into c (row ra at c, row stride W): c[x] = sum_t
   L[r][cidx[x,t]] * cw[x,t], as a multiply then an add per tap, in tap order. row: n_low + LANES
   floats of scratch (a low-res row padded so that every window load stays inside it). */
static void column_rows(const float *L, int64_t n_low, int64_t ra, int64_t rb, int64_t x0, int64_t x1,
                        const col_blocks *cb, const int64_t *cidx, const float *cw, int64_t W, int64_t S,
                        float *c, float *row) {
    for (int64_t l = 0; l < LANES; l++) row[n_low + l] = 0.0f;
    for (int64_t r = ra; r <= rb; r++) {
        const float *Lr = L + r * n_low;
        for (int64_t j = 0; j < n_low; j++) row[j] = Lr[j];
        float *o = c + (r - ra) * W;
        for (int64_t b = x0 / LANES; b * LANES < x1; b++) {
            int64_t xa = b * LANES, n = x1 - xa < LANES ? x1 - xa : LANES;
#if defined(__GNUC__) && !defined(__clang__)
            if (cb->fits[b]) {
                vf win;
                __builtin_memcpy(&win, row + cb->base[b], sizeof win);
                const int32_t *ix = cb->idx + b * S * LANES;
                const float *wx = cb->wt + b * S * LANES;
                vi i0;
                vf w0;
                __builtin_memcpy(&i0, ix, sizeof i0);
                __builtin_memcpy(&w0, wx, sizeof w0);
                vf a = __builtin_shuffle(win, i0) * w0;
                for (int64_t t = 1; t < S; t++) {
                    vi it;
                    vf wt;
                    __builtin_memcpy(&it, ix + t * LANES, sizeof it);
                    __builtin_memcpy(&wt, wx + t * LANES, sizeof wt);
                    vf p = __builtin_shuffle(win, it) * wt;
                    a = a + p;
                }
                if (n == LANES)
                    __builtin_memcpy(o + xa, &a, sizeof a);
                else
                    for (int64_t l = 0; l < n; l++) o[xa + l] = a[l];
                continue;
            }
#endif
            for (int64_t x = xa; x < xa + n; x++) {
                float a = row[cidx[x * S]] * cw[x * S];
                for (int64_t t = 1; t < S; t++) {
                    float p = row[cidx[x * S + t]] * cw[x * S + t];
                    a = a + p;
                }
                o[x] = a;
            }
        }
    }
}

/* Row pass of one output row over columns x0..x1-1: v[x] = sum_s src_s[x] * w_s with the same
   multiply-then-add order as the column pass (src_s: the column-passed low-res row of tap s),
   stored to v (if given) and thresholded into ob (if given). One fused loop for S a constant. */
static inline __attribute__((always_inline)) float tap_sum(const float *restrict const *s, const float *w, int64_t x,
                                                            int64_t S) {
    float a = s[0][x] * w[0];
    for (int64_t k = 1; k < S; k++) {
        float p = s[k][x] * w[k];
        a = a + p;
    }
    return a;
}
#define ROW_TAPS(S_)                                                                                       \
    static void row_values_##S_(const float *const *src, const float *wy, int64_t x0, int64_t x1,           \
                                float *restrict v, uint8_t *restrict ob, float t) {                       \
        float w[S_];                                                                                      \
        const float *restrict s[S_];                                                                      \
        for (int64_t k = 0; k < S_; k++) {                                                                \
            w[k] = wy[k];                                                                                 \
            s[k] = src[k];                                                                                \
        }                                                                                                 \
        if (v && ob)                                                                                      \
            for (int64_t x = x0; x < x1; x++) {                                                           \
                float a = tap_sum(s, w, x, S_);                                                           \
                v[x] = a;                                                                                 \
                ob[x] = a > t;                                                                            \
            }                                                                                             \
        else if (ob)                                                                                      \
            for (int64_t x = x0; x < x1; x++) ob[x] = tap_sum(s, w, x, S_) > t;                           \
        else                                                                                              \
            for (int64_t x = x0; x < x1; x++) v[x] = tap_sum(s, w, x, S_);                                \
    }
ROW_TAPS(2)
ROW_TAPS(3)
ROW_TAPS(4)

static void row_values(const float *const *src, const float *wy, int64_t S, int64_t x0, int64_t x1, float *v,
                       uint8_t *ob, float t) {
    switch (S) {
        case 2: row_values_2(src, wy, x0, x1, v, ob, t); return;
        case 3: row_values_3(src, wy, x0, x1, v, ob, t); return;
        case 4: row_values_4(src, wy, x0, x1, v, ob, t); return;
    }
    for (int64_t x = x0; x < x1; x++) v[x] = src[0][x] * wy[0];
    for (int64_t k = 1; k < S; k++)
        for (int64_t x = x0; x < x1; x++) {
            float p = src[k][x] * wy[k];
            v[x] = v[x] + p;
        }
    if (ob)
        for (int64_t x = x0; x < x1; x++) ob[x] = v[x] > t;
}

/* Columns per block of the row pass's skip test (see segany_upscale_rows). */
#define XB 32

/* Per block of XB output columns of each low-res row r0..r0+R-1 of L: the min and max of the
   low-res values its column taps read (a column-passed value is a convex combination of them);
   -inf and +inf where one is NaN (then no bound decides the block). */
static void block_bounds(const float *L, int64_t n_low, int64_t r0, int64_t R, const int64_t *cidx, int64_t W,
                         int64_t S, float *bmin, float *bmax) {
    int64_t nb = (W + XB - 1) / XB;
    for (int64_t j = 0; j < nb; j++) {
        int64_t x0 = j * XB, x1 = x0 + XB < W ? x0 + XB : W;
        int64_t c0 = cidx[x0 * S], c1 = c0;
        for (int64_t x = x0; x < x1; x++)
            for (int64_t t = 0; t < S; t++) {
                int64_t cc = cidx[x * S + t];
                c0 = cc < c0 ? cc : c0;
                c1 = cc > c1 ? cc : c1;
            }
        for (int64_t r = 0; r < R; r++) {
            const float *row = L + (r0 + r) * n_low;
            float lo = row[c0], hi = row[c0];
            int bad = 0;
            for (int64_t cc = c0; cc <= c1; cc++) {
                float v = row[cc];
                lo = v < lo ? v : lo;
                hi = v > hi ? v : hi;
                bad |= v != v;
            }
            bmin[r * nb + j] = bad ? -INFINITY : lo;
            bmax[r * nb + j] = bad ? INFINITY : hi;
        }
    }
}

/* Per block of one output row: 0 where some of its values may be on either side of a requested
   threshold, else 1 + (all > t_mid) + 2 (all > t_hi) + 4 (all > t_lo) for those requested. */
static void classify_blocks(const float *bmin, const float *bmax, const int64_t *iy, int64_t S, int64_t r0,
                            int64_t nb, float t_hi, float t_lo, float t_mid, int need_mid, int need_counts,
                            float *lo, float *hi, uint8_t *code) {
    const float *m0 = bmin + (iy[0] - r0) * nb, *M0 = bmax + (iy[0] - r0) * nb;
    for (int64_t j = 0; j < nb; j++) {
        lo[j] = m0[j];
        hi[j] = M0[j];
    }
    for (int64_t s = 1; s < S; s++) {
        const float *m = bmin + (iy[s] - r0) * nb, *M = bmax + (iy[s] - r0) * nb;
        for (int64_t j = 0; j < nb; j++) {
            lo[j] = m[j] < lo[j] ? m[j] : lo[j];
            hi[j] = M[j] > hi[j] ? M[j] : hi[j];
        }
    }
    for (int64_t j = 0; j < nb; j++) {
        float a = fabsf(lo[j]), b = fabsf(hi[j]);
        float margin = (a > b ? a : b) * 1e-5f + 1e-30f; /* NaN for infinite bounds: undecided */
        float l = lo[j] - margin, h = hi[j] + margin;
        int ok = 1, c = 1;
        if (need_mid) {
            ok &= (l > t_mid) | (h <= t_mid);
            c += 1 * (l > t_mid);
        }
        if (need_counts) {
            ok &= ((l > t_hi) | (h <= t_hi)) & ((l > t_lo) | (h <= t_lo));
            c += 2 * (l > t_hi) + 4 * (l > t_lo);
        }
        code[j] = (uint8_t)(ok ? c : 0);
    }
}

/* Output rows y0..y1-1 of one mask.

   out_f (optional): (y1-y0) x W values. out_b (optional): (y1-y0) x W bytes, value > t_mid.
   counts (optional): counts[0] += #(value > t_hi), counts[1] += #(value > t_lo).
   row_any (optional): (y1-y0) bytes, any value of the row > t_mid.
   col_any (optional): W bytes, |= value > t_mid.

   skip (only without out_f, and only where the caller has checked that every row's and every
   column's tap weights are >= 0 and sum to 1 within 1e-6): a value is a convex combination of
   the low-res values its taps read, so where, for a block of XB columns of an output row, the
   smallest of those over the block (widened by a rounding margin that covers both passes, as in
   segany/upscale.py) is above a threshold, every value of the block is, and where the largest is
   not, none is. Runs of such blocks take their bytes, counts and extents without computing a
   value; the rest is computed as without skipping, so every result is the same.
   Returns 0, or -1 when the scratch memory could not be allocated. */
int segany_upscale_rows(const float *L, int64_t n_low, const int64_t *ridx, const float *rw, int64_t y0,
                        int64_t y1, const int64_t *cidx, const float *cw, float *blocks, int64_t W, int64_t S, float t_hi,
                        float t_lo, float t_mid, float *out_f, uint8_t *out_b, int64_t *counts,
                        uint8_t *row_any, uint8_t *col_any, int skip) {
    if (y1 <= y0) return 0;
    int64_t r0 = ridx[y0 * S], r1 = r0;
    for (int64_t y = y0; y < y1; y++) {
        for (int64_t s = 0; s < S; s++) {
            int64_t r = ridx[y * S + s];
            if (r < r0) r0 = r;
            if (r > r1) r1 = r;
        }
    }
    int64_t R = r1 - r0 + 1;
    int64_t nb = (W + XB - 1) / XB, ny = y1 - y0;
    skip = skip && !out_f && W >= 2 * n_low; /* (a block of a shrinking map reads too many low-res values) */
    size_t extra = skip ? (size_t)(2 * R * nb + 2 * nb + (ny * nb + R * nb) / 4 + 2) : 0;
    float *c = scratch((size_t)(R * W + W + n_low + LANES) + extra);
    if (!c) return -1;
    float *v = c + R * W; /* one output row */
    float *lrow = v + W;  /* one low-res row, padded (column_rows) */
    col_blocks cb = col_blocks_view(blocks, W, S);
    int need_mid = out_b || row_any || col_any;
    uint8_t *codes = 0;
    float *bmin = lrow + n_low + LANES, *bmax = bmin + R * nb, *lo = bmax + R * nb, *hi = lo + nb;
    if (skip) {
        /* a sample of rows first: where few blocks are decided (noisy logits) the test costs more
           than it saves */
        codes = (uint8_t *)(hi + nb);
        block_bounds(L, n_low, r0, R, cidx, W, S, bmin, bmax);
        int64_t open = 0, seen = 0;
        for (int64_t y = y0; y < y1; y += 8) {
            classify_blocks(bmin, bmax, ridx + y * S, S, r0, nb, t_hi, t_lo, t_mid, need_mid, counts != 0, lo, hi, codes);
            for (int64_t j = 0; j < nb; j++) open += !codes[j];
            seen += nb;
        }
        skip = 4 * open < 3 * seen;
    }
    if (!skip) {
        column_rows(L, n_low, r0, r1, 0, W, &cb, cidx, cw, W, S, c, lrow);
    } else {
        /* every row's block codes first, then the column pass only where a row computes values */
        uint8_t *need = codes + ny * nb;
        memset(need, 0, (size_t)(R * nb));
        int64_t open = 0;
        for (int64_t y = y0; y < y1; y++) {
            const int64_t *iy = ridx + y * S;
            uint8_t *code = codes + (y - y0) * nb;
            classify_blocks(bmin, bmax, iy, S, r0, nb, t_hi, t_lo, t_mid, need_mid, counts != 0, lo, hi, code);
            int64_t o = 0;
            for (int64_t j = 0; j < nb; j++) o += !code[j];
            open += o;
            if (o)
                for (int64_t s = 0; s < S; s++) {
                    uint8_t *nr = need + (iy[s] - r0) * nb;
                    for (int64_t j = 0; j < nb; j++) nr[j] |= !code[j];
                }
        }
        if (2 * open > ny * nb) { /* mostly undecided (noisy logits): one pass is cheaper */
            column_rows(L, n_low, r0, r1, 0, W, &cb, cidx, cw, W, S, c, lrow);
        } else {
            for (int64_t j = 0; j < nb; j++) {
                int64_t ra = -1, rb = -1;
                for (int64_t r = 0; r < R; r++)
                    if (need[r * nb + j]) {
                        if (ra < 0) ra = r;
                        rb = r;
                    }
                if (ra >= 0) {
                    int64_t x0 = j * XB, x1 = x0 + XB < W ? x0 + XB : W;
                    column_rows(L, n_low, r0 + ra, r0 + rb, x0, x1, &cb, cidx, cw, W, S, c + ra * W, lrow);
                }
            }
        }
    }
    int64_t n_hi = 0, n_lo = 0;
    const float **sp = (const float **)alloca(sizeof(float *) * (size_t)S); /* the row taps' rows of c */
    for (int64_t y = y0; y < y1; y++) {
        const int64_t *iy = ridx + y * S;
        const float *wy = rw + y * S;
        int64_t k = y - y0;
        int32_t any = 0;
        const uint8_t *code = skip ? codes + k * nb : 0;
        for (int64_t ja = 0; ja < nb;) { /* runs of blocks with one code */
            int64_t jb = ja + 1;
            uint8_t cj = skip ? code[ja] : 0;
            if (skip)
                while (jb < nb && code[jb] == cj) jb++;
            else
                jb = nb;
            int64_t x0 = ja * XB, x1 = jb * XB < W ? jb * XB : W, n = x1 - x0;
            ja = jb;
            if (cj) {
                int above_mid = (cj - 1) & 1;
                if (out_b) memset(out_b + k * W + x0, above_mid, (size_t)n);
                if (col_any && above_mid) memset(col_any + x0, 1, (size_t)n);
                any += above_mid;
                n_hi += ((cj - 1) & 2) ? n : 0;
                n_lo += ((cj - 1) & 4) ? n : 0;
                continue;
            }
            for (int64_t s = 0; s < S; s++) sp[s] = c + (iy[s] - r0) * W;
            /* values to out_f's row, else to v where a statistic reads them (or S has no fused loop) */
            float *vals = out_f ? out_f + k * W : (counts || col_any || row_any || S < 2 || S > 4) ? v : 0;
            row_values(sp, wy, S, x0, x1, vals, out_b ? out_b + k * W : 0, t_mid);
            if (counts) {
                int32_t a = 0, b = 0;
                for (int64_t x = x0; x < x1; x++) {
                    a += vals[x] > t_hi;
                    b += vals[x] > t_lo;
                }
                n_hi += a;
                n_lo += b;
            }
            if (col_any) {
                for (int64_t x = x0; x < x1; x++) col_any[x] |= vals[x] > t_mid;
            }
            if (row_any) {
                for (int64_t x = x0; x < x1; x++) any += vals[x] > t_mid;
            }
        }
        if (row_any) row_any[k] = any > 0;
    }
    if (counts) {
        counts[0] += n_hi;
        counts[1] += n_lo;
    }
    return 0;
}


/* n_masks masks (H output rows each) cut into pieces of rows_per_piece rows, numbered mask by
   mask; computes pieces p0..p1-1, spread over the OpenMP threads (a build without OpenMP runs
   them in order, and the caller spreads ranges of pieces over its own threads).
   counts/row_any/col_any need whole masks per piece (rows_per_piece >= H). */
int segany_upscale_batch(int64_t p0, int64_t p1, int64_t n_masks, int64_t rows_per_piece, const float *L,
                         int64_t n_low, const int64_t *ridx,
                         const float *rw, int64_t H, const int64_t *cidx, const float *cw, float *blocks, int64_t W,
                         int64_t S, float t_hi, float t_lo, float t_mid, float *out_f, uint8_t *out_b, int64_t *counts,
                         uint8_t *row_any, uint8_t *col_any, int skip) {
    if (rows_per_piece < 1) rows_per_piece = H;
    int64_t ppm = (H + rows_per_piece - 1) / rows_per_piece;
    if (p1 > n_masks * ppm) p1 = n_masks * ppm;
    int err = 0;
#pragma omp parallel for schedule(static) reduction(| : err)
    for (int64_t p = p0; p < p1; p++) {
        int64_t i = p / ppm;
        int64_t y0 = (p % ppm) * rows_per_piece;
        int64_t y1 = y0 + rows_per_piece < H ? y0 + rows_per_piece : H;
        int64_t off = i * H * W + y0 * W;
        err |= segany_upscale_rows(L + i * n_low * n_low, n_low, ridx, rw, y0, y1, cidx, cw, blocks, W, S, t_hi, t_lo, t_mid,
                                   out_f ? out_f + off : 0, out_b ? out_b + off : 0, counts ? counts + 2 * i : 0,
                                   row_any ? row_any + i * H + y0 : 0, col_any ? col_any + i * W : 0, skip) != 0;
    }
    return err ? -1 : 0;
}
