"""SAM's ViT image encoder (ViTDet-style): windowed + global attention, decomposed relative
positions, absolute position embedding, and a neck down to ``out_chans`` channels.

Module and parameter names match the official checkpoints. The arithmetic is the official one,
reorganised for CPU speed and memory without changing results beyond float32 rounding:

* the qkv projection runs on the unpadded token grid; padded window positions get the qkv bias,
  which is exactly what the reference computes for its zero-padded (post-norm) tokens;
* attention with the relative-position bias runs in cache-sized pieces of scores (a window's
  heads, or a few grid rows of one head for global blocks) so the (N x N) attention never
  materialises at once; at float32 CPU inference it runs in fused native kernels instead
  (``segany.kernels.rel_attention`` for global blocks: an online softmax, the scores never leave
  the cache; ``segany.kernels.window_attention`` for windows: read straight from the qkv
  projection, padding tokens as the qkv bias, written straight to the token grid);
* the output projection runs on the unpadded grid.
"""
from __future__ import annotations

import functools

from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .common import (LayerNorm2d, MLPBlock, _dispatch_mode_active, _onednn_available, _onednn_bf16_available, _tracing_or_exporting,
                     apply_linear)

# Bound on the attention-bias bytes built at once in a global-attention block (per chunk), when
# training (the differentiable SDPA path).
_ATTN_BIAS_BYTES = 64 * 2**20
_MLP_ROWS = 512  # tokens per MLP piece at inference
_ATTN_CHUNK_BYTES = 4 << 20  # attention scores per piece (2**20 in float32, 2**21 in bfloat16)


