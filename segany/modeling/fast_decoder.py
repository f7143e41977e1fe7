"""Inference-only fast path for SAM's mask decoder (prompt encoder output -> masks, iou).

The official decoder projects all h*w image tokens (4096 for a 64x64 embedding) through
256x128 matrices six times per prompt. Everything here computes the same function with the
image-side work either done once per image or folded onto the few prompt tokens:

* With no mask input the dense prompt embedding is the constant ``no_mask_embed``, so the first
  layer's token->image k/v projections and its image->token q projection do not depend on the
  prompt: ``DecoderCache`` holds them for the image.
* Token->image attention (queries are the ~7 prompt tokens): scores
  ``q_h (W_k,h x + b_k,h)`` equal ``(q_h W_k,h) x`` plus a per-row constant that softmax
  cancels, and ``softmax(S)(x W_v,h^T + b_v,h) = (softmax(S) x) W_v,h^T + b_v,h`` because softmax
  rows sum to one. Only (heads*tokens x 256) @ (256 x h*w) products remain.
* Image->token attention: scores ``(x W_q,h^T + b_q,h) k_h^T`` are ``x (W_q,h^T k_h^T) + b``; all
  heads go in one GEMM against a block-diagonal key matrix, and ``out_proj(concat_h A_h v_h)``
  is ``[A_1..A_H] @ [v_h W_o,h^T] + b_o``.
* The output upscaling runs channel-last: each 2x2 stride-2 transposed convolution is one GEMM,
  LayerNorm2d is ``layer_norm`` over the last axis, and only the requested mask tokens go through
  their hypernetwork MLP.

Results equal ``MaskDecoder.forward`` up to float32 rounding (see tests/test_speed_paths.py).
The module structure and parameters are the official ones; this file only reads them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .mask_decoder import MaskDecoder
from .transformer import Attention


@dataclass
class DecoderCache:
    """Prompt-independent decoder state for one image embedding (and no mask input)."""

    src: Tensor  # (1, N, C) image embedding + no_mask_embed, channel-last
    pe: Tensor  # (1, N, C) positional encoding, channel-last
    src_pe: Tensor  # (1, N, C) src + pe
    k0: Tensor  # (1, heads, N, hd) layer-0 token->image keys
    v0: Tensor  # (1, heads, N, hd) layer-0 token->image values
    q0: Tensor  # (1, N, internal) layer-0 image->token queries (bias included)
    hw: Tuple[int, int]


def _heads(x: Tensor, nh: int) -> Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, nh, c // nh).transpose(1, 2)


@torch.no_grad()
def build_cache(decoder: MaskDecoder, image_embeddings: Tensor, image_pe: Tensor, no_mask_embed: Tensor) -> DecoderCache:
    """image_embeddings (1, C, h, w), image_pe (1, C, h, w), no_mask_embed (1, C)."""
    h, w = image_embeddings.shape[-2:]
    src = image_embeddings.flatten(2).transpose(1, 2) + no_mask_embed.reshape(1, 1, -1)
    pe = image_pe.flatten(2).transpose(1, 2)
    src = src.contiguous()
    pe = pe.contiguous()
    src_pe = src + pe
    layer0 = decoder.transformer.layers[0]
    t2i: Attention = layer0.cross_attn_token_to_image
    i2t: Attention = layer0.cross_attn_image_to_token
    nh = t2i.num_heads
    k0 = _heads(t2i.k_proj(src_pe), nh).contiguous()
    v0 = _heads(t2i.v_proj(src), nh).contiguous()
    q0 = i2t.q_proj(src_pe)
    return DecoderCache(src=src, pe=pe, src_pe=src_pe, k0=k0, v0=v0, q0=q0, hw=(int(h), int(w)))


def _self_attn(attn: Attention, q: Tensor, v: Tensor) -> Tensor:
    return attn(q=q, k=q, v=v)


def _t2i_cached(attn: Attention, q_tokens: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Token->image attention with precomputed image keys/values (1, heads, N, hd)."""
    nh = attn.num_heads
    q = _heads(attn.q_proj(q_tokens), nh)
    b = q.shape[0]
    out = F.scaled_dot_product_attention(q, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), scale=q.shape[-1] ** -0.5)
    b, _, t, hd = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, nh * hd))


def _t2i_folded(attn: Attention, q_tokens: Tensor, x_pe: Tensor, x: Tensor) -> Tensor:
    """Token->image attention, keys ``x_pe`` (B|1, N, C), values ``x`` (B|1, N, C), with the image
    projections folded onto the token side."""
    nh = attn.num_heads
    q = attn.q_proj(q_tokens)  # (B, t, I)
    B, t, I = q.shape
    hd = I // nh
    C = x.shape[-1]
    qh = q.reshape(B, t, nh, hd).transpose(1, 2)  # (B, nh, t, hd)
    wk = attn.k_proj.weight.reshape(nh, hd, C)  # (nh, hd, C)
    g = torch.matmul(qh, wk).reshape(B, nh * t, C) * (hd**-0.5)  # (B, nh*t, C)
    s = torch.matmul(g, x_pe.transpose(1, 2))  # (B, nh*t, N)
    a = torch.softmax(s, dim=-1)
    r = torch.matmul(a, x).reshape(B, nh, t, C)  # (B, nh, t, C)
    wv = attn.v_proj.weight.reshape(nh, hd, C)
    o = torch.matmul(r, wv.transpose(1, 2)) + attn.v_proj.bias.reshape(nh, 1, hd)  # (B, nh, t, hd)
    return attn.out_proj(o.transpose(1, 2).reshape(B, t, I))


