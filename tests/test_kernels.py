"""The native kernels (segany.kernels): built on first use with the machine's C compiler, equal to
the PyTorch code they replace (the mask upscaling bit for bit, the decoder tail up to float32
rounding), and optional (no compiler -> PyTorch code)."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segany import kernels
from segany.predictor import SamPredictor, _SeparableResize
from segany.transforms import ResizeLongestSide
from segany.upscale import CellUpscaler

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C compiler: native kernels unavailable")


needs_decoder_kernel = pytest.mark.skipif(not kernels.decoder_available(), reason="no C compiler: native kernels unavailable")


def _upscaling_decoder(dim, seed, ln_gain=1.0):
    from segany.modeling.mask_decoder import MaskDecoder
    from segany.modeling.transformer import TwoWayTransformer

    dec = MaskDecoder(transformer_dim=dim, transformer=TwoWayTransformer(depth=1, embedding_dim=dim, num_heads=2, mlp_dim=16))
    g = torch.Generator().manual_seed(seed)
    for prm in dec.output_upscaling.parameters():
        prm.data.copy_(torch.randn(prm.shape, generator=g) * 0.3)
    dec.output_upscaling[1].weight.data.mul_(ln_gain)
    return dec.eval()


@needs_decoder_kernel
@pytest.mark.parametrize(
    "dim,h,w,B,M,ln_gain",
    [
        (256, 64, 64, 1, 3, 1.0),  # SAM's sizes, one click
        (256, 64, 64, 3, 1, 1.0),  # a batch: several chunks of rows, each at its own output rows
        (128, 32, 32, 2, 4, 1.0),  # the bundled model's sizes
        (256, 16, 24, 2, 2, 30.0),  # GELU inputs far into both tails (|x| up to ~100)
        (32, 5, 7, 2, 3, 1.0),  # channels and widths that fill no whole vector
    ],
)
def test_native_decoder_tail_matches_pytorch(dim, h, w, B, M, ln_gain):
    from segany.modeling import fast_decoder

    dec = _upscaling_decoder(dim, seed=h + w, ln_gain=ln_gain)
    g = torch.Generator().manual_seed(dim + B)
    keys = torch.randn(B, h * w, dim, generator=g)
    hyper = torch.randn(B, M, dim // 8, generator=g)
    with torch.no_grad():
        want = fast_decoder._upscale_masks(dec, keys, hyper, h, w, rows_per_chunk=max(1, h // 3))
        got = fast_decoder._upscale_masks_native(dec, keys, hyper, h, w)
    assert got.shape == want.shape == (B, M, 4 * h, 4 * w)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 2e-6 * max(1.0, scale)
    assert torch.isfinite(got).all()


@needs_decoder_kernel
@pytest.mark.parametrize("dim,h,w,B,M", [(256, 64, 64, 1, 3), (256, 64, 64, 3, 1), (32, 5, 7, 2, 3)])
def test_native_decoder_tail_on_factored_image_tokens(monkeypatch, dim, h, w, B, M):
    """Factored image tokens alpha * (S + P^T Q) (the transformer's output form, with S W1
    precomputed per image; P the first rows of a larger buffer): the native path's masks and
    the PyTorch path's on the same factors equal the dense PyTorch path's. Rows in whole vectors
    take the tail with the first convolution's product fused in."""
    from segany.modeling import fast_decoder

    fused_calls = []
    real_fused = kernels.decoder_tail_fused
    monkeypatch.setattr(kernels, "decoder_tail_fused", lambda *a, **k: fused_calls.append(1) or real_fused(*a, **k))

    dec = _upscaling_decoder(dim, seed=h * w, ln_gain=1.0)
    g = torch.Generator().manual_seed(dim + B + M)
    r, N = 11, h * w
    S = torch.randn(N, dim, generator=g)
    pbuf = torch.full((B, r + 2, N), float("nan"))
    pbuf[:, :r] = torch.randn(B, r, N, generator=g) * 0.3
    fx = fast_decoder._Factored(alpha=torch.rand(B, N, generator=g) + 0.5, P=pbuf[:, :r], Q=torch.randn(B, r, dim, generator=g) * 0.3)
    dense = fx.alpha[..., None] * (S + fx.P.transpose(1, 2) @ fx.Q)
    hyper = torch.randn(B, M, dim // 8, generator=g)
    with torch.no_grad():
        w1 = fast_decoder._first_conv_channels_last(dec.output_upscaling[0])
        base_w1t = (w1.t() @ S.t()).contiguous()
        want = fast_decoder._upscale_masks(dec, dense, hyper, h, w, rows_per_chunk=max(1, h // 3))
        got = fast_decoder._upscale_masks_native(dec, (fx, None, base_w1t), hyper, h, w)
        # the base given untransposed (the PyTorch path's layout): same masks
        got2 = fast_decoder._upscale_masks_native(dec, (fx, base_w1t.t().contiguous(), None), hyper, h, w)
        got3 = fast_decoder._upscale_masks(dec, (fx, None, base_w1t), hyper, h, w, rows_per_chunk=max(1, h // 2))
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 5e-6 * max(1.0, scale)
    assert (got2 - want).abs().max().item() <= 5e-6 * max(1.0, scale)
    assert (got3 - want).abs().max().item() <= 5e-6 * max(1.0, scale)
    assert bool(fused_calls) == (w % kernels.decoder_lanes() == 0)


@needs_decoder_kernel
@pytest.mark.parametrize("B,M,rows,cols", [(1, 1, 43, 64), (3, 1, 64, 43), (2, 3, 17, 5), (1, 2, 1, 1)])
def test_native_fused_tail_computes_the_visible_part_only(B, M, rows, cols):
    """``visible`` (rows, cols): the masks' first 4*rows rows and 4*cols columns are those of the
    whole computation, bit for bit (the part a mask at the image's size reads); the rest, which
    lies in the input's padding, is zero, not computed."""
    from segany.modeling import fast_decoder

    dim, h, w, r = 256, 64, 64, 11
    if not kernels.fused_tail_ok(w, dim // 4):
        pytest.skip("this build's vectors do not divide 64")
    dec = _upscaling_decoder(dim, seed=5)
    g = torch.Generator().manual_seed(B * 10 + M)
    S = torch.randn(h * w, dim, generator=g)
    fx = fast_decoder._Factored(alpha=torch.rand(B, h * w, generator=g) + 0.5, P=torch.randn(B, r, h * w, generator=g) * 0.3,
                                Q=torch.randn(B, r, dim, generator=g) * 0.3)
    hyper = torch.randn(B, M, dim // 8, generator=g)
    with torch.no_grad():
        base_w1t = (fast_decoder._first_conv_channels_last(dec.output_upscaling[0]).t() @ S.t()).contiguous()
        full = fast_decoder._upscale_masks_native(dec, (fx, None, base_w1t), hyper, h, w)
        part = fast_decoder._upscale_masks_native(dec, (fx, None, base_w1t), hyper, h, w, visible=(rows, cols))
    assert torch.equal(part[..., : 4 * rows, : 4 * cols], full[..., : 4 * rows, : 4 * cols])
    assert not part[..., 4 * rows :, :].any() and not part[..., : 4 * rows, 4 * cols :].any()
    assert full[..., 4 * rows :, :].abs().sum() + full[..., : 4 * rows, 4 * cols :].abs().sum() > 0  # (so the zeros above are skipped work)


@needs_decoder_kernel
def test_native_fused_tail_checks_its_arguments():
    lanes = kernels.decoder_lanes()
    c1, c2, w, h, B, M, r = 8, 4, lanes, 2, 1, 1, 3
    args = dict(ln_weight=torch.ones(c1), ln_bias=torch.zeros(c1), eps=1e-6, w2=torch.zeros(2, c1, 2, c2),
                bias2=torch.zeros(2 * c2), hyper_in=torch.zeros(B, M, c2), bias1=torch.zeros(c1),
                base=torch.zeros(4 * c1, h * w), alpha=torch.ones(B, h * w))
    out = torch.zeros(B, M, 4 * h, 4 * w)
    kernels.decoder_tail_fused(torch.zeros(B, 4 * c1, r), torch.zeros(B, r, h * w), w, out=out, **args)  # consistent: runs
    with pytest.raises(ValueError, match="inconsistent shapes"):
        kernels.decoder_tail_fused(torch.zeros(B, 4 * c1, r), torch.zeros(B, r + 1, h * w), w, out=out, **args)
    with pytest.raises(ValueError, match="inconsistent shapes"):  # rows not in whole vectors
        kernels.decoder_tail_fused(torch.zeros(B, 4 * c1, r), torch.zeros(B, r, h * (w + 1)), w + 1,
                                   out=torch.zeros(B, M, 4 * h, 4 * (w + 1)), **{**args, "base": torch.zeros(4 * c1, h * (w + 1)), "alpha": torch.ones(B, h * (w + 1))})
    with pytest.raises(ValueError, match="float32"):
        kernels.decoder_tail_fused(torch.zeros(B, 4 * c1, r, dtype=torch.float64), torch.zeros(B, r, h * w), w, out=out, **args)
    for visible in ((0, w), (h + 1, w), (h, 0), (1, w + 1)):
        with pytest.raises(ValueError, match="visible"):
            kernels.decoder_tail_fused(torch.zeros(B, 4 * c1, r), torch.zeros(B, r, h * w), w, out=out, visible=visible, **args)


@needs_decoder_kernel
def test_native_decoder_tail_checks_its_arguments():
    dec = _upscaling_decoder(32, seed=0)
    ct2 = dec.output_upscaling[3]
    w2 = ct2.weight.permute(2, 0, 3, 1).contiguous()
    b2 = ct2.bias.repeat(2).contiguous()
    ln = dec.output_upscaling[1]
    yT = torch.zeros(1, 32, 4 * 5)
    out = torch.zeros(1, 2, 16, 20)
    b1 = dec.output_upscaling[0].bias.detach()
    args = (ln.weight, ln.bias, ln.eps, w2.detach(), b2.detach())
    with pytest.raises(ValueError, match="inconsistent shapes"):
        kernels.decoder_tail(yT, 5, *args, torch.zeros(1, 3, 4), out, 0, b1)
    with pytest.raises(ValueError, match="contiguous float32"):
        kernels.decoder_tail(yT.double(), 5, *args, torch.zeros(1, 2, 4), out, 0, b1)
    with pytest.raises(ValueError, match="base"):  # a per-image part without its row scales
        kernels.decoder_tail(yT, 5, *args, torch.zeros(1, 2, 4), out, 0, b1, base=torch.zeros(32, 20))
    with pytest.raises(ValueError, match="base"):  # columns not contiguous
        kernels.decoder_tail(yT, 5, *args, torch.zeros(1, 2, 4), out, 0, b1, base=torch.zeros(20, 32).t(), alpha=torch.ones(1, 20))


@needs_decoder_kernel
def test_decoder_kernels_are_used_where_built_for_avx2_or_wider_or_when_asked(monkeypatch):
    """Built with vectors as wide as the CPU's (16 floats with AVX-512, 8 with AVX2, 4 else);
    the decoder's fast path takes them at 8 lanes or more (SSE2 builds were not measured
    faster than the PyTorch code), unless SEGANY_DECODER_KERNELS says otherwise."""
    from segany.modeling.fast_decoder import _native_ok

    lanes = kernels.decoder_lanes()
    assert lanes in (4, 8, 16)
    monkeypatch.delenv("SEGANY_DECODER_KERNELS", raising=False)
    x = torch.zeros(1)
    with torch.no_grad():
        assert kernels.decoder_preferred() == (lanes >= 8) == _native_ok(x)
        monkeypatch.setenv("SEGANY_DECODER_KERNELS", "1")
        assert kernels.decoder_preferred() and _native_ok(x)
        monkeypatch.setenv("SEGANY_DECODER_KERNELS", "0")
        assert not kernels.decoder_preferred() and not _native_ok(x)


@needs_decoder_kernel
def test_kernels_build_for_the_cpu_named_in_the_environment(monkeypatch):
    """SEGANY_KERNEL_MARCH builds for another CPU than this one (a cache shared by machines, or
    measuring what an AVX2 user gets): an x86-64 baseline build has SSE2's 4 lanes, beside this
    machine's own build; a name that is not a CPU name is refused before any compiler runs."""
    if os.uname().machine != "x86_64":
        pytest.skip("x86-64 CPU names")
    native = kernels._get("decoder")
    monkeypatch.setenv("SEGANY_KERNEL_MARCH", "x86-64")
    lib = kernels._build("decoder")
    assert lib is not None and lib.segany_vector_lanes() == 4
    assert kernels._get("decoder") is native  # (the loaded library stays this process's)
    monkeypatch.setenv("SEGANY_KERNEL_MARCH", "haswell; rm -rf ~")
    with pytest.raises(ValueError, match="SEGANY_KERNEL_MARCH"):
        kernels._build("decoder")


@needs_decoder_kernel
@pytest.mark.parametrize("nh,B,t,N", [(8, 2, 7, 4096), (2, 3, 1, 37), (1, 1, 3, 5)])
def test_native_softmax_pixels_matches_pytorch(nh, B, t, N):
    """The token->image softmax over the pixels times alpha, in its two layouts (B, nh, t, N) and
    (nh, B, t, N): torch.softmax's values, also when written over the scores themselves."""
    g = torch.Generator().manual_seed(N)
    s = torch.randn(nh, B, t, N, generator=g) * 8
    s[0, 0, 0, : min(N, 3)] = -1e4  # far below the row's maximum: exp underflows to 0
    alpha = torch.rand(B, N, generator=g) + 0.5
    a = torch.softmax(s, dim=-1)
    a_bt, w = torch.empty(B, nh, t, N), torch.empty(nh, B, t, N)
    kernels.softmax_pixels(s, alpha, a_bt, w)
    torch.testing.assert_close(a_bt, (a * alpha[None, :, None, :]).transpose(0, 1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w, a * alpha[None, :, None, :], rtol=1e-5, atol=1e-7)
    inplace = s.clone()
    kernels.softmax_pixels(inplace, alpha, torch.empty(B, nh, t, N), inplace)
    assert torch.equal(inplace, w)
    with pytest.raises(ValueError, match="softmax_pixels"):
        kernels.softmax_pixels(s, alpha[:, :-1].contiguous(), a_bt, w)


@needs_decoder_kernel
@pytest.mark.parametrize("nh,B,t,N", [(8, 1, 7, 4096), (8, 5, 7, 300), (2, 2, 1, 13)])
def test_native_softmax_tokens_matches_pytorch(nh, B, t, N):
    """The image->token softmax over the tokens, (nh, B, t, N) scores into the (B, nh, t, N)
    layout: torch.softmax's values, with pixel counts that fill no whole vector or piece."""
    g = torch.Generator().manual_seed(N + t)
    s = torch.randn(nh, B, t, N, generator=g) * 8
    s[0, 0, 0, : min(N, 3)] = -1e4  # far below the others: exp underflows to 0
    out = torch.empty(B, nh, t, N)
    assert kernels.softmax_tokens(s, out) is out
    torch.testing.assert_close(out, torch.softmax(s, dim=2).transpose(0, 1), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="softmax_tokens"):
        kernels.softmax_tokens(s, torch.empty(nh, B, t, N) if nh != B else torch.empty(1))
    # the reduced layout: per head the first t-1 tokens' rows, then one row of ones
    rows = kernels.reduced_rows(nh, t)
    buf = torch.full((B, rows + 2, N), float("nan"))  # the first rows of a larger buffer
    red = buf[:, :rows]
    assert kernels.softmax_tokens(s, red, reduced=True) is red
    assert torch.equal(red[:, :-1], out[:, :, : t - 1].reshape(B, nh * (t - 1), N))
    assert torch.equal(red[:, -1], torch.ones(B, N))
    assert buf[:, rows:].isnan().all()
    with pytest.raises(ValueError, match="softmax_tokens"):
        kernels.softmax_tokens(s, out if t > 1 else torch.empty(B, nh + 1, N), reduced=True)


@needs_decoder_kernel
@pytest.mark.parametrize("B,xb,N,C,k", [(8, 8, 4096, 256, 56), (3, 1, 301, 128, 9), (2, 2, 7, 64, 1)])
def test_native_update_row_stats_match_the_formed_update(B, xb, N, C, k):
    """The LayerNorm statistics of x + aT^T u, from the rows as the kernel forms them (never
    stored): torch.native_layer_norm's of the formed sum, up to float32 rounding, with x shared
    by the batch or per prompt and row counts that fill no whole block."""
    g = torch.Generator().manual_seed(N)
    x = torch.randn(xb, N, C, generator=g) * 2 + 5
    aT = torch.softmax(torch.randn(B, k, N, generator=g) * 3, dim=1)
    u = torch.randn(B, k, C, generator=g) * 4
    y = x.expand(B, -1, -1) + aT.transpose(1, 2) @ u
    _, mean, rstd = torch.native_layer_norm(y, (C,), None, None, 1e-5)
    m, r = kernels.update_row_stats(x, aT, u, 1e-5)
    assert m.shape == r.shape == (B, N)
    torch.testing.assert_close(m, mean.squeeze(-1), rtol=1e-5, atol=1e-5)
    assert ((r - rstd.squeeze(-1)).abs() / rstd.squeeze(-1)).max().item() <= 1e-5
    # aT as the first rows of a larger buffer, its columns scaled per pixel (the factored form's)
    buf = torch.full((B, k + 3, N), float("nan"))
    buf[:, :k] = aT
    scale = torch.rand(B, N, generator=g) + 0.5
    y2 = x.expand(B, -1, -1) + (aT * scale[:, None]).transpose(1, 2) @ u
    _, mean2, rstd2 = torch.native_layer_norm(y2, (C,), None, None, 1e-5)
    m2, r2 = kernels.update_row_stats(x, buf[:, :k], u, 1e-5, scale)
    torch.testing.assert_close(m2, mean2.squeeze(-1), rtol=1e-5, atol=1e-5)
    assert ((r2 - rstd2.squeeze(-1)).abs() / rstd2.squeeze(-1)).max().item() <= 1e-5
    with pytest.raises(ValueError, match="scale"):
        kernels.update_row_stats(x, aT, u, 1e-5, scale[:, :-1].contiguous())
    with pytest.raises(ValueError, match="multiple of 64"):
        kernels.update_row_stats(torch.zeros(1, N, 48), aT, torch.zeros(B, k, 48), 1e-5)
    with pytest.raises(ValueError, match="update_row_stats"):
        kernels.update_row_stats(x, aT, u[:, :, :-64] if C > 64 else u[:1 if B > 1 else 0], 1e-5)


@needs_decoder_kernel
@pytest.mark.parametrize("B,H,W,c", [(1, 256, 256, 16), (2, 36, 20, 16), (3, 8, 72, 8)])
def test_native_mask_downscale_matches_the_mask_embedding(B, H, W, c):
    """SAM's mask embedding before its 1x1 convolution (as a refinement click feeds back logits)
    in one kernel pass: the module's values up to float32 rounding, a row of ones after them,
    into a buffer with a batch stride; pixel counts that fill no vector."""
    from segany.modeling.prompt_encoder import PromptEncoder
    from segany.modeling.build import randomize_

    pe = randomize_(PromptEncoder(embed_dim=32, image_embedding_size=(H // 4, W // 4), input_image_size=(4 * H, 4 * W),
                                  mask_in_chans=c), seed=B, std=0.5)
    g = torch.Generator().manual_seed(H)
    masks = torch.randn(B, 1, H, W, generator=g) * 8
    md = pe.mask_downscaling
    conv1, ln1, _, conv2, ln2 = md[:5]
    with torch.no_grad():
        want = md[:-1](masks).flatten(2)
    buf = torch.full((B, c + 3, H * W // 16), float("nan"))
    got = kernels.mask_downscale(masks, conv1.weight, conv1.bias, ln1.weight, ln1.bias, ln1.eps, conv2.weight, conv2.bias,
                                 ln2.weight, ln2.bias, ln2.eps, out=buf[:, : c + 1])
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(got[:, :c], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(got[:, c], torch.ones(B, H * W // 16))
    with pytest.raises(ValueError, match="mask_downscale"):
        kernels.mask_downscale(masks[:, :, :-2], conv1.weight, conv1.bias, ln1.weight, ln1.bias, ln1.eps, conv2.weight, conv2.bias,
                               ln2.weight, ln2.bias, ln2.eps)


def _value_group(S, v, W, bias, nh):
    """An image->token update's reduced value rows (fast_decoder._reduced_values) for values v
    (B, t, I) through out_proj (W (C, I), bias (C,)), and their group for
    kernels.factored_stats: the per-head maps and the bias against S (N, C)."""
    from segany.modeling.fast_decoder import _head_cols

    B, t, I = v.shape
    hd = I // nh
    wo = W.t().reshape(nh, hd, -1)
    u = torch.einsum("bkhd,hdc->bhkc", v.view(B, t, nh, hd), wo) + bias / nh  # (B, nh, t, C)
    rows = torch.cat(((u[:, :, : t - 1] - u[:, :, t - 1 :]).flatten(1, 2), u[:, :, t - 1].sum(1, keepdim=True)), 1)
    return rows, ("values", _head_cols(S @ W, nh), S @ bias, v)


@needs_decoder_kernel
@pytest.mark.parametrize("B,N,C,nh,hd,t,m,scaled", [(1, 4096, 256, 8, 16, 7, 17, True), (3, 301, 64, 2, 8, 3, 0, False),
                                                      (2, 37, 32, 4, 4, 1, 2, True)])
def test_native_factored_stats_match_the_formed_rows(B, N, C, nh, hd, t, m, scaled):
    """LayerNorm statistics of alpha (S + P^T Q) from the factored parts alone (rows of the
    image->token updates' values as per-head maps, fixed rows, the Gram matrix): those of the
    formed rows in float64, up to float32 rounding; P the first rows of a larger buffer, row
    counts that fill no block of four, pixel counts that fill no vector; the groups as the
    decoder's second layer has them (fixed rows, values, fixed rows, values)."""
    g = torch.Generator().manual_seed(N + t)
    S = torch.randn(N, C, generator=g) * 2 + 0.5
    I = nh * hd
    fixed = torch.randn(m, C, generator=g)
    rows1, grp1 = _value_group(S, torch.randn(B, t, I, generator=g), torch.randn(C, I, generator=g) * 0.3, torch.randn(C, generator=g), nh)
    two = torch.randn(2, C, generator=g)
    rows2, grp2 = _value_group(S, torch.randn(B, t, I, generator=g), torch.randn(C, I, generator=g) * 0.3, torch.randn(C, generator=g), nh)
    Q = torch.cat((fixed.expand(B, -1, -1), rows1, two.expand(B, -1, -1), rows2), 1)
    groups = ([("rows", (fixed @ S.t()).contiguous())] if m else []) + [grp1, ("rows", (two @ S.t()).contiguous()), grp2]
    r = Q.shape[1]
    buf = torch.full((B, r + 5, N), float("nan"))
    buf[:, :r] = torch.randn(B, r, N, generator=g)
    P = buf[:, :r]
    alpha = torch.rand(B, N, generator=g) + 0.5 if scaled else None
    y = (S.double() + P.double().transpose(1, 2) @ Q.double()) * (1.0 if alpha is None else alpha.double()[..., None])
    want_mean, want_rstd = y.mean(-1), (y.var(-1, unbiased=False) + 1e-5).rsqrt()
    qbar = Q.mean(-1)
    Qc = Q - qbar[..., None]
    Sd = S.double()
    sbar = Sd.mean(1)
    mean, rstd = kernels.factored_stats(P, groups, Qc @ Qc.transpose(1, 2), qbar, sbar.float(), (Sd - sbar[:, None]).square().sum(1).float(),
                                        alpha, 1e-5, C)
    assert mean.shape == rstd.shape == (B, N)
    scale = y.abs().max().item()
    assert (mean.double() - want_mean).abs().max().item() <= 1e-5 * scale
    assert ((rstd.double() - want_rstd).abs() / want_rstd).max().item() <= 1e-5
    # the per-image maps in the kernel's pixel tiles (as the decoder cache keeps them): the same bits
    tiled = [(grp[0], kernels.stats_tiles(grp[1]), *grp[2:]) if grp[0] == "values" else grp for grp in groups]
    assert tiled[-1][1].shape[0] * tiled[-1][1].shape[-1] >= N and torch.equal(kernels.untile_maps(tiled[-1][1], N), grp2[1])
    m2, r2 = kernels.factored_stats(P, tiled, Qc @ Qc.transpose(1, 2), qbar, sbar.float(), (Sd - sbar[:, None]).square().sum(1).float(),
                                    alpha, 1e-5, C)
    assert torch.equal(m2, mean) and torch.equal(r2, rstd)
    # a NaN stays where it is (as the formed rows would give), it is not clamped to a variance of 0
    P[0, 0, N // 2] = float("nan")
    mean, rstd = kernels.factored_stats(P, groups, Qc @ Qc.transpose(1, 2), qbar, sbar.float(), (Sd - sbar[:, None]).square().sum(1).float(),
                                        alpha, 1e-5, C)
    assert mean[0, N // 2].isnan() and rstd[0, N // 2].isnan()
    assert mean[:, : N // 2].isfinite().all() and rstd[:, : N // 2].isfinite().all()
    with pytest.raises(ValueError, match="rows in the groups"):
        kernels.factored_stats(P, groups[1:], Qc @ Qc.transpose(1, 2), qbar, sbar.float(), sbar.float(), alpha, 1e-5, C)
    wide = ("values", torch.zeros(1, 65, N), torch.zeros(N), torch.zeros(B, 2, 65))
    with pytest.raises(ValueError, match="factored_stats"):
        kernels.factored_stats(P[:, :2], [wide], torch.zeros(B, 2, 2), qbar[:, :2], sbar.float(), sbar.float(), alpha, 1e-5, C)
    short = (grp1[0], kernels.stats_tiles(grp1[1])[:-1], *grp1[2:])  # tiles that do not cover the pixels
    with pytest.raises(ValueError, match="factored_stats"):
        kernels.factored_stats(P, [short if grp is groups[-3] else grp for grp in groups], Qc @ Qc.transpose(1, 2), qbar,
                               sbar.float(), sbar.float(), alpha, 1e-5, C)


@needs_decoder_kernel
@pytest.mark.parametrize("B,t,nh,hd,C", [(1, 7, 8, 16, 256), (3, 5, 2, 8, 64), (2, 1, 4, 4, 32)])
@torch.no_grad()
def test_native_factored_glue_matches_pytorch(B, t, nh, hd, C):
    """The factored image tokens' small per-prompt algebra in one call each, against the PyTorch
    formulas of fast_decoder: the reduced value rows, the centred Gram matrix of rows given in two
    parts (one of them strided: the first rows of a larger buffer), a LayerNorm as new factors, and
    the token side of scores and values (head split, h (Q W^T)^T, (aP Q) W^T); float32 rounding
    apart. Sizes the kernels do not take are refused by name."""
    from segany.modeling import fast_decoder as fd
    from segany.modeling.transformer import Attention

    g = torch.Generator().manual_seed(B * 100 + t)
    I = nh * hd
    attn = Attention(C, nh, downsample_rate=C // I).eval()
    for prm in attn.parameters():
        prm.data.copy_(torch.randn(prm.shape, generator=g) * 0.2)
    v = torch.randn(B, t, I, generator=g)
    wo = attn.out_proj.weight.t().reshape(nh, hd, C).contiguous()
    want = fd._reduced_values(fd._value_update(attn, v), nh)
    got = kernels.value_rows(v, wo, attn.out_proj.bias.contiguous())
    assert got.shape == want.shape == (B, nh * (t - 1) + 1, C)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="value_rows"):
        kernels.value_rows(v[:, :, :-1].contiguous(), wo, attn.out_proj.bias.contiguous())

    r1, r2 = 2 * t + 1, nh * (t - 1) + 1
    Q1 = (torch.randn(B, r1 + 3, C, generator=g) + 0.7)[:, :r1]
    Q2 = torch.randn(B, r2, C, generator=g) * 2
    for first in (None, Q1):
        Q = Q2 if first is None else torch.cat((first, Q2), 1)
        qbar = Q.double().mean(-1)
        Qc = Q.double() - qbar[..., None]
        G, qb = kernels.centered_gram(first, Q2)
        assert torch.allclose(qb.double(), qbar, atol=1e-6)
        assert (G.double() - Qc @ Qc.transpose(1, 2)).abs().max() <= 1e-5 * (Qc @ Qc.transpose(1, 2)).abs().max()
        assert torch.equal(G, G.transpose(1, 2))

    N = 37
    ln = torch.nn.LayerNorm(C)
    ln.weight.data.copy_(torch.rand(C, generator=g) + 0.5)
    ln.bias.data.copy_(torch.randn(C, generator=g))
    k = r2
    P = torch.randn(B, r1 + k + 2 + 1, N, generator=g)
    mean, rstd = torch.randn(B, N, generator=g), torch.rand(B, N, generator=g) + 0.5
    for fx in (None, fd._Factored(torch.rand(B, N, generator=g) + 0.5, P[:, :r1], Q1)):
        r0 = 0 if fx is None else r1
        P_want, P_got = P.clone(), P.clone()
        want = fd._normed(None if fx is None else fd._Factored(fx.alpha, P_want[:, :r0], fx.Q), P_want, r0, k, Q2, mean, rstd, ln)
        Q, QT, alpha = kernels.normed_rows(None if fx is None else fx.Q, Q2, ln.weight, ln.bias, mean, rstd,
                                           None if fx is None else fx.alpha, P_got, r0 + k)
        assert torch.allclose(Q, want.Q, atol=1e-6) and torch.allclose(alpha, want.alpha, rtol=1e-6)
        assert torch.equal(QT, kernels.transposed_rows(Q)) and QT.shape[2] % kernels.decoder_lanes() == 0
        assert torch.allclose(P_got, P_want, rtol=1e-6, atol=1e-6)

    x = torch.randn(B, t, I, generator=g)
    W = torch.randn(I, C, generator=g) * 0.2
    h, low = kernels.factored_low(x, nh, hd**-0.5, W, kernels.transposed_rows(Q1), r1)
    h_want = fd._split_heads_scaled(x, nh)
    low_want = torch.matmul(h_want.view(nh, B, t, hd).transpose(0, 1), F.linear(Q1, W).view(B, r1, nh, hd).permute(0, 2, 3, 1))
    assert torch.equal(h, h_want)
    assert torch.allclose(low, low_want, atol=1e-4, rtol=1e-4)
    o = torch.randn(nh, B * t, hd, generator=g)
    aP = torch.rand(B, nh, t, r1, generator=g)
    for bias in (None, torch.randn(I, generator=g)):
        got = kernels.factored_values(o, aP, Q1, W.t().contiguous(), bias)
        want = o.view(nh, B, t, hd).permute(1, 2, 0, 3) + torch.matmul(aP, F.linear(Q1, W).view(B, r1, nh, hd).transpose(1, 2)).transpose(1, 2)
        want = want.reshape(B, t, I) + (0 if bias is None else bias)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="factored_values"):
        kernels.factored_values(o, aP[:, :, :, :-1], Q1, W.t().contiguous(), None)
    with pytest.raises(ValueError, match="factored_low"):
        kernels.factored_low(x, nh, 1.0, W[:, :-1].contiguous(), kernels.transposed_rows(Q1), r1)


@needs_decoder_kernel
@pytest.mark.parametrize("shape", [(8, 4096, 256), (3, 1024, 128), (2, 37, 64), (5, 64)])
def test_native_layer_norm_rows_matches_pytorch(shape):
    """In place and statistics-only LayerNorm over the last axis: torch.native_layer_norm's
    values, means and rstds up to float32 rounding, on rows with a large common offset (where a
    one-pass variance would cancel)."""
    C = shape[-1]
    g = torch.Generator().manual_seed(C)
    y = torch.randn(shape, generator=g) * 3 + 40
    y[..., 0, :] = 7.0  # a constant row: variance 0, rstd = eps^-1/2
    w, b = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    want, mean, rstd = torch.native_layer_norm(y, (C,), w, b, 1e-5)
    got = y.clone()
    m, r = kernels.layer_norm_rows_(got, w, b, 1e-5)
    assert m.shape == r.shape == y.shape[:-1]
    assert (got - want).abs().max().item() <= 1e-5
    torch.testing.assert_close(m, mean.squeeze(-1), rtol=1e-6, atol=1e-6)  # |mean| ~ 40: a few ulp
    assert ((r - rstd.squeeze(-1)).abs() / rstd.squeeze(-1)).max().item() <= 1e-5
    same = y.clone()
    m2, r2 = kernels.layer_norm_rows_(same, w, b, 1e-5, normalise=False)
    assert torch.equal(same, y) and torch.equal(m2, m) and torch.equal(r2, r)
    with pytest.raises(ValueError, match="channels"):
        kernels.layer_norm_rows_(torch.zeros(4, 48), torch.ones(48), torch.zeros(48), 1e-5)
    with pytest.raises(ValueError, match="contiguous float32"):
        kernels.layer_norm_rows_(y.double(), w, b, 1e-5)
    # a residual added in the same pass, repeating over the leading rows (one per prompt)
    base = torch.randn((1,) + tuple(shape[-2:]) if len(shape) == 3 else shape, generator=g)
    want2, mean2, _ = torch.native_layer_norm(y + base, (C,), w, b, 1e-5)
    got2 = y.clone()
    m3, _ = kernels.layer_norm_rows_(got2, w, b, 1e-5, add=base)
    assert (got2 - want2).abs().max().item() <= 1e-5
    torch.testing.assert_close(m3, mean2.squeeze(-1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="repeat"):
        kernels.layer_norm_rows_(y.clone(), w, b, 1e-5, add=torch.zeros(3, C) if shape[0] % 3 else torch.zeros(7, C))


@needs_decoder_kernel
@pytest.mark.parametrize("B, nh, t, hd, r, N", [(1, 8, 7, 16, 58, 4096), (3, 8, 9, 8, 37, 2304), (2, 4, 3, 5, 0, 100), (1, 2, 1, 4, 3, 17)])
def test_native_factored_scores_match_pytorch(B, nh, t, hd, r, N):
    """Scores against factored image tokens, and the softmax over tokens, equal the PyTorch
    products up to float32 rounding: SAM's sizes and odd ones (token counts not a multiple of the
    register block, pixel counts not a multiple of the vector, no low-rank part)."""
    g = torch.Generator().manual_seed(B * 1000 + N)
    q, base, pe = torch.randn(nh, B * t, hd, generator=g), torch.randn(nh, hd, N, generator=g), torch.randn(nh, hd, N, generator=g)
    alpha, low, P = torch.rand(B, N, generator=g) + 0.5, torch.randn(B, nh, t, r, generator=g), torch.randn(B, r, N, generator=g)
    want = ((torch.bmm(q, base).view(nh, B, t, N) + torch.matmul(low, P[:, None]).transpose(0, 1)) * alpha[None, :, None]
            + torch.bmm(q, pe).view(nh, B, t, N))
    got = kernels.factored_scores(q, base, pe, alpha, low, P, torch.full((nh, B, t, N), float("nan")))
    assert (got - want).abs().max().item() <= 2e-6 * max(1.0, want.abs().max().item())
    # no positional share (the first layer's maps hold it, with mask prompts)
    want_nope = (torch.bmm(q, base).view(nh, B, t, N) + torch.matmul(low, P[:, None]).transpose(0, 1)) * alpha[None, :, None]
    nope = kernels.factored_scores(q, base, None, alpha, low, P, torch.full((nh, B, t, N), float("nan")))
    assert (nope - want_nope).abs().max().item() <= 2e-6 * max(1.0, want_nope.abs().max().item())
    soft = kernels.factored_scores(q, base, pe, alpha, low, P, torch.full((B, nh, t, N), float("nan")), softmax_over_tokens=True)
    assert (soft - torch.softmax(got.transpose(0, 1), dim=2)).abs().max().item() <= 1e-6  # of the same scores
    # the maps in the kernel's pixel tiles (as the decoder cache keeps them): the same bits
    bt, pt = kernels.scores_tiles(base), kernels.scores_tiles(pe)
    assert torch.equal(kernels.untile_maps(bt, N), base)
    assert torch.equal(kernels.factored_scores(q, bt, pt, alpha, low, P, torch.full((nh, B, t, N), float("nan"))), got)
    assert torch.equal(kernels.factored_scores(q, bt, None, alpha, low, P, torch.full((nh, B, t, N), float("nan"))), nope)
    with pytest.raises(ValueError, match="inconsistent shapes"):  # tiled and plain maps do not mix
        kernels.factored_scores(q, bt, pe, alpha, low, P, torch.empty(nh, B, t, N))
    # the softmax in the reduced layout (see softmax_tokens), the scores left in out; P and the
    # reduced output as rows of larger buffers, the output scaled per pixel
    rows = kernels.reduced_rows(nh, t)
    red = torch.full((B, rows + 2, N), float("nan"))
    pbuf = torch.full((B, r + 3, N), float("nan"))
    pbuf[:, :r] = P
    scale = torch.rand(B, N, generator=g) + 0.5
    scores = torch.full((B, nh, t, N), float("nan"))
    kernels.factored_scores(q, base, pe, alpha, low, pbuf[:, :r], scores, softmax_over_tokens=True, reduced=red[:, :rows],
                            reduced_scale=scale)
    assert torch.equal(scores, got.transpose(0, 1))
    torch.testing.assert_close(red[:, : rows - 1], soft[:, :, : t - 1].reshape(B, nh * (t - 1), N) * scale[:, None],
                               rtol=1e-6, atol=1e-7)
    assert torch.equal(red[:, rows - 1], scale)
    assert red[:, rows:].isnan().all()  # nothing past its rows
    with pytest.raises(ValueError, match="reduced_scale"):
        kernels.factored_scores(q, base, pe, alpha, low, P, scores, softmax_over_tokens=True, reduced_scale=scale)
    with pytest.raises(ValueError, match="reduced"):
        kernels.factored_scores(q, base, pe, alpha, low, P, torch.empty(nh, B, t, N), reduced=red)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        kernels.factored_scores(q, base, pe, alpha, low, P, torch.empty(B, nh, t, N + 1))
    with pytest.raises(ValueError, match="contiguous float32"):
        kernels.factored_scores(q.double(), base, pe, alpha, low, P, torch.empty(nh, B, t, N))


def _logits(n, side, seed):
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.randn(n, 1, 7, 7, generator=g) * 20, (side, side), mode="bicubic", align_corners=False)[:, 0]
    return torch.cat([smooth, torch.randn(n, side, side, generator=g) * 3])


@needs_kernels
@pytest.mark.parametrize("original", [(150, 211), (1, 1), (37, 512), (300, 97)])
def test_native_values_equal_pytorch_bit_for_bit(original):
    side, img_size = 64, 256
    input_size = ResizeLongestSide.get_preprocess_shape(*original, img_size)
    up = CellUpscaler(side, img_size, input_size, original)
    low = _logits(3, side, seed=original[0])
    native = up.native()
    up.prefer_native = False
    want = up.full(low)
    assert torch.equal(native.values(low), want)
    assert torch.equal(native.values(low, 0.25), want > 0.25)
    counts, rows, cols = native.stats(low, 1.0, -1.0, 0.0)
    assert torch.equal(counts[:, 0], (want > 1.0).sum((1, 2)))
    assert torch.equal(counts[:, 1], (want > -1.0).sum((1, 2)))
    assert torch.equal(rows, (want > 0).any(2)) and torch.equal(cols, (want > 0).any(1))
    # one thread or several: the same result (work is split by masks or by rows)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(native.values(low[:1]), want[:1])
    finally:
        torch.set_num_threads(n)
    assert torch.equal(native.values(low[:1]), want[:1])


def _separable_reference(L, t):
    """The native upscale's arithmetic in PyTorch: per output value, a multiply then an add per tap,
    columns first, in tap order."""
    cols = L[:, :, t.cidx[:, 0]] * t.cw[:, 0]
    for k in range(1, t.S):
        cols = cols + L[:, :, t.cidx[:, k]] * t.cw[:, k]
    out = cols[:, t.ridx[:, 0], :] * t.rw[:, 0, None]
    for k in range(1, t.S):
        out = out + cols[:, t.ridx[:, k], :] * t.rw[:, k, None]
    return out


@needs_kernels
@pytest.mark.parametrize("side,original", [(256, (13, 40)), (256, (700, 30)), (64, (1000, 1500))])
def test_native_values_for_strong_down_and_upscaling_equal_pytorch(side, original):
    """Strong downscaling spreads a block of output columns' taps wider than one vector (the
    kernel's scalar path), strong upscaling packs many outputs into each low-res window."""
    input_size = ResizeLongestSide.get_preprocess_shape(*original, 4 * side)
    up = CellUpscaler(side, 4 * side, input_size, original)
    low = _logits(2, side, seed=3)
    native = up.native()
    up.prefer_native = False
    want = up.full(low)
    assert torch.equal(native.values(low), want)
    assert torch.equal(native.values(low, 0.25), want > 0.25)


@needs_kernels
@pytest.mark.parametrize("S", [1, 2, 5])
def test_native_taps_of_any_count_equal_their_arithmetic(S):
    """Tap tables with as many taps as a caller gives (the fused loops cover 2-4, others the
    general one): values and thresholded bytes as the same float32 operations in PyTorch."""
    g = torch.Generator().manual_seed(S)
    n_low, H, W = 40, 90, 117
    ridx = torch.sort(torch.randint(0, n_low, (H, S), generator=g), dim=1).values
    cidx = torch.sort(torch.randint(0, n_low, (W, S), generator=g), dim=1).values
    rw, cw = torch.rand(H, S, generator=g), torch.rand(W, S, generator=g)
    t = kernels.Taps(ridx, rw, cidx, cw)
    L = torch.randn(3, n_low, n_low, generator=g)
    want = _separable_reference(L, t)
    assert torch.equal(t.values(L), want)
    assert torch.equal(t.values(L, 0.1), want > 0.1)


@needs_kernels
@pytest.mark.parametrize("original", [(420, 600), (900, 700)])
def test_thresholded_outputs_that_skip_decided_blocks_equal_pytorch(original):
    """Thresholded maps and statistics skip blocks whose values are bounded away from the
    thresholds (segany/kernels/upscale.c); every byte and count must stay as computed."""
    side, img_size = 64, 256
    input_size = ResizeLongestSide.get_preprocess_shape(*original, img_size)
    up = CellUpscaler(side, img_size, input_size, original)
    native = up.native()
    assert native.skip  # bilinear taps: convex combinations
    low = _logits(2, side, seed=1)[:1].repeat(6, 1, 1)
    low[1] = 0.25  # a plateau exactly at the threshold: rounding decides each value
    low[2, :, : side // 2] = 0.25 + 1e-7  # just above it
    low[3, 10:20, 10:20] = float("nan")  # NaN is never above a threshold
    low[4, 30:34, 5:40] = float("inf")
    low[4, 40:44, 5:40] = -float("inf")
    low[5] = low[5] * 1e4  # large values: the rounding margin scales with them
    up.prefer_native = False
    want = up.full(low)
    for t in (0.25, 0.0, -3.0):
        assert torch.equal(native.values(low, t), want > t)
    counts, rows, cols = native.stats(low, 1.0, -1.0, 0.25)
    assert torch.equal(counts[:, 0], (want > 1.0).sum((1, 2)))
    assert torch.equal(counts[:, 1], (want > -1.0).sum((1, 2)))
    assert torch.equal(rows, (want > 0.25).any(2)) and torch.equal(cols, (want > 0.25).any(1))
    # the taps of a map that is not a convex combination are never skipped
    t = kernels.Taps(native.ridx, -native.rw, native.cidx, native.cw)
    assert not t.skip


@needs_kernels
def test_predictor_masks_match_segment_everything_and_the_banded_map():
    from core_helpers import TINY_VIT
    from segany.modeling.build import build_sam, randomize_

    sam = randomize_(build_sam(TINY_VIT), seed=0, std=0.5).eval()
    p = SamPredictor(sam)
    img = np.random.default_rng(0).integers(0, 255, (97, 131, 3), dtype=np.uint8)
    p.set_image(img)
    masks, _, low = p.predict(point_coords=np.array([[40.0, 50.0]]), point_labels=np.array([1]))
    logits, _, _ = p.predict(point_coords=np.array([[40.0, 50.0]]), point_labels=np.array([1]), return_logits=True)
    assert np.array_equal(logits > sam.mask_threshold, masks)  # one computation, thresholded or not
    n_low = low.shape[-1]
    up = CellUpscaler(n_low, sam.image_encoder.img_size, p.input_size, p.original_size)
    assert np.array_equal(up.masks(torch.from_numpy(low), sam.mask_threshold).numpy(), masks)
    banded = _SeparableResize(n_low, sam.image_encoder.img_size, p.input_size, p.original_size, "cpu")
    other = banded(torch.from_numpy(low)).numpy()
    assert np.abs(other - logits).max() <= 1e-5 * max(1.0, np.abs(logits).max())


def test_without_a_compiler_everything_falls_back_to_pytorch(tmp_path):
    code = (
        "import numpy as np, torch\n"
        "from segany import kernels\n"
        "from segany.upscale import CellUpscaler\n"
        "assert not kernels.available()\n"
        "up = CellUpscaler(32, 128, (96, 128), (60, 80))\n"
        "assert up.native() is None\n"
        "m = up.masks(torch.randn(2, 32, 32), 0.0)\n"
        "s, b = up.stats(torch.randn(2, 32, 32), 0.0, 1.0)\n"
        "print(tuple(m.shape), up.last_split != (0, 0, 2) or 'direct')\n"
    )
    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler"), "PATH": str(tmp_path), "SEGANY_HOME": str(tmp_path / "home")}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(__file__))] + sys.path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("(2, 60, 80)")
    assert not (tmp_path / "home" / "kernels").exists() or not list((tmp_path / "home" / "kernels").glob("*.so"))


def test_kernel_is_built_into_the_cache_and_reused(tmp_path):
    if not kernels.available():
        pytest.skip("no C compiler")
    code = "from segany import kernels; print(kernels.available())"
    env = {**os.environ, "SEGANY_HOME": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(__file__))] + sys.path)
    # builds an older segany (or another CPU sharing the cache) left: stale ones are deleted on
    # load, a recently used one and other kernels' builds stay
    (tmp_path / "kernels").mkdir()
    old_day = time.time() - (kernels.STALE_DAYS + 1) * 86400
    for f, mtime in [("upscale-0000000000000000.so", old_day), ("upscale-1111111111111111.so", time.time()),
                     ("decoder-2222222222222222.so", old_day)]:
        (tmp_path / "kernels" / f).write_bytes(b"not a library")
        os.utime(tmp_path / "kernels" / f, (mtime, mtime))
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "True"
    names = sorted(f.name for f in (tmp_path / "kernels").iterdir())
    built = [n for n in names if n.startswith("upscale-") and n != "upscale-1111111111111111.so"]
    assert len(built) == 1 and built[0].endswith(".so")  # no temporary left behind
    assert names == sorted(built + ["upscale-1111111111111111.so", "decoder-2222222222222222.so"])
    assert time.time() - (tmp_path / "kernels" / built[0]).stat().st_mtime < 60  # marked used


@needs_kernels
def test_kernel_threads_work_in_a_forked_child():
    """A process forked after the kernel's thread pool started (multiprocessing's default on
    Linux) gets a fresh pool instead of waiting on threads it does not have."""
    import multiprocessing as mp

    up = CellUpscaler(32, 128, (96, 128), (300, 400))
    low = torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(0))
    want = up.masks(low, 0.0)  # starts the pool in this process
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_child_masks, (low.numpy(),)).get(timeout=60)
    assert np.array_equal(got, want.numpy())


def _child_masks(low):
    # a numpy array back: torch's own tensor sharing between processes is not what is tested
    return CellUpscaler(32, 128, (96, 128), (300, 400)).masks(torch.from_numpy(low), 0.0).numpy()


@needs_decoder_kernel
@pytest.mark.parametrize("nh,Q,hd,N", [(8, 7, 16, 4096), (8, 1, 16, 64), (2, 13, 8, 40), (1, 16, 16, 24)])
def test_native_t2i_attention_matches_pytorch(nh, Q, hd, N):
    """The first two-way block's token->image attention against per-image keys (heads, hd, N) and
    values (heads, N, hd): PyTorch's attention of the same queries, for query counts that fill
    no whole register block or piece, and a score far below its row's maximum (exp underflows)."""
    if not kernels.t2i_attention_ok(hd, N):
        pytest.skip(f"this build's vectors do not divide hd={hd}, N={N}")
    g = torch.Generator().manual_seed(Q * N)
    q = torch.randn(Q, nh * hd, generator=g) * 2
    k = torch.randn(nh, N, hd, generator=g)
    v = torch.randn(nh, N, hd, generator=g)
    k[0, 0] = 1e3 * q[0, :hd].sign()  # one key dominating query 0 of head 0
    ref = F.scaled_dot_product_attention(q.view(Q, nh, hd).transpose(0, 1), k, v, scale=hd**-0.5)
    out = torch.full((Q, nh * hd), float("nan"))
    assert kernels.t2i_attention(q, k.transpose(1, 2).contiguous(), v, hd**-0.5, out) is out
    torch.testing.assert_close(out, ref.transpose(0, 1).reshape(Q, nh * hd), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0, :hd], v[0, 0])
    with pytest.raises(ValueError, match="t2i_attention"):
        kernels.t2i_attention(q, k.contiguous(), v, 1.0, out)  # keys not transposed
    with pytest.raises(ValueError, match="t2i_attention"):
        kernels.t2i_attention(q, k.transpose(1, 2).contiguous(), v, 1.0, out[:, :-1].contiguous())
    assert not kernels.t2i_attention_ok(hd + 1, N) and not kernels.t2i_attention_ok(hd, N + 1)


@needs_decoder_kernel
@pytest.mark.parametrize("nh,t,r,hd,N", [(8, 7, 51, 16, 4096), (8, 4, 102, 16, 4096), (2, 3, 5, 8, 300), (1, 1, 1, 8, 7)])
def test_native_attend_values_match_pytorch(nh, t, r, hd, N):
    """One prompt's token->image attention values on factored image tokens: softmax over the
    pixels times alpha, against the per-image values and P's rows, equal PyTorch's, with pixel
    counts that fill no whole vector or pixel range and a score far above its row's others."""
    lanes = kernels.decoder_lanes()
    if hd % lanes:
        pytest.skip(f"hd={hd} is not a multiple of this build's {lanes} lanes")
    g = torch.Generator().manual_seed(N + r)
    s = torch.randn(nh, t, N, generator=g) * 4
    s[0, 0, N // 2] = 200.0  # exp(s - max) underflows to zero for every other pixel of that row
    alpha = torch.rand(N, generator=g) + 0.5
    v = torch.randn(nh, N, hd, generator=g)
    P = torch.randn(r, N, generator=g)
    a = torch.softmax(s, -1) * alpha
    o, aP = torch.full((nh, t, hd), float("nan")), torch.full((nh, t, r), float("nan"))
    kernels.attend_values(s, alpha, v, P, o, aP)
    torch.testing.assert_close(o, torch.bmm(a, v), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(aP, (a.reshape(nh * t, N) @ P.t()).view(nh, t, r), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(o[0, 0], v[0, N // 2] * alpha[N // 2])
    with pytest.raises(ValueError, match="attend_values"):
        kernels.attend_values(s, alpha, v, P[:, :-1].contiguous(), o, aP)
    with pytest.raises(ValueError, match="attend_values"):
        kernels.attend_values(s, alpha, v, P, o, aP, part=torch.empty(1))


@needs_decoder_kernel
@pytest.mark.parametrize("nh,B,t,hd,N", [(8, 1, 7, 16, 4096), (2, 3, 5, 4, 300), (8, 2, 16, 16, 100), (1, 1, 1, 8, 5)])
def test_native_i2t_softmax_matches_pytorch(nh, B, t, hd, N):
    """The first block's image->token attention from the tokens' keys and per-image queries, in
    the reduced layout: the scores' GEMM and softmax_tokens' values, from maps laid out plain or
    in pixel tiles, into the first rows of a larger buffer."""
    g = torch.Generator().manual_seed(N + t)
    k = torch.randn(B, t, nh * hd, generator=g)
    q = torch.randn(nh, hd, N, generator=g) * 2
    h = k.view(B, t, nh, hd).permute(2, 0, 1, 3).reshape(nh, B * t, hd) * hd**-0.5
    rows = kernels.reduced_rows(nh, t)
    ref = torch.empty(B, rows, N)
    kernels.softmax_tokens(torch.bmm(h, q).view(nh, B, t, N), ref, reduced=True)
    for maps in (q, kernels.scores_tiles(q)):
        buf = torch.full((B, rows + 1, N), float("nan"))
        assert kernels.i2t_softmax(k, nh, hd**-0.5, maps, buf[:, :rows]) is not None
        torch.testing.assert_close(buf[:, :rows], ref, rtol=1e-6, atol=1e-7)
        assert buf[:, rows].isnan().all()
    with pytest.raises(ValueError, match="i2t_softmax"):
        kernels.i2t_softmax(k, nh, 1.0, q[:, :, :-1].contiguous(), ref)
    with pytest.raises(ValueError, match="i2t_softmax"):
        kernels.i2t_softmax(torch.randn(B, kernels.I2T_TOKENS_MAX + 1, nh * hd), nh, 1.0, q, ref)


@needs_decoder_kernel
def test_one_prompts_attention_kernels_give_the_same_values_on_the_thread_pool(monkeypatch):
    """Where OpenMP's threads are gone (a forked child), the pieces run on segany's own thread
    pool in contiguous ranges: the same values as in one OpenMP call (each piece writes its own
    rows, attend_values' pieces their own partial sums)."""
    g = torch.Generator().manual_seed(5)
    nh, t, hd, N, r = 8, 7, 16, 1000, 9
    q, k, v = torch.randn(t, nh * hd, generator=g), torch.randn(nh, hd, N, generator=g), torch.randn(nh, N, hd, generator=g)
    s, alpha, P = torch.randn(nh, t, N, generator=g), torch.rand(N, generator=g) + 0.5, torch.randn(r, N, generator=g)
    keys = torch.randn(1, t, nh * hd, generator=g)

    def run():
        o1 = kernels.t2i_attention(q, k, v, 0.25, torch.empty(t, nh * hd)) if kernels.t2i_attention_ok(hd, N) else None
        o2, aP = torch.empty(nh, t, hd), torch.empty(nh, t, r)
        kernels.attend_values(s, alpha, v, P, o2, aP)
        o3 = kernels.i2t_softmax(keys, nh, 0.25, k, torch.empty(1, kernels.reduced_rows(nh, t), N))
        return o1, o2, aP, o3

    want = run()
    monkeypatch.setattr(kernels, "_forked", True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for a, b in zip(run(), want):
        assert (a is None and b is None) or torch.equal(a, b)


@needs_decoder_kernel
def test_decoder_cache_built_for_the_kernel_also_serves_the_pytorch_path(monkeypatch):
    """A cache built while the native tail was usable (it keeps the upscaling base transposed)
    still gives the same masks when a later call cannot use the kernel."""
    from core_helpers import TINY_VIT

    monkeypatch.setenv("SEGANY_DECODER_KERNELS", "1")  # also where this CPU's build is not preferred
    from segany.modeling import fast_decoder
    from segany.modeling.build import build_sam, randomize_

    sam = randomize_(build_sam(TINY_VIT), seed=3, std=0.2).eval()
    pe = sam.prompt_encoder
    h, w = pe.image_embedding_size
    feats = torch.randn(1, pe.embed_dim, h, w, generator=torch.Generator().manual_seed(0))
    pts = torch.tensor([[[20.0, 30.0]], [[50.0, 10.0]]])
    with torch.no_grad():
        sparse, _ = pe(points=(pts, torch.ones(2, 1, dtype=torch.int64)), boxes=None, masks=None)
        cache = fast_decoder.build_cache(sam.mask_decoder, feats, pe.get_dense_pe(), pe.no_mask_embed.weight)
        assert cache.upscale is None and cache.upscale_t is not None
        native, iou_n = fast_decoder.predict_masks_fast(sam.mask_decoder, sparse, cache)
        monkeypatch.setattr(fast_decoder, "_native_tail_ok", lambda decoder, x: False)
        plain, iou_p = fast_decoder.predict_masks_fast(sam.mask_decoder, sparse, cache)
    assert torch.equal(iou_n, iou_p)
    assert (native - plain).abs().max().item() <= 2e-6 * max(1.0, plain.abs().max().item())


needs_attention_kernel = pytest.mark.skipif(kernels._get("attention") is None, reason="no C compiler: native kernels unavailable")


def _rel_attention_unfused(q, k, v, Rh, Rw, scale):
    """SAM's attention with decomposed relative positions, as the official code computes it."""
    B, nh, N, hd = q.shape
    h, w = Rh.shape[0], Rw.shape[0]
    r_q = q.reshape(B, nh, h, w, hd)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw)
    s = ((q * scale) @ k.transpose(-1, -2)).view(B, nh, h, w, h, w) + rel_h[..., :, None] + rel_w[..., None, :]
    return s.view(B, nh, N, N).softmax(-1) @ v


@needs_attention_kernel
@pytest.mark.parametrize(
    "B,nh,h,w,hd,bias_scale",
    [
        (1, 2, 16, 16, 16, 1.0),  # one vector per key row and head
        (2, 3, 8, 32, 32, 1.0),  # a batch; fewer grid rows than columns
        (1, 2, 64, 64, 80, 1.0),  # SAM's grid, vit_h's head width (a 4 + 1 vector split)
        (1, 2, 12, 16, 16, 40.0),  # large biases: the running maximum grows late and often
        (1, 2, 7, 16, 16, 1.0),  # an odd number of grid rows: the last piece (two rows each) has one
    ],
)
def test_native_rel_attention_matches_the_unfused_attention(B, nh, h, w, hd, bias_scale):
    """The encoder's global attention with decomposed relative positions, fused with an online
    softmax: equal to softmax(q k^T * scale + rel_h + rel_w) v up to float32 rounding, for q, k,
    v as strided views of one qkv tensor (as the encoder passes them)."""
    g = torch.Generator().manual_seed(B * 100 + h)
    qkv = torch.randn(B, h * w, 3, nh, hd, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    Rh = torch.randn(h, h, hd, generator=g) * bias_scale / hd**0.5
    Rw = torch.randn(w, w, hd, generator=g) * bias_scale / hd**0.5
    ref = _rel_attention_unfused(q.double(), k.double(), v.double(), Rh.double(), Rw.double(), hd**-0.5)
    out = kernels.rel_attention(q, k, v, Rh, Rw, hd**-0.5)
    assert out.shape == ref.shape
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@needs_attention_kernel
@needs_decoder_kernel
def test_kernels_flush_denormals_while_they_run_and_leave_the_callers_float_environment():
    """The attention and decoder kernels run with denormal floats flushed to zero (on Intel cores
    each operation on one takes a microcode assist: a softmax's far tails times small values make
    them): results stay the unfused ones, and the calling thread's floating-point environment is
    as it was (a denormal double still arises from Python arithmetic after the calls)."""
    tiny = 5e-324
    assert tiny * 3 != 0.0  # this thread keeps denormals to begin with
    g = torch.Generator().manual_seed(7)
    B, nh, h, w, hd = 1, 2, 16, 16, 16
    qkv = torch.randn(B, h * w, 3, nh, hd, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    v = v * 1e-3
    # rel-pos terms ~N(0, 40^2): keys ~80 apart, the far keys' softmax weights ~1e-35, times
    # values ~1e-3: denormal products
    Rh = torch.randn(h, h, hd, generator=g) * 40 / hd**0.5
    Rw = torch.zeros(w, w, hd)
    ref = _rel_attention_unfused(q.double(), k.double(), v.double(), Rh.double(), Rw.double(), hd**-0.5)
    out = kernels.rel_attention(q, k, v, Rh, Rw, hd**-0.5)
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert tiny * 3 != 0.0
    win = kernels.window_attention(torch.randn(1, 8, 8, 3 * 32, generator=g), torch.zeros(3 * 32),
                                   torch.randn(4, 4, 16, generator=g), torch.randn(4, 4, 16, generator=g), 2, 4, 0.25)
    assert torch.isfinite(win).all()
    assert tiny * 3 != 0.0
    s = torch.randn(8, 1, 7, 4096, generator=g) * 30
    a_bt, wt = torch.empty(1, 8, 7, 4096), torch.empty(8, 1, 7, 4096)
    kernels.softmax_pixels(s, torch.ones(1, 4096), a_bt, wt)
    torch.testing.assert_close(wt, torch.softmax(s, -1), rtol=1e-5, atol=1e-7)
    assert tiny * 3 != 0.0


@needs_attention_kernel
@pytest.mark.parametrize("R,h,w,scale", [(37, 8, 16, 3.0), (64, 64, 64, 3.0), (20, 4, 16, 60.0)])
def test_bf16_rel_softmax_is_the_float32_softmax_rounded(R, h, w, scale):
    """The int8 mode's bfloat16 global attention: softmax(s + rel_h[key row] + rel_w[key column])
    over bfloat16 scores, in place, summed and normalised in float32 (PyTorch's three bfloat16
    passes round after each add: ~10x the error), rounded to bfloat16 once; NaN stays NaN; a
    piece count that leaves a short last piece (R = 37, 20); large scores (the exp far below the
    maximum)."""
    g = torch.Generator().manual_seed(R)
    s = (torch.randn(R, h * w, generator=g) * scale).bfloat16()
    rh = (torch.randn(R, h, generator=g) * 2).bfloat16()
    rw = (torch.randn(R, w, generator=g) * 2).bfloat16()
    x = s.double().view(R, h, w) + rh.double()[:, :, None] + rw.double()[:, None, :]
    ref = torch.softmax(x.view(R, -1), -1)
    out = kernels.rel_softmax_bf16_(s.clone(), rh, rw)
    assert out.dtype == torch.bfloat16 and out.shape == s.shape
    # one rounding to bfloat16 (8 bits): within a bfloat16 unit of the float64 softmax
    assert ((out.double() - ref).abs() <= ref * (2.0**-8 + 1e-5) + 1e-30).all()
    if R == 37:
        s[3, 5] = float("nan")
        out = kernels.rel_softmax_bf16_(s, rh, rw)
        assert out[3].isnan().all() and not out[:3].isnan().any() and not out[4:].isnan().any()
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.rel_softmax_bf16_(s.float(), rh, rw)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        kernels.rel_softmax_bf16_(s, rh[:, :-1], rw)


@needs_attention_kernel
def test_native_rel_attention_checks_its_arguments():
    q = torch.zeros(1, 2, 64, 16)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        kernels.rel_attention(q, q, q, torch.zeros(8, 8, 8), torch.zeros(8, 8, 8), 0.25)
    q = torch.zeros(1, 2, 16 * 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32"):
        kernels.rel_attention(q, q, q, torch.zeros(16, 16, 16), torch.zeros(16, 16, 16), 0.25)
    odd = torch.zeros(1, 2, 6 * 6, 16)  # a grid narrower than a vector
    with pytest.raises(ValueError, match="multiples"):
        kernels.rel_attention(odd, odd, odd, torch.zeros(6, 6, 16), torch.zeros(6, 6, 16), 0.25)
    assert not kernels.attention_preferred(6, 16)
    lanes = int(kernels._get("attention").segany_vector_lanes())
    # windows wider than the kernel takes (4 vectors) keep the PyTorch code instead of raising
    assert not kernels.attention_preferred(None, lanes, 4 * lanes + 1)


@needs_attention_kernel
def test_encoder_global_attention_takes_the_kernel_and_matches_the_unfused_path(monkeypatch):
    """A ViT block with global attention at inference: the same output with the kernel as
    without (SEGANY_ATTENTION_KERNEL=0), and the kernel is what runs when asked for."""
    from segany.modeling import image_encoder as ie

    torch.manual_seed(0)
    attn = ie.Attention(64, num_heads=4, use_rel_pos=True, input_size=(16, 16)).eval()
    for prm in (attn.rel_pos_h, attn.rel_pos_w):
        prm.data.normal_(0, 0.5)
    x = torch.randn(1, 16, 16, 64)
    monkeypatch.setattr(ie, "_ATTN_CHUNK_BYTES", 1 << 10)  # a grid this small counts as global
    calls = []
    real = kernels.rel_attention
    monkeypatch.setattr(kernels, "rel_attention", lambda *a: calls.append(weakref.ref(a[0])) or real(*a))
    with torch.no_grad():
        monkeypatch.setenv("SEGANY_ATTENTION_KERNEL", "0")
        unfused = attn(x)
        assert not calls
        monkeypatch.setenv("SEGANY_ATTENTION_KERNEL", "1")
        fused = attn(x)
    assert calls
    gc.collect()
    assert calls[0]() is None, "a call's queries outlived it (cached somewhere: memory grows per image)"
    assert (fused - unfused).abs().max() <= 1e-5 * unfused.abs().max()
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        calls.clear()
        attn(x.double().float().requires_grad_(False))  # still float32: the kernel again
        assert calls
        calls.clear()
        attn.double()(x.double())  # float64: the PyTorch code
        assert not calls


@needs_attention_kernel
@pytest.mark.parametrize(
    "B,H,W,nh,C,ws,qkv_bias",
    [
        (1, 28, 28, 2, 32, 14, True),  # whole windows
        (2, 10, 13, 2, 32, 4, True),  # padding on both sides: padded tokens hold the qkv bias
        (1, 9, 7, 1, 16, 5, False),  # no qkv bias: padded tokens are zeros
        (1, 16, 16, 2, 160, 14, True),  # vit_h's 80-wide heads
    ],
)
def test_native_window_attention_matches_partitioned_attention(monkeypatch, B, H, W, nh, C, ws, qkv_bias):
    """The encoder's windowed attention read straight from qkv and written to the grid equals
    the PyTorch path (pad, partition, attention with rel-pos, unpartition, crop)."""
    from segany.modeling import image_encoder as ie

    torch.manual_seed(B * 1000 + H * 10 + W)
    attn = ie.Attention(C, num_heads=nh, qkv_bias=qkv_bias, use_rel_pos=True, input_size=(ws, ws)).eval()
    for prm in (attn.rel_pos_h, attn.rel_pos_w):
        prm.data.normal_(0, 0.5)
    if qkv_bias:
        attn.qkv.bias.data.normal_(0, 0.5)
    x = torch.randn(B, H, W, C)
    calls = []
    real = kernels.window_attention
    monkeypatch.setattr(kernels, "window_attention", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        monkeypatch.setenv("SEGANY_ATTENTION_KERNEL", "0")
        unfused = attn(x, ws)
        assert not calls
        monkeypatch.setenv("SEGANY_ATTENTION_KERNEL", "1")
        fused = attn(x, ws)
    assert calls
    assert fused.shape == unfused.shape == (B, H, W, C)
    assert (fused - unfused).abs().max() <= 1e-5 * unfused.abs().max()


@needs_attention_kernel
def test_native_window_attention_checks_its_arguments():
    qkv = torch.zeros(1, 8, 8, 3 * 32)
    rel = torch.zeros(4, 4, 16)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        kernels.window_attention(qkv, torch.zeros(3 * 32), rel, torch.zeros(4, 4, 8), 2, 4, 0.25)
    with pytest.raises(ValueError, match="float32"):
        kernels.window_attention(qkv.double(), torch.zeros(3 * 32), rel, rel, 2, 4, 0.25)
    if kernels.decoder_lanes() == 16:
        with pytest.raises(ValueError, match="multiple"):
            kernels.window_attention(torch.zeros(1, 8, 8, 3 * 24), torch.zeros(3 * 24), torch.zeros(4, 4, 8), torch.zeros(4, 4, 8), 3, 4, 0.25)


needs_token_kernel = pytest.mark.skipif(kernels._get("tokens") is None, reason="no C compiler: native kernels unavailable")


def _two_way_block(C, heads, mlp, downsample, skip_pe, seed):
    from segany.modeling.transformer import TwoWayAttentionBlock

    blk = TwoWayAttentionBlock(C, heads, mlp, attention_downsample_rate=downsample, skip_first_layer_pe=skip_pe)
    g = torch.Generator().manual_seed(seed)
    for prm in blk.parameters():
        prm.data.copy_(torch.randn(prm.shape, generator=g) * 0.2)
    return blk.eval()


def _token_side_pytorch(blk, x, pe, heads_of):
    """The token side of a two-way block as its forward computes it, the token->image
    attention's heads (before out_proj) given by heads_of(q)."""
    if blk.skip_first_layer_pe:
        x = blk.norm1(blk.self_attn(q=x, k=x, v=x))
    else:
        q = x + pe
        x = blk.norm1(x + blk.self_attn(q=q, k=q, v=x))
    t2i, i2t = blk.cross_attn_token_to_image, blk.cross_attn_image_to_token
    q = t2i.q_proj(x + pe)
    x = blk.norm2(x + t2i.out_proj(heads_of(q)))
    x = blk.norm3(x + blk.mlp(x))
    return q, x, i2t.k_proj(x + pe), i2t.v_proj(x)


@needs_token_kernel
@pytest.mark.parametrize(
    "C,heads,mlp,down,B,t,skip_pe",
    [
        (256, 8, 2048, 2, 1, 7, True),  # SAM's first block, one click
        (256, 8, 2048, 2, 2, 9, False),  # SAM's second block, two prompts of 9 tokens (rows past a register block)
        (24, 2, 40, 2, 3, 5, False),  # widths that fill no whole panel, 15 rows
        (32, 4, 64, 1, 1, 1, False),  # one token
    ],
)
def test_native_token_block_matches_pytorch(C, heads, mlp, down, B, t, skip_pe):
    blk = _two_way_block(C, heads, mlp, down, skip_pe, seed=C + t)
    g = torch.Generator().manual_seed(1)
    x, pe = torch.randn(B, t, C, generator=g), torch.randn(B, t, C, generator=g)
    mix = torch.randn(C // down, C // down, generator=g)
    sa, t2i, i2t = blk.self_attn, blk.cross_attn_token_to_image, blk.cross_attn_image_to_token
    wb = lambda m: (m.weight, m.bias)  # noqa: E731
    ln = lambda n: (n.weight, n.bias, n.eps)  # noqa: E731
    native = kernels.TokenBlock(q=wb(t2i.q_proj), o=wb(t2i.out_proj), ln2=ln(blk.norm2),
                                self_attn=[wb(sa.q_proj), wb(sa.k_proj), wb(sa.v_proj), wb(sa.out_proj)], sa_heads=heads,
                                ln1=ln(blk.norm1), mlp=[wb(blk.mlp.lin1), wb(blk.mlp.lin2)], ln3=ln(blk.norm3),
                                k=wb(i2t.k_proj), v=wb(i2t.v_proj))
    with torch.no_grad():
        want_q, want_x, want_k, want_v = _token_side_pytorch(blk, x, pe, lambda q: torch.tanh(q @ mix))
        x1, q = native.pre(x, pe, skip_pe=skip_pe)
        x2, k, v = native.post(torch.tanh(q @ mix), x1, pe)
    for got, want in ((q, want_q), (x2, want_x), (k, want_k), (v, want_v)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


@needs_token_kernel
def test_native_final_attention_block_and_chain_match_pytorch():
    """The final attention's block (q projection, out-projection and LayerNorm only) and 1-3
    layer chains with ReLU between (the IoU head, hypernetworks), at widths that fill no whole
    panel."""
    g = torch.Generator().manual_seed(2)
    q_lin, o_lin, ln = torch.nn.Linear(40, 20), torch.nn.Linear(20, 40), torch.nn.LayerNorm(40)
    for prm in (*q_lin.parameters(), *o_lin.parameters(), *ln.parameters()):
        prm.data.copy_(torch.randn(prm.shape, generator=g))
    final = kernels.TokenBlock(q=(q_lin.weight, q_lin.bias), o=(o_lin.weight, o_lin.bias), ln2=(ln.weight, ln.bias, ln.eps))
    x, pe = torch.randn(2, 11, 40, generator=g), torch.randn(2, 11, 40, generator=g)
    layers = [torch.nn.Linear(40, 33), torch.nn.Linear(33, 70), torch.nn.Linear(70, 3)]
    with torch.no_grad():
        same_x, q = final.pre(x, pe)
        assert same_x is x
        torch.testing.assert_close(q, q_lin(x + pe), rtol=1e-5, atol=1e-5)
        out, k, v = final.post(torch.tanh(q), x, None)
        assert k is None and v is None
        torch.testing.assert_close(out, ln(x + o_lin(torch.tanh(q))), rtol=1e-5, atol=2e-5)
        for n in (1, 2, 3):
            chain = kernels.TokenChain([(m.weight, m.bias) for m in layers[:n]])
            want = x
            for i, m in enumerate(layers[:n]):
                want = m(want) if i == n - 1 else torch.relu(m(want))
            torch.testing.assert_close(chain(x), want, rtol=1e-5, atol=1e-5)


@needs_token_kernel
def test_native_token_kernels_check_their_arguments():
    lin = torch.nn.Linear(8, 4)
    ln = (torch.ones(8), torch.zeros(8), 1e-5)
    with pytest.raises(ValueError, match="o is \\(4, 8\\), expected \\(8, 4\\)"):
        kernels.TokenBlock(q=(lin.weight, lin.bias), o=(lin.weight, lin.bias), ln2=ln)
    with pytest.raises(ValueError, match="LayerNorm over 8"):
        kernels.TokenBlock(q=(lin.weight, lin.bias), o=(torch.nn.Linear(4, 8).weight, torch.zeros(8)), ln2=(torch.ones(3), torch.zeros(3), 1e-5))
    with pytest.raises(ValueError, match="do not chain"):
        kernels.TokenChain([(lin.weight, lin.bias), (lin.weight, lin.bias)])
    chain = kernels.TokenChain([(lin.weight, lin.bias)])
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        chain(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="contiguous float32"):
        chain(torch.zeros(2, 8, dtype=torch.float64))
    block = kernels.TokenBlock(q=(lin.weight, lin.bias), o=(torch.nn.Linear(4, 8).weight, torch.zeros(8)), ln2=ln)
    with pytest.raises(ValueError, match="pe"):
        block.pre(torch.zeros(1, 3, 8), torch.zeros(1, 2, 8))
