"""Low-res mask logits to the original image size, exactly and only where it matters.

SAM's masks come out of the decoder as (4h x 4w) logits; the official postprocess upsamples them
bilinearly to the padded input (1024 x 1024), crops the image area and upsamples again to the
image size, in float, for every mask. That map is separable and every output pixel is a convex
combination of a few neighbouring low-res logits. Output rows (columns) are grouped into *cells*
by their first low-res tap, so a cell takes its values from one small fixed low-res window:
where the window's minimum is above a threshold every pixel of the cell is above it, where its
maximum is not, none is. :class:`CellUpscaler` uses that for segment-everything (stability
scores, boxes and the survivors' masks): work grows with the low-res size plus the contour length,
not with the image area. This is the PyTorch path: where the native kernel of
``segany.kernels`` is built (the usual case), every mask takes its fused direct pass instead,
which computes the same values with the same float32 operations and was faster at every size
tried; the predictor's click masks use that kernel too.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import kernels


class _Axis:
    """One axis of the upscale: output index -> first low-res tap ``first`` and the weights of
    taps first .. first+S-1; outputs grouped into cells by ``first``."""

    def __init__(self, n_low: int, n_pad: int, n_crop: int, n_out: int) -> None:
        eye = torch.eye(n_low, dtype=torch.float64).view(n_low, 1, n_low, 1)
        up = F.interpolate(eye, (n_pad, 1), mode="bilinear", align_corners=False)[:, :, :n_crop]
        out = F.interpolate(up, (n_out, 1), mode="bilinear", align_corners=False)
        w = out.view(n_low, n_out).T.contiguous()  # (n_out, n_low)
        nz = w.abs() > 1e-12
        ar = torch.arange(n_low)
        first = torch.where(nz, ar, n_low).amin(1)
        last = torch.where(nz, ar, -1).amax(1)
        if (last < first).any() or (first[1:] < first[:-1]).any():
            raise RuntimeError("unexpected upscale weights (non-monotone taps)")
        self.span = int((last - first).max()) + 1
        self.n_out = n_out
        self.first = first
        self._w = w
        self.size = torch.bincount(first, minlength=n_low)[:n_low]  # outputs per cell
        self.cell_of = first  # (n_out,) the cell of each output index (outputs are in cell order)
        self.start = torch.cumsum(self.size, 0) - self.size
        self.max_size = int(self.size.max())
        # rows of the low-res map that any output reads (the rest is padding of the input)
        self.n_used = int(last.max()) + 1

    def build(self, S: int) -> None:
        """Per-output tap weights padded to ``S`` taps, and the per-cell tables."""
        n_low = self._w.shape[1]
        taps = self.first[:, None] + torch.arange(S)[None]
        idx = taps.clamp(max=n_low - 1)
        self.local = (torch.gather(self._w, 1, idx) * (taps < n_low)).float()  # (n_out, S)
        # (n_out, S) low-res index of each tap; taps past the last one read have weight 0
        self.idx = taps.clamp(max=self.n_used - 1)
        R = self.max_size
        pos = self.start[:, None] + torch.arange(R)[None]  # (n_low, R)
        valid = torch.arange(R)[None] < self.size[:, None]
        pos_c = pos.clamp(max=self.n_out - 1)
        self.table = self.local[pos_c] * valid[..., None]  # (n_low, R, S)
        self.valid = valid
        self.pos = torch.where(valid, pos, 0)


@lru_cache(maxsize=64)
def used_extent(n_low: int, img_size: int, input_size: Tuple[int, int], original_size: Tuple[int, int]) -> Tuple[int, int]:
    """The rows and columns of (n_low x n_low) low-res logits that the upscale to
    ``original_size`` reads (bilinear to the padded input, crop to ``input_size``, bilinear to the
    original size): (rows, cols), each at most n_low. The rest lies in the input's padding: for a
    3:2 photo a third of the rows."""
    return (_Axis(n_low, img_size, int(input_size[0]), int(original_size[0])).n_used,
            _Axis(n_low, img_size, int(input_size[1]), int(original_size[1])).n_used)


class CellUpscaler:
    """Exact statistics of ``upscale(low_res) > t`` at the original size (see the module doc).
    ``low_res`` logits are (B, n, n).

    Every value is computed by one fixed sequence of float32 operations (the column taps, then the
    row taps, each as a multiply then an add, in tap order), whether it comes from the direct
    separable upscale, from a contour cell, or from ``masks``; so the statistics, the boxes and the
    survivors' full-size masks agree bit for bit with each other, and with the official upscale up
    to float32 rounding."""

    def __init__(
        self,
        n_low: int,
        img_size: int,
        input_size: Tuple[int, int],
        original_size: Tuple[int, int],
        max_cells: int = 1 << 14,
        dense_fraction: float = 0.05,
        chunk_bytes: int = 32 << 20,
    ) -> None:
        self.rows = _Axis(n_low, img_size, input_size[0], original_size[0])
        self.cols = _Axis(n_low, img_size, input_size[1], original_size[1])
        self.n_low = n_low
        self.original_size = tuple(original_size)
        self.S = max(self.rows.span, self.cols.span)
        self.rows.build(self.S)
        self.cols.build(self.S)
        self.cell_valid = (self.rows.size > 0)[:, None] & (self.cols.size > 0)[None, :]
        self.cell_area = self.rows.size[:, None] * self.cols.size[None, :]  # (n, n) int64
        self._area_f64 = (self.cell_area * self.cell_valid).flatten().to(torch.float64)
        self.max_cells = max_cells
        # a mask whose contour cells cover more than this fraction of the image is computed by
        # the direct (chunked) upscale: per pixel it is cheaper than the cell gathers
        self.dense_fraction = dense_fraction
        H, W = self.original_size
        # the direct statistics hold no full-size map: column pass + two row blocks per mask
        self.dense_chunk = max(1, chunk_bytes // (4 * max(1, (self.rows.n_used + 2 * self._ROW_BLOCK) * W)))
        self.last_split = (0, 0, 0)  # (pruned, by cells, direct) masks of the last ``stats`` call
        self._colbuf: Optional[torch.Tensor] = None  # column-pass workspace, reused between calls
        self._taps: Optional[kernels.Taps] = None
        # With the native kernel every mask takes the fused direct pass: measured faster than the
        # cell analysis below at every image size tried (0.5-12 Mpx, smooth and noisy logits).
        # False: the PyTorch paths (cells / direct), e.g. to test them.
        self.prefer_native = True

    def _fused(self) -> Optional[kernels.Taps]:
        """The native kernel when it is to be used (``prefer_native``), else None."""
        return self.native() if self.prefer_native else None

    def native(self) -> Optional[kernels.Taps]:
        """The fused native kernel over this upscale's taps (same float32 operations as the
        PyTorch code below), or None where it is unavailable (see ``segany.kernels``)."""
        if self._taps is None and kernels.available():
            self._taps = kernels.Taps(self.rows.idx, self.rows.local, self.cols.idx, self.cols.local)
        return self._taps

    # ------------------------------------------------------------------ helpers
    def _window_bounds(self, L: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per cell, lower and upper bounds of every computed value of its pixels: the window's
        min and max, widened by a float32 rounding margin."""
        x = self._pad(L)
        n, S = L.shape[-1], self.S

        def sliding(f):
            # separable: S - 1 shifted elementwise passes per axis (several times faster than
            # max_pool2d with stride 1 on CPU)
            y = x[:, :, :n]
            for s in range(1, S):
                y = f(y, x[:, :, s : s + n])
            z = y[:, :n]
            for s in range(1, S):
                z = f(z, y[:, s : s + n])
            return z

        mx, mn = sliding(torch.maximum), sliding(torch.minimum)
        margin = torch.maximum(mx.abs(), mn.abs()) * 1e-5 + 1e-30
        return mn - margin, mx + margin

    def _area_sum(self, cells: torch.Tensor) -> torch.Tensor:
        """(B, n, n) bool cell selections -> (B,) int64 total pixel area, as one GEMV (exact:
        float64 holds every count)."""
        B = cells.shape[0]
        return (cells.reshape(B, -1).to(torch.float64) @ self._area_f64).round().to(torch.int64)

    @staticmethod
    def _count(m: torch.Tensor) -> torch.Tensor:
        """(b, H, W) bool -> (b,) int32 number of True (a byte sum: ~2x faster than bool sum)."""
        return m.view(torch.uint8).sum((1, 2), dtype=torch.int32)

    def _pad(self, L: torch.Tensor) -> torch.Tensor:
        return F.pad(L[:, None], (0, self.S - 1, 0, self.S - 1), mode="replicate")[:, 0]

    _ROW_BLOCK = 32  # output rows per block of the row pass (stays in cache)

    _COL_BLOCK = 256  # output columns per block of the column pass

    def _columns(self, L: torch.Tensor) -> torch.Tensor:
        """Column pass on the low-res rows that are read: (b, n, n) -> (b, n_used, W).

        Works a block of output columns at a time on the transposed low-res map (gathers of whole
        rows are several times faster than per-element gathers along the last axis), so every
        temporary is small; the result goes to a buffer kept between calls (fresh multi-MB
        allocations cost a page fault per 4 KiB)."""
        cols = self.cols
        b, n_used, W = L.shape[0], self.rows.n_used, self.original_size[1]
        xt = L[:, :n_used].float().transpose(1, 2).contiguous()  # (b, n, n_used)
        if self._colbuf is None or self._colbuf.shape[0] < b:
            self._colbuf = torch.empty(b, n_used, W)
        c = self._colbuf[:b]
        for x0 in range(0, W, self._COL_BLOCK):
            x1 = min(W, x0 + self._COL_BLOCK)
            v = xt.index_select(1, cols.idx[x0:x1, 0]).mul_(cols.local[x0:x1, 0, None])
            for s in range(1, self.S):
                v.add_(xt.index_select(1, cols.idx[x0:x1, s]).mul_(cols.local[x0:x1, s, None]))
            c[:, :, x0:x1] = v.transpose(1, 2)
        return c

    def _row_blocks(self, c: torch.Tensor):
        """Row pass, a block of output rows at a time: yields (y0, y1, values (b, y1-y0, W)), the
        values in a buffer that the next block overwrites."""
        rows = self.rows
        H = self.original_size[0]
        b, RB = c.shape[0], self._ROW_BLOCK
        v_buf = c.new_empty(b, RB, c.shape[2])
        t_buf = torch.empty_like(v_buf)
        for y0 in range(0, H, RB):
            y1 = min(H, y0 + RB)
            v, t = v_buf[:, : y1 - y0], t_buf[:, : y1 - y0]
            torch.index_select(c, 1, rows.idx[y0:y1, 0], out=v).mul_(rows.local[y0:y1, 0, None])
            for s in range(1, self.S):
                v.add_(torch.index_select(c, 1, rows.idx[y0:y1, s], out=t).mul_(rows.local[y0:y1, s, None]))
            yield y0, y1, v

    def full(self, L: torch.Tensor) -> torch.Tensor:
        """(b, n, n) -> (b, H, W) float32 upscaled logits (the direct separable computation:
        columns on the low-res rows that are read, then rows; in-place multiply, then add)."""
        native = self._fused()
        if native is not None:
            return native.values(L)
        c = self._columns(L)
        out = c.new_empty(L.shape[0], *self.original_size)
        for y0, y1, v in self._row_blocks(c):
            out[:, y0:y1] = v
        return out

    def _eval_cells(self, Lp: torch.Tensor, cells: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Values of the pixels of ``cells`` (k, 3: mask, cell row, cell col): (k, R, C) values
        (the same operations as ``full``) and validity."""
        S = self.S
        b, cr, cc = cells[:, 0], cells[:, 1], cells[:, 2]
        ar = torch.arange(S)
        patch = Lp[b[:, None, None], cr[:, None, None] + ar[None, :, None], cc[:, None, None] + ar[None, None, :]]  # (k, S, S)
        ty = self.rows.table[cr]  # (k, R, S)
        tx = self.cols.table[cc]  # (k, C, S)
        col = patch[:, :, None, 0] * tx[:, None, :, 0]  # (k, S, C)
        for s in range(1, S):
            col = col + patch[:, :, None, s] * tx[:, None, :, s]
        vals = col[:, None, 0, :] * ty[:, :, 0, None]  # (k, R, C)
        for s in range(1, S):
            vals = vals + col[:, None, s, :] * ty[:, :, s, None]
        valid = self.rows.valid[cr][:, :, None] & self.cols.valid[cc][:, None, :]
        return vals, valid

    def _contour_values(self, L: torch.Tensor, cells: torch.Tensor):
        """Yields (cells, values (k, R, C), valid) for ``cells`` (K, 3) of ``L``, ``max_cells`` at a time."""
        if len(cells) == 0:
            return
        Lp = self._pad(L)
        for s in range(0, len(cells), self.max_cells):
            ch = cells[s : s + self.max_cells]
            yield (ch, *self._eval_cells(Lp, ch))

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def stats(self, L: torch.Tensor, threshold: float, offset: float, min_stability: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(stability score (B,) float32, box XYXY (B, 4) int64 of ``upscale(L) > threshold``),
        both as the official generator computes them on the full-size logits.

        With ``min_stability``, a mask whose stability is provably below it (from the cell
        counts alone: at most ``certain + contour`` pixels above ``t + offset`` over at least
        ``certain`` pixels above ``t - offset``) is not evaluated: its score is that upper bound
        (< ``min_stability``, so the same filter decision) and its box is zeros."""
        B = L.shape[0]
        L = L.float()
        H, W = self.original_size
        if B == 0:
            self.last_split = (0, 0, 0)
            return torch.zeros(0), torch.zeros(0, 4, dtype=torch.int64)
        taus = (threshold + offset, threshold - offset, threshold)
        native = self._fused()
        if native is not None:
            counts, ra, ca = native.stats(L, *taus)
            self.last_split = (0, 0, B)
            return counts[:, 0].to(torch.int32) / counts[:, 1].to(torch.int32), self._extent_boxes(ra, ca)
        lo, hi = self._window_bounds(L)
        cv = self.cell_valid[None]
        pos = [(lo > t) & cv for t in taus]  # every pixel of the cell is above t
        crossing = [~p & (hi > t) & cv for t, p in zip(taus, pos)]  # some may be
        pos_n = [self._area_sum(p) for p in pos[:2]]
        cross_n = [self._area_sum(crossing[0])]

        stability = torch.full((B,), float("nan"))
        boxes = torch.zeros(B, 4, dtype=torch.int64)
        todo = torch.ones(B, dtype=torch.bool)
        if min_stability is not None:
            bound = (pos_n[0] + cross_n[0]).float() / pos_n[1].float()
            pruned = bound < min_stability
            stability[pruned] = bound[pruned]
            todo &= ~pruned
        any_cross = crossing[0] | crossing[1] | crossing[2]
        frac = self._area_sum(any_cross).double() / float(H * W)
        dense = todo & (frac > self.dense_fraction)
        sparse = todo & ~dense
        self.last_split = (int((~todo).sum()), int(sparse.sum()), int(dense.sum()))

        # direct path: a block of rows at a time, counts and extents accumulated (no full-size map)
        di = dense.nonzero().flatten()
        for s in range(0, len(di), self.dense_chunk):
            ix = di[s : s + self.dense_chunk]
            n = len(ix)
            inter = torch.zeros(n, dtype=torch.int32)
            union = torch.zeros(n, dtype=torch.int32)
            ra = torch.zeros(n, H, dtype=torch.bool)
            ca = torch.zeros(n, W, dtype=torch.bool)
            for y0, y1, v in self._row_blocks(self._columns(L[ix])):
                inter += self._count(v > taus[0])
                union += self._count(v > taus[1])
                # extents from row / column maxima (float reductions are far faster than bool any)
                ra[:, y0:y1] = v.amax(2) > taus[2]
                ca |= v.amax(1) > taus[2]
            stability[ix] = inter / union
            boxes[ix] = self._extent_boxes(ra, ca)

        si = sparse.nonzero().flatten()
        if len(si):
            Ls = L[si]
            n = len(si)
            ac = any_cross[si]
            # certain cells not evaluated pixel by pixel (those crossing another threshold are)
            counts = [self._area_sum(pos[i][si] & ~ac) for i in range(2)]
            cert = pos[2][si]
            rows_any, cols_any = cert.any(2), cert.any(1)
            r_start, r_end = self.rows.start, self.rows.start + self.rows.size - 1
            c_start, c_end = self.cols.start, self.cols.start + self.cols.size - 1
            y0 = torch.where(rows_any, r_start, H).amin(1)
            y1 = torch.where(rows_any, r_end, -1).amax(1)
            x0 = torch.where(cols_any, c_start, W).amin(1)
            x1 = torch.where(cols_any, c_end, -1).amax(1)
            for ch, vals, valid in self._contour_values(Ls, ac.nonzero()):
                b = ch[:, 0]
                for i in range(2):
                    counts[i].index_add_(0, b, ((vals > taus[i]) & valid).sum((1, 2)))
                p = (vals > taus[2]) & valid
                ry = self.rows.pos[ch[:, 1]]  # (k, R)
                cx = self.cols.pos[ch[:, 2]]  # (k, C)
                pr, pc = p.any(2), p.any(1)
                y0.scatter_reduce_(0, b, torch.where(pr, ry, H).amin(1), "amin")
                y1.scatter_reduce_(0, b, torch.where(pr, ry, -1).amax(1), "amax")
                x0.scatter_reduce_(0, b, torch.where(pc, cx, W).amin(1), "amin")
                x1.scatter_reduce_(0, b, torch.where(pc, cx, -1).amax(1), "amax")
            stability[si] = counts[0].to(torch.int32) / counts[1].to(torch.int32)
            b = torch.stack([x0, y0, x1, y1], 1)
            b[y1 < 0] = 0
            boxes[si] = b
        return stability, boxes

    def _extent_boxes(self, ra: torch.Tensor, ca: torch.Tensor) -> torch.Tensor:
        """Rows (b, H) and columns (b, W) holding a foreground pixel -> XYXY boxes (b, 4) int64,
        zeros for an empty mask."""
        H, W = self.original_size
        ar_h, ar_w = torch.arange(H), torch.arange(W)
        y0 = torch.where(ra, ar_h, H).amin(1)
        y1 = torch.where(ra, ar_h, -1).amax(1)
        x0 = torch.where(ca, ar_w, W).amin(1)
        x1 = torch.where(ca, ar_w, -1).amax(1)
        b = torch.stack([x0, y0, x1, y1], 1)
        b[y1 < 0] = 0
        return b

    @torch.no_grad()
    def masks(self, L: torch.Tensor, threshold: float) -> torch.Tensor:
        """(B, H, W) bool ``upscale(L) > threshold``, equal to ``full(L) > threshold``.

        Cells whose window is entirely above (or not above) the threshold are filled whole and
        only contour cells are evaluated, with the same float32 operations as ``full``. A mask
        whose contour cells cover more than ``dense_fraction`` of the image (noisy logits) is
        computed directly instead, a block of rows at a time."""
        L = L.float()
        B = L.shape[0]
        H, W = self.original_size
        native = self._fused()
        if native is not None:
            return native.values(L, threshold)
        flat = torch.empty(B * H * W + 1, dtype=torch.uint8)  # the last byte takes padding writes
        out = flat[:-1].view(B, H, W)
        if B == 0:
            return out.view(torch.bool)
        lo, hi = self._window_bounds(L)
        certain = lo > threshold
        contour = ~certain & (hi > threshold) & self.cell_valid[None]
        dense = self._area_sum(contour).double() > self.dense_fraction * H * W
        di = dense.nonzero().flatten()
        for s in range(0, len(di), self.dense_chunk):  # direct, a block of rows at a time
            ix = di[s : s + self.dense_chunk]
            for y0, y1, v in self._row_blocks(self._columns(L[ix])):
                out[ix, y0:y1] = (v > threshold).view(torch.uint8)
        if len(di) == B:
            return out.view(torch.bool)
        contour &= ~dense[:, None, None]  # done directly above
        # certain cells, expanded to pixels: columns on the small grid first, then whole rows
        sparse = (~dense).nonzero().flatten()
        wide = certain[sparse].view(torch.uint8).index_select(2, self.cols.cell_of)
        if len(sparse) == B:
            torch.index_select(wide, 1, self.rows.cell_of, out=out)
        else:
            out[sparse] = wide.index_select(1, self.rows.cell_of)
        for ch, vals, valid in self._contour_values(L, contour.nonzero()):
            b, cr, cc = ch.unbind(1)
            idx = b[:, None, None] * (H * W) + self.rows.pos[cr][:, :, None] * W + self.cols.pos[cc][:, None, :]
            idx.masked_fill_(~valid, B * H * W)
            flat.index_put_((idx.flatten(),), (vals > threshold).view(torch.uint8).flatten())
        return out.view(torch.bool)
