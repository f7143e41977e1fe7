"""SamAutomaticMaskGenerator: the cell upscaler against the full-size computation, and the whole
generator against the reference ``segment_anything`` 1.0 on the same random weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segany import masks as M
from segany.automatic import CellUpscaler, SamAutomaticMaskGenerator
from segany.modeling.build import build_sam, randomize_

from core_helpers import TINY_VIT, reference_model


def _full_upscale(low, img_size, input_size, original_size):
    # the reference's Sam.postprocess_masks
    x = F.interpolate(low[:, None], (img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, original_size, mode="bilinear", align_corners=False)[:, 0]


def _logits(n, side, seed):
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.randn(n, 1, 6, 6, generator=g) * 4, (side, side), mode="bicubic", align_corners=False)[:, 0]
    noisy = torch.randn(n, side, side, generator=g) * 2
    out = torch.cat([smooth, noisy, smooth + 0.3 * noisy])
    out[0] = -5.0  # empty at every threshold
    out[1] = 5.0  # full
    out[2, side // 2, side // 3] = 50  # a single positive bump in a negative map
    out[2] = torch.where(out[2] == 50, out[2], torch.full_like(out[2], -3.0))
    return out


@pytest.mark.parametrize(
    "side,img_size,original",
    [(32, 128, (150, 200)), (32, 128, (61, 47)), (32, 128, (128, 128)), (64, 256, (300, 97)), (256, 1024, (333, 517))],
)
@pytest.mark.parametrize("native", [True, False], ids=["native", "pytorch"])
def test_cell_upscaler_equals_full_computation(side, img_size, original, native):
    from segany.transforms import ResizeLongestSide

    input_size = ResizeLongestSide.get_preprocess_shape(*original, img_size)
    low = _logits(4, side, seed=side + original[0])
    up = CellUpscaler(side, img_size, input_size, original)
    up.prefer_native = native
    full = _full_upscale(low, img_size, input_size, original)
    for offset in (1.0, 0.5, 0.0):
        stab, boxes = up.stats(low, 0.0, offset)
        ref_stab = M.stability_score(full, 0.0, offset)
        union = (full > -offset).sum((1, 2)).clamp(min=1)
        # a pixel whose logit lies within float32 rounding of a threshold may count differently
        tol = 2.5 / union
        both_nan = ref_stab.isnan() & stab.isnan()
        assert (both_nan | ((stab - ref_stab).abs() <= tol)).all(), (stab, ref_stab)
    ref_boxes = M.masks_to_boxes(full > 0)
    assert (boxes - ref_boxes).abs().max() <= 1  # float rounding can move a contour pixel
    assert (boxes != ref_boxes).any(1).float().mean() < 0.1
    masks = up.masks(low, 0.0)
    ref = full > 0
    assert masks.shape == ref.shape
    diff = (masks != ref).sum((1, 2))
    assert int(diff.max()) <= 2, diff  # pixels whose logit rounds across 0 differently
    assert torch.equal(boxes[:2], torch.tensor([[0, 0, 0, 0], [0, 0, original[1] - 1, original[0] - 1]]))


@pytest.fixture(scope="module")
def models():
    ours = randomize_(build_sam(TINY_VIT), seed=1, std=0.5)  # std 0.5: logits of a useful scale
    ref = reference_model(TINY_VIT)
    ref.load_state_dict(ours.state_dict())
    import segment_anything

    return ours, ref, segment_anything


def _image(h, w, seed=0):
    g = np.random.default_rng(seed)
    img = (g.random((h, w, 3)) * 60).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(6):
        cy, cx, r = g.integers(0, h), g.integers(0, w), g.integers(5, max(h, w) // 3)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = g.integers(0, 255, 3)
    return img


def _match(ours, ref, h, w):
    """Pair records by (point, predicted IoU) and check the parity criteria."""
    assert len(ours) == len(ref)
    groups = {}
    for side, recs in ((0, ours), (1, ref)):
        for r in recs:
            k = (tuple(np.round(r["point_coords"][0], 3)), tuple(int(v) for v in r["crop_box"]))
            groups.setdefault(k, ([], []))[side].append(r)
    pairs = []
    for k, (a, b) in groups.items():
        assert len(a) == len(b), f"point {k}: {len(a)} masks here, {len(b)} in the reference"
        a = sorted(a, key=lambda r: r["predicted_iou"])
        b = sorted(b, key=lambda r: r["predicted_iou"])
        pairs += list(zip(a, b))
    worst = 1.0
    for a, b in pairs:
        sa = M.decode_rle(a["segmentation"]) if isinstance(a["segmentation"], dict) else a["segmentation"]
        sb = M.decode_rle(b["segmentation"]) if isinstance(b["segmentation"], dict) else b["segmentation"]
        assert sa.shape == sb.shape == (h, w)
        union = (sa | sb).sum()
        iou = (sa & sb).sum() / union if union else 1.0
        worst = min(worst, iou)
        assert abs(a["predicted_iou"] - b["predicted_iou"]) < 1e-4
        assert abs(a["stability_score"] - b["stability_score"]) <= 2.5 / max(a["area"], 1)
        assert abs(a["area"] - b["area"]) <= 2
        assert np.abs(np.subtract(a["bbox"], b["bbox"])).max() <= 1
        assert list(a["crop_box"]) == [int(v) for v in b["crop_box"]]  # the reference may give floats
        assert set(a) == set(b)
    assert worst >= 0.99
    return worst


CONFIGS = {
    "plain": dict(points_per_side=8, pred_iou_thresh=-5.0, stability_score_thresh=0.5, box_nms_thresh=1.0, points_per_batch=50),
    "crops+regions": dict(points_per_side=6, pred_iou_thresh=-5.0, stability_score_thresh=0.5, box_nms_thresh=1.0,
                          crop_n_layers=1, crop_nms_thresh=1.0, min_mask_region_area=30, output_mode="coco_rle"),
    "defaults_rle": dict(points_per_side=4, output_mode="uncompressed_rle", stability_score_offset=0.5, stability_score_thresh=0.8, pred_iou_thresh=0.0),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_generator_matches_reference(models, name):
    ours, ref, sa = models
    kw = CONFIGS[name]
    h, w = (90, 130) if name != "crops+regions" else (100, 80)
    img = _image(h, w, seed=len(name))
    a = SamAutomaticMaskGenerator(ours, **kw).generate(img)
    b = sa.SamAutomaticMaskGenerator(ref, **kw).generate(img)
    if name != "defaults_rle":
        assert len(b) >= 5, "test set-up lets too few masks through to be meaningful"
    _match(a, b, h, w)
    if kw.get("output_mode") == "coco_rle":
        assert all(isinstance(r["segmentation"]["counts"], str) for r in a)
    # ordering is the reference's too (NMS order)
    assert [r["predicted_iou"] for r in a] == pytest.approx([r["predicted_iou"] for r in b], abs=1e-4)


def test_pred_iou_filter_matches_reference(models):
    """A pred_iou_thresh that drops about half of the masks: segany never upscales the dropped
    ones (the IoU head runs first), and the survivors are still the reference's."""
    import copy

    ours, ref = (copy.deepcopy(m) for m in models[:2])
    sa = models[2]
    h, w = 90, 130
    img = _image(h, w, seed=11)
    kw = dict(points_per_side=8, stability_score_thresh=0.5, box_nms_thresh=1.0)
    everything = sa.SamAutomaticMaskGenerator(ref, pred_iou_thresh=-5.0, **kw).generate(img)
    ious = np.array([r["predicted_iou"] for r in everything])
    # the reference filters only with a positive threshold: shift the IoU head's output (same
    # change on both models) so that the median prediction is 0.5
    shift = 0.5 - float(np.median(ious))
    with torch.no_grad():
        for m in (ours, ref):
            m.mask_decoder.iou_prediction_head.layers[-1].bias += shift
    thresh = 0.5
    everything = sa.SamAutomaticMaskGenerator(ref, pred_iou_thresh=-5.0, **kw).generate(img)
    a = SamAutomaticMaskGenerator(ours, pred_iou_thresh=thresh, **kw).generate(img)
    b = sa.SamAutomaticMaskGenerator(ref, pred_iou_thresh=thresh, **kw).generate(img)
    assert 5 <= len(b) < len(everything)
    _match(a, b, h, w)


