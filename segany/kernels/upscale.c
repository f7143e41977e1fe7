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
#include "common.h"

/* Column pass of low-res rows r0..r1 (inclusive) of one map L (n_low x n_low) into c
   ((r1-r0+1) x W). Vectorised over rows: the needed block of L is transposed first (so that each
   output column's taps read contiguous low-res columns), the result is transposed back in
   cache-sized tiles. work: n_low*R + W*R floats. */
static void column_pass(const float *L, int64_t n_low, int64_t r0, int64_t r1, const int64_t *cidx,
                        const float *cw, int64_t W, int64_t S, float *c, float *work) {
    int64_t R = r1 - r0 + 1;
    float *Lt = work;          /* (n_low x R): Lt[j*R + r] = L[(r0+r)*n_low + j] */
    float *cT = work + n_low * R; /* (W x R) */
    for (int64_t r = 0; r < R; r++) {
        const float *row = L + (r0 + r) * n_low;
        for (int64_t j = 0; j < n_low; j++) Lt[j * R + r] = row[j];
    }
    for (int64_t x = 0; x < W; x++) {
        const int64_t *ix = cidx + x * S;
        const float *wx = cw + x * S;
        float *o = cT + x * R;
        const float *a = Lt + ix[0] * R;
        float w0 = wx[0];
        for (int64_t r = 0; r < R; r++) o[r] = a[r] * w0;
        for (int64_t t = 1; t < S; t++) {
            a = Lt + ix[t] * R;
            float wt = wx[t];
            for (int64_t r = 0; r < R; r++) {
                float p = a[r] * wt;
                o[r] = o[r] + p;
            }
        }
    }
    const int64_t B = 32;
    for (int64_t x0 = 0; x0 < W; x0 += B) {
        int64_t x1 = x0 + B < W ? x0 + B : W;
        for (int64_t q0 = 0; q0 < R; q0 += B) {
            int64_t q1 = q0 + B < R ? q0 + B : R;
            for (int64_t r = q0; r < q1; r++)
                for (int64_t x = x0; x < x1; x++) c[r * W + x] = cT[x * R + r];
        }
    }
}

/* Output rows y0..y1-1 of one mask.

   out_f (optional): (y1-y0) x W values. out_b (optional): (y1-y0) x W bytes, value > t_mid.
   counts (optional): counts[0] += #(value > t_hi), counts[1] += #(value > t_lo).
   row_any (optional): (y1-y0) bytes, any value of the row > t_mid.
   col_any (optional): W bytes, |= value > t_mid.
   Returns 0, or -1 when the scratch memory could not be allocated. */
int segany_upscale_rows(const float *L, int64_t n_low, const int64_t *ridx, const float *rw, int64_t y0,
                        int64_t y1, const int64_t *cidx, const float *cw, int64_t W, int64_t S, float t_hi,
                        float t_lo, float t_mid, float *out_f, uint8_t *out_b, int64_t *counts,
                        uint8_t *row_any, uint8_t *col_any) {
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
    float *c = scratch((size_t)(R * W + W + n_low * R + W * R));
    if (!c) return -1;
    float *v = c + R * W; /* one output row */
    column_pass(L, n_low, r0, r1, cidx, cw, W, S, c, v + W);
    int64_t n_hi = 0, n_lo = 0;
    for (int64_t y = y0; y < y1; y++) {
        const int64_t *iy = ridx + y * S;
        const float *wy = rw + y * S;
        const float *src = c + (iy[0] - r0) * W;
        float w0 = wy[0];
        for (int64_t x = 0; x < W; x++) v[x] = src[x] * w0;
        for (int64_t s = 1; s < S; s++) {
            src = c + (iy[s] - r0) * W;
            float ws = wy[s];
            for (int64_t x = 0; x < W; x++) {
                float p = src[x] * ws;
                v[x] = v[x] + p;
            }
        }
        int64_t k = y - y0;
        if (out_f) {
            float *o = out_f + k * W;
            for (int64_t x = 0; x < W; x++) o[x] = v[x];
        }
        if (out_b) {
            uint8_t *o = out_b + k * W;
            for (int64_t x = 0; x < W; x++) o[x] = v[x] > t_mid;
        }
        if (counts) {
            int32_t a = 0, b = 0;
            for (int64_t x = 0; x < W; x++) {
                a += v[x] > t_hi;
                b += v[x] > t_lo;
            }
            n_hi += a;
            n_lo += b;
        }
        if (col_any) {
            for (int64_t x = 0; x < W; x++) col_any[x] |= v[x] > t_mid;
        }
        if (row_any) {
            int32_t any = 0;
            for (int64_t x = 0; x < W; x++) any += v[x] > t_mid;
            row_any[k] = any > 0;
        }
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
                         const float *rw, int64_t H, const int64_t *cidx, const float *cw, int64_t W, int64_t S,
                         float t_hi, float t_lo, float t_mid, float *out_f, uint8_t *out_b, int64_t *counts,
                         uint8_t *row_any, uint8_t *col_any) {
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
        err |= segany_upscale_rows(L + i * n_low * n_low, n_low, ridx, rw, y0, y1, cidx, cw, W, S, t_hi, t_lo, t_mid,
                                   out_f ? out_f + off : 0, out_b ? out_b + off : 0, counts ? counts + 2 * i : 0,
                                   row_any ? row_any + i * H + y0 : 0, col_any ? col_any + i * W : 0) != 0;
    }
    return err ? -1 : 0;
}
