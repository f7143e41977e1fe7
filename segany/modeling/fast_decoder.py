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
* Image->token attention: scores ``(x W_q,h^T + b_q,h) k_h^T`` are ``x (W_q,h^T k_h^T) + b``
  (with a mask input all heads go in one GEMM against a block-diagonal key matrix; from the
  cache, per head against the cached queries), and ``out_proj(concat_h A_h v_h)`` is
  ``[A_1..A_H] @ [v_h W_o,h^T] + b_o``: the update of the image tokens has rank heads*tokens.
* Factored image tokens (the cached path, layers past the first): every image-token state is
  ``X = diag(alpha) (S + P^T Q)`` with ``S`` a per-image matrix (the embedding scaled by the
  LayerNorm gains met so far), ``alpha`` (N,) the product of the LayerNorm row scales, and a
  low-rank prompt part (``P`` r x N, ``Q`` r x C; r = heads*(tokens-1) + 3 per layer, since each
  head's attention over the tokens sums to one: :func:`_reduced_values`): an image->token
  update adds ``A^T U`` and a LayerNorm maps ``(X - m) r g + b`` onto the same form, appending
  rows to P (:func:`_normed`). So every projection of the image tokens,
  ``X W^T = diag(alpha) (S W^T + P^T (Q W^T))``, reads a
  per-image ``S W^T`` (built once, in ``DecoderCache``) plus a rank-r product; this covers the
  later token->image keys/values, image->token queries and the first output-upscaling
  convolution. The LayerNorm statistics come from the factored form itself (two-layer decoders,
  SAM's: :func:`_factored_stats`, from per-image moments and maps and a Gram matrix of Q's
  rows, O(r^2) per pixel); other depths form the residual stream densely for them, in one reused
  buffer (with the native kernels normalised in place, after the last layer only its
  statistics taken). The scores against factored tokens (five GEMMs with
  K = 16 or r in PyTorch, each a pass over a multi-MB map) are one pass in the native kernel
  (``kernels.factored_scores``, with the image->token softmax over the tokens fused in): a
  click 3-6% faster for vit_b on the AMD development VM (in-process A/B, 2026-12-03).
* Mask prompts (a click that feeds back the previous logits): SAM's mask embedding ends in a
  1x1 convolution from 16 channels, so the image tokens are the cached ones plus a rank-17
  product (:func:`mask_prompt_factor`; the embedding before that convolution in one native pass,
  ``kernels.mask_downscale``) and the factored form starts at the first layer, whose
  cached maps then hold the positional share and biases (alpha is one there). A refinement
  click costs about a first click plus the mask embedding (vit_b: 19 vs 17 ms in one process),
  where forming the tokens densely took ~1.7x a first click. Mask embeddings of another shape
  (or with hooks) take the dense path, whose stream lives in two kept per-thread buffers.
* The factored rank grows with the prompt's tokens; with many points (an interactive session's
  accumulated clicks) it passes the channels, and a cached call forms the tokens densely from
  the cached ones instead (:func:`_dense_is_cheaper`).
* The output upscaling: only the requested mask tokens go through their hypernetwork MLP. The
  first 2x2 stride-2 transposed convolution is one GEMM (on the factored tokens, a per-image map
  plus a rank-r product). Everything after it (LayerNorm2d, GELU, the second convolution, GELU,
  the hypernetwork products) runs in the native kernel of ``segany.kernels`` (decoder.c) where
  one is built: one pass instead of six over multi-MB temporaries, 20-25% less upscaling time
  on the development machine (5.0 vs 6.2 ms a click, 33 vs 44 ms for 8 prompts). Otherwise it
  runs channel-last in PyTorch: the second convolution one GEMM per output-row parity and
  LayerNorm2d ``layer_norm`` over the last axis.

* The token side (a click's ~7 prompt tokens through self-attention, the cross-attentions' token
  projections, MLPs, LayerNorms, the IoU head and hypernetworks: ~35 small linear layers) runs in
  the native token kernels (``segany.kernels.TokenBlock``, tokens.c) where the decoder kernels
  are on: two calls per two-way block and for the final attention, one per head, in place of
  ~400 PyTorch operations (a vit_b click 0.91-0.95x in in-process A/Bs, 2026-12-06).

* The small per-prompt algebra of the factored tokens (the reduced value rows, the Gram matrix
  for the statistics, a LayerNorm's new factors, the token side of factored scores and values:
  matrices of r ~ 50-100 rows) runs in native calls where the decoder kernels do
  (``kernels.value_rows``, ``centered_gram``, ``normed_rows``, ``factored_low``,
  ``factored_values``): ~90 PyTorch operations a click fewer, the decoder 0.92-0.94x (in-process
  A/Bs, 2026-12-06).

* Many prompts in a row (segment everything): inside ``decoder_workspace()`` the large
  temporaries of each call (score maps, attention, the factored P, the stream, the masks) reuse
  buffers instead of fresh memory, whose pages would fault in one by one every call.

Results equal ``MaskDecoder.forward`` up to float32 rounding (see tests/test_speed_paths.py).
The module structure and parameters are the official ones; this file only reads them.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import kernels
from . import common as _common
from .common import (LayerNorm2d, MLPBlock, _act_name, _dispatch_mode_active, _global_hooks, _has_hooks, _tracing_or_exporting, linear,
                     tensor_version)
from .mask_decoder import MLP, MaskDecoder
from .transformer import Attention


@dataclass
class DecoderCache:
    """Prompt-independent decoder state for one image embedding (and no mask input)."""

    src: Tensor  # (1, N, C) image embedding + no_mask_embed, channel-last
    pe: Tensor  # (1, N, C) positional encoding, channel-last
    src_pe: Tensor  # (1, N, C) src + pe
    k0: Tensor  # (1, heads, N, hd) layer-0 token->image keys (bias included)
    v0: Tensor  # (1, heads, N, hd) layer-0 token->image values (bias included)
    q0: Tensor  # (heads, hd, N) layer-0 image->token queries (bias included)
    hw: Tuple[int, int]
    # Per layer past the first, projections of the per-image base S_l = src * (norm4 gains of
    # the layers before): token->image keys/values and image->token queries, with the positional
    # encoding's share (bias included) apart. ~10 (N x internal) maps: ~20 MB at SAM's sizes.
    layers: Tuple["_LayerProjections", ...] = ()
    final: Optional["_LayerProjections"] = None  # final token->image attention (keys/values)
    upscale: Optional[Tensor] = None  # (N, 4*c1) S_depth @ first upscaling conv, channel-last
    upscale_t: Optional[Tensor] = None  # (4*c1, N) the same, transposed, for the native tail
    # (heads, hd, N) k0 for the native first-layer attention (made with the cache where the decoder
    # kernels are preferred) and for the factored first layer (mask prompts; else made on first use)
    k0_cols: Optional[Tensor] = None
    stats: Optional["_StatsMaps"] = None  # two-layer decoders: per-image terms of the LayerNorm statistics
    # what it was made from, for cache_current: (dict, key, object, version, storage) of every
    # module and parameter link on the way to the weights read above, and the weights generation
    sources: tuple = ()
    generation: int = 0


@dataclass
class _LayerProjections:
    """``S W^T`` per head, transposed for bmm: (heads, hd, N) for scores, (heads, N, hd) for values.

    Without the positional shares (None): the first layer's cached maps, of the base plus the
    positional encoding with the biases (there the row scales are one). Where the decoder
    kernels are preferred (``kernels.decoder_preferred``), the (heads, hd, N) maps of the later layers are kept in
    ``kernels.factored_scores``' pixel tiles instead, (ceil(N / 64), heads, hd, 64)."""

    t2i_k: Tensor  # (heads, hd, N)   S @ W_k^T
    t2i_kpe: Optional[Tensor]  # (heads, hd, N) pe @ W_k^T + b_k
    t2i_v: Tensor  # (heads, N, hd)   S @ W_v^T
    i2t_q: Optional[Tensor] = None  # (heads, hd, N) S @ W_q^T
    i2t_qpe: Optional[Tensor] = None  # (heads, hd, N) pe @ W_q^T + b_q


@dataclass
class _StatsMaps:
    """Per-image terms of the image tokens' LayerNorm statistics in factored form, for a
    two-layer decoder (:func:`_factored_stats`). S_0 is the cached image tokens ``src``, S_1 =
    S_0 * g0 (the first block's norm4 gain); the value rows of a layer's image->token update are
    its values through per-head slices of out_proj, so their dot products with S_l come from
    per-head maps ``out_proj.weight^T S^T`` (heads, hd, N) plus the bias's dot product (N,)."""

    sbar: Tuple[Tensor, Tensor]  # (N,) channel means of S_0, S_1
    sq: Tuple[Tensor, Tensor]  # (N,) |S_l - sbar_l|^2
    # u0, u1: (nh, hd, N), or where the decoder kernels are preferred in factored_stats' pixel tiles
    # (kernels.stats_tiles: (n_tiles, nh, hd, tile)), which the PyTorch path unpacks
    u0: Tuple[Tensor, Tensor]  # layer 0's out_proj against S_0, and (its rows rescaled by g0 in layer 1) against S_0 g0^2
    u0_bias: Tuple[Tensor, Tensor]  # (N,) b_o0 . S_0, b_o0 . (S_0 g0^2)
    u1: Tensor  # layer 1's out_proj against S_1
    u1_bias: Tensor  # (N,) b_o1 . S_1
    g0b0: Tensor  # (2, N) g0 . S_1 and b0 . S_1 (the rows a LayerNorm appends)
    mask_rows: Optional[Tuple[Tensor, Tensor, Tensor]] = None  # (Q0, Q0 S_0^T, (Q0 g0^2) S_0^T) of the last mask prompt's rows


def _stats_maps(decoder: MaskDecoder, src: Tensor) -> Optional[_StatsMaps]:
    """src (N, C). None unless the decoder has SAM's two blocks (the statistics path is written
    for that depth; others keep the dense stream)."""
    blocks = decoder.transformer.layers
    if len(blocks) != 2 or not all(type(b.norm4) is torch.nn.LayerNorm for b in blocks):
        return None
    g0, b0 = blocks[0].norm4.weight, blocks[0].norm4.bias
    o0, o1 = blocks[0].cross_attn_image_to_token.out_proj, blocks[1].cross_attn_image_to_token.out_proj
    nh0, nh1 = blocks[0].cross_attn_image_to_token.num_heads, blocks[1].cross_attn_image_to_token.num_heads
    s1 = src * g0
    s0g = src * (g0 * g0)
    C = src.shape[1]

    def moments(x):  # (native_layer_norm: ~10x faster than var_mean here)
        _, m, rstd = torch.native_layer_norm(x, (C,), None, None, 0.0)
        return m[:, 0], C / rstd[:, 0].square()

    tiled = kernels.decoder_preferred()  # (where the native path is the default; the PyTorch path would unpack them every call)

    def head_maps(w, x, nh):  # (heads, hd, N): w^T x^T, made in that layout; in the native kernel's tiles where it is built
        maps = torch.mm(w.t(), x.t()).view(nh, -1, x.shape[0])
        return kernels.stats_tiles(maps) if tiled else maps

    (m0, q0), (m1, q1) = moments(src), moments(s1)
    return _StatsMaps(
        sbar=(m0, m1), sq=(q0, q1),
        u0=(head_maps(o0.weight, src, nh0), head_maps(o0.weight, s0g, nh0)),
        u0_bias=(src @ o0.bias, s0g @ o0.bias),
        u1=head_maps(o1.weight, s1, nh1), u1_bias=s1 @ o1.bias,
        g0b0=torch.stack((s1 @ g0, s1 @ b0)),
    )


_per_thread = threading.local()