def _block_diag_keys(k: Tensor, nh: int) -> Tensor:
    """(B, t, I) keys -> (B, I, nh*t) block-diagonal: block h holds k_h^T."""
    B, t, I = k.shape
    hd = I // nh
    kh = k.reshape(B, t, nh, hd).permute(0, 2, 3, 1)  # (B, nh, hd, t)
    eye = torch.eye(nh, dtype=k.dtype, device=k.device)
    # (B, nh, hd, nh, t) with zeros off the diagonal
    bd = kh[:, :, :, None, :] * eye[None, :, None, :, None]
    return bd.reshape(B, I, nh * t)


def _i2t(attn: Attention, x_pe: Optional[Tensor], q_img: Optional[Tensor], k_tokens: Tensor, v_tokens: Tensor, residual: Tensor, inplace: bool = False) -> Tensor:
    """``residual`` + image->token attention output after out_proj, (B, N, C). Queries are either
    the projected ``q_img`` (1, N, I) or folded from ``x_pe`` (B|1, N, C).

    Scores are laid out (B, heads, tokens, N) so that the softmax over the few tokens runs along a
    strided axis with contiguous N-long rows (a softmax over a 7-long last axis is ~20x slower).
    The out_proj bias is folded into the value side: each head's softmax row sums to one, so
    ``a @ (u + b/heads) = a @ u + b``; the residual add is the GEMM's accumulator."""
    nh = attn.num_heads
    k = attn.k_proj(k_tokens)  # (B, t, I)
    v = attn.v_proj(v_tokens)  # (B, t, I)
    B, t, I = k.shape
    hd = I // nh
    kbd = _block_diag_keys(k, nh) * (hd**-0.5)  # (B, I, nh*t)
    kbdT = kbd.transpose(1, 2)  # (B, nh*t, I)
    if q_img is not None:
        sT = torch.matmul(kbdT, q_img.transpose(1, 2))  # (B, nh*t, N)
    else:
        mT = torch.matmul(kbdT, attn.q_proj.weight)  # (B, nh*t, C)
        c = torch.matmul(attn.q_proj.bias, kbd)  # (B, nh*t)
        sT = torch.baddbmm(c[:, :, None], mT, x_pe.expand(B, -1, -1).transpose(1, 2))
    N = sT.shape[-1]
    aT = torch.softmax(sT.view(B, nh, t, N), dim=2).view(B, nh * t, N)
    C = attn.out_proj.weight.shape[0]
    wo = attn.out_proj.weight.t().reshape(nh, hd, C)  # (nh, hd, C)
    u = torch.matmul(v.reshape(B, t, nh, hd).transpose(1, 2), wo).reshape(B, nh * t, C)  # (B, nh*t, C)
    u = u + attn.out_proj.bias / nh
    if inplace and residual.shape[0] == B:
        return residual.baddbmm_(aT.transpose(1, 2), u)
    return torch.baddbmm(residual.expand(B, -1, -1), aT.transpose(1, 2), u)


