"""The inference fast paths compute the same function as the official module structure."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core_helpers import TINY_VIT, randomize_batchnorm_
from segany import kernels
from segany.modeling.build import build_sam, randomize_
from segany.modeling.fast_decoder import build_cache, mask_prompt_factor, predict_masks_fast
from segany.predictor import SamPredictor, _SeparableResize
from segany.upscale import CellUpscaler

DEC_CONFIGS = [
    TINY_VIT,
    # depth 3 and heads 4: the folds must not assume SAM's exact sizes
    {**TINY_VIT, "decoder": {"depth": 3, "mlp_dim": 48, "num_heads": 4, "iou_head_hidden_dim": 16}},
    # depth 1: the factored image tokens start right at the final attention
    {**TINY_VIT, "decoder": {"depth": 1, "mlp_dim": 48, "num_heads": 2, "iou_head_hidden_dim": 16}},
    # 24 channels, not a multiple of AVX-512's 16 lanes: the native kernels that need whole
    # vectors of channels leave those steps to PyTorch within the same call
    {**TINY_VIT, "prompt_embed_dim": 24, "decoder": {"depth": 2, "mlp_dim": 48, "num_heads": 2, "iou_head_hidden_dim": 16}},
]


@pytest.fixture(params=["factored", "dense"])
def decoder_form(request, monkeypatch):
    """Cached decoder calls with the image tokens factored, or formed densely from the cache (the
    rank fraction past which predict_masks_fast switches: always or never)."""
    from segany.modeling import fast_decoder

    monkeypatch.setattr(fast_decoder, "DENSE_ABOVE_RANK", (float("inf"),) * 2 if request.param == "factored" else (0.0, 0.0))
    return request.param


def _model(config, seed=0):
    return randomize_(build_sam(config), seed=seed, std=0.2).eval()


@pytest.mark.parametrize("config", DEC_CONFIGS)
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("batch,npts,with_box,with_mask", [(1, 1, False, False), (3, 2, True, False), (2, 3, False, True)])
@pytest.mark.parametrize("native", [True, False], ids=["native", "pytorch"])
def test_fast_decoder_matches_module(config, multimask, batch, npts, with_box, with_mask, native, decoder_form, monkeypatch):
    from segany import kernels
    from segany.modeling import fast_decoder

    if native and not kernels.decoder_available():
        pytest.skip("no C compiler: native decoder kernel unavailable")
    if native:  # also where this CPU's build is not preferred (narrower than AVX-512)
        monkeypatch.setenv("SEGANY_DECODER_KERNELS", "1")
    else:  # PyTorch only, as on CPUs narrower than AVX-512 (none of the native decoder kernels)
        monkeypatch.setenv("SEGANY_DECODER_KERNELS", "0")
        monkeypatch.setattr(fast_decoder, "_native_tail_ok", lambda decoder, x: False)
    sam = _model(config)
    pe = sam.prompt_encoder
    g = torch.Generator().manual_seed(1)
    h, w = pe.image_embedding_size
    feats = torch.randn(1, pe.embed_dim, h, w, generator=g)
    pts = torch.rand(batch, npts, 2, generator=g) * config["image_size"]
    labels = torch.randint(0, 2, (batch, npts), generator=g, dtype=torch.int32)
    boxes = torch.tensor([[5.0, 10.0, 90.0, 100.0]]).repeat(batch, 1) if with_box else None
    masks = torch.randn(batch, 1, 4 * h, 4 * w, generator=g) * 3 if with_mask else None
    with torch.no_grad():
        sparse, dense = pe(points=(pts, labels), boxes=boxes, masks=masks)
        want_m, want_iou = sam.mask_decoder(feats, pe.get_dense_pe(), sparse, dense, multimask)
        cache = build_cache(sam.mask_decoder, feats, pe.get_dense_pe(), pe.no_mask_embed.weight)
        if with_mask:  # any dense prompt, and a mask prompt on the cached image (twice: kept buffers)
            runs = [predict_masks_fast(
                sam.mask_decoder, sparse, None, image_embeddings=feats, image_pe=pe.get_dense_pe(),
                dense_prompt_embeddings=dense, multimask_output=multimask,
            )]
            runs += [predict_masks_fast(sam.mask_decoder, sparse, cache, multimask_output=multimask,
                                        mask_factor=mask_prompt_factor(pe, masks)) for _ in range(2)]
        else:
            runs = [predict_masks_fast(sam.mask_decoder, sparse, cache, multimask_output=multimask)]
    for got_m, got_iou in runs:
        assert got_m.shape == want_m.shape and got_iou.shape == want_iou.shape
        scale = want_m.abs().max().item()
        assert (got_m - want_m).abs().max().item() <= 1e-5 * max(1.0, scale)
        assert (got_iou - want_iou).abs().max().item() <= 1e-5 * max(1.0, want_iou.abs().max().item())
    # the cache (shared by the image's clicks) is read, never written
    fresh = build_cache(sam.mask_decoder, feats, pe.get_dense_pe(), pe.no_mask_embed.weight)
    assert torch.equal(cache.src, fresh.src) and torch.equal(cache.src_pe, fresh.src_pe)


@pytest.mark.parametrize("npts,with_box", [(1, False), (3, True), (14, True)])
def test_one_prompts_attention_kernels_match_module(npts, with_box, monkeypatch):
    """One prompt's first-block attentions against the cached image (t2i_attention, i2t_softmax)
    and its later token->image attentions' values (attend_values) take heads a whole number of
    vectors wide; with 8-channel heads they run, and give the module's masks and scores, up to
    the token counts where they hand over to PyTorch (14 points and a box: 21 tokens)."""
    from segany.modeling import fast_decoder

    if not kernels.decoder_available():
        pytest.skip("no C compiler: native decoder kernels unavailable")
    monkeypatch.setenv("SEGANY_DECODER_KERNELS", "1")
    monkeypatch.setattr(fast_decoder, "DENSE_ABOVE_RANK", (float("inf"),) * 2)  # factored, as at SAM's sizes
    used = []
    for name in ("t2i_attention", "i2t_softmax", "attend_values"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: used.append(_name) or _real(*a, **k))
    config = {**TINY_VIT, "decoder": {"depth": 2, "mlp_dim": 48, "num_heads": 2, "iou_head_hidden_dim": 16}}  # heads 8 wide
    sam = _model(config)
    pe = sam.prompt_encoder
    g = torch.Generator().manual_seed(npts)
    h, w = pe.image_embedding_size
    feats = torch.randn(1, pe.embed_dim, h, w, generator=g)
    pts = torch.rand(1, npts, 2, generator=g) * config["image_size"]
    labels = torch.randint(0, 2, (1, npts), generator=g, dtype=torch.int32)
    boxes = torch.tensor([[5.0, 10.0, 90.0, 100.0]]) if with_box else None
    with torch.no_grad():
        sparse, dense = pe(points=(pts, labels), boxes=boxes, masks=None)
        want_m, want_iou = sam.mask_decoder(feats, pe.get_dense_pe(), sparse, dense, True)
        cache = build_cache(sam.mask_decoder, feats, pe.get_dense_pe(), pe.no_mask_embed.weight)
        got_m, got_iou = predict_masks_fast(sam.mask_decoder, sparse, cache, multimask_output=True)
    assert (got_m - want_m).abs().max().item() <= 1e-5 * max(1.0, want_m.abs().max().item())
    assert (got_iou - want_iou).abs().max().item() <= 1e-5 * max(1.0, want_iou.abs().max().item())
    if kernels.decoder_lanes() <= 8:  # (AVX-512's 16 lanes: 8-channel heads stay with PyTorch)
        if sparse.shape[1] + 5 <= 16:
            assert {"t2i_attention", "i2t_softmax", "attend_values"} <= set(used)
        else:
            assert "t2i_attention" not in used and "i2t_softmax" not in used and "attend_values" in used


@pytest.mark.parametrize("config", DEC_CONFIGS)
def test_cache_built_for_the_native_kernels_serves_the_pytorch_path(config, monkeypatch):
    """A decoder cache made where the native kernels are the default keeps its per-image maps in
    their pixel tiles; a call that cannot take them (kernels turned off afterwards, as a dispatch
    mode or tracing would) unpacks them and gives the module's outputs, first clicks and mask
    prompts alike."""
    from segany import kernels
    from segany.modeling import fast_decoder

    if not kernels.decoder_available():
        pytest.skip("no C compiler: native decoder kernel unavailable")
    sam = _model(config)
    pe = sam.prompt_encoder
    g = torch.Generator().manual_seed(5)
    h, w = pe.image_embedding_size
    feats = torch.randn(1, pe.embed_dim, h, w, generator=g)
    pts = torch.rand(2, 2, 2, generator=g) * config["image_size"]
    labels = torch.randint(0, 2, (2, 2), generator=g, dtype=torch.int32)
    masks = torch.randn(2, 1, 4 * h, 4 * w, generator=g) * 3
    monkeypatch.setenv("SEGANY_DECODER_KERNELS", "1")
    with torch.no_grad():
        cache = build_cache(sam.mask_decoder, feats, pe.get_dense_pe(), pe.no_mask_embed.weight)
        tiled = [m for lp in cache.layers + (cache.final,) for m in (lp.t2i_k, lp.i2t_q) if m is not None]
        assert all(m.ndim == 4 for m in tiled) and (cache.stats is None or cache.stats.u1.ndim == 4)
        monkeypatch.setenv("SEGANY_DECODER_KERNELS", "0")
        monkeypatch.setattr(fast_decoder, "_native_tail_ok", lambda decoder, x: False)
        for m in (None, masks):
            sparse, dense = pe(points=(pts, labels), boxes=None, masks=m)
            want_m, want_iou = sam.mask_decoder(feats, pe.get_dense_pe(), sparse, dense, True)
            got_m, got_iou = predict_masks_fast(sam.mask_decoder, sparse, cache, multimask_output=True,
                                                mask_factor=None if m is None else mask_prompt_factor(pe, m))
            assert (got_m - want_m).abs().max().item() <= 1e-5 * max(1.0, want_m.abs().max().item())
            assert (got_iou - want_iou).abs().max().item() <= 1e-5 * max(1.0, want_iou.abs().max().item())


def test_predictor_mask_prompts_factored_hooked_alone_and_broadcast():
    """Mask prompts through the predictor as the official decoder computes them: factored; through
    the module itself where a hook watches the mask embedding (no factor then, the hook runs); a
    mask without points or box; one mask for several point prompts (broadcast, as the official
    decoder does); mismatched counts refused."""
    sam = _model(TINY_VIT)
    pe = sam.prompt_encoder
    g = torch.Generator().manual_seed(2)
    h, w = pe.image_embedding_size
    feats = torch.randn(1, pe.embed_dim, h, w, generator=g)
    masks = torch.randn(3, 1, 4 * h, 4 * w, generator=g) * 3
    pts = torch.rand(3, 2, 2, generator=g) * 128
    labels = torch.tensor([[1, 0], [1, 1], [0, 1]], dtype=torch.int)
    p = SamPredictor(sam)
    p.set_embedding(feats, (60, 80), (96, 128))

    def check(points, m, multimask):
        got_m, got_iou = p.decode(*(points or (None, None)), mask_input=m, multimask_output=multimask)
        with torch.no_grad():
            sparse, dense = pe(points=points, boxes=None, masks=m)
            want_m, want_iou = sam.mask_decoder(feats, pe.get_dense_pe(), sparse, dense, multimask)
        torch.testing.assert_close(got_iou, want_iou, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_m, want_m, rtol=1e-5, atol=1e-5 * max(1.0, want_m.abs().max().item()))

    assert mask_prompt_factor(pe, masks) is not None
    check((pts, labels), masks, True)
    check(None, masks, False)  # masks alone
    check((pts, labels), masks[:1], True)  # one mask for the three prompts
    calls = []
    hook = pe.mask_downscaling.register_forward_hook(lambda mod, a, o: calls.append(1))
    try:
        assert mask_prompt_factor(pe, masks) is None
        check((pts, labels), masks, False)
    finally:
        hook.remove()
    assert calls  # the module itself ran, hook and all
    with pytest.raises(ValueError, match="mask prompts"):
        p.decode(pts[:2], labels[:2], mask_input=masks)
    with pytest.raises(ValueError, match="mask_input must have shape"):  # (PromptError)
        p.predict_torch(pts, labels, mask_input=masks[:, :, :16, :16])


def _one_point_prompts(sam, config, n: int, with_mask, seed: int):
    """n one-point prompts on a random embedding: sparse embeddings, and either the decoder
    cache (no mask input; with ``with_mask == "factored"`` random mask inputs as a factor of it)
    or the dense keyword arguments of ``predict_masks_fast`` (random mask inputs)."""
    pe = sam.prompt_encoder
    g = torch.Generator().manual_seed(seed)
    h, w = pe.image_embedding_size
    feats = torch.randn(1, pe.embed_dim, h, w, generator=g)
    pts = torch.rand(n, 1, 2, generator=g) * config["image_size"]
    dense_in = torch.randn(n, 1, 4 * h, 4 * w, generator=g) if with_mask else None
    with torch.no_grad():
        sparse, dense = pe(points=(pts, torch.ones(n, 1, dtype=torch.int32)), boxes=None, masks=dense_in)
        cache = build_cache(sam.mask_decoder, feats, pe.get_dense_pe(), pe.no_mask_embed.weight)
        if with_mask == "factored":
            return sparse, cache, dict(mask_factor=mask_prompt_factor(pe, dense_in))
        if with_mask:
            return sparse, None, dict(image_embeddings=feats, image_pe=pe.get_dense_pe(), dense_prompt_embeddings=dense)
        return sparse, cache, {}


@pytest.mark.parametrize("config", DEC_CONFIGS)
@pytest.mark.parametrize("with_mask", [False, True, "factored"])
def test_iou_filtered_decoding_returns_the_kept_masks_of_the_full_decoding(config, with_mask, decoder_form):
    """Segment everything decodes with ``iou_thresh``: the IoU head runs first and only kept
    masks are computed (without a mask input, the mask tokens' final attention too). Scores must
    be those of the full decoding and the masks exactly the kept ones, in (prompt, mask) order,
    for thresholds that keep none, some and all."""
    sam = _model(config)
    h, w = sam.prompt_encoder.image_embedding_size
    sparse, cache, kw = _one_point_prompts(sam, config, 6, with_mask, seed=3)
    with torch.no_grad():
        want_m, want_iou = predict_masks_fast(sam.mask_decoder, sparse, cache, multimask_output=True, **kw)
        ious = want_iou.flatten().sort().values
        # "some": between two scores of the middle half, at their widest gap (a threshold within
        # float32 rounding of a score would make the comparison itself a coin toss)
        n = len(ious)
        k = n // 4 + int((ious[n // 4 + 1 : 3 * n // 4 + 1] - ious[n // 4 : 3 * n // 4]).argmax())
        for thresh in (ious[-1].item() + 1.0, (ious[k].item() + ious[k + 1].item()) / 2, ious[0].item() - 1.0):
            got_m, got_iou = predict_masks_fast(sam.mask_decoder, sparse, cache, multimask_output=True, iou_thresh=thresh, **kw)
            torch.testing.assert_close(got_iou, want_iou, rtol=1e-5, atol=1e-5)
            keep = want_iou > thresh
            assert torch.equal(got_iou > thresh, keep)
            assert got_m.shape == (int(keep.sum()), 4 * h, 4 * w)
            torch.testing.assert_close(got_m, want_m[keep], rtol=1e-5, atol=1e-5 * max(1.0, want_m.abs().max().item()))


def test_fast_decoder_follows_weights_changed_in_place():
    """The fast decoder keeps per-parameter layouts between calls: new weights loaded into the
    same modules (load_state_dict copies in place) must give the new model's outputs."""
    config = DEC_CONFIGS[1]
    sam, other = _model(config, seed=0), _model(config, seed=7)
    pe = sam.prompt_encoder
    g = torch.Generator().manual_seed(2)
    h, w = pe.image_embedding_size
    feats = torch.randn(1, pe.embed_dim, h, w, generator=g)
    pts = torch.rand(2, 1, 2, generator=g) * config["image_size"]
    lab = torch.ones(2, 1, dtype=torch.int32)

    def run(model):
        with torch.no_grad():
            sparse, _ = model.prompt_encoder(points=(pts, lab), boxes=None, masks=None)
            cache = build_cache(model.mask_decoder, feats, model.prompt_encoder.get_dense_pe(), model.prompt_encoder.no_mask_embed.weight)
            return predict_masks_fast(model.mask_decoder, sparse, cache)

    before = run(sam)
    sam.load_state_dict(other.state_dict())
    after, want = run(sam), run(other)
    assert not torch.allclose(before[0], want[0])
    torch.testing.assert_close(after[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(after[1], want[1], rtol=0, atol=0)


@pytest.mark.parametrize("change", ["no_grad", "load_state_dict", "data_assigned", "data_assigned_mlp", "new_parameter",
                                    "new_module", "data_written", "no_mask_embed", "positions", "embedding"])
def test_predictor_follows_decoder_weights_changed_after_set_image(change, decoder_form):
    """A predictor keeps per-image decoder state made through the decoder's weights (and the
    token kernels keep packed copies of them): after the weights change, with an image already
    set, its masks are the changed model's, as the official predictor's would be, however the
    change was made (and after its embedding is overwritten in place, the new embedding's).
    Writes through ``.data`` bump no version counter: the caller says so with
    ``segany.weights_changed()``."""
    import segany

    sam, other = _model(TINY_VIT, seed=0), _model(TINY_VIT, seed=7)
    pe = sam.prompt_encoder
    g = torch.Generator().manual_seed(4)
    h, w = pe.image_embedding_size
    feats = torch.randn(1, pe.embed_dim, h, w, generator=g)
    kw = dict(point_coords=np.array([[40.0, 30.0], [70.0, 20.0]]), point_labels=np.array([1, 0]), return_logits=True)
    p = SamPredictor(sam)
    p.set_embedding(feats, (100, 120), (107, 128))
    before = p.predict(**kw)
    tf, src = sam.mask_decoder.transformer, other.mask_decoder.transformer
    with torch.no_grad():
        if change == "no_grad":
            tf.layers[1].cross_attn_token_to_image.k_proj.weight.mul_(1.5)
        elif change == "load_state_dict":
            sam.load_state_dict(other.state_dict())
        elif change == "data_assigned":
            tf.layers[0].norm4.weight.data = src.layers[0].norm4.weight.clone()
        elif change == "data_assigned_mlp":  # (packed for the token kernels)
            tf.layers[1].mlp.lin1.weight.data = src.layers[1].mlp.lin1.weight.clone()
        elif change == "new_parameter":
            tf.layers[0].cross_attn_image_to_token.q_proj.weight = torch.nn.Parameter(src.layers[0].cross_attn_image_to_token.q_proj.weight.clone())
        elif change == "new_module":
            tf.final_attn_token_to_image.v_proj = src.final_attn_token_to_image.v_proj
        elif change == "data_written":
            sam.mask_decoder.output_upscaling[0].weight.data.mul_(-1.0)
            segany.weights_changed()
        elif change == "no_mask_embed":
            pe.no_mask_embed.weight.add_(1.0)
        elif change == "positions":
            pe.pe_layer.positional_encoding_gaussian_matrix.mul_(2.0)
        else:  # (not a weight: the predictor's embedding itself, overwritten in place)
            p.features.mul_(-1.0)
    after = p.predict(**kw)
    fresh = SamPredictor(sam)
    fresh.set_embedding(p.features.clone(), (100, 120), (107, 128))
    want = fresh.predict(**kw)
    assert not np.allclose(before[2], want[2], atol=1e-4)  # the change matters
    for a, b in zip(after, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=0)


def test_predictor_on_a_model_built_under_inference_mode():
    """Parameters made under torch.inference_mode carry no version counter: the fast decoder's
    per-parameter layouts must not need one (the same masks as a normally built model)."""
    with torch.inference_mode():
        frozen = _model(TINY_VIT)
    normal = _model(TINY_VIT)
    img = np.random.default_rng(3).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    out = []
    for model in (frozen, normal):
        p = SamPredictor(model)
        with torch.inference_mode():
            p.set_image(img)
            out.append(p.predict(np.array([[30.0, 40.0]]), np.array([1]), return_logits=True))
    for a, b in zip(*out):
        np.testing.assert_allclose(a, b, rtol=0, atol=0)


class _Shifted(torch.nn.Module):
    def __init__(self, head: torch.nn.Module, offset: torch.Tensor) -> None:
        super().__init__()
        self.head, self.offset = head, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) + self.offset[: x.shape[0]]


@pytest.mark.parametrize("config", DEC_CONFIGS)
@pytest.mark.parametrize("with_mask", [False, True, "factored"])
def test_best_only_decoding_returns_each_prompts_top_candidate(config, with_mask, decoder_form):
    """``best_only`` (an interactive click's path) upscales only the candidate with the highest
    predicted IoU: per prompt, the mask and score that argmax over the full decoding picks, also
    when a batch's prompts pick different candidates."""
    sam = _model(config)
    # random weights score the candidates alike for every prompt: a per-prompt offset on the
    # IoU head's output makes the prompts pick different candidates
    head = sam.mask_decoder.iou_prediction_head
    offset = torch.zeros(12, sam.mask_decoder.num_mask_tokens)
    offset[torch.arange(12), 1 + torch.arange(12) % 3] = 5.0
    sam.mask_decoder.iou_prediction_head = _Shifted(head, offset)
    h, w = sam.prompt_encoder.image_embedding_size
    sparse, cache, kw = _one_point_prompts(sam, config, 12, with_mask, seed=5)
    with torch.no_grad():
        want_m, want_iou = predict_masks_fast(sam.mask_decoder, sparse, cache, multimask_output=True, **kw)
        got_m, got_iou = predict_masks_fast(sam.mask_decoder, sparse, cache, multimask_output=True, best_only=True, **kw)
        with pytest.raises(ValueError, match="best_only"):
            predict_masks_fast(sam.mask_decoder, sparse, cache, best_only=True, iou_thresh=0.5, **kw)
    best = want_iou.argmax(1)
    assert len(best.unique()) == 3  # the batch's prompts pick each of the three candidates
    assert got_m.shape == (12, 1, 4 * h, 4 * w) and got_iou.shape == (12, 1)
    torch.testing.assert_close(got_iou[:, 0], want_iou[torch.arange(12), best], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_m[:, 0], want_m[torch.arange(12), best], rtol=1e-5, atol=1e-5 * max(1.0, want_m.abs().max().item()))


def test_predict_best_is_predicts_argmax_candidate():
    """``SamPredictor.predict_best`` returns what ``predict`` + ``argmax(scores)`` picks: the
    same mask at the original size, score and low-res logits (the next click's mask input)."""
    sam = _model(TINY_VIT)
    p = SamPredictor(sam)
    img = np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8)
    p.set_image(img)
    rng = np.random.default_rng(1)
    for k in range(4):
        pts = rng.uniform((0, 0), (130, 90), size=(k + 1, 2))
        labels = (np.arange(k + 1) % 2 == 0).astype(np.int64)
        prev = None if k < 2 else logits[best : best + 1]  # noqa: F821 (from the previous click)
        masks, scores, logits = p.predict(pts, labels, mask_input=prev)
        best = int(np.argmax(scores))
        m, s, lo = p.predict_best(pts, labels, mask_input=prev)
        assert m.shape == (1, 90, 130) and m.dtype == bool and s.shape == (1,) and lo.shape == (1, *logits.shape[1:])
        assert np.array_equal(m[0], masks[best])
        np.testing.assert_allclose(s[0], scores[best], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(lo[0], logits[best], rtol=1e-5, atol=1e-5)
        full, _, _ = p.predict(pts, labels, mask_input=prev, return_logits=True)
        fb, _, _ = p.predict_best(pts, labels, mask_input=prev, return_logits=True)
        np.testing.assert_allclose(fb[0], full[best], rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="point_labels"):
        p.predict_best(np.array([[5.0, 5.0]]))


# a 16x16 embedding: rows of whole vectors at AVX2's and AVX-512's width (the fused native tail)
WIDE_VIT = {**TINY_VIT, "image_size": 256}


@pytest.fixture
def fused_tail_visible(monkeypatch):
    """The ``visible`` extents the fused native tail was given (None: all of it), with the decoder
    kernels on wherever built."""
    seen = []
    if kernels.decoder_available():
        monkeypatch.setenv("SEGANY_DECODER_KERNELS", "1")
        real = kernels.decoder_tail_fused
        monkeypatch.setattr(kernels, "decoder_tail_fused", lambda *a, **k: seen.append(k.get("visible")) or real(*a, **k))
    return seen


@pytest.mark.parametrize("size", [(90, 130), (130, 90), (100, 100), (7, 250)])
def test_predict_best_without_low_res_gives_the_same_mask(size, fused_tail_visible):
    """``predict_best(return_low_res=False)``: the same mask, logits at the image size and score,
    no low-res logits; the masks' part in the input's padding is not computed (where the fused
    native tail runs), and the upscale to the image never reads it."""
    sam = _model(WIDE_VIT)
    p = SamPredictor(sam)
    H, W = size
    p.set_image(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8))
    rng = np.random.default_rng(1)
    for k in range(3):
        pts = rng.uniform((0, 0), (W, H), size=(k + 1, 2))
        labels = (np.arange(k + 1) % 2 == 0).astype(np.int64)
        m, s, lo = p.predict_best(pts, labels)
        m2, s2, none = p.predict_best(pts, labels, return_low_res=False)
        assert none is None and np.array_equal(m2, m) and np.array_equal(s2, s)
        f, _, _ = p.predict_best(pts, labels, return_logits=True)
        f2, _, _ = p.predict_best(pts, labels, return_logits=True, return_low_res=False)
        assert np.array_equal(f2, f)
        # what lies outside the visible extent does not reach the image: NaN there changes nothing
        rows, cols = (4 * v for v in p._visible_embedding())
        poisoned = torch.from_numpy(lo.copy())
        poisoned[..., rows:, :] = float("nan")
        poisoned[..., cols:] = float("nan")
        assert np.array_equal(p.upscale(poisoned)[0].numpy(), f[0])
    vis = p._visible_embedding()
    assert vis == {(90, 130): (12, 16), (130, 90): (16, 12), (100, 100): (16, 16), (7, 250): (1, 16)}[size]
    if fused_tail_visible:  # the kernel was told the extent in the mask-only calls
        assert (vis if vis != (16, 16) else None) in fused_tail_visible


def test_segment_everything_unchanged_by_skipping_the_padding(fused_tail_visible, monkeypatch):
    """Segment everything upscales its masks only to each crop: the decoder leaves out their
    part in the crop's padding, and every record stays the same as with all of it computed."""
    from segany.automatic import SamAutomaticMaskGenerator
    from segany.modeling import fast_decoder

    # factored image tokens, as at SAM's sizes (this narrow model would form them densely)
    monkeypatch.setattr(fast_decoder, "DENSE_ABOVE_RANK", (float("inf"),) * 2)
    sam = _model(WIDE_VIT, seed=3)
    img = np.random.default_rng(2).integers(0, 255, (120, 200, 3), dtype=np.uint8)
    img[30:90, 40:120] = (250, 30, 30)

    def generate():
        gen = SamAutomaticMaskGenerator(sam, points_per_side=6, pred_iou_thresh=1e-6, stability_score_thresh=0.0,
                                        crop_n_layers=1, box_nms_thresh=0.99, decode_workers=1)
        return gen.generate(img)

    got = generate()
    if kernels.decoder_available():
        assert any(v is not None for v in fused_tail_visible)
    monkeypatch.setattr(SamPredictor, "_visible_embedding", lambda self: tuple(self.features.shape[-2:]))
    want = generate()
    assert len(got) == len(want) > 10
    for a, b in zip(got, want):
        assert np.array_equal(a["segmentation"], b["segmentation"])
        assert (a["bbox"], a["predicted_iou"], a["stability_score"], a["crop_box"]) == (b["bbox"], b["predicted_iou"], b["stability_score"], b["crop_box"])


def test_decoder_caches_share_the_positional_maps():
    """The image-independent part of the per-image decoder state (the positional encoding and its
    share of the later layers' maps) is one copy for every image's cache of a decoder, the masks
    are those of separate copies, and a change to the weights it comes from makes it anew."""
    sam = _model(TINY_VIT)
    rng = np.random.default_rng(4)
    preds = [SamPredictor(sam) for _ in range(2)]
    for p in preds:
        p.set_image(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8))
    pts, lab = np.array([[40.0, 30.0], [90.0, 60.0]]), np.array([1, 0])
    got = [p.predict(pts, lab)[2] for p in preds]
    c1, c2 = (p._get_decoder_cache() for p in preds)
    assert c1.pe is c2.pe and c1.layers[0].t2i_kpe is c2.layers[0].t2i_kpe and c1.final.t2i_kpe is c2.final.t2i_kpe
    assert c1.layers[0].t2i_k is not c2.layers[0].t2i_k  # (the per-image maps are each image's)
    for p, g in zip(preds, got):  # the official module structure, image by image
        want = _module_logits(p, pts, lab)
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))
    with torch.no_grad():  # a weight the positional share goes through
        sam.mask_decoder.transformer.final_attn_token_to_image.k_proj.bias.add_(0.5)
    got = [p.predict(pts, lab)[2] for p in preds]
    c3 = preds[0]._get_decoder_cache()
    assert c3.final.t2i_kpe is not c1.final.t2i_kpe and c3.final.t2i_kpe is preds[1]._get_decoder_cache().final.t2i_kpe
    for p, g in zip(preds, got):
        want = _module_logits(p, pts, lab)
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))