@pytest.mark.parametrize("output_mode", ["coco_rle", "binary_mask"])
def test_generate_from_embedding_equals_generate(models, output_mode):
    """On a predictor that already holds the image, ``generate_from_embedding`` gives exactly the
    records of a fresh ``generate`` on that image, and leaves the predictor's image in place."""
    from segany.predictor import SamPredictor

    ours = models[0]
    img = _image(90, 130, seed=5)
    kw = dict(points_per_side=8, pred_iou_thresh=-5.0, stability_score_thresh=0.5, box_nms_thresh=1.0, min_mask_region_area=20, output_mode=output_mode)
    p = SamPredictor(ours)
    gen = SamAutomaticMaskGenerator(p, **kw)
    fresh = gen.generate(img)
    assert len(fresh) >= 5 and not p.is_image_set
    p.set_image(img)
    features = p.features.clone()
    again = gen.generate_from_embedding()
    assert p.is_image_set and torch.equal(p.features, features)
    # a predictor given only the embedding (as the server's cache holds it) gives the same too
    q = SamPredictor(ours)
    q.set_embedding(features, p.original_size, p.input_size)
    other = SamAutomaticMaskGenerator(q, **kw).generate_from_embedding()
    for recs in (again, other):
        assert len(recs) == len(fresh)
        for a, b in zip(recs, fresh):
            assert set(a) == set(b)
            for k in a:
                if isinstance(a[k], np.ndarray):
                    np.testing.assert_array_equal(a[k], b[k])
                else:
                    assert a[k] == b[k], k

    with pytest.raises(RuntimeError, match="set_image"):
        SamAutomaticMaskGenerator(SamPredictor(ours), points_per_side=2).generate_from_embedding()
    with pytest.raises(ValueError, match="crop_n_layers"):
        SamAutomaticMaskGenerator(p, points_per_side=2, crop_n_layers=1).generate_from_embedding()