def _layer_norm(ln: torch.nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


@torch.no_grad()
def predict_masks_fast(
    decoder: MaskDecoder,
    sparse_prompt_embeddings: Tensor,
    cache: Optional[DecoderCache] = None,
    *,
    image_embeddings: Optional[Tensor] = None,
    image_pe: Optional[Tensor] = None,
    dense_prompt_embeddings: Optional[Tensor] = None,
    multimask_output: bool = True,
    iou_thresh: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """Same outputs as ``decoder(image_embeddings, image_pe, sparse, dense, multimask_output)``.

    Give either ``cache`` (no mask input) or ``image_embeddings``/``image_pe``/
    ``dense_prompt_embeddings`` (any dense input, e.g. a mask prompt).

    With ``iou_thresh`` only the masks whose predicted IoU is above it are upscaled (the IoU head
    runs before the output upscaling, which is half the decoder's work): returns masks (K, 4h, 4w)
    of those K masks in (prompt, mask) order, and the full iou (B, M); ``iou > iou_thresh`` says
    which they are."""
    tf = decoder.transformer
    tokens0 = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    B = sparse_prompt_embeddings.shape[0]
    tokens = torch.cat((tokens0.unsqueeze(0).expand(B, -1, -1), sparse_prompt_embeddings), dim=1)
    if cache is not None:
        h, w = cache.hw
        src, pe, src_pe = cache.src, cache.pe, cache.src_pe
    else:
        h, w = image_embeddings.shape[-2:]
        src = image_embeddings.flatten(2).transpose(1, 2) + dense_prompt_embeddings.flatten(2).transpose(1, 2)
        pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        src_pe = src + pe

    queries = tokens
    keys, keys_pe = src, src_pe
    for i, layer in enumerate(tf.layers):
        if layer.skip_first_layer_pe:
            queries = _self_attn(layer.self_attn, queries, queries)
        else:
            q = queries + tokens
            queries = queries + _self_attn(layer.self_attn, q, queries)
        queries = _layer_norm(layer.norm1, queries)
        q = queries + tokens
        if i == 0 and cache is not None:
            att = _t2i_cached(layer.cross_attn_token_to_image, q, cache.k0, cache.v0)
        else:
            att = _t2i_folded(layer.cross_attn_token_to_image, q, keys_pe, keys)
        queries = _layer_norm(layer.norm2, queries + att)
        queries = _layer_norm(layer.norm3, queries + layer.mlp(queries))
        q = queries + tokens
        if i == 0 and cache is not None:
            keys = _i2t(layer.cross_attn_image_to_token, None, cache.q0, q, queries, keys)
        else:
            # keys is a fresh per-prompt tensor past the first layer; the cache's src is not.
            keys = _i2t(layer.cross_attn_image_to_token, keys_pe, None, q, queries, keys, inplace=i > 0)
        keys = _layer_norm(layer.norm4, keys)
        keys_pe = keys + pe
    q = queries + tokens
    queries = queries + _t2i_folded(tf.final_attn_token_to_image, q, keys_pe, keys)
    queries = _layer_norm(tf.norm_final_attn, queries)

    sl = slice(1, None) if multimask_output else slice(0, 1)
    idx = range(decoder.num_mask_tokens)[sl]
    iou_pred = decoder.iou_prediction_head(queries[:, 0, :])[:, sl]
    hyper_in = torch.stack([decoder.output_hypernetworks_mlps[j](queries[:, 1 + j, :]) for j in idx], dim=1)
    if iou_thresh is None:
        return _upscale_masks(decoder, keys, hyper_in, h, w), iou_pred
    keep = iou_pred > iou_thresh  # (B, M)
    rows = keep.any(1).nonzero().flatten()
    if len(rows) == 0:
        return keys.new_zeros(0, 4 * h, 4 * w), iou_pred
    masks = _upscale_masks(decoder, keys[rows].contiguous(), hyper_in[rows], h, w)  # (R, M, 4h, 4w)
    return masks[keep[rows]], iou_pred


def _upscale_masks(decoder: MaskDecoder, keys: Tensor, hyper_in: Tensor, h: int, w: int, rows_per_chunk: int = 8) -> Tensor:
    """keys (B, h*w, C) channel-last, hyper_in (B, M, C/8) -> masks (B, M, 4h, 4w).

    Runs ``rows_per_chunk`` embedding rows at a time: the intermediates (up to 16x the pixels at
    128 channels) then stay in cache and in reused allocator blocks instead of being written to
    fresh multi-MB buffers (page faults) and read back by the next op."""
    ct1, ln, act1, ct2, act2 = decoder.output_upscaling
    B, N, C = keys.shape
    c1 = ct1.out_channels
    c2 = ct2.out_channels
    M = hyper_in.shape[1]
    # ConvTranspose2d weight (in, out, 2, 2) -> (in, (a, b, out)) so channels stay last.
    w1 = ct1.weight.permute(0, 2, 3, 1).reshape(C, 4 * c1)
    b1 = ct1.bias.repeat(4)
    w2 = ct2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
    b2 = ct2.bias.repeat(4)
    hyp = hyper_in.transpose(1, 2)  # (B, c2, M)
    out = keys.new_empty(B, M, 4 * h, 4 * w)
    # out[b, m, i, a, a2, j, bb, b2] <- rows (i, j, a, bb, a2, b2) of the GEMM results
    out_v = out.view(B, M, h, 2, 2, w, 2, 2)
    kv = keys.view(B, h, w, C)
    for i0 in range(0, h, rows_per_chunk):
        i1 = min(h, i0 + rows_per_chunk)
        r = i1 - i0
        x = kv[:, i0:i1].reshape(B * r * w, C)
        y = torch.addmm(b1, x, w1).view(B * r * w * 4, c1)
        y = act1(F.layer_norm(y, (c1,), ln.weight, ln.bias, ln.eps))
        z = act2(torch.addmm(b2, y, w2))  # (B*r*w*4*4, c2) rows ordered (b, i, j, a, bb, a2, b2)
        m = torch.bmm(z.view(B, r * w * 16, c2), hyp)  # (B, r*w*16, M)
        # (B, i, j, a, bb, a2, b2, M) -> (B, M, i, a, a2, j, bb, b2)
        out_v[:, :, i0:i1].copy_(m.view(B, r, w, 2, 2, 2, 2, M).permute(0, 7, 1, 3, 5, 2, 4, 6))
    return out