@contextmanager
def decoder_workspace():
    """Within this block, this thread's decoder calls (``predict_masks_fast``) take their large
    temporaries (score and attention maps, the factored image tokens, the stream: tens of MB a
    call for 8 prompts at SAM's sizes) from buffers kept for the block and freed when it ends.

    Without it each call allocates them afresh; above glibc's mmap threshold, and always in a
    worker thread's arena, a fresh multi-MB tensor is fresh memory whose pages fault in one by one
    (segment everything, 32x32 points, 2 workers: ~330,000 faults, ~2.4 s of system time). A block
    holds one buffer per kind at the largest size it met; blocks do not nest (an inner one joins
    the outer), and a thread's results never alias its buffers (only temporaries live there)."""
    if getattr(_per_thread, "workspace", None) is not None:
        yield
        return
    _per_thread.workspace = {}
    try:
        yield
    finally:
        _per_thread.workspace = None


def keep_decoder_workspace() -> None:
    """Give the calling thread a workspace (see :func:`decoder_workspace`) for the rest of its
    life: for worker threads of a pool that ends with the work (as a pool ``initializer``)."""
    if getattr(_per_thread, "workspace", None) is None:
        _per_thread.workspace = {}


def _scratch(name: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, numpy: bool = False) -> Tensor:
    """An uninitialised tensor for a temporary of one decoder call: a view of the active
    workspace's buffer ``name`` (grown as needed), or a fresh tensor outside a workspace (from
    numpy's allocator with ``numpy``, see ``kernels.Taps.values``). A name stands for one live
    temporary at a time."""
    ws = getattr(_per_thread, "workspace", None)
    if ws is None:
        if numpy and dtype == torch.float32 and device.type == "cpu":
            return torch.from_numpy(np.empty(shape, dtype=np.float32))
        return torch.empty(shape, dtype=dtype, device=device)
    n = 1
    for d in shape:
        n *= int(d)
    key = (name, dtype, device)
    buf = ws.get(key)
    if buf is None or buf.numel() < n:
        buf = ws[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def workspace_buffer(name: str, shape: Tuple[int, ...], like: Tensor) -> Tensor:
    """A caller's own temporary in the active workspace (see :func:`decoder_workspace`), under a
    name the decoder does not use (``name`` is prefixed); a fresh tensor outside a workspace."""
    return _scratch_like("caller:" + name, shape, like)


def _scratch_like(name: str, shape: Tuple[int, ...], like: Tensor, numpy: bool = False) -> Tensor:
    return _scratch(name, tuple(shape), like.dtype, like.device, numpy)


def _head_cols(x: Tensor, nh: int) -> Tensor:
    """(N, I) -> (heads, hd, N) contiguous: the right-hand side of per-head score GEMMs."""
    n, i = x.shape
    return x.t().reshape(nh, i // nh, n).contiguous()


def _head_rows(x: Tensor, nh: int) -> Tensor:
    """(N, I) -> (heads, N, hd) contiguous."""
    n, i = x.shape
    return x.reshape(n, nh, i // nh).transpose(0, 1).contiguous()


def _project(linear: torch.nn.Linear, x: Tensor, bias: bool) -> Tensor:
    return F.linear(x, linear.weight, linear.bias if bias else None)


def _score_maps_tiling():
    """The layout of the maps the factored scores read: the native kernel's pixel tiles where it
    is the default (kernels.scores_tiles; the PyTorch path unpacks them: with AVX2 a click 0.97x,
    emulated), else (heads, hd, N) as they are."""
    return kernels.scores_tiles if kernels.decoder_preferred() else None


def _layer_projections(t2i: Attention, i2t: Optional[Attention], base: Tensor, pe_shares: Tuple[Tensor, Optional[Tensor]],
                       tiling) -> _LayerProjections:
    """The per-image maps of one layer past the first, with ``pe_shares`` (t2i_kpe, i2t_qpe) from
    :func:`_pe_shares` (shared by the images)."""
    tile = tiling or (lambda m: m)
    lp = _LayerProjections(
        t2i_k=tile(_head_cols(_project(t2i.k_proj, base, False), t2i.num_heads)),
        t2i_kpe=pe_shares[0],
        t2i_v=_head_rows(_project(t2i.v_proj, base, False), t2i.num_heads),
    )
    if i2t is not None:
        lp.i2t_q = tile(_head_cols(_project(i2t.q_proj, base, False), i2t.num_heads))
        lp.i2t_qpe = pe_shares[1]
    return lp


def _pe_shares(t2i: Attention, i2t: Optional[Attention], pe: Tensor, tiling) -> Tuple[Tensor, Optional[Tensor]]:
    """The positional encoding's share of one layer's maps (biases included): (t2i_kpe, i2t_qpe)."""
    tile = tiling or (lambda m: m)
    kpe = tile(_head_cols(_project(t2i.k_proj, pe, True), t2i.num_heads))
    return kpe, None if i2t is None else tile(_head_cols(_project(i2t.q_proj, pe, True), i2t.num_heads))


@dataclass
class _PeMaps:
    """The image-independent part of the decoder caches: the positional encoding channel-last and
    its share of every later layer's maps (~10 MB at SAM's sizes), one copy for all the images
    whose caches come from the same decoder and ``image_pe`` (a server's LRU of embeddings)."""

    pe: Tensor  # (1, N, C)
    layers: tuple  # per layer past the first, (t2i_kpe, i2t_qpe)
    final: tuple  # (t2i_kpe, None)
    tiling: object
    sources: tuple  # as DecoderCache's, for cache_current: the decoder's links and image_pe
    generation: int


_pe_maps: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # decoder -> _PeMaps (the last image_pe's)


def _shared_pe_maps(decoder: MaskDecoder, image_pe: Tensor) -> _PeMaps:
    """The decoder's :class:`_PeMaps` for ``image_pe`` (1, C, h, w): the kept ones while
    :func:`cache_current` holds for them (the same image_pe, unchanged, and the same decoder
    weights) and their layout is still the kernels', else made anew."""
    tiling = _score_maps_tiling()
    kept = _pe_maps.get(decoder)
    # (image_pe is the last of the kept sources, the input: _cache_sources lists inputs last)
    if kept is not None and kept.tiling is tiling and kept.sources[-1][2] is image_pe and cache_current(kept):
        return kept
    sources = _cache_sources(decoder, (image_pe,), None)
    generation = _common._weights_generation
    pe = image_pe.flatten(2).transpose(1, 2).contiguous()
    tf = decoder.transformer
    layers = tuple(_pe_shares(layer.cross_attn_token_to_image, layer.cross_attn_image_to_token, pe[0], tiling) for layer in tf.layers[1:])
    final = _pe_shares(tf.final_attn_token_to_image, None, pe[0], tiling)
    kept = _PeMaps(pe=pe, layers=layers, final=final, tiling=tiling, sources=sources, generation=generation)
    _pe_maps[decoder] = kept
    return kept


def _cache_sources(decoder: MaskDecoder, inputs: Tuple[Tensor, ...], prompt_encoder: Optional[torch.nn.Module]) -> tuple:
    """What :func:`build_cache` reads, each as (the dict holding it, its key, the object, its
    version, its storage) for :func:`cache_current`: the module and parameter links from the
    decoder down to the weights it projects through (the image-side projections of every block
    and of the final attention, the blocks' norm4, the first upscaling convolution); the tensors
    it was given (``inputs``: the embedding, ``no_mask_embed``); and, where the caller names the
    prompt encoder they came from, its links to ``no_mask_embed`` and the gaussian matrix the
    dense positional encoding is made from."""
    links = []

    def child(parent: torch.nn.Module, name: str) -> torch.nn.Module:
        mod = parent._modules[name]
        links.append((parent._modules, name, mod))
        return mod

    def params(mod: torch.nn.Module) -> None:  # (its submodules' links too: a projection may be replaced)
        for m in mod.modules():
            links.extend((m._modules, n, c) for n, c in m._modules.items() if c is not None)
            links.extend((m._parameters, n, p) for n, p in m._parameters.items() if p is not None)

    tf = child(decoder, "transformer")
    layers = child(tf, "layers")
    for i in range(len(layers)):
        layer = child(layers, str(i))
        for name in ("cross_attn_token_to_image", "cross_attn_image_to_token", "norm4"):
            params(child(layer, name))
    params(child(tf, "final_attn_token_to_image"))
    params(child(child(decoder, "output_upscaling"), "0"))
    if prompt_encoder is not None:
        params(child(prompt_encoder, "no_mask_embed"))
        pe_layer = child(prompt_encoder, "pe_layer")
        links.append((pe_layer._buffers, "positional_encoding_gaussian_matrix", pe_layer.positional_encoding_gaussian_matrix))
    links.extend(({}, None, t) for t in inputs)  # (their owners, where any, are the caller's)
    return tuple((d, k, o, tensor_version(o), o.data_ptr()) if isinstance(o, Tensor) else (d, k, o, None, None)
                 for d, k, o in links)


def cache_current(cache: DecoderCache) -> bool:
    """Whether the weights ``cache`` was built from are still the decoder's, unchanged: the same
    modules and parameters, the same storage and version counters (parameters made under
    ``torch.inference_mode`` have none: their in-place changes go unseen), and no
    :func:`segany.modeling.common.weights_changed` since."""
    if cache.generation != _common._weights_generation:
        return False
    for d, k, o, v, ptr in cache.sources:
        if k is not None and d.get(k) is not o:
            return False
        if ptr is not None and (o.data_ptr() != ptr or (v is not None and o._version != v)):
            return False
    return True


@torch.no_grad()
def build_cache(decoder: MaskDecoder, image_embeddings: Tensor, image_pe: Tensor, no_mask_embed: Tensor,
                prompt_encoder: Optional[torch.nn.Module] = None) -> DecoderCache:
    """image_embeddings (1, C, h, w), image_pe (1, C, h, w), no_mask_embed (1, C); the
    ``prompt_encoder`` the last two come from, if any. The cache holds projections of them
    through the decoder's weights: :func:`cache_current` says whether any of that changed."""
    sources = _cache_sources(decoder, (image_embeddings, no_mask_embed), prompt_encoder)
    generation = _common._weights_generation
    h, w = image_embeddings.shape[-2:]
    src = image_embeddings.flatten(2).transpose(1, 2) + no_mask_embed.reshape(1, 1, -1)
    src = src.contiguous()
    shared = _shared_pe_maps(decoder, image_pe)
    pe = shared.pe
    src_pe = src + pe
    layer0 = decoder.transformer.layers[0]
    t2i: Attention = layer0.cross_attn_token_to_image
    i2t: Attention = layer0.cross_attn_image_to_token
    nh = t2i.num_heads
    k0 = _head_rows(t2i.k_proj(src_pe)[0], nh)[None]
    v0 = _head_rows(t2i.v_proj(src)[0], nh)[None]
    q0 = _head_cols(i2t.q_proj(src_pe)[0], i2t.num_heads)
    # The per-image bases S_l of the factored image tokens and their projections.
    base = src[0]
    layers = []
    blocks = decoder.transformer.layers
    for i, layer in enumerate(blocks[1:]):
        base = base * blocks[i].norm4.weight  # the previous block's norm4 gain
        layers.append(_layer_projections(layer.cross_attn_token_to_image, layer.cross_attn_image_to_token, base,
                                         shared.layers[i], shared.tiling))
    base = base * blocks[-1].norm4.weight
    final = _layer_projections(decoder.transformer.final_attn_token_to_image, None, base, shared.final, shared.tiling)
    w1 = _first_conv_channels_last(decoder.output_upscaling[0])
    cache = DecoderCache(src=src, pe=pe, src_pe=src_pe, k0=k0, v0=v0, q0=q0, hw=(int(h), int(w)), layers=tuple(layers), final=final,
                         stats=_stats_maps(decoder, src[0]), sources=sources, generation=generation)
    if _native_ok_now(src):
        cache.k0_cols = k0[0].transpose(1, 2).contiguous()
    if _native_tail_ok(decoder, image_embeddings):
        cache.upscale_t = (w1.t() @ base.t()).contiguous()
    else:
        cache.upscale = (base @ w1).contiguous()
    return cache


# The token side of each two-way block (self-attention, the cross-attentions' token projections
# and out-projection, the MLP, three LayerNorms) and of the final attention runs in
# segany.kernels' token kernels where this call may use them: two native calls per block, one
# before and one after its token->image attention, in place of ~150 PyTorch operations (see
# tokens.c). Each block's weights are packed once and kept while its modules and parameters stay
# the same (_token_plan); the check runs on every call, so it reads the modules' own dicts
# (through nn.Module's attribute lookup, 26 parameters' checks took 94 us a block, more than the
# kernels saved).

_token_plans: dict = {}


def _tokens_ok(x: Tensor) -> bool:
    """Whether token rows ``x`` (..., C) may go to the token kernels in this decoder call: its
    native kernels are on (see predict_masks_fast), few rows (batches of many prompts: PyTorch's
    GEMMs), float32 on the CPU."""
    return (bool(getattr(_per_thread, "tokens", False)) and x.dtype == torch.float32 and x.is_cpu
            and x.numel() <= kernels.TOKEN_ROWS_MAX * x.shape[-1])


def _plain_linear(m) -> bool:
    return type(m) is torch.nn.Linear and m.bias is not None and m.weight.dtype == torch.float32


def _plain_ln(m) -> bool:
    return type(m) is torch.nn.LayerNorm and m.weight is not None and m.bias is not None and len(m.normalized_shape) == 1


@dataclass
class _TokenPlan:
    owner: "weakref.ref"
    modules: tuple  # the modules the plan was built from, in the order the caller gathers them
    params: tuple  # (module, name, parameter, version, storage) of every parameter it packed
    eps: tuple
    plan: object
    generation: int  # segany.modeling.common.weights_generation() when it was built

    def current(self, modules: tuple, eps: tuple) -> bool:
        if self.eps != eps or len(modules) != len(self.modules) or not all(a is b for a, b in zip(modules, self.modules)) \
                or self.generation != _common._weights_generation:
            return False
        return all(m._parameters.get(n) is p and p._version == v and p.data_ptr() == d for m, n, p, v, d in self.params)


def _no_hooks(modules: tuple) -> bool:
    return not (_global_hooks() or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


def _token_plan(owner: torch.nn.Module, kind: str, modules: tuple, eps: tuple, eligible, make):
    """The token-kernel plan ``make()`` of ``owner``'s token side, kept while ``modules`` (gathered
    by the caller from the modules' own ``_modules`` dicts; ``owner``'s submodules, never
    ``owner`` itself, which the kept plan would keep alive) are the same objects with the same
    parameters, unchanged in place (version counters) and in the same storage, the LayerNorms'
    ``eps`` are the same, and :func:`segany.modeling.common.weights_changed` was not called.
    ``eligible()`` (the modules' types and settings) is asked when a plan is built. None where the
    modules have hooks (PyTorch's code runs them) or are not eligible. Parameters without version
    counters (made under ``torch.inference_mode``) get a fresh plan on every call, as
    :func:`_derived` does."""
    if not _no_hooks(modules):
        return None
    k = (id(owner), kind)
    hit = _token_plans.get(k)
    try:
        if hit is not None and hit.owner() is owner and hit.current(modules, eps):
            return hit.plan
    except RuntimeError:  # inference tensors
        pass
    if not eligible():
        return None
    params = tuple((m, n, p) for m in modules for n, p in m._parameters.items() if p is not None)
    try:
        versions = tuple(p._version for _, _, p in params)
    except RuntimeError:
        return make()
    entry = _TokenPlan(weakref.ref(owner, lambda _, k=k: _token_plans.pop(k, None)), modules,
                       tuple((m, n, p, v, p.data_ptr()) for (m, n, p), v in zip(params, versions)), eps, make(),
                       _common._weights_generation)
    _token_plans[k] = entry
    return entry.plan


def _ln_params(ln: torch.nn.LayerNorm):
    return ln.weight, ln.bias, ln.eps


def _token_block(layer, queries: Tensor) -> Optional["kernels.TokenBlock"]:
    """The two-way block ``layer``'s token side as a native :class:`kernels.TokenBlock`, where
    this call may use the token kernels and the block is SAM's (plain linear layers and
    LayerNorms, a ReLU MLP, no hooks); else None (PyTorch's code)."""
    if not _tokens_ok(queries):
        return None
    lm = layer._modules
    sa, t2i, i2t, mlp = lm["self_attn"], lm["cross_attn_token_to_image"], lm["cross_attn_image_to_token"], lm["mlp"]
    sm, tm, im, mm = sa._modules, t2i._modules, i2t._modules, mlp._modules
    linears = (sm["q_proj"], sm["k_proj"], sm["v_proj"], sm["out_proj"], tm["q_proj"], tm["out_proj"], mm["lin1"], mm["lin2"],
               im["k_proj"], im["v_proj"])
    norms = (lm["norm1"], lm["norm2"], lm["norm3"])

    def eligible():
        return (type(sa) is Attention and type(t2i) is Attention and type(i2t) is Attention and type(mlp) is MLPBlock
                and _act_name(mlp.act) == "relu" and all(map(_plain_linear, linears)) and all(map(_plain_ln, norms)))

    def make():
        wb = [(m.weight, m.bias) for m in linears]
        return kernels.TokenBlock(q=wb[4], o=wb[5], ln2=_ln_params(norms[1]), self_attn=wb[:4], sa_heads=sa.num_heads,
                                  ln1=_ln_params(norms[0]), mlp=wb[6:8], ln3=_ln_params(norms[2]), k=wb[8], v=wb[9])

    return _token_plan(layer, "block", (sa, mlp) + linears + norms, tuple(n.eps for n in norms), eligible, make)


def _final_block(tf, queries: Tensor) -> Optional["kernels.TokenBlock"]:
    """The final token->image attention's token side (q projection; out-projection and
    norm_final_attn) as a native :class:`kernels.TokenBlock`, as :func:`_token_block`."""
    if not _tokens_ok(queries):
        return None
    attn, ln = tf._modules["final_attn_token_to_image"], tf._modules["norm_final_attn"]
    q, o = attn._modules["q_proj"], attn._modules["out_proj"]

    def eligible():
        return type(attn) is Attention and _plain_linear(q) and _plain_linear(o) and _plain_ln(ln)

    return _token_plan(tf, "final", (q, o, ln), (ln.eps,), eligible,
                       lambda: kernels.TokenBlock(q=(q.weight, q.bias), o=(o.weight, o.bias), ln2=_ln_params(ln)))


def _mlp_head(mlp, x: Tensor) -> Tensor:
    """``mlp(x)`` for the decoder's IoU head and hypernetworks (``mask_decoder.MLP``), x (B, C)."""
    if _tokens_ok(x) and not (mlp._forward_hooks or mlp._forward_pre_hooks):
        layers = tuple(mlp._modules["layers"]._modules.values()) if "layers" in mlp._modules else ()

        def eligible():
            return type(mlp) is MLP and 1 <= len(layers) <= 3 and all(map(_plain_linear, layers))

        # (the plan keeps its modules: the owner itself among them would never be freed)
        plan = _token_plan(mlp, "head", layers, (), eligible, lambda: kernels.TokenChain([(m.weight, m.bias) for m in layers]))
        if plan is not None:
            y = plan(x.contiguous())
            return torch.sigmoid(y) if mlp.sigmoid_output else y
    return mlp(x)


def _token_steps(layer, queries: Tensor, tokens: Tensor, t2i) -> Tuple[Tensor, Tensor, Tensor]:
    """The token side of one two-way block around its cross-attentions: self-attention and norm1,
    the token->image attention ``t2i(q)`` (its projected queries (B, t, I) -> its heads' outputs
    (B, t, I) before out_proj, on the already prepared image tokens), out_proj and norm2, the MLP
    and norm3. Returns the tokens and the image->token attention's projected keys and values
    (B, t, I): ``k_proj(queries + tokens)``, ``v_proj(queries)``."""
    block = _token_block(layer, queries)
    if block is not None:
        queries, q = block.pre(queries.contiguous(), tokens.contiguous(), skip_pe=layer.skip_first_layer_pe)
        return block.post(t2i(q), queries, tokens.contiguous())
    sa, t2i_attn, i2t_attn = layer.self_attn, layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    if layer.skip_first_layer_pe:
        queries = _layer_norm(layer.norm1, sa(q=queries, k=queries, v=queries))
    else:
        q = queries + tokens
        queries = _layer_norm(layer.norm1, queries + sa(q=q, k=q, v=queries))
    heads = t2i(t2i_attn.q_proj(queries + tokens))
    queries = _layer_norm(layer.norm2, queries + t2i_attn.out_proj(heads))
    queries = _layer_norm(layer.norm3, queries + layer.mlp(queries))
    return queries, i2t_attn.k_proj(queries + tokens), i2t_attn.v_proj(queries)


def _final_steps(tf, queries: Tensor, tokens: Tensor, t2i) -> Tensor:
    """The final token->image attention ``t2i(q)`` (as in :func:`_token_steps`) with its residual
    and norm_final_attn."""
    block = _final_block(tf, queries)
    if block is not None:
        queries, tokens = queries.contiguous(), tokens.contiguous()
        _, q = block.pre(queries, tokens)
        return block.post(t2i(q), queries, None)[0]
    attn = tf.final_attn_token_to_image
    return _layer_norm(tf.norm_final_attn, queries + attn.out_proj(t2i(attn.q_proj(queries + tokens))))


def _t2i_cached(attn: Attention, q: Tensor, cache: DecoderCache) -> Tensor:
    """Token->image attention of projected queries q (B, t, I) with the cache's first-layer image
    keys/values: the heads' outputs (B, t, I) before out_proj."""
    nh = attn.num_heads
    b, t, I = q.shape
    hd = I // nh
    k, v, kT = cache.k0, cache.v0, cache.k0_cols
    # A click's few queries (up to two of the kernel's 8-query pieces per head): the native
    # kernel, 0.21 vs 0.46 ms for 7 queries (its scores stay in L2; PyTorch's fused attention
    # works in key blocks sized for many queries). Beyond that they are about even.
    if kT is not None and b * t <= 16 and _native_ok(q) and kernels.t2i_attention_ok(hd, kT.shape[-1]):
        out = q.new_empty(b, t, I)
        kernels.t2i_attention(q.reshape(b * t, I).contiguous(), kT, v[0], hd**-0.5, out.view(b * t, I))
        return out
    # all prompts' queries in one attention per head: the shared keys and values are read once,
    # not once per prompt (8 prompts: 3.6 vs 5.7 ms on one thread). Two GEMMs and a softmax were
    # as fast for one prompt, but their score maps (15 MB each for 16 prompts) cost segment
    # everything 8% (2026-12-05, fifth session).
    q = q.reshape(b * t, nh, -1).transpose(0, 1)[None]  # (1, nh, b*t, hd)
    out = F.scaled_dot_product_attention(q, k, v, scale=hd**-0.5)  # (1, nh, b*t, hd)
    return out[0].transpose(0, 1).reshape(b, t, nh * hd)


def _t2i_folded(attn: Attention, q: Tensor, x_pe: Tensor, x: Tensor) -> Tensor:
    """Token->image attention of projected queries q (B, t, I), keys ``x_pe`` (B|1, N, C), values
    ``x`` (B|1, N, C), with the image projections folded onto the token side: the heads' outputs
    before out_proj."""
    nh = attn.num_heads
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
    return o.transpose(1, 2).reshape(B, t, I)


def _block_diag_keys(k: Tensor, nh: int) -> Tensor:
    """(B, t, I) keys -> (B, I, nh*t) block-diagonal: block h holds k_h^T."""
    B, t, I = k.shape
    hd = I // nh
    kh = k.reshape(B, t, nh, hd).permute(0, 2, 3, 1)  # (B, nh, hd, t)
    eye = torch.eye(nh, dtype=k.dtype, device=k.device)
    # (B, nh, hd, nh, t) with zeros off the diagonal
    bd = kh[:, :, :, None, :] * eye[None, :, None, :, None]
    return bd.reshape(B, I, nh * t)


def _i2t(attn: Attention, x_pe: Tensor, k: Tensor, v: Tensor, residual: Tensor, out: Tensor) -> Tensor:
    """``residual`` (B|1, N, C) + image->token attention output after out_proj into ``out`` (B, N,
    C; may be ``residual``), queries folded from the image tokens ``x_pe`` (B|1, N, C), the
    tokens' projected keys and values k, v (B, t, I).

    Scores are laid out (B, heads, tokens, N) so that the softmax over the few tokens runs along a
    strided axis with contiguous N-long rows (a softmax over a 7-long last axis is ~20x slower).
    The out_proj bias is folded into the value side: each head's softmax row sums to one, so
    ``a @ (u + b/heads) = a @ u + b``; the residual add is the GEMM's accumulator."""
    nh = attn.num_heads
    B, t, I = k.shape
    hd = I // nh
    kbd = _block_diag_keys(k, nh) * (hd**-0.5)  # (B, I, nh*t)
    kbdT = kbd.transpose(1, 2)  # (B, nh*t, I)
    mT = torch.matmul(kbdT, attn.q_proj.weight)  # (B, nh*t, C)
    c = torch.matmul(attn.q_proj.bias, kbd)  # (B, nh*t)
    sT = torch.baddbmm(c[:, :, None], mT, x_pe.expand(B, -1, -1).transpose(1, 2))
    N = sT.shape[-1]
    aT = torch.softmax(sT.view(B, nh, t, N), dim=2).view(B, nh * t, N)
    u = _value_update(attn, v)  # (B, nh*t, C)
    if out is residual:
        return out.baddbmm_(aT.transpose(1, 2), u)
    return torch.baddbmm(residual.expand(B, -1, -1), aT.transpose(1, 2), u, out=out)


def _i2t_cached(attn: Attention, q_cols: Tensor, k: Tensor, v: Tensor, out: Tensor,
                values: Optional[list] = None) -> Tensor:
    """Image->token attention with precomputed image queries ``q_cols`` (heads, hd, N) and the
    tokens' projected keys and values k, v (B, t, I): the update's factors in the reduced form
    (see :func:`_reduced_values`), aT (B, heads*(t-1)+1, N) into ``out`` and u
    (B, heads*(t-1)+1, C) returned; the update is ``aT^T u``."""
    B, t, _ = k.shape
    nh, hd, N = q_cols.shape
    if t <= kernels.I2T_TOKENS_MAX and hd <= 64 and _native_ok(k):
        # the scores and their softmax per pixel vector in one pass (no (nh, B*t, N) score map)
        kernels.i2t_softmax(k.contiguous(), nh, hd**-0.5, q_cols, out)
    else:
        h = _split_heads_scaled(k, attn.num_heads)  # (nh, B*t, hd)
        s = torch.bmm(h, q_cols, out=_scratch_like("scores", (nh, B * t, N), h)).view(nh, B, t, N)
        _softmax_over_tokens(s, out)
    return _update_rows(attn, v, values)


def _softmax_over_tokens(s: Tensor, out: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """Scores (heads, B, t, N) -> attention over the t tokens into ``out`` (B, heads*(t-1)+1, N;
    matrices contiguous, any batch stride) in the reduced layout: per head its first t-1 tokens,
    then a row of ones (see :func:`_reduced_values`); times ``scale`` (B, N) where given."""
    nh, B, t, N = s.shape
    rows = kernels.reduced_rows(nh, t)
    if _native_ok(s) and s.is_contiguous() and scale is None:  # one pass (a click's: 0.1 vs 0.22 ms)
        return kernels.softmax_tokens(s, out, reduced=True)
    a = torch.softmax(s, dim=2, out=_scratch_like("softmax", s.shape, s))
    out[:, : rows - 1].view(B, nh, t - 1, N).copy_(a[:, :, : t - 1].transpose(0, 1))
    out[:, rows - 1] = 1.0
    if scale is not None:
        out.mul_(scale[:, None, :])
    return out


def _value_update(attn: Attention, v: Tensor, values: Optional[list] = None) -> Tensor:
    """Projected values v (B, t, I) -> (B, heads*t, C): each head's values through its slice of
    out_proj, plus out_proj's bias shared among the heads (softmax rows sum to one). The values
    are appended to ``values`` where given."""
    nh = attn.num_heads
    if values is not None:
        values.append(v)
    B, t, I = v.shape
    hd = I // nh
    C = attn.out_proj.weight.shape[0]
    # one product per head over all prompts (a matmul broadcasting the weight over the prompts
    # copied it, transposed, once per prompt: 8 prompts, 1.8 of a call's 76 ms)
    wo = _derived(attn.out_proj.weight, "heads", lambda w: w.t().reshape(nh, hd, C).contiguous())
    u = torch.bmm(v.view(B * t, nh, hd).transpose(0, 1), wo)  # (nh, B*t, C)
    u = u.view(nh, B, t, C).transpose(0, 1).reshape(B, nh * t, C)
    return u + attn.out_proj.bias / nh


def _update_rows(attn: Attention, v: Tensor, values: Optional[list] = None) -> Tensor:
    """``_reduced_values(_value_update(attn, v, values), heads)``: in one native call where the
    decoder kernels run (~20 PyTorch operations on a click's 7 tokens, ~50 us, against ~5)."""
    nh = attn.num_heads
    o = attn.out_proj
    I = v.shape[-1]
    C = o.weight.shape[0]
    if _native_ok(v) and o.bias is not None and C % kernels.decoder_lanes() == 0 and I % nh == 0 and I // nh <= 64:
        if values is not None:
            values.append(v)
        wo = _derived(o.weight, "heads", lambda w: w.t().reshape(nh, I // nh, C).contiguous())
        return kernels.value_rows(v.contiguous(), wo, o.bias.contiguous())
    return _reduced_values(_value_update(attn, v, values), nh)


_derived_cache: dict = {}


def _derived(weight: Tensor, key: str, make) -> Tensor:
    """``make(weight)``: a layout of a parameter that every call would rebuild, kept while the
    parameter lives and is not changed in place (its version counter) or given new storage, and
    :func:`segany.modeling.common.weights_changed` is not called; built fresh where autograd
    records (training) and for parameters made under ``torch.inference_mode``."""
    if torch.is_grad_enabled() or weight.is_inference():  # (inference tensors have no version counter)
        return make(weight)
    k = (id(weight), key)
    hit = _derived_cache.get(k)
    # (the storage too: ``p.data = x`` gives a parameter new values without a version bump)
    state = (weight._version, weight.data_ptr(), _common._weights_generation)
    if hit is not None and hit[0]() is weight and hit[1] == state:
        return hit[2]
    value = make(weight)
    ref = weakref.ref(weight, lambda _, k=k: _derived_cache.pop(k, None))
    _derived_cache[k] = (ref, state, value)
    return value


def _reduced_values(u: Tensor, nh: int) -> Tensor:
    """The image->token update ``aT^T u`` (aT (B, heads*t, N), u (B, heads*t, C)) with one row
    less per head: each head's t attention weights sum to one at every pixel, so its last
    token's weight is one minus the others' and
    ``sum_k a_k u_k = sum_{k<t-1} a_k (u_k - u_{t-1}) + u_{t-1}``. The last terms of all heads
    make one row (u_{t-1} summed over the heads) against a row of ones in aT. Returns
    (B, heads*(t-1)+1, C), for aT in the reduced layout of :func:`_softmax_over_tokens`.

    The update's rank, and with it the factored image tokens' rank r, drops from heads*t + 2 to
    heads*(t-1) + 3 per layer (a click: 58 -> 51; after two layers 116 -> 102): every product
    with P (scores, attention values, the stream, the first upscaling convolution) shrinks
    with it (segment everything at SAM's defaults ~5% faster, in-process A/B, 2026-12-05)."""
    B, ht, C = u.shape
    t = ht // nh
    u4 = u.view(B, nh, t, C)
    last = u4[:, :, t - 1]  # (B, nh, C)
    out = u.new_empty(B, nh * (t - 1) + 1, C)
    torch.sub(u4[:, :, : t - 1], last[:, :, None], out=out[:, :-1].view(B, nh, t - 1, C))
    torch.sum(last, 1, out=out[:, -1])
    return out


@dataclass
class _Factored:
    """Image tokens (B, N, C) = alpha[..., None] * (S + P^T Q), S the per-image base of its layer.

    One row scale for both parts: a LayerNorm then only appends rows to P (layer l's P is the
    first rows of layer l+1's, in one buffer), where scaling the base alone made every layer
    rewrite P's rows times its row scales (at 16 prompts ~8% of a decoder call)."""

    alpha: Tensor  # (B, N)
    P: Tensor  # (B, r, N), matrices contiguous (a view of the first rows of the call's buffer)
    Q: Tensor  # (B, r, C)
    QT: Optional[Tensor] = None  # (B, C, rp) Q transposed for the native kernels, made on first use (_q_columns)

    def select(self, rows: Tensor) -> "_Factored":
        # index_select: advanced indexing copied P (15 MB for 8 prompts) at ~2 GB/s
        return _Factored(*(torch.index_select(t, 0, rows) for t in (self.alpha, self.P, self.Q)))


def _q_columns(fx: _Factored) -> Tensor:
    """fx.Q transposed and padded as ``kernels.factored_low`` takes it (native LayerNorm factors
    come with it)."""
    if fx.QT is None:
        fx.QT = kernels.transposed_rows(fx.Q)
    return fx.QT


def _normed(fx: Optional[_Factored], P: Tensor, r0: int, k: int, u: Tensor, mean: Tensor, rstd: Tensor,
            ln: torch.nn.LayerNorm) -> _Factored:
    """``LayerNorm(X + aT^T u)`` in factored form, from the row statistics mean, rstd (B, N) of
    ``X + aT^T u``; ``fx`` is X (None: X is the base itself, row scale 1). P (B, >= r0+k+2, N)
    holds X's rows 0..r0-1 and, in rows r0..r0+k-1, aT divided by X's row scales (the reduced
    attention, see :func:`_reduced_values`); the two rows after them are written here.

    With X = alpha (S + P^T Q): LayerNorm gives r (X + aT^T u - m) g + b
    = (r alpha) (S g + P^T (Q g) + (aT / alpha)^T (u g) - (m / alpha) g + b / (r alpha))."""
    g, b = ln.weight, ln.bias
    if _native_ok(u) and g is not None and b is not None:  # (one call for ~10 small operations)
        Q, QT, alpha = kernels.normed_rows(None if fx is None else fx.Q, u, g.contiguous(), b.contiguous(), mean.contiguous(),
                                           rstd.contiguous(), None if fx is None else fx.alpha.contiguous(), P, r0 + k)
        return _Factored(alpha, P[:, : r0 + k + 2], Q, QT)
    B, _, N = P.shape
    C = g.shape[0]
    if fx is None:
        torch.neg(mean, out=P[:, r0 + k])
        alpha = rstd
    else:
        torch.div(mean, fx.alpha, out=P[:, r0 + k]).neg_()
        alpha = fx.alpha * rstd
    torch.reciprocal(alpha, out=P[:, r0 + k + 1])
    Q = [u * g, g.expand(B, 1, C), b.expand(B, 1, C)]
    if fx is not None:
        Q.insert(0, fx.Q * g)
    return _Factored(alpha, P[:, : r0 + k + 2], torch.cat(Q, 1))


def _factored_scores(x: Tensor, nh: int, weight: Tensor, fx: _Factored, base_cols: Tensor, pe_cols: Tensor,
                     out: Optional[Tensor] = None) -> Tensor:
    """Per-head scores of the tokens' projection ``x`` (B, t, I), split into ``nh`` heads h
    (heads, B*t, hd) and scaled by hd^-0.5, against the projection ``weight`` (I, C) of the
    factored image tokens plus the positional share:
    (heads, B, t, N) = alpha * (h S_h^T + (h (Q W_h^T)^T) P) + h PE_h^T.

    ``out`` (B, heads*(t-1)+1, N): the image->token attention into it instead, per pixel and head
    the softmax over the t tokens in the reduced layout of :func:`_softmax_over_tokens`, divided
    by alpha (the rows P takes, see :func:`_normed`)."""
    B, t, I = x.shape
    hd = I // nh
    r, N = fx.P.shape[1:]
    if _native_ok(x):  # one pass over the image-side maps instead of five
        if weight.shape[1] % kernels.decoder_lanes() == 0:
            # the head split and h (Q W_h^T)^T as (h W_h) Q^T in one call (~10 operations fewer)
            h, low = kernels.factored_low(x.contiguous(), nh, hd**-0.5, weight.contiguous(), _q_columns(fx), r)
        else:
            h = _split_heads_scaled(x, nh)
            qw = F.linear(fx.Q, weight).view(B, r, nh, hd).permute(0, 2, 3, 1)  # (B, nh, hd, r)
            low = torch.matmul(h.view(nh, B, t, hd).transpose(0, 1), qw).contiguous()  # (B, nh, t, r)
        if out is not None:
            scores = _scratch_like("scores", (B, nh, t, N), h)
            kernels.factored_scores(h.contiguous(), base_cols, pe_cols, fx.alpha.contiguous(), low, fx.P, scores, True,
                                    out, torch.reciprocal(fx.alpha))
            return out
        scores = _scratch_like("scores", (nh, B, t, N), h)
        return kernels.factored_scores(h.contiguous(), base_cols, pe_cols, fx.alpha.contiguous(), low, fx.P, scores)
    s = _unfused_scores(_split_heads_scaled(x, nh), weight, fx, base_cols, pe_cols)
    return s if out is None else _softmax_over_tokens(s, out, torch.reciprocal(fx.alpha))


def _unfused_scores(h: Tensor, weight: Tensor, fx: _Factored, base_cols: Tensor, pe_cols: Tensor) -> Tensor:
    nh, Bt, hd = h.shape
    B, r, N = fx.P.shape
    if base_cols.ndim == 4:  # (the native kernel's tiles)
        base_cols = kernels.untile_maps(base_cols, N)
        pe_cols = None if pe_cols is None else kernels.untile_maps(pe_cols, N)
    t = Bt // B
    s = torch.bmm(h, base_cols, out=_scratch_like("scores", (nh, Bt, N), h)).view(nh, B, t, N)
    qw = F.linear(fx.Q, weight).view(B, r, nh, hd).permute(0, 2, 3, 1)  # (B, nh, hd, r)
    low = torch.matmul(h.view(nh, B, t, hd).transpose(0, 1), qw)  # (B, nh, t, r)
    low = torch.bmm(low.reshape(B, nh * t, r), fx.P, out=_scratch_like("low", (B, nh * t, N), h))
    s.add_(low.view(B, nh, t, N).transpose(0, 1)).mul_(fx.alpha[None, :, None, :])
    if pe_cols is not None:
        s.view(nh, Bt, N).baddbmm_(h, pe_cols)
    return s


def _split_heads_scaled(x: Tensor, nh: int) -> Tensor:
    """(B, t, I) -> (heads, B*t, hd) times hd^-0.5."""
    B, t, I = x.shape
    hd = I // nh
    return x.view(B, t, nh, hd).permute(2, 0, 1, 3).reshape(nh, B * t, hd) * (hd**-0.5)


def _t2i_factored(attn: Attention, q: Tensor, fx: _Factored, proj: _LayerProjections) -> Tensor:
    """Token->image attention of projected queries q (B, t, I) on factored image tokens (keys
    X + pe, values X): the heads' outputs before out_proj."""
    nh = attn.num_heads
    B, t, _ = q.shape
    N = fx.P.shape[-1]
    hd = q.shape[-1] // nh
    s = _factored_scores(q, nh, attn.k_proj.weight, fx, proj.t2i_k, proj.t2i_kpe)
    native = _native_ok(s)
    r = fx.P.shape[1]
    w_v = attn.v_proj.weight
    values_native = native and w_v.shape[1] % kernels.decoder_lanes() == 0
    if values_native and B == 1 and hd % kernels.decoder_lanes() == 0:
        # One prompt: the softmax and both products in one native call, split over pixel ranges
        # (0.43 vs 0.51 ms for layer 1's, 0.35 vs 0.54 for the final attention's, alone)
        o = _scratch_like("t2i_o", (nh, t, hd), s)  # (nh, B*t, hd)
        aP = _scratch_like("t2i_aP", (nh, t, r), s)  # (B, nh*t, r)
        part = _scratch_like("t2i_part", (kernels.attend_part_floats(nh, t, r, hd, N),), s)
        kernels.attend_values(s.view(nh, t, N), fx.alpha[0].contiguous(), proj.t2i_v, fx.P[0], o, aP, part)
    else:
        # a * alpha in (B, nh*t, N) layout for a P^T (one prompt: the same memory as s's layout)
        a_bt = s.view(B, nh, t, N) if native and B == 1 else _scratch_like("attn", (B, nh, t, N), s)
        # values: (a * alpha) S W_v^T + ((a * alpha) P^T)(Q W_v^T) + b_v
        if native:  # one pass: softmax, the alpha weighting, both layouts (one in place of s)
            weighted = s
            kernels.softmax_pixels(s, fx.alpha.contiguous(), a_bt, weighted)
        else:
            a = torch.softmax(s, dim=-1, out=_scratch_like("softmax", s.shape, s))  # (nh, B, t, N)
            weighted = torch.mul(a, fx.alpha[None, :, None, :], out=_scratch_like("weighted", (nh, B, t, N), s))
            a_bt.copy_(weighted.transpose(0, 1))
        o = torch.bmm(weighted.view(nh, B * t, N), proj.t2i_v)  # (nh, B*t, hd)
        aP = torch.bmm(a_bt.view(B, nh * t, N), fx.P.transpose(1, 2))  # (B, nh*t, r)
    if values_native:  # (~10 operations in one call)
        return kernels.factored_values(o, aP.view(B, nh, t, r), fx.Q, _derived(w_v, "columns", lambda w: w.t().contiguous()),
                                       None if proj.t2i_kpe is None else attn.v_proj.bias.contiguous())
    qv = F.linear(fx.Q, attn.v_proj.weight).view(B, r, nh, hd).transpose(1, 2)  # (B, nh, r, hd)
    o2 = torch.matmul(aP.view(B, nh, t, r), qv)  # (B, nh, t, hd)
    o = o.view(nh, B, t, hd).permute(1, 2, 0, 3) + o2.transpose(1, 2)
    if proj.t2i_kpe is not None:  # (else the values hold the bias)
        o = o + attn.v_proj.bias.view(nh, hd)
    return o.reshape(B, t, nh * hd)


def _i2t_factored(attn: Attention, fx: _Factored, proj: _LayerProjections, k: Tensor, v: Tensor,
                  out: Tensor, values: Optional[list] = None) -> Tensor:
    """Image->token attention with queries from factored image tokens (X + pe) and the tokens'
    projected keys and values k, v: the update's factors in the reduced form, as
    :func:`_i2t_cached`, with aT divided by X's row scales."""
    nh = attn.num_heads
    _factored_scores(k, nh, attn.q_proj.weight, fx, proj.i2t_q, proj.i2t_qpe, out=out)
    return _update_rows(attn, v, values)


def _layer_norm(ln: torch.nn.LayerNorm, x: Tensor) -> Tensor:
    return torch.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


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
    scratch_masks: bool = False,
    best_only: bool = False,
    mask_factor: Optional[Tuple[Tensor, Tensor]] = None,
    visible: Optional[Tuple[int, int]] = None,
) -> Tuple[Tensor, Tensor]:
    """Same outputs as ``decoder(image_embeddings, image_pe, sparse, dense, multimask_output)``.

    Give either ``cache`` (no mask input, or with ``mask_factor`` mask prompts on the cached image:
    :func:`mask_prompt_factor`) or ``image_embeddings``/``image_pe``/``dense_prompt_embeddings``
    (any dense input).

    With ``iou_thresh`` only the masks whose predicted IoU is above it are upscaled (the IoU head
    runs before the output upscaling, which is half the decoder's work, and, without a mask
    input, before the mask tokens' final attention): returns masks (K, 4h, 4w)
    of those K masks in (prompt, mask) order, and the full iou (B, M); ``iou > iou_thresh`` says
    which they are.

    ``scratch_masks``: the masks may be a view of the active :func:`decoder_workspace`'s buffer,
    overwritten by the thread's next call; for callers that copy what they keep.

    ``best_only`` (not with ``iou_thresh``): per prompt only the candidate with the highest
    predicted IoU (the first of equal ones, as ``argmax``), the one an interactive click shows:
    masks (B, 1, 4h, 4w) and its iou (B, 1). The IoU head runs before the output upscaling, so
    the other candidates' hypernetwork MLPs and mask products are skipped.

    ``visible`` (rows, cols) of the (h, w) embedding: only the masks' first 4*rows rows and 4*cols
    columns are needed (callers that upscale them to the original image and return nothing else:
    the rest lies in the input's padding, which the upscale never reads; see
    ``segany.upscale.used_extent``). Where the native output upscaling runs, the rest is not
    computed and is zero; elsewhere it is computed as usual."""
    if best_only and iou_thresh is not None:
        raise ValueError("best_only and iou_thresh do not combine")
    # The native kernels' eligibility is asked once per call, not by each of the ~10 helpers
    # that choose between them and PyTorch (~7 us a question; see _native_ok).
    _per_thread.native = _native_ok_now(sparse_prompt_embeddings)
    _per_thread.tokens = _per_thread.native and kernels.tokens_usable()
    try:
        return _predict_masks_fast(decoder, sparse_prompt_embeddings, cache, image_embeddings, image_pe, dense_prompt_embeddings,
                                   multimask_output, iou_thresh, scratch_masks, best_only, mask_factor, visible)
    finally:
        _per_thread.native = _per_thread.tokens = None


_token_indices: dict = {}  # (indices, device) -> that index tensor (a fresh one per call costs ~7 us)


def _index_tensor(indices: Tuple[int, ...], device: torch.device) -> Tensor:
    key = (indices, device)
    t = _token_indices.get(key)
    if t is None:
        t = _token_indices[key] = torch.tensor(indices, device=device)
    return t


def _predict_masks_fast(decoder, sparse_prompt_embeddings, cache, image_embeddings, image_pe, dense_prompt_embeddings,
                        multimask_output, iou_thresh, scratch_masks, best_only, mask_factor, visible):
    B = sparse_prompt_embeddings.shape[0]
    tokens = torch.cat((decoder.iou_token.weight.expand(B, -1, -1), decoder.mask_tokens.weight.expand(B, -1, -1),
                        sparse_prompt_embeddings), dim=1)
    if mask_factor is not None and cache is None:
        raise ValueError("mask_factor goes with a cache")
    own = False  # whether src and src_pe are this call's kept buffers (then updated in place)
    if cache is not None and _dense_is_cheaper(decoder, tokens.shape[1], mask_factor, cache.src.shape[-1]):
        # the image tokens formed densely, from the cached ones (plus a mask prompt's product)
        h, w = cache.hw
        src, pe, src_pe = cache.src, cache.pe, cache.src_pe
        if mask_factor is not None:
            P0, Q0 = mask_factor
            src = torch.baddbmm(src.expand(B, -1, -1), P0.transpose(1, 2), Q0, out=_kept_buffer("keys", (B, *src.shape[1:]), src))
            src_pe = torch.add(src, pe, out=_kept_buffer("keys_pe", tuple(src.shape), src))
            own = True
        cache = mask_factor = None
    elif cache is not None:
        h, w = cache.hw
        src, pe, src_pe = cache.src, cache.pe, cache.src_pe
    else:
        h, w = image_embeddings.shape[-2:]
        src = image_embeddings.flatten(2).transpose(1, 2) + dense_prompt_embeddings.flatten(2).transpose(1, 2)
        pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        src_pe = src + pe

    sl = slice(1, None) if multimask_output else slice(0, 1)
    idx = range(decoder.num_mask_tokens)[sl]

    def hypernetworks(queries: Tensor) -> Tensor:  # queries (B, M, C) of the requested mask tokens
        return torch.stack([_mlp_head(decoder.output_hypernetworks_mlps[j], queries[:, i, :]) for i, j in enumerate(idx)], dim=1)

    if cache is not None and iou_thresh is not None:
        # The IoU head reads only the IoU token, and the final attention treats each query token
        # on its own: the IoU token goes through it first, the mask tokens only for the prompts
        # with a mask above the threshold (segment everything at SAM's thresholds: few).
        queries, fx = _layers_cached(decoder, tokens, cache, mask_factor)
        iou_pred = _mlp_head(decoder.iou_prediction_head, _final_cached(decoder, queries[:, :1], tokens[:, :1], fx, cache)[:, 0])[:, sl]
        keep = iou_pred > iou_thresh  # (B, M)
        rows = keep.any(1).nonzero().flatten()
        if len(rows) == 0:
            return queries.new_zeros(0, 4 * h, 4 * w), iou_pred
        mask_tokens = _index_tensor(tuple(1 + j for j in idx), tokens.device)
        if len(rows) < B:  # (all kept: nothing to gather)
            fx, queries, tokens = fx.select(rows), queries[rows], tokens[rows]
        hyper_in = hypernetworks(_final_cached(decoder, queries[:, mask_tokens], tokens[:, mask_tokens], fx, cache))
        masks = _upscale_masks(decoder, (fx, cache.upscale, cache.upscale_t), hyper_in, h, w, visible=visible, scratch=True)
        return _kept_masks(masks, keep[rows], scratch_masks), iou_pred

    # Only the IoU token and the requested mask tokens are read after the final token->image
    # attention, which treats each query token on its own: the others skip it.
    used = _index_tensor((0,) + tuple(1 + j for j in idx), tokens.device)
    if cache is not None:
        queries, upscale_in = _transformer_cached(decoder, tokens, cache, used, mask_factor)
    else:
        queries, upscale_in = _transformer_dense(decoder, tokens, src, pe, src_pe, used, own=own)

    iou_pred = _mlp_head(decoder.iou_prediction_head, queries[:, 0, :])[:, sl]
    if best_only and B == 1:  # (a click: a dozen fewer small operations than the batched form below)
        i = int(iou_pred.argmax())
        hyper_in = _mlp_head(decoder.output_hypernetworks_mlps[idx[i]], queries[:, 1 + i])[:, None]
        return _upscale_masks(decoder, upscale_in, hyper_in, h, w, visible=visible, scratch=scratch_masks), iou_pred[:, i : i + 1]
    if best_only:
        best = iou_pred.argmax(1)  # (B,)
        hyper_in = queries.new_empty(B, 1, decoder.output_hypernetworks_mlps[0].layers[-1].out_features)
        for i in best.unique().tolist():  # prompts that chose the same candidate share one MLP call
            rows = (best == i).nonzero().flatten()
            hyper_in[rows, 0] = _mlp_head(decoder.output_hypernetworks_mlps[idx[i]], queries[rows, 1 + i, :])
        return (_upscale_masks(decoder, upscale_in, hyper_in, h, w, visible=visible, scratch=scratch_masks),
                iou_pred.gather(1, best[:, None]))
    hyper_in = hypernetworks(queries[:, 1:])
    if iou_thresh is None:
        return _upscale_masks(decoder, upscale_in, hyper_in, h, w, visible=visible, scratch=scratch_masks), iou_pred
    keep = iou_pred > iou_thresh  # (B, M)
    rows = keep.any(1).nonzero().flatten()
    if len(rows) == 0:
        return queries.new_zeros(0, 4 * h, 4 * w), iou_pred
    if len(rows) < B:  # (all kept: nothing to gather)
        upscale_in = torch.index_select(upscale_in, 0, rows)
        hyper_in = hyper_in[rows]
    masks = _upscale_masks(decoder, upscale_in, hyper_in, h, w, visible=visible, scratch=True)  # (R, M, 4h, 4w)
    return _kept_masks(masks, keep[rows], scratch_masks), iou_pred


def _kept_masks(masks: Tensor, keep: Tensor, scratch: bool) -> Tensor:
    """masks (R, M, H, W), keep (R, M) bool -> the kept masks (K, H, W) in (row, mask) order; in
    the workspace's buffer with ``scratch``."""
    kept = keep.flatten().nonzero().flatten()
    out = _scratch_like("masks_kept", (len(kept), *masks.shape[2:]), masks) if scratch else None
    return torch.index_select(masks.flatten(0, 1), 0, kept, out=out)


# Where the factored image tokens' rank passes these fractions of the channels (without, with a
# mask prompt), forming the tokens densely is cheaper (see _dense_is_cheaper).
DENSE_ABOVE_RANK = (0.9, 0.75)


def _dense_is_cheaper(decoder: MaskDecoder, t: int, mask_factor, C: int) -> bool:
    """Whether a cached decoder call with t tokens per prompt should form the image tokens
    densely (from the cached ones, in kept buffers). The factored form's every product grows
    with its rank r (per layer heads*(t-1)+3 rows, plus a mask prompt's 17), the dense form's
    with the channels C: with many points (an interactive session's accumulated clicks) r passes
    C. A mask prompt factored costs more for its rank (its first layer reads two maps more).

    Measured 2026-12-05 (2 threads, one process, both forms alternating; ms factored / dense),
    vit_b (C 256): without a mask 13.2 / 16.7 (2 points, r/C 0.46), 24.1 / 25.4 (8, 0.84),
    29.2 / 27.2 (12, 1.09); with a mask 18.8 / 21.0 (1 point, 0.46), 20.4 / 19.8 (4, 0.65),
    22.3 / 23.6 (6, 0.78), 26.0 / 25.8 (8, 0.90), 32.2 / 28.6 (12, 1.15). The bundled model
    (C 128): without a mask 6.1 / 6.0 (1 point, 0.80), 6.6 / 6.5 (4, 1.17); with a mask
    10.1 / 9.6 (1 point, 0.93). Near the fractions the two are within noise of each other."""
    m = 0 if mask_factor is None else mask_factor[0].shape[1]
    r = m + sum(kernels.reduced_rows(layer.cross_attn_image_to_token.num_heads, t) + 2 for layer in decoder.transformer.layers)
    return r > DENSE_ABOVE_RANK[mask_factor is not None] * C


def _transformer_dense(decoder: MaskDecoder, tokens: Tensor, src: Tensor, pe: Tensor, src_pe: Tensor, used: Tensor,
                       own: bool = False):
    """Any dense prompt (mask input): image tokens formed densely, projections folded. Returns
    the ``used`` tokens and the final image tokens.

    The stream lives in two kept buffers (:func:`_kept_buffer`), updated in place: ``own`` says
    ``src`` and ``src_pe`` already are them (B rows each)."""
    tf = decoder.transformer
    queries = tokens
    B = tokens.shape[0]
    N, C = src.shape[-2:]
    keys, keys_pe = src, src_pe
    native = _native_rows_ok(src)
    for i, layer in enumerate(tf.layers):
        queries, k, v = _token_steps(layer, queries, tokens, lambda q: _t2i_folded(layer.cross_attn_token_to_image, q, keys_pe, keys))
        out = keys if own or i > 0 else _kept_buffer("keys", (B, N, C), src)
        keys = _i2t(layer.cross_attn_image_to_token, keys_pe, k, v, keys, out=out)
        ln = layer.norm4
        if native:
            kernels.layer_norm_rows_(keys, ln.weight, ln.bias, ln.eps)
        else:
            keys.copy_(_layer_norm(ln, keys))
        if i == 0 and not own:
            keys_pe = _kept_buffer("keys_pe", (B, N, C), src)
        torch.add(keys, pe, out=keys_pe)
    queries, tokens = queries[:, used], tokens[:, used]
    return _final_steps(tf, queries, tokens, lambda q: _t2i_folded(tf.final_attn_token_to_image, q, keys_pe, keys)), keys


def _kept_buffer(name: str, shape: Tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised buffer for a large temporary of one decoder call (the image-token stream,
    ~4 MB a prompt at SAM's sizes): the workspace's when one is active, else, for float32 CPU
    tensors, one kept per thread and name between calls (a fresh tensor that size is fresh memory
    whose pages fault in on every call: under segany's huge-page allocator a fresh 4 MB sum took
    1.2 ms against 0.27 ms into a kept buffer). Valid until the thread's next decoder call."""
    if getattr(_per_thread, "workspace", None) is not None:
        return _scratch_like(name, shape, like)
    if not like.is_cpu or like.dtype != torch.float32:
        return like.new_empty(shape)
    kept = getattr(_per_thread, "kept", None)
    if kept is None:
        kept = _per_thread.kept = {}
    n = 1
    for d in shape:
        n *= int(d)
    buf = kept.get(name)
    if buf is None or buf.numel() < n:
        buf = kept[name] = torch.empty(n)
    return buf[:n].view(shape)


def _transformer_cached(decoder: MaskDecoder, tokens: Tensor, cache: DecoderCache, used: Tensor, mask_factor=None):
    """No mask input (or a factored one): the first layer from the cache, the rest on factored
    image tokens. Returns the ``used`` tokens and (factored final image tokens, the cache's
    upscaling base)."""
    queries, fx = _layers_cached(decoder, tokens, cache, mask_factor)
    return _final_cached(decoder, queries[:, used], tokens[:, used], fx, cache), (fx, cache.upscale, cache.upscale_t)


def _final_cached(decoder: MaskDecoder, queries: Tensor, tokens: Tensor, fx: "_Factored", cache: DecoderCache) -> Tensor:
    """The final token->image attention and its LayerNorm, for the given query tokens (each on
    its own: any subset of them gives the same values as all of them together)."""
    tf = decoder.transformer
    return _final_steps(tf, queries, tokens, lambda q: _t2i_factored(tf.final_attn_token_to_image, q, fx, cache.final))


def _layers_cached(decoder: MaskDecoder, tokens: Tensor, cache: DecoderCache, mask_factor=None):
    """The two-way blocks of :func:`_transformer_cached`: all tokens and the factored image tokens
    before the final attention. ``mask_factor`` (P0 (B, m, N), Q0 (B, m, C)): mask prompts, whose
    image tokens are the cached ones plus P0^T Q0 (:func:`mask_prompt_factor`)."""
    tf = decoder.transformer
    queries = tokens
    keys = cache.src  # the dense residual stream, needed for LayerNorm statistics
    fx: Optional[_Factored] = None
    native = _native_rows_ok(cache.src)
    last = len(tf.layers) - 1
    B, t, _ = tokens.shape
    N = keys.shape[1]
    # each layer's P rows: its reduced attention (written there by the softmax) and two rows of
    # statistics; later layers append to the same buffer (see _Factored), after a mask prompt's
    m = 0 if mask_factor is None else mask_factor[0].shape[1]
    ks = [kernels.reduced_rows(layer.cross_attn_image_to_token.num_heads, t) for layer in tf.layers]
    P = _scratch_like("P", (B, m + sum(k + 2 for k in ks), N), tokens)
    if mask_factor is not None:
        P[:, :m].copy_(mask_factor[0])
        fx = _Factored(tokens.new_ones(B, N), P[:, :m], mask_factor[1])
    r0 = m
    values = [] if cache.stats is not None else None  # each layer's values, for _factored_stats
    for i, layer in enumerate(tf.layers):
        k = ks[i]
        aT = P[:, r0 : r0 + k]  # the reduced attention divided by the row scales of the layer's input
        if fx is None:
            queries, kt, vt = _token_steps(layer, queries, tokens, lambda q: _t2i_cached(layer.cross_attn_token_to_image, q, cache))
            u = _i2t_cached(layer.cross_attn_image_to_token, cache.q0, kt, vt, aT, values)
        else:
            proj = cache.layers[i - 1] if i > 0 else _first_layer_projections(cache)
            queries, kt, vt = _token_steps(layer, queries, tokens, lambda q: _t2i_factored(layer.cross_attn_token_to_image, q, fx, proj))
            u = _i2t_factored(layer.cross_attn_image_to_token, fx, proj, kt, vt, aT, values)
        ln = layer.norm4
        if values is not None:  # the statistics without the dense stream
            mean, rstd = _factored_stats(P[:, : r0 + k], None if fx is None else fx.Q, u, _stats_groups(decoder, cache, i, values, mask_factor),
                                         cache.stats.sbar[i], cache.stats.sq[i], None if i == 0 else fx.alpha, ln.eps)
            fx = _normed(fx, P, r0, k, u, mean, rstd, ln)
            r0 += k + 2
            continue
        # the stream's update aU^T uU, row-scaled by `scale`: a mask prompt's part joins the first
        # one, the stream then being the cached tokens plus [P0; aT]^T [Q0; u] (scales still one)
        if i == 0 and m:
            aU, uU, scale = P[:, : m + k], torch.cat((mask_factor[1], u), 1), None
        else:
            aU, uU, scale = aT, u, None if fx is None else fx.alpha
        # The statistics are what the factored form needs; the normalised stream itself only as
        # the next layer's residual (so not after the last layer).
        if native and i == last:
            # only the statistics of the last update are read: from the update's rows as they
            # are formed, never stored (8 prompts on one thread: 11.5 vs 13.9 ms; for one
            # prompt as fast as the dense update and its statistics, and it takes aT as P holds it)
            mean, rstd = kernels.update_row_stats(keys, aU, uU.contiguous(), ln.eps, scale)
        else:
            a = aU if scale is None else torch.mul(aU, scale[:, None, :], out=_scratch_like("aT", aU.shape, aU))
            residual = None
            if i > 0:  # keys is this call's own stream by now
                y = keys.baddbmm_(a.transpose(1, 2), uU)
            elif native:
                # the product first; the base is added by the LayerNorm kernel as it reads each row
                # (baddbmm with a broadcast base copies it twice, a separate add is a pass more)
                y = torch.bmm(a.transpose(1, 2), uU, out=_kept_buffer("stream", (B, N, keys.shape[2]), keys))
                residual = keys
            else:
                y = torch.bmm(a.transpose(1, 2), uU).add_(keys)
            if native:
                mean, rstd = kernels.layer_norm_rows_(y, ln.weight, ln.bias, ln.eps, normalise=i < last, add=residual)
                keys = y
            else:  # (native_layer_norm is ~10x faster than var_mean here)
                keys, mean, rstd = torch.native_layer_norm(y, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
                mean, rstd = mean.squeeze(-1), rstd.squeeze(-1)
        fx = _normed(fx, P, r0, k, u, mean, rstd, ln)
        r0 += k + 2
    return queries, fx


def _value_rows(v: Tensor, nh: int, maps: Tensor, bias: Tensor, out: Tensor) -> None:
    """Dot products of a layer's reduced value rows (:func:`_reduced_values`) with the per-image
    tokens: v (B, t, I) the layer's values, maps (heads, hd, N) and bias (N,) out_proj's per-head
    slices and bias against the tokens (:class:`_StatsMaps`) -> out (B, heads*(t-1)+1, N).
    (One product per head with the last token's row as well, summed over the heads after, read
    the maps once but took longer: 248 vs 194 us.)"""
    B, t, I = v.shape
    hd = I // nh
    N = maps.shape[-1]
    if t > 1:
        vh = v.view(B, t, nh, hd)
        diff = (vh[:, : t - 1] - vh[:, t - 1 :]).permute(2, 0, 1, 3).reshape(nh, B * (t - 1), hd)
        rows = out[:, : nh * (t - 1)]
        if B == 1:
            torch.bmm(diff, maps, out=rows.view(nh, t - 1, N))
        else:
            rows.view(B, nh, t - 1, N).copy_(torch.bmm(diff, maps).view(nh, B, t - 1, N).transpose(0, 1))
    out[:, nh * (t - 1)] = torch.addmm(bias, v[:, t - 1], maps.view(I, N))


def _stats_groups(decoder: MaskDecoder, cache: DecoderCache, i: int, values: list, mask_factor) -> list:
    """Layer i's factored rows Q' (the factored tokens' Q, then the layer's value rows) against
    the per-image base S_i, as ``kernels.factored_stats`` takes them, in P's row order (see
    :func:`_layers_cached`): [mask rows][layer 0's value rows][g0, b0][layer 1's value rows] (the
    last two groups in layer 1 only)."""
    st = cache.stats
    blocks = decoder.transformer.layers
    groups = []
    if mask_factor is not None:
        Q0 = mask_factor[1][0]
        if st.mask_rows is None or not torch.equal(st.mask_rows[0], Q0):  # (the mask embedding's weights: the same every click)
            g0 = blocks[0].norm4.weight
            S0 = cache.src[0]
            st.mask_rows = (Q0.clone(), (Q0 @ S0.t()).contiguous(), ((Q0 * (g0 * g0)) @ S0.t()).contiguous())
        groups.append(("rows", st.mask_rows[1 + i]))
    groups.append(("values", st.u0[i], st.u0_bias[i], values[0]))
    if i == 1:
        groups += [("rows", st.g0b0), ("values", st.u1, st.u1_bias, values[1])]
    return groups


def _factored_stats(P: Tensor, Q1: Optional[Tensor], Q2: Tensor, groups: list, sbar: Tensor, sq: Tensor,
                    alpha: Optional[Tensor], eps: float):
    """LayerNorm statistics (mean, rstd) (B, N) of Y = diag(alpha) (S + P^T Q) (alpha None: one)
    without forming Y: P (B, r, N), Q (B, r, C) given as its rows Q1 (or None) then Q2, the dot
    products R = Q S^T as ``groups`` (see
    ``kernels.factored_stats``), and per image sbar, sq (N,) the channel means of S and the
    squared norms of S minus them.

    With Q' = Q minus its row means qbar, each row of S + P^T Q minus its mean is
    (S_n - sbar_n) + P_n^T Q', whose squared norm is sq_n + P_n . (2 T_n + G P_n), with
    T = Q' S^T = R - C qbar sbar and G = Q' Q'^T (r x r): per pixel O(r^2) work where forming
    the row is O(r C), and no (B, N, C) stream written and read back (a click: 4 MB, twice)."""
    B, r, N = P.shape
    C = Q2.shape[-1]
    native = _native_ok(P)
    if native and C % kernels.decoder_lanes() == 0:
        G, qbar = kernels.centered_gram(Q1, Q2)
    else:
        Q = Q2 if Q1 is None else torch.cat((Q1, Q2), 1)
        qbar = Q.mean(-1)  # (B, r)
        Qc = Q - qbar[..., None]
        G = torch.bmm(Qc, Qc.transpose(1, 2))  # (B, r, r)
    if native:
        return kernels.factored_stats(P, groups, G, qbar, sbar, sq, None if alpha is None else alpha.contiguous(), eps, C)
    R = P.new_empty(B, r, N)
    j = 0
    for grp in groups:
        if grp[0] == "rows":
            R[:, j : j + grp[1].shape[0]] = grp[1]
            j += grp[1].shape[0]
        else:
            _, maps, bias, v = grp
            if maps.ndim == 4:  # (the native kernel's tiles)
                maps = kernels.untile_maps(maps, N)
            k = maps.shape[0] * (v.shape[1] - 1) + 1
            _value_rows(v, maps.shape[0], maps, bias, R[:, j : j + k])
            j += k
    R.addcmul_(qbar[:, :, None], sbar.expand(B, 1, N), value=-C)  # T
    W = R.baddbmm_(G, P, beta=2)  # 2T + G P
    cvar = torch.mul(W, P, out=W).sum(1).add_(sq)  # C * var
    mean = torch.baddbmm(sbar.expand(B, 1, N), qbar[:, None, :], P)[:, 0]
    if alpha is not None:
        mean = mean * alpha
        cvar = cvar * (alpha * alpha)
    rstd = torch.rsqrt(cvar.mul_(1.0 / C).clamp_(min=0).add_(eps))
    return mean, rstd


def _first_layer_projections(cache: DecoderCache) -> _LayerProjections:
    """The first layer's cached maps as factored attention reads them (mask prompts)."""
    if cache.k0_cols is None:
        cache.k0_cols = cache.k0[0].transpose(1, 2).contiguous()
    return _LayerProjections(t2i_k=cache.k0_cols, t2i_kpe=None, t2i_v=cache.v0[0], i2t_q=cache.q0, i2t_qpe=None)


@torch.no_grad()
def mask_prompt_factor(prompt_encoder, masks: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """Mask prompts (B, 1, 4h, 4w) as a low-rank change of the cached image tokens: (P0 (B, c+1,
    h*w), Q0 (B, c+1, C)) with tokens = cache.src + P0^T Q0, for ``predict_masks_fast(cache,
    mask_factor=...)``; None where the prompt encoder's mask embedding is not SAM's (ending in a
    1x1 convolution from c channels, no hooks): those go through the dense path.

    The dense prompt embedding of a mask is a 1x1 convolution of a c = 16 channel map: a rank-17
    change (16 channels and the bias, less ``no_mask_embed``, which the cached tokens hold) of the
    tokens every cached projection was made from. So a click that feeds back its previous logits
    (an interactive tool's second and later clicks) takes the cached path too, with the factored
    image tokens starting at rank 17 instead of 0."""
    md = prompt_encoder.mask_downscaling
    last = md[-1] if isinstance(md, torch.nn.Sequential) and len(md) > 1 else None
    if not (type(last) is torch.nn.Conv2d and last.kernel_size == (1, 1) and last.stride == (1, 1) and last.padding == (0, 0)
            and last.groups == 1 and last.bias is not None and not _has_hooks(md) and not _has_hooks(last)):
        return None
    C = last.out_channels
    if _native_mask_embedding_ok(md, masks):
        # one pass where PyTorch ran ~15 small operations (vit_b, 2 threads: 0.18 vs 0.74 ms)
        conv1, ln1, _, conv2, ln2 = md[:5]
        P0 = kernels.mask_downscale(masks.contiguous(), conv1.weight, conv1.bias, ln1.weight, ln1.bias, ln1.eps,
                                    conv2.weight, conv2.bias, ln2.weight, ln2.bias, ln2.eps)
        B, c = P0.shape[0], P0.shape[1] - 1
    else:
        x = md[:-1](masks)  # (B, c, h, w)
        B, c = x.shape[:2]
        P0 = torch.cat((x.flatten(2), x.new_ones(B, 1, x.shape[2] * x.shape[3])), 1)
    no_mask = prompt_encoder.no_mask_embed.weight.reshape(1, -1)
    Q0 = torch.cat((last.weight.reshape(C, c).t(), last.bias.reshape(1, -1) - no_mask), 0)
    return P0, Q0.unsqueeze(0).expand(B, -1, -1)


def _native_mask_embedding_ok(md: torch.nn.Sequential, masks: Tensor) -> bool:
    """Whether SAM's mask embedding (conv 2x2/2, LayerNorm2d, exact GELU, conv 2x2/2,
    LayerNorm2d, exact GELU, then the 1x1 convolution) can run in ``kernels.mask_downscale``."""
    if len(md) != 7 or not _native_ok(masks) or masks.ndim != 4 or masks.shape[1] != 1:
        return False
    conv1, ln1, act1, conv2, ln2, act2 = md[:6]
    return (
        all(type(c) is torch.nn.Conv2d and c.kernel_size == (2, 2) and c.stride == (2, 2) and c.padding == (0, 0)
            and c.dilation == (1, 1) and c.groups == 1 and c.bias is not None and c.weight.dtype == torch.float32 for c in (conv1, conv2))
        and conv1.in_channels == 1 and conv1.out_channels <= 16 and conv2.in_channels == conv1.out_channels and conv2.out_channels <= 64
        and type(ln1) is LayerNorm2d and type(ln2) is LayerNorm2d and _act_name(act1) == "gelu" and _act_name(act2) == "gelu"
        and masks.shape[2] % 4 == 0 and masks.shape[3] % 4 == 0
    )


def _first_conv_channels_last(ct1: torch.nn.ConvTranspose2d) -> Tensor:
    """ConvTranspose2d weight (in, out, 2, 2) -> (in, (a, b, out)), so channels stay last."""
    return ct1.weight.permute(0, 2, 3, 1).reshape(ct1.in_channels, -1)


def _native_ok(x: Tensor) -> bool:
    """Whether ``x`` may go to segany's native kernels: float32 on the CPU, no autograd, not
    traced/exported or watched by a dispatch mode, and the decoder kernels built and preferred
    on this CPU (``kernels.decoder_preferred``). Inside a decoder call the part that does not
    depend on ``x`` is the call's, asked once at its start."""
    call = getattr(_per_thread, "native", None)
    if call is not None:
        return call and x.is_cpu and x.dtype == torch.float32
    return _native_ok_now(x)


def _native_ok_now(x: Tensor) -> bool:
    return (
        x.is_cpu and x.dtype == torch.float32 and not torch.is_grad_enabled()
        and not _tracing_or_exporting()
        and not _dispatch_mode_active() and kernels.decoder_preferred()
    )


def _native_rows_ok(src: Tensor) -> bool:
    """Whether the image-token LayerNorms can run in the native row kernel (see
    ``segany.kernels.layer_norm_rows_``)."""
    return kernels.rows_ok(src.shape[-1]) and _native_ok(src)


def _native_tail_ok(decoder: MaskDecoder, x: Tensor) -> bool:
    """Whether the output upscaling can run in segany's native kernel: SAM's layers (exact GELU,
    LayerNorm2d), float32 on the CPU, not traced/exported or watched by a dispatch mode."""
    ct1, ln, act1, ct2, act2 = decoder.output_upscaling
    return (
        ct1.weight.dtype == torch.float32 and _act_name(act1) == "gelu" and _act_name(act2) == "gelu"
        and isinstance(ln, LayerNorm2d) and _native_ok(x)
    )


def _upscale_masks_native(decoder: MaskDecoder, keys, hyper_in: Tensor, h: int, w: int, scratch: bool = False,
                          visible: Optional[Tuple[int, int]] = None) -> Tensor:
    """:func:`_upscale_masks` with the part after the first convolution in ``segany.kernels``:
    the first convolution is a GEMM producing channel-major (B, 4*c1, pixels) chunks, which the
    kernel reads with pixels along its vectors."""
    ct1, ln, act1, ct2, act2 = decoder.output_upscaling
    B, M = hyper_in.shape[:2]
    c1, c2 = ct1.out_channels, ct2.out_channels
    rows_per_chunk = max(1, min(h, 4096 // (B * w)))
    w1t = _derived(ct1.weight, "channels last", lambda _: _first_conv_channels_last(ct1)).t()  # (4*c1, C), rows (a, bb, c)
    w2 = _derived(ct2.weight, "tail", lambda w: w.permute(2, 0, 3, 1).contiguous())  # (a2, c, b2, o)
    b2 = _derived(ct2.bias, "tail", lambda b: b.repeat(2).contiguous())
    hyp = hyper_in.contiguous()
    if scratch:
        out = _scratch_like("masks", (B, M, 4 * h, 4 * w), hyper_in)
    else:  # numpy's allocator for the multi-MB result (see segany.kernels.Taps.values)
        out = torch.from_numpy(np.empty((B, M, 4 * h, 4 * w), dtype=np.float32))
    factored = not isinstance(keys, Tensor)
    if factored:  # diag(alpha) (S W1 + P^T (Q W1)), with S W1 transposed
        fx, base_w1, base_w1t = keys
        if base_w1t is None:
            base_w1t = base_w1.t().contiguous()
        if B == 1:  # (made in its layout: no transposing copy)
            qw1t = torch.mm(w1t, fx.Q[0].t()).unsqueeze(0)  # (1, 4*c1, r)
        else:
            qw1t = (fx.Q @ w1t.t()).transpose(1, 2)  # (B, 4*c1, r)
        if kernels.fused_tail_ok(w, c1):
            # the product formed row by row inside the tail (one click's upscaling 0.9x: no
            # multi-MB chunk written and read back across 256 channel streams)
            kernels.decoder_tail_fused(qw1t.contiguous(), fx.P, w, ln.weight, ln.bias, ln.eps, w2, b2, hyp, out, ct1.bias,
                                       base_w1t, fx.alpha, visible=visible)
            return out
    # one chunk buffer, filled in place by the GEMM; the bias and the per-image part are added in
    # the kernel as it reads the chunk (an addcmul pass less: a vit_b click ~1.5% faster)
    buf = _scratch_like("upscale", (B * 4 * c1 * rows_per_chunk * w,), hyp, numpy=True)
    for i0 in range(0, h, rows_per_chunk):
        i1 = min(h, i0 + rows_per_chunk)
        n0, n1 = i0 * w, i1 * w
        yT = buf[: B * 4 * c1 * (n1 - n0)].view(B, 4 * c1, n1 - n0)
        if factored:
            torch.bmm(qw1t, fx.P[:, :, n0:n1], out=yT)
            base, alpha = base_w1t[:, n0:n1], fx.alpha[:, n0:n1]
        else:
            torch.bmm(w1t.expand(B, -1, -1), keys[:, n0:n1].transpose(1, 2), out=yT)
            base = alpha = None
        kernels.decoder_tail(yT, w, ln.weight, ln.bias, ln.eps, w2, b2, hyp, out, i0, ct1.bias, base, alpha)
    return out


def _upscale_masks(
    decoder: MaskDecoder, keys, hyper_in: Tensor, h: int, w: int, rows_per_chunk: Optional[int] = None, scratch: bool = False,
    visible: Optional[Tuple[int, int]] = None,
) -> Tensor:
    """keys (B, h*w, C) channel-last, or (factored keys, their base through the first conv
    (h*w, 4*c1) or None, the same transposed (4*c1, h*w) or None); hyper_in (B, M, C/8) -> masks (B, M, 4h, 4w).

    Runs ``rows_per_chunk`` embedding rows at a time (default: ~4096 embedding pixels over the
    batch per chunk): fewer, larger ops were faster than cache-sized pieces at one prompt
    (6-7 ms vs 8.6-9 ms for 8 rows at 64x64), while a batch of prompts keeps its intermediates
    (16x the pixels at up to 64 channels per prompt) bounded. ``visible``: the part of the masks
    that is needed (see predict_masks_fast); the fused native tail computes only that part."""
    if rows_per_chunk is None and _native_tail_ok(decoder, hyper_in):
        if visible is not None and tuple(visible) == (h, w):
            visible = None
        return _upscale_masks_native(decoder, keys, hyper_in, h, w, scratch, visible)
    ct1, ln, act1, ct2, act2 = decoder.output_upscaling
    C = ct1.in_channels
    B = hyper_in.shape[0]
    c1 = ct1.out_channels
    c2 = ct2.out_channels
    M = hyper_in.shape[1]
    if rows_per_chunk is None:
        rows_per_chunk = max(1, min(h, 4096 // (B * w)))
    w1 = _first_conv_channels_last(ct1)
    b1 = ct1.bias.repeat(4)
    # Second conv split by output row parity a2: weight (c1, c2, a2, b2) -> per a2 ((b2, c2), c1),
    # a linear layer's layout (its activation fused in where oneDNN runs it).
    w2 = [ct2.weight[:, :, a2].permute(2, 1, 0).reshape(2 * c2, c1).contiguous() for a2 in range(2)]
    b2 = ct2.bias.repeat(2)
    act2_name = _act_name(act2)
    hyp_t = hyper_in  # (B, M, c2)
    out = hyper_in.new_empty(B, M, 4 * h, 4 * w)
    # out[b, m, i, a, a2, (j, bb, b2)]: with the first conv's rows in (i, a, j, bb) order, each
    # a2's GEMM yields rows (i, a, j, bb, b2), i.e. whole output rows of 4w pixels.
    out_v = out.view(B, M, h, 2, 2, 4 * w)
    if isinstance(keys, Tensor):
        kv = keys.view(B, h, w, C)
    else:  # diag(alpha) (S W1 + P^T (Q W1))
        fx, base_w1, base_w1t = keys
        if base_w1 is None:
            base_w1 = base_w1t.t()
        qw1 = fx.Q @ w1  # (B, r, 4*c1)
    for i0 in range(0, h, rows_per_chunk):
        i1 = min(h, i0 + rows_per_chunk)
        r = i1 - i0
        if isinstance(keys, Tensor):
            y = torch.addmm(b1, kv[:, i0:i1].reshape(B * r * w, C), w1)
        else:
            n0, n1 = i0 * w, i1 * w
            y = torch.baddbmm(base_w1[n0:n1], fx.P[:, :, n0:n1].transpose(1, 2), qw1)
            y = torch.addcmul(b1, y, fx.alpha[:, n0:n1, None])
        # rows (b, i, j) x cols (a, bb, c1) -> rows (b, i, a, j, bb) x c1
        y = y.view(B, r, w, 2, 2 * c1).transpose(2, 3).reshape(B * r * 2 * w * 2, c1)
        y = act1(F.layer_norm(y, (c1,), ln.weight, ln.bias, ln.eps))
        for a2 in range(2):
            if act2_name is not None:
                z = linear(y, w2[a2], b2, act2_name)
            else:
                z = act2(F.linear(y, w2[a2], b2))
            z = z.view(B, r * 2 * w * 2 * 2, c2)  # rows (i, a, j, bb, b2)
            m = torch.matmul(hyp_t, z.transpose(1, 2))  # (B, M, r*2*4w)
            out_v[:, :, i0:i1, :, a2].copy_(m.view(B, M, r, 2, 4 * w))
    return out