def _module_logits(p: SamPredictor, pts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Low-res logits of ``p``'s image through the official modules (no fast path)."""
    sam = p.model
    coords = torch.as_tensor(p.transform.apply_coords(pts, p.original_size), dtype=torch.float)[None]
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=(coords, torch.as_tensor(labels, dtype=torch.int)[None]), boxes=None, masks=None)
        low, _ = sam.mask_decoder(p.features, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=True)
    return low[0].numpy()


@pytest.mark.parametrize("config", DEC_CONFIGS[:2])
def test_decoder_workspace_reuses_its_buffers_and_changes_no_result(config):
    """Segment everything decodes batch after batch in a workspace: the second call of a size
    allocates nothing, results are those of calls outside one, a result handed back is never
    overwritten by the next call (unless asked for scratch masks), and the buffers go with the block."""
    import threading

    from segany.modeling import fast_decoder as fd

    sam = _model(config)
    # random weights score the candidates alike for every prompt: a per-prompt offset on the
    # IoU head's output makes the prompts pick different candidates
    head = sam.mask_decoder.iou_prediction_head
    offset = torch.zeros(12, sam.mask_decoder.num_mask_tokens)
    offset[torch.arange(12), 1 + torch.arange(12) % 3] = 5.0
    sam.mask_decoder.iou_prediction_head = _Shifted(head, offset)
    pe = sam.prompt_encoder
    g = torch.Generator().manual_seed(5)
    h, w = pe.image_embedding_size
    feats = torch.randn(1, pe.embed_dim, h, w, generator=g)
    cache = build_cache(sam.mask_decoder, feats, pe.get_dense_pe(), pe.no_mask_embed.weight)
    prompts = []
    for _ in range(3):
        pts = torch.rand(4, 1, 2, generator=g) * config["image_size"]
        prompts.append(pe(points=(pts, torch.ones(4, 1, dtype=torch.int32)), boxes=None, masks=None)[0])

    def run(sparse, **kw):
        with torch.no_grad():
            return predict_masks_fast(sam.mask_decoder, sparse, cache, multimask_output=True, **kw)

    want = [run(sp) for sp in prompts]
    want_thresh = run(prompts[0], iou_thresh=0.0)
    with fd.decoder_workspace():
        got0 = run(prompts[0])
        kept = got0[0].clone()
        buffers = {k: v.data_ptr() for k, v in fd._per_thread.workspace.items()}
        assert buffers, "the calls took no buffers from the workspace"
        with fd.decoder_workspace():  # an inner block joins the outer one
            got1 = run(prompts[1])
        assert fd._per_thread.workspace is not None
        assert {k: v.data_ptr() for k, v in fd._per_thread.workspace.items()} == buffers  # nothing new
        torch.testing.assert_close(got0[0], kept, rtol=0, atol=0)  # not overwritten by the next call
        got_thresh = run(prompts[0], iou_thresh=0.0)
        scratch = run(prompts[2], scratch_masks=True)
        other = []
        t = threading.Thread(target=lambda: other.append((run(prompts[2]), getattr(fd._per_thread, "workspace", None))))
        t.start()
        t.join()
    assert fd._per_thread.workspace is None  # freed with the block
    assert other[0][1] is None  # another thread never sees this thread's workspace
    for (gm, gi), (wm, wi) in zip([got0, got1, scratch, other[0][0]], [want[0], want[1], want[2], want[2]]):
        torch.testing.assert_close(gm, wm, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gi, wi, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_thresh[0], want_thresh[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("original", [(100, 150), (37, 11), (300, 200), (128, 128), (1, 700), (1500, 2), (2000, 1500)])
def test_separable_resize_matches_two_step_interpolation(original):
    from segany.transforms import ResizeLongestSide

    input_size = ResizeLongestSide.get_preprocess_shape(*original, 1024)
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 5

    def official(x):
        y = F.interpolate(x, (1024, 1024), mode="bilinear", align_corners=False)
        y = y[..., : input_size[0], : input_size[1]]
        return F.interpolate(y, original, mode="bilinear", align_corners=False)

    got = _SeparableResize(256, 1024, input_size, original, "cpu")(x)
    exact = official(x.double())
    assert got.shape == exact.shape
    scale = exact.abs().max().item()
    assert (got - exact).abs().max().item() < 2e-6 * scale
    # the official float32 computation itself rounds its sampling positions (~1e-4 relative)
    assert (got - official(x)).abs().max().item() < 1e-4 * scale
    # thresholding on the fly (row blocks at a time) gives exactly the thresholded float map
    resize = _SeparableResize(256, 1024, input_size, original, "cpu")
    for thr in (0.0, 1.5):
        assert torch.equal(resize(x, threshold=thr), got > thr)


@pytest.mark.parametrize("original", [(100, 150), (37, 11), (1500, 2), (2000, 1500)])
def test_cell_upscale_matches_two_step_interpolation(original):
    from segany.transforms import ResizeLongestSide

    input_size = ResizeLongestSide.get_preprocess_shape(*original, 1024)
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 5
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    x[1, 0] = 40 - ((yy - 90) ** 2 + (xx - 120) ** 2).sqrt()  # smooth: mostly certain cells
    x[1, 1] = -1.0  # empty
    x[1, 2] = 1.0  # full

    def official(x):
        y = F.interpolate(x, (1024, 1024), mode="bilinear", align_corners=False)
        y = y[..., : input_size[0], : input_size[1]]
        return F.interpolate(y, original, mode="bilinear", align_corners=False)

    up = CellUpscaler(256, 1024, input_size, original)
    got = up.full(x.reshape(-1, 256, 256)).reshape(2, 3, *original)
    exact = official(x.double())
    assert got.shape == exact.shape
    scale = exact.abs().max().item()
    assert (got - exact).abs().max().item() < 2e-6 * scale
    # the official float32 computation itself rounds its sampling positions (~1e-4 relative)
    assert (got - official(x)).abs().max().item() < 1e-4 * scale
    # masks computed along contours only are exactly the thresholded float map
    for thr in (0.0, 1.5):
        assert torch.equal(up.masks(x.reshape(-1, 256, 256), thr).reshape(got.shape), got > thr)


def test_predictor_cache_follows_the_embedding():
    sam = _model(TINY_VIT)
    p = SamPredictor(sam)
    pe = sam.prompt_encoder
    g = torch.Generator().manual_seed(3)
    h, w = pe.image_embedding_size
    pt = np.array([[40.0, 30.0]])
    lab = np.array([1])
    outs = []
    for _ in range(2):
        feats = torch.randn(1, pe.embed_dim, h, w, generator=g)
        p.set_embedding(feats, (100, 120), (107, 128))
        m, s, low = p.predict(point_coords=pt, point_labels=lab)
        with torch.no_grad():
            coords = torch.as_tensor(p.transform.apply_coords(pt, (100, 120)), dtype=torch.float)[None]
            sparse, dense = pe(points=(coords, torch.ones(1, 1, dtype=torch.int)), boxes=None, masks=None)
            want_low, want_iou = sam.mask_decoder(feats, pe.get_dense_pe(), sparse, dense, True)
        np.testing.assert_allclose(low, want_low[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(s, want_iou[0].numpy(), atol=1e-5)
        outs.append(low)
    assert np.abs(outs[0] - outs[1]).max() > 1e-3  # the second image really used its own cache


def test_int8_encoder_runs_close_to_float():
    from segany.quantize import quantize_model

    sam = _model(TINY_VIT)
    q = quantize_model(sam)
    assert q is not sam and q.quantized == "int8-dynamic"
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = sam.image_encoder(x), q.image_encoder(x)
    assert a.shape == b.shape
    cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    assert cos > 0.98
    # the predictor runs end to end on the quantised model
    p = SamPredictor(q)
    p.set_image(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    m, s, _ = p.predict(point_coords=np.array([[10.0, 20.0]]), point_labels=np.array([1]))
    assert m.shape == (3, 60, 90)


def test_int8_engine_is_onednn_with_amx_else_fbgemm(monkeypatch):
    """The dynamic int8 layers' engine follows the CPU (oneDNN where AMX int8 tiles are there,
    measured 2.1x fbgemm's linear, and oneDNN is not capped below them), a model quantised under either engine stays close, and the
    process's own engine setting is put back (the packed layers keep the one they were made with)."""
    import segany.quantize as Q

    engines = torch.backends.quantized.supported_engines
    for var in ("DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(Q, "_cpu_flags", lambda: {"avx512f", "amx_int8", "amx_tile"})
    assert Q.int8_engine() == ("onednn" if "onednn" in engines else "fbgemm" if "fbgemm" in engines else None)
    # oneDNN capped below AMX by the user (or bench_speed.py --isa avx2): fbgemm, and no bfloat16
    for var, cap in (("DNNL_MAX_CPU_ISA", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "avx512_core_vnni")):
        monkeypatch.setenv(var, cap)
        assert Q.int8_engine() == ("fbgemm" if "fbgemm" in engines else None), (var, cap)
        assert not Q.native_bf16() or cap.upper() != "AVX2"
        monkeypatch.delenv(var)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert not Q.native_bf16()
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "ALL")
    assert Q.int8_engine() == ("onednn" if "onednn" in engines else "fbgemm" if "fbgemm" in engines else None)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA")
    monkeypatch.setattr(Q, "_cpu_flags", lambda: {"avx2", "avx512_vnni"})
    assert Q.int8_engine() == ("fbgemm" if "fbgemm" in engines else None)
    sam = _model(TINY_VIT)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    before = torch.backends.quantized.engine
    try:
        for engine in [e for e in ("fbgemm", "onednn") if e in engines]:
            monkeypatch.setattr(Q, "int8_engine", lambda engine=engine: engine)
            q = Q.quantize_model(sam)
            assert torch.backends.quantized.engine == before, "quantize_model left the process's engine changed"
            with torch.no_grad():
                a, b = sam.image_encoder(x), q.image_encoder(x)
            assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() > 0.98, engine
            # packed for `engine`: the same bits as layers packed with that engine kept set
            torch.backends.quantized.engine = engine
            try:
                with torch.no_grad():
                    want = Q.quantize_model(sam).image_encoder(x)
            finally:
                torch.backends.quantized.engine = before
            assert torch.equal(b, want), engine
    finally:
        torch.backends.quantized.engine = before


def test_int8_mode_global_attention_in_bfloat16_stays_close():
    """The int8 mode's bfloat16 global attention (chosen on CPUs with native bf16, forced here so
    that every machine checks it): global blocks only, and the embedding stays close."""
    from segany.modeling.image_encoder import Attention
    from segany.quantize import _cpu_flags, _onednn_allows, quantize_model

    if not _onednn_allows("AVX512_CORE") and "avx512bw" in _cpu_flags():
        # PyTorch sends bfloat16 products to oneDNN by the CPU's flags, and oneDNN, capped below
        # them (an older CPU emulated: bench_speed.py --isa avx2), has no kernel for them. On a
        # real AVX2 CPU PyTorch computes them itself.
        pytest.skip("oneDNN capped below the CPU's bfloat16 instructions")
    sam = _model(TINY_VIT)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for blk in sam.image_encoder.blocks:  # non-zero relative positions, as in trained models
            if blk.attn.use_rel_pos:
                blk.attn.rel_pos_h.normal_(0, 0.5)
                blk.attn.rel_pos_w.normal_(0, 0.5)
        want = sam.image_encoder(x)
        q = quantize_model(sam, bf16_attention=True)
        q8 = quantize_model(sam, bf16_attention=False)
        got, got8 = q.image_encoder(x), q8.image_encoder(x)
    kinds = [(b.window_size, b.attn.attn_dtype) for b in q.image_encoder.blocks]
    assert all((d is torch.bfloat16) == (ws == 0) for ws, d in kinds) and q.bf16_attention_blocks >= 1
    assert q8.bf16_attention_blocks == 0 and all(b.attn.attn_dtype is None for b in q8.image_encoder.blocks)
    assert got.dtype == torch.float32
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0).item() > 0.98
    assert not torch.equal(got, got8)  # the bf16 path really ran
    # the attention alone, bf16 against float32, on a grid that needs several score pieces
    att = Attention(64, num_heads=2, use_rel_pos=True, input_size=(48, 48))
    with torch.no_grad():  # seeded: the global RNG's state depends on the tests run before
        g = torch.Generator().manual_seed(3)
        att.rel_pos_h.normal_(0, 0.3, generator=g)
        att.rel_pos_w.normal_(0, 0.3, generator=g)
        qkv = torch.randn(1, 48, 48, 192, generator=torch.Generator().manual_seed(2))
        ref = att._attend(qkv)
        low = att._attend(qkv.to(torch.bfloat16)).float()
    assert (low - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize("act", ["none", "gelu", "relu"])
def test_fused_linear_matches_pytorch(act):
    """segany's inference linear (oneDNN with the activation fused, for large products) computes
    act(x W^T + b): 3-D and strided inputs, with and without bias; under autograd it is exactly
    PyTorch's and differentiable."""
    from segany.modeling.common import linear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 512, generator=g) * 0.05  # 2**19 weights: the fused path when available
    b = torch.randn(1024, generator=g)
    ref_act = {"none": lambda y: y, "gelu": F.gelu, "relu": F.relu}[act]
    x3 = torch.randn(2, 40, 1024, generator=g)
    for x in (x3[..., :512], x3[..., :512].contiguous(), x3[0, :3, :512]):
        for bias in (b, None):
            want = ref_act(F.linear(x, w, bias))
            with torch.no_grad():
                got = linear(x, w, bias, act)
            assert got.shape == want.shape
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    xg = x3[..., :512].clone().requires_grad_(True)
    y = linear(xg, w, b, act)
    assert torch.equal(y, ref_act(F.linear(xg, w, b)))
    y.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_fused_linear_keeps_hooks_and_flop_counting():
    """Forward hooks on a Linear still fire, and torch's FLOP counter still sees the products."""
    from torch.utils.flop_counter import FlopCounterMode

    from segany.modeling.common import MLPBlock

    mlp = MLPBlock(512, 1024).eval()
    seen = []
    h = mlp.lin1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(4, 512)
    with torch.no_grad():
        mlp(x)
        h.remove()
        with FlopCounterMode(display=False) as fc:
            mlp(x)
    assert seen == [torch.Size([4, 1024])]
    assert fc.get_total_flops() == 2 * 2 * 4 * 512 * 1024


def test_global_attention_onednn_loop_matches_default():
    """The global-attention score loop gives the same result through oneDNN's matmul as through
    PyTorch's (float32 rounding), with a shorter last piece of rows."""
    from segany.modeling import common, image_encoder as IE

    if not common._onednn_available():
        pytest.skip("oneDNN matmul not available in this PyTorch build")
    att = IE.Attention(64, num_heads=2, use_rel_pos=True, input_size=(40, 40))
    with torch.no_grad():
        att.rel_pos_h.normal_(0, 0.3)
        att.rel_pos_w.normal_(0, 0.3)
        qkv = torch.randn(1, 40, 40, 192, generator=torch.Generator().manual_seed(3))
        got = att._attend(qkv)
        try:
            common._onednn = False
            want = att._attend(qkv)
        finally:
            common._onednn = None
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else "unavailable"


@pytest.mark.skipif(_thp_mode() != "madvise", reason="needs transparent huge pages in madvise mode")
def test_import_segany_puts_large_tensors_on_huge_pages():
    import os
    import subprocess
    import sys

    code = (
        "import segany, torch\n"
        "x = torch.ones(64 << 20)\n"
        "print(sum(int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "SEGANY_ALLOCATOR")}
    run = lambda extra: int(subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True, check=True).stdout)
    assert run({}) >= 128 << 10  # most of the 256 MB tensor, in kB
    assert run({"SEGANY_ALLOCATOR": "default"}) == 0


@pytest.mark.parametrize("onednn", [True, False])
def test_tiny_vit_inference_path_is_its_modules_function(onednn, monkeypatch):
    """MobileSAM's TinyViT at float32 CPU inference (folded BatchNorms, fused GELU, channels-last
    convolutions, gathered windows, the official attention arithmetic, in-place adds) computes
    what its modules compute with autograd on: at 256 px every attention stage pads its windows.
    The input is left alone, the folded weights follow in-place changes, and hooks still fire."""
    from segany.modeling import common
    from segany.modeling.tiny_vit import Conv2d_BN, TinyViT

    if onednn and not common.fused_conv_available():
        pytest.skip("this PyTorch has no oneDNN fused convolution")
    monkeypatch.setattr(common, "_fused_conv", onednn)
    torch.manual_seed(0)
    enc = randomize_batchnorm_(TinyViT(img_size=256), seed=1).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if name.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(1, 3, 256, 256, generator=g)
    x0 = x.clone()

    def modules_output():
        with torch.enable_grad():
            return enc(x).detach()

    with torch.no_grad():
        fast = enc(x)
        assert torch.equal(x, x0)
        torch.testing.assert_close(fast, modules_output(), rtol=1e-4, atol=2e-5)
        conv = enc.layers[1].blocks[0].local_conv
        assert isinstance(conv, Conv2d_BN) and conv._folded._value is not None
        conv.bn.running_mean.add_(0.5)
        enc.layers[2].blocks[1].attn.attention_biases.mul_(2.0)
        changed = enc(x)
        assert not torch.allclose(changed, fast, atol=1e-4)
        torch.testing.assert_close(changed, modules_output(), rtol=1e-4, atol=2e-5)
        seen = []
        hooks = [enc.layers[0].blocks[1].conv2.c.register_forward_hook(lambda m, i, o: seen.append(o.shape)),
                 enc.layers[0].blocks[0].act1.register_forward_hook(lambda m, i, o: seen.append(o.shape))]
        enc(x)
        for h in hooks:
            h.remove()
    assert sorted(seen) == [(1, 256, 64, 64)] * 2


def _click_outputs(model, tokens_native, monkeypatch):
    monkeypatch.setattr(kernels, "tokens_usable", (lambda: False) if not tokens_native else _real_tokens_usable)
    pe = model.prompt_encoder
    g = torch.Generator().manual_seed(4)
    h, w = pe.image_embedding_size
    feats = torch.randn(1, pe.embed_dim, h, w, generator=g)
    pts = torch.rand(2, 2, 2, generator=g) * model.image_encoder.img_size
    with torch.no_grad():
        sparse, _ = pe(points=(pts, torch.ones(2, 2, dtype=torch.int32)), boxes=None, masks=None)
        cache = build_cache(model.mask_decoder, feats, pe.get_dense_pe(), pe.no_mask_embed.weight)
        return predict_masks_fast(model.mask_decoder, sparse, cache)


_real_tokens_usable = kernels.tokens_usable


def _token_kernels_on():
    from segany.modeling.fast_decoder import _native_ok_now

    with torch.no_grad():
        return _real_tokens_usable() and _native_ok_now(torch.zeros(1))


needs_token_kernels = pytest.mark.skipif(not _token_kernels_on(), reason="decoder kernels not built or not preferred on this CPU")


@needs_token_kernels
def test_token_kernels_run_the_token_side_of_a_click_with_the_same_results(monkeypatch):
    """Where the decoder kernels are on, each two-way block's token side and the final
    attention's run as two native calls each, and the IoU head and hypernetworks as one; the
    results equal PyTorch's code up to float32 rounding."""
    sam = _model(TINY_VIT)
    calls = {"pre": 0, "post": 0, "chain": 0}
    for cls, name, key in ((kernels.TokenBlock, "pre", "pre"), (kernels.TokenBlock, "post", "post"), (kernels.TokenChain, "__call__", "chain")):
        orig = getattr(cls, name)

        def counted(self, *a, _orig=orig, _key=key, **k):
            calls[_key] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(cls, name, counted)
    got = _click_outputs(sam, True, monkeypatch)
    blocks = len(sam.mask_decoder.transformer.layers) + 1
    assert calls == {"pre": blocks, "post": blocks, "chain": 1 + sam.mask_decoder.num_mask_tokens - 1}
    want = _click_outputs(sam, False, monkeypatch)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5 * want[0].abs().max().item())


@needs_token_kernels
def test_token_kernels_follow_replaced_parameters_and_leave_hooked_modules_to_pytorch(monkeypatch):
    """The packed token weights are rebuilt when a parameter is replaced or changed in place,
    and a module with a forward hook runs as PyTorch's module (its hook fires)."""
    sam = _model(TINY_VIT)
    layer = sam.mask_decoder.transformer.layers[0]
    before = _click_outputs(sam, True, monkeypatch)
    layer.mlp.lin1.weight = torch.nn.Parameter(torch.randn_like(layer.mlp.lin1.weight))
    replaced = _click_outputs(sam, True, monkeypatch)
    assert not torch.allclose(replaced[1], before[1])
    torch.testing.assert_close(replaced[1], _click_outputs(sam, False, monkeypatch)[1], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        sam.mask_decoder.iou_prediction_head.layers[0].bias.add_(1.0)  # in place: a new version
    changed = _click_outputs(sam, True, monkeypatch)
    torch.testing.assert_close(changed[1], _click_outputs(sam, False, monkeypatch)[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(changed[1], replaced[1])
    seen = []
    layer.self_attn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    hooked = _click_outputs(sam, True, monkeypatch)
    assert len(seen) == 1
    torch.testing.assert_close(hooked[1], changed[1], rtol=1e-5, atol=1e-6)


@needs_token_kernels
def test_token_kernels_can_be_turned_off(monkeypatch):
    sam = _model(TINY_VIT)
    used = []
    orig = kernels.TokenBlock.pre
    monkeypatch.setattr(kernels.TokenBlock, "pre", lambda self, *a, **k: used.append(1) or orig(self, *a, **k))
    monkeypatch.setenv("SEGANY_TOKEN_KERNELS", "0")
    off = _click_outputs(sam, True, monkeypatch)
    assert not used
    monkeypatch.delenv("SEGANY_TOKEN_KERNELS")
    on = _click_outputs(sam, True, monkeypatch)
    assert used
    torch.testing.assert_close(on[1], off[1], rtol=1e-5, atol=1e-6)


@needs_token_kernels
def test_token_kernel_plans_do_not_keep_a_dropped_model_alive(monkeypatch):
    import gc
    import weakref

    sam = _model(TINY_VIT)
    _click_outputs(sam, True, monkeypatch)
    decoder = weakref.ref(sam.mask_decoder)
    heads = [weakref.ref(m) for m in (sam.mask_decoder.iou_prediction_head, *sam.mask_decoder.output_hypernetworks_mlps)]
    del sam
    gc.collect()
    assert decoder() is None and all(h() is None for h in heads)