def _eager_inference() -> bool:
    """True when the in-place, chunked inference path may run: no autograd, and not being traced
    for export (ONNX/TorchScript must see the plain graph, not Python-side chunk loops)."""
    return not (torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


class ImageEncoderViT(nn.Module):
    """(B, 3, img_size, img_size) normalised image -> (B, out_chans, img_size/patch, img_size/patch)."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        global_attn_indexes: Tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(
            kernel_size=(patch_size, patch_size),
            stride=(patch_size, patch_size),
            in_chans=in_chans,
            embed_dim=embed_dim,
        )
        grid = img_size // patch_size
        self.pos_embed: Optional[nn.Parameter] = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))

        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                rel_pos_zero_init=rel_pos_zero_init,
                window_size=window_size if i not in global_attn_indexes else 0,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))


class Block(nn.Module):
    """Pre-norm transformer block on a (B, H, W, C) grid, windowed (``window_size`` > 0) or global."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        input_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _eager_inference():
            x = x + self.attn(self.norm1(x), self.window_size)
            return x + self.mlp(self.norm2(x))
        # Inference: residual adds in place on the fresh attention output, and the MLP over pieces
        # of _MLP_ROWS tokens, so that its 4x-wide hidden activations stay in cache and in reused
        # allocator blocks (a full-size one is a fresh ~50 MB mapping, page-faulted on every call).
        x = self.attn(self.norm1(x), self.window_size).add_(x)
        flat = x.view(-1, x.shape[-1])
        for r0 in range(0, flat.shape[0], _MLP_ROWS):
            xs = flat[r0 : r0 + _MLP_ROWS]
            xs += self.mlp(self.norm2(xs))
        return x


class Attention(nn.Module):
    """Multi-head attention with decomposed relative position embeddings, on a (B, H, W, C) grid.

    ``attn_dtype`` (None: the input's dtype) is the dtype the attention itself (scores, softmax,
    weighted sum; not the projections) runs in at inference. Only the opt-in int8 mode sets it
    (``segany.quantize``, bfloat16 for global blocks): float32 results stay the reference's."""

    attn_dtype: Optional[torch.dtype] = None

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is needed for relative positional encoding")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor, window_size: int = 0) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = apply_linear(self.qkv, x)  # (B, H, W, 3C)
        if window_size > 0 and self.use_rel_pos and _native_attention_ok(qkv, True, None, C // self.num_heads, window_size):
            # float32 CPU inference: windows read straight from qkv by the native kernel
            Rh = get_rel_pos(window_size, window_size, self.rel_pos_h)
            Rw = get_rel_pos(window_size, window_size, self.rel_pos_w)
            out = kernels.window_attention(qkv, self._qkv_bias(qkv, C), Rh, Rw, self.num_heads, window_size, self.scale)
            return apply_linear(self.proj, out)
        if window_size > 0 and _eager_inference():
            # Inference: pad + partition as one row gather (and unpartition + crop as another)
            # instead of a padded copy, a permuted copy, and two more copies on the way back.
            gather, scatter, pad_rows = _window_indices(H, W, window_size, str(qkv.device))
            windows = qkv.view(B, H * W, 3 * C).index_select(1, gather.to(qkv.device))
            if pad_rows.numel():
                # The reference pads the normalised tokens with zeros before qkv: a padded
                # token's q, k, v is then the qkv bias.
                windows[:, pad_rows.to(qkv.device)] = self._qkv_bias(qkv, C)
            out = self._attend(windows.view(-1, window_size, window_size, 3 * C))  # (B*nW, ws, ws, C)
            out = out.reshape(B, -1, C).index_select(1, scatter.to(qkv.device)).view(B, H, W, C)
            return apply_linear(self.proj, out)
        if window_size > 0:
            pad_h = (window_size - H % window_size) % window_size
            pad_w = (window_size - W % window_size) % window_size
            if pad_h or pad_w:
                # The reference pads the normalised tokens with zeros before qkv: a padded
                # token's q, k, v is then the qkv bias.
                Hp, Wp = H + pad_h, W + pad_w
                padded = self._qkv_bias(qkv, C).expand(B, Hp, Wp, 3 * C).clone()
                padded[:, :H, :W] = qkv
                qkv = padded
            qkv, (Hp, Wp) = window_partition(qkv, window_size)
            out = self._attend(qkv)  # (B*nW, ws, ws, C)
            out = window_unpartition(out, window_size, (Hp, Wp), (H, W))
        elif self.attn_dtype is not None and self.attn_dtype != qkv.dtype and _eager_inference():
            out = self._attend(qkv.to(self.attn_dtype)).to(qkv.dtype)
        else:
            out = self._attend(qkv)
        return apply_linear(self.proj, out)

    def _qkv_bias(self, qkv: torch.Tensor, C: int) -> torch.Tensor:
        fill = self.qkv.bias
        if callable(fill):  # dynamically quantized Linear (segany.quantize) exposes bias()
            fill = fill()
        if fill is None:
            fill = qkv.new_zeros(3 * C)
        return fill.to(qkv.dtype)

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, h, w, 3C) projected tokens -> (B, h, w, C) attention output (before proj)."""
        B, h, w, C3 = qkv.shape
        nh = self.num_heads
        q, k, v = qkv.reshape(B, h * w, 3, nh, C3 // (3 * nh)).permute(2, 0, 3, 1, 4).unbind(0)
        # q, k, v: (B, nh, N, hd)
        n = h * w
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
            return out.transpose(1, 2).reshape(B, h, w, -1)
        if not _eager_inference() and (
            torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or q.requires_grad or self.rel_pos_h.requires_grad
        ):
            return self._attend_sdpa(q, k, v, h, w)
        Rh = get_rel_pos(h, h, self.rel_pos_h).to(q.dtype)  # (h, h, hd)
        Rw = get_rel_pos(w, w, self.rel_pos_w).to(q.dtype)  # (w, w, hd)
        if _native_attention_ok(q, nh * n * n > 2 * (_ATTN_CHUNK_BYTES // q.element_size()), w, q.shape[-1]):
            # q, k, v straight from the qkv projection; the rel-pos terms formed inside
            out = kernels.rel_attention(q, k, v, Rh, Rw, self.scale)
            return out.transpose(1, 2).reshape(B, h, w, -1)
        r_q = q.reshape(B, nh, h, w, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh)  # (B, nh, h, w, h)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw)  # (B, nh, h, w, w)
        qs = q * self.scale
        kt = k.transpose(-2, -1)
        out = q.new_empty(B, nh, n, q.shape[-1])
        # The official order of operations ((q * scale) @ k^T + rel_h + rel_w, softmax, @ v), run
        # in pieces of about _ATTN_CHUNK_BYTES of scores (all heads of a window, or a few grid rows of
        # one head for global attention) so that the score block stays in cache across the GEMM,
        # the two in-place bias adds, the in-place softmax and the second GEMM. A float bias
        # passed to SDPA instead has to be materialised at full size first (3x the memory traffic).
        chunk = _ATTN_CHUNK_BYTES // q.element_size()
        if nh * n * n <= 2 * chunk:
            hb, rows = nh, h
        else:
            hb, rows = 1, max(1, min(h, chunk // (w * n)))
        # One head at a time (global attention), both GEMMs can run as oneDNN matmuls against
        # that head's contiguous k and v^T: 12-16% faster than MKL's for these shapes here.
        onednn = hb == 1 and (q.dtype is torch.float32 or (q.dtype is torch.bfloat16 and _onednn_bf16_available())) \
            and _onednn_available() and not _dispatch_mode_active()
        # bfloat16 (the int8 mode): both relative-position adds and the softmax as one native pass
        # per piece, in float32 (2.4x faster than the three bfloat16 passes, and closer)
        bf16_native = q.dtype == torch.bfloat16 and not _dispatch_mode_active() and kernels.attention_preferred(w, q.shape[-1])
        if bf16_native:
            rel_h, rel_w = rel_h.contiguous(), rel_w.contiguous()
        s = None
        for b in range(B):
            for h0 in range(0, nh, hb):
                h1 = min(nh, h0 + hb)
                if onednn:
                    kc = k[b, h0].contiguous()  # (n, hd): scores = q @ kc^T
                    vt = v[b, h0].t().contiguous()  # (hd, n): out = scores @ vt^T
                for i0 in range(0, h, rows):
                    i1 = min(h, i0 + rows)
                    qp = qs[b, h0:h1, i0 * w : i1 * w]
                    if onednn:
                        s = torch.ops.mkldnn._linear_pointwise(qp[0], kc, None, "none", [], "")[None]
                    else:
                        if s is not None and s.shape != (h1 - h0, (i1 - i0) * w, n):
                            s = None  # last, shorter piece: a fresh buffer (matmul warns on resizing)
                        s = torch.matmul(qp, kt[b, h0:h1], out=s)
                    if bf16_native:
                        kernels.rel_softmax_bf16_(s.view(-1, n), rel_h[b, h0:h1, i0:i1].reshape(-1, h), rel_w[b, h0:h1, i0:i1].reshape(-1, w))
                    else:
                        sv = s.view(h1 - h0, i1 - i0, w, h, w)
                        sv.add_(rel_h[b, h0:h1, i0:i1, :, :, None])
                        sv.add_(rel_w[b, h0:h1, i0:i1, :, None, :])
                        torch.ops.aten._softmax.out(s, -1, False, out=s)
                    if onednn:
                        out[b, h0, i0 * w : i1 * w] = torch.ops.mkldnn._linear_pointwise(s[0], vt, None, "none", [], "")
                    else:
                        torch.matmul(s, v[b, h0:h1], out=out[b, h0:h1, i0 * w : i1 * w])
        return out.transpose(1, 2).reshape(B, h, w, -1)

    def _attend_sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Differentiable path (training): SDPA with the rel-pos bias built per chunk of rows."""
        B, nh, n, _ = q.shape
        rows = max(1, min(n, _ATTN_BIAS_BYTES // max(1, B * nh * n * q.element_size())))
        rows = max(w, (rows // w) * w)  # whole rows of the grid keep the bias decomposition simple
        Rh = get_rel_pos(h, h, self.rel_pos_h).to(q.dtype)  # (h, h, hd)
        Rw = get_rel_pos(w, w, self.rel_pos_w).to(q.dtype)  # (w, w, hd)
        outs = []
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            qc = q[:, :, start:stop]
            hr = (stop - start) // w
            r_q = qc.reshape(B, nh, hr, w, -1)
            h0 = start // w
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh[h0 : h0 + hr])
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw)
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, nh, stop - start, n)
            outs.append(F.scaled_dot_product_attention(qc, k, v, attn_mask=bias, scale=self.scale))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out.transpose(1, 2).reshape(B, h, w, -1)


def _native_attention_ok(x: torch.Tensor, big: bool, w: Optional[int], hd: int, window: int = 0) -> bool:
    """Whether this attention runs in ``segany.kernels`` (``rel_attention`` for a global block,
    ``window_attention`` for windows ``window`` tokens wide, w None): big enough (a global block's score blocks would
    not stay in the cache), float32 CPU inference, not traced or exported or watched by a
    dispatch mode, and the kernels preferred for these sizes (``kernels.attention_preferred``).
    Measured on the 2-core Xeon: 12 heads of a 64x64 grid 310-370 vs 460-510 ms unfused."""
    return (
        big and x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad
        and not torch.is_grad_enabled() and not _dispatch_mode_active()
        and not _tracing_or_exporting()
        and kernels.attention_preferred(w, hd, window)
    )


@functools.lru_cache(maxsize=16)
def _window_indices(H: int, W: int, ws: int, device: str):
    """For ``window_partition`` of an (H, W) grid: the token index read at each windowed position
    (0 at padding), the windowed position of each token, and the padded positions."""
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    yy = torch.arange(Hp).view(Hp // ws, ws, 1, 1)
    xx = torch.arange(Wp).view(1, 1, Wp // ws, ws)
    yy, xx = torch.broadcast_tensors(yy, xx)  # (nH, ws, nW, ws)
    yy = yy.permute(0, 2, 1, 3).reshape(-1)  # windowed order (nH, nW, ws, ws)
    xx = xx.permute(0, 2, 1, 3).reshape(-1)
    valid = (yy < H) & (xx < W)
    gather = torch.where(valid, yy * W + xx, torch.zeros_like(yy))
    scatter = torch.empty(H * W, dtype=torch.long)
    scatter[gather[valid]] = torch.nonzero(valid).flatten()
    pad_rows = torch.nonzero(~valid).flatten()
    return gather, scatter, pad_rows


def window_partition(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(B, H, W, C) -> (B * num_windows, ws, ws, C), zero-padding H and W up to multiples of ws."""
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)
    return windows, (Hp, Wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: Tuple[int, int], hw: Tuple[int, int]
) -> torch.Tensor:
    """(B * num_windows, ws, ws, C) -> (B, H, W, C), dropping the padding."""
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // (Hp * Wp // window_size // window_size)
    x = windows.view(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()
    return x


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position embeddings (q_size, k_size, C) picked (and resized if needed) from (L, C)."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos_resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        )
        rel_pos_resized = rel_pos_resized.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        rel_pos_resized = rel_pos
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos_resized[relative_coords.long()]


class PatchEmbed(nn.Module):
    """(B, C, H, W) image -> (B, H/p, W/p, embed_dim) patch tokens."""

    def __init__(
        self,
        kernel_size: Tuple[int, int] = (16, 16),
        stride: Tuple[int, int] = (16, 16),
        padding: Tuple[int, int] = (0, 0),
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)