def test_decode_workers_give_the_serial_results_and_restore_threads(models, monkeypatch):
    """Batches decoded on 2 worker threads (PyTorch single-threaded meanwhile) give the serial
    records; PyTorch's thread count is restored afterwards, also when a batch fails."""
    from segany import automatic, kernels

    if not kernels.available():
        pytest.skip("the threaded path needs the native upscale kernel")
    ours = models[0]
    img = _image(90, 130, seed=3)
    kw = dict(points_per_side=8, pred_iou_thresh=-5.0, stability_score_thresh=0.5, box_nms_thresh=1.0, points_per_batch=16)
    calls = []
    real = automatic._map_single_threaded
    monkeypatch.setattr(automatic, "_map_single_threaded", lambda fn, items, n: calls.append(n) or real(fn, items, n))
    before = torch.get_num_threads()
    serial = SamAutomaticMaskGenerator(ours, decode_workers=1, **kw).generate(img)
    assert calls == []
    threaded = SamAutomaticMaskGenerator(ours, decode_workers=2, **kw).generate(img)
    assert calls == [2] and torch.get_num_threads() == before
    assert len(serial) >= 5
    _match(threaded, serial, 90, 130)

    gen = SamAutomaticMaskGenerator(ours, decode_workers=2, **kw)
    real_decode = gen.predictor.decode

    def failing(*a, **k):
        if len(calls) == 2:
            calls.append("failed")
            raise RuntimeError("decoder failed")
        return real_decode(*a, **k)

    monkeypatch.setattr(gen.predictor, "decode", failing)
    with pytest.raises(RuntimeError, match="decoder failed"):
        gen.generate(img)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="decode_workers"):
        SamAutomaticMaskGenerator(ours, decode_workers=0)


def test_generator_bad_arguments(models):
    ours = models[0]
    with pytest.raises(ValueError, match="Exactly one"):
        SamAutomaticMaskGenerator(ours, points_per_side=None)
    with pytest.raises(ValueError, match="output_mode"):
        SamAutomaticMaskGenerator(ours, output_mode="png")
    with pytest.raises(ValueError, match="points_per_batch"):
        SamAutomaticMaskGenerator(ours, points_per_batch=0)
    with pytest.raises(ValueError, match="one grid per layer"):
        SamAutomaticMaskGenerator(ours, points_per_side=None, point_grids=[np.full((4, 2), 0.5)], crop_n_layers=1)
    with pytest.raises(ValueError, match="pred_iou_thresh must be a finite"):
        SamAutomaticMaskGenerator(ours, pred_iou_thresh=float("nan"))
    with pytest.raises(ValueError, match="stability_score_offset must be a finite"):
        SamAutomaticMaskGenerator(ours, stability_score_offset=float("inf"))
    g = SamAutomaticMaskGenerator(ours, points_per_side=2)
    with pytest.raises(ValueError, match="image is empty"):
        g.generate(np.zeros((0, 5, 3), np.uint8))


def _steep_smooth(n, side, seed):
    # trained-SAM-like logits: smooth, with steep contours (tens of logits per low-res pixel)
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, 1, 5, 5, generator=g) * 200, (side, side), mode="bicubic", align_corners=False)[:, 0]


@pytest.mark.parametrize("kind", ["smooth", "noisy"])
def test_adaptive_paths_agree_bitwise(kind):
    """Contour cells and the direct (chunked) upscale are the same float32 operations: forcing
    either path gives identical statistics, boxes and masks; the adaptive choice takes the cells
    for smooth logits and falls back to the direct upscale for noisy ones."""
    from segany.transforms import ResizeLongestSide

    side, img_size, original = 64, 256, (150, 211)
    input_size = ResizeLongestSide.get_preprocess_shape(*original, img_size)
    if kind == "smooth":
        low = _steep_smooth(6, side, seed=3)
    else:
        low = torch.randn(6, side, side, generator=torch.Generator().manual_seed(4)) * 3
    # (a small image has few cells, so its contours cover a larger fraction than at SAM's sizes)
    up = CellUpscaler(side, img_size, input_size, original, chunk_bytes=1 << 16, dense_fraction=0.3)
    up.prefer_native = False  # the PyTorch paths; the native kernel is compared at the end
    stab, boxes = up.stats(low, 0.0, 1.0)
    pruned, by_cells, direct = up.last_split
    if kind == "smooth":
        assert by_cells == len(low) and direct == 0
    else:
        assert direct == len(low) and by_cells == 0
    results = []
    for frac in (-1.0, 2.0):  # everything direct, everything by cells
        up.dense_fraction = frac
        results.append(up.stats(low, 0.0, 1.0))
    assert up.last_split[1] == len(low)
    for s, b in results:
        assert torch.equal(s.nan_to_num(-1), stab.nan_to_num(-1)) and torch.equal(b, boxes)
    full = up.full(low)
    assert torch.equal(up.masks(low, 0.0), full > 0)
    assert torch.equal(boxes, M.masks_to_boxes(full > 0))
    assert torch.equal(stab.nan_to_num(-1), M.stability_score(full, 0.0, 1.0).nan_to_num(-1))
    # and the official two-step upscale, up to float32 rounding
    ref = _full_upscale(low, img_size, input_size, original)
    assert int((ref > 0).ne(full > 0).sum((1, 2)).max()) <= 2
    assert (boxes - M.masks_to_boxes(ref > 0)).abs().max() <= 1
    # the fused native kernel: the same float32 operations, so the same bits
    if up.native() is not None:
        up.prefer_native = True
        s, b = up.stats(low, 0.0, 1.0)
        assert up.last_split == (0, 0, len(low))
        assert torch.equal(s.nan_to_num(-1), stab.nan_to_num(-1)) and torch.equal(b, boxes)
        assert torch.equal(up.full(low), full)
        assert torch.equal(up.masks(low, 0.0), full > 0)


def test_stability_bound_prunes_with_the_same_decisions():
    from segany.transforms import ResizeLongestSide

    side, img_size, original = 64, 256, (120, 170)
    input_size = ResizeLongestSide.get_preprocess_shape(*original, img_size)
    g = torch.Generator().manual_seed(5)
    low = torch.cat([_steep_smooth(8, side, seed=6), _steep_smooth(8, side, seed=7) * 0.01, torch.randn(4, side, side, generator=g)])
    up = CellUpscaler(side, img_size, input_size, original)
    up.prefer_native = False  # the bound belongs to the cell analysis of the PyTorch path
    exact, boxes = up.stats(low, 0.0, 1.0)
    for thresh in (0.5, 0.9, 0.97):
        s, b = up.stats(low, 0.0, 1.0, min_stability=thresh)
        assert torch.equal(s >= thresh, exact >= thresh)
        keep = exact >= thresh
        assert torch.equal(s[keep], exact[keep]) and torch.equal(b[keep], boxes[keep])
    assert up.last_split[0] > 0  # some masks were decided from the cell counts alone


def test_survivor_logits_are_gathered_like_a_concatenation():
    from segany.automatic import _gather_rows

    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 4, 4, generator=g) for n in (3, 0, 5, 1)]
    index = torch.tensor([8, 0, 4, 2, 3])  # NMS order: not sorted, spans every non-empty chunk
    assert torch.equal(_gather_rows(chunks, index), torch.cat(chunks)[index])
    assert _gather_rows(chunks, torch.tensor([], dtype=torch.long)).shape == (0, 4, 4)
