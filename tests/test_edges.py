"""Edge snapping (segany.edges): it moves an outline onto the image's edge, keeps
shapes and dtypes, and is reachable from Segmenter, ``segany segment --snap-edges`` and the
benchmark's ``SamMethod(snap_edges=True)``."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from core_helpers import TINY_VIT, config_safetensors, test_image
from segany import edges as R
from segany.cli import main


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def step_scene(h=80, w=120, edge=60, seed=0):
    """A noisy photo, dark left of column ``edge`` and bright from it on, and the true mask."""
    rng = np.random.default_rng(seed)
    gray = np.where(np.arange(w)[None, :] >= edge, 200.0, 60.0) + rng.normal(0, 6, (h, w))
    image = np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    truth = np.zeros((h, w), bool)
    truth[:, edge:] = True
    return image, truth


def test_guided_filter_keeps_the_guides_own_edges_and_smooths_flat_regions():
    image, _ = step_scene()
    guide = image.astype(np.float32) / 255
    gray = np.ascontiguousarray(guide[..., 0])
    out = R.guided_filter(guide, gray, 4, 1e-4)  # filtering the guide by itself: edges kept
    assert np.abs(out - gray)[:, 50:70].max() < 0.05
    flat = R.guided_filter(np.full_like(guide, 0.5), gray, 4, 1e-3)  # a flat guide: a box mean
    assert flat[:, 20:40].std() < gray[:, 20:40].std() / 3
    # a colour edge with no change of brightness is still an edge
    rgb = np.zeros((40, 60, 3), np.float32)
    rgb[:, :30] = (0.6, 0.2, 0.2)
    rgb[:, 30:] = (0.2, 0.4, 0.33)  # about the same luminance as the left side
    x = np.arange(60, dtype=np.float32)
    ramp = np.broadcast_to(1 / (1 + np.exp(-(x - 27) / 3)), (40, 60)).astype(np.float32)  # misses it by 3 px
    assert np.all(np.argmax(R.guided_filter(rgb, ramp, 8, 1e-3) > 0.5, axis=1) == 30)


def test_snap_moves_an_outline_that_misses_the_edge_onto_it():
    image, truth = step_scene()
    for miss in (-4, 3):  # the model's edge a few pixels left / right of the image's
        x = np.arange(image.shape[1], dtype=np.float32)
        logits = np.broadcast_to((x - (60 + miss)) * 3.0, truth.shape).astype(np.float32)
        plain = logits > 0
        refined = R.snap_to_edges(image, logits, radius=8)  # corrects misses up to about radius / 2
        assert refined.dtype == bool and refined.shape == truth.shape
        assert iou(plain, truth) < 0.96
        assert iou(refined, truth) > 0.99, miss


def test_snap_on_a_large_photo_fits_on_a_shrunk_image_and_still_lands_on_the_edge():
    image, truth = step_scene(h=600, w=900, edge=450, seed=1)
    x = np.arange(900, dtype=np.float32)
    logits = np.broadcast_to((x - 444) * 0.75, truth.shape).astype(np.float32)  # SAM's slope, 6 px off
    snapped = R.snap_to_edges(image, logits, radius=16)  # radius 16: fitted 4x shrunk
    assert iou(logits > 0, truth) < 0.99 and iou(snapped, truth) > 0.998
    p = (1 / (1 + np.exp(-logits / R.DEFAULT_TEMPERATURE))).astype(np.float32)
    exact = R.guided_filter(image.astype(np.float32) / 255, p, 16, R.DEFAULT_EPS) > 0.5
    assert iou(snapped, exact) > 0.995


def test_snap_handles_stacks_and_rejects_bad_input():
    image, truth = step_scene()
    logits = np.stack([np.where(truth, 8.0, -8.0), np.full(truth.shape, -8.0)]).astype(np.float32)
    out = R.snap_to_edges(image, logits, radius=3)
    assert out.shape == (2, *truth.shape)
    assert iou(out[0], truth) > 0.99 and not out[1].any()  # a confident mask stays, empty stays empty
    with pytest.raises(ValueError, match="image is 120x80 but the logits are 40x30"):
        R.snap_to_edges(image, np.zeros((30, 40), np.float32), radius=3)
    bad = logits[0].copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        R.snap_to_edges(image, bad, radius=3)
    with pytest.raises(ValueError, match="RGB"):
        R.snap_to_edges(np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4), np.float32), radius=1)
    assert R.logit_radius((512, 384, 3), 128) == 6 and R.logit_radius((10, 10), 256) == 1
    assert R.logit_radius((512, 384, 3), 128, logits=1) == 4


def test_snap_only_filters_where_the_mask_is_in_doubt():
    # outside the band where the logits are not saturated the result is the plain threshold,
    # and inside it the same as filtering the whole image
    image, truth = step_scene(h=200, w=300, edge=150)
    x = np.arange(300, dtype=np.float32)
    logits = np.broadcast_to((x - 147) * 3.0, truth.shape).astype(np.float32).copy()
    logits[:, :100] = -40.0
    logits[:, 200:] = 40.0
    banded = R.snap_to_edges(image, logits, radius=4)
    p = 1 / (1 + np.exp(-np.clip(logits / R.DEFAULT_TEMPERATURE, -30, 30)))
    whole = R.guided_filter(image.astype(np.float32) / 255, p.astype(np.float32), 4, R.DEFAULT_EPS) > 0.5
    assert np.array_equal(banded, whole)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("edges")
    Image.fromarray(test_image(90, 120, seed=4)).save(d / "photo.png")
    config_safetensors(TINY_VIT, d / "model.safetensors", seed=5)
    return d


def test_segmenter_snap_edges_keeps_scores_and_logits_and_needs_the_image(files, tmp_path):
    from segany.predictor import Segmenter

    seg = Segmenter(str(files / "model.safetensors"))
    image = seg.set_image(str(files / "photo.png"))
    plain = seg.predict(points=[(60, 40)])
    refined = seg.predict(points=[(60, 40)], snap_edges=True)
    assert refined.masks.shape == plain.masks.shape and refined.masks.dtype == bool
    assert np.array_equal(refined.scores, plain.scores) and np.array_equal(refined.logits, plain.logits)
    full = seg.predictor.predict(np.array([[60.0, 40.0]]), np.array([1]), return_logits=True)[0]
    radius = R.logit_radius(image.shape, plain.logits.shape[-1])
    assert np.array_equal(refined.masks, R.snap_to_edges(image, full, radius))
    seg.save_embedding(tmp_path / "e.pt")
    seg.load_embedding(tmp_path / "e.pt")
    with pytest.raises(RuntimeError, match="snap_edges needs the image"):
        seg.predict(points=[(60, 40)], snap_edges=True)
    with pytest.raises(ValueError, match="made from a 120x90 image"):
        seg.load_embedding(tmp_path / "e.pt", image=image[:50])
    seg.load_embedding(tmp_path / "e.pt", image=image)
    assert np.array_equal(seg.predict(points=[(60, 40)], snap_edges=True).masks, refined.masks)


def test_cli_segment_snap_edges_writes_the_snapped_mask(files, tmp_path, capsys):
    from segany.predictor import Segmenter

    out, emb = tmp_path / "m.png", tmp_path / "e.pt"
    common = ["--point", "60,40", "--checkpoint", str(files / "model.safetensors"), "--snap-edges"]
    assert main(["segment", str(files / "photo.png"), *common, "-o", str(out)]) == 0, capsys.readouterr().err
    seg = Segmenter(str(files / "model.safetensors"))
    seg.set_image(str(files / "photo.png"))
    want = seg.predict(points=[(60, 40)], snap_edges=True).best
    assert np.array_equal(np.asarray(Image.open(out)) > 0, want)
    # from a saved embedding: the image file is at hand, so snapping works the same
    assert main(["embed", str(files / "photo.png"), "-o", str(emb), "--checkpoint", str(files / "model.safetensors")]) == 0
    assert main(["segment", str(files / "photo.png"), *common, "-o", str(out), "--embedding", str(emb)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)) > 0, want)


def test_sam_method_snap_edges_returns_snapped_masks_and_feeds_back_the_models_logits(files):
    from segany.checkpoints import load_model
    from segany.evaluate.metrics import Click
    from segany.evaluate.methods import SamMethod

    model = load_model(str(files / "model.safetensors"))
    plain, refined = SamMethod(model), SamMethod(model, snap_edges=True)
    assert refined.name == plain.name + "+edges"
    image = np.asarray(Image.open(files / "photo.png").convert("RGB"))
    clicks = [Click(60, 40, True), Click(20, 70, False)]
    for m in (plain, refined):
        m.set_image(image)
        m.predict_clicks(clicks[:1])
    assert np.array_equal(plain._logits, refined._logits)
    full = plain._predict_clicks(clicks, full_logits=True)  # the same second click, unrefined
    second = refined.predict_clicks(clicks)
    assert np.array_equal(plain._logits, refined._logits)  # the loop runs on the model's logits
    assert second.dtype == bool and second.shape == image.shape[:2]
    radius = R.logit_radius(image.shape, 4 * refined.predictor.features.shape[-1])
    assert np.array_equal(second, R.snap_to_edges(image, full, radius))
    box = refined.predict_box(np.array([30, 20, 90, 70]))
    assert box.dtype == bool and box.shape == image.shape[:2]


def test_snap_masks_moves_a_binary_outline_onto_the_edge():
    image, truth = step_scene()
    coarse = np.zeros_like(truth)
    coarse[:, 57:] = True  # 3 px off, no logits
    snapped = R.snap_masks(image, np.stack([coarse, np.zeros_like(coarse)]), radius=8)
    assert iou(coarse, truth) < 0.96 and iou(snapped[0], truth) > 0.99 and not snapped[1].any()


def test_generator_snap_edges_snaps_the_final_masks(files):
    from segany.automatic import SamAutomaticMaskGenerator
    from segany.checkpoints import load_model

    model = load_model(str(files / "model.safetensors"))
    image = np.asarray(Image.open(files / "photo.png").convert("RGB"))
    kw = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    plain = SamAutomaticMaskGenerator(model, **kw).generate(image)
    snapped = SamAutomaticMaskGenerator(model, snap_edges=True, **kw).generate(image)
    assert len(plain) > 0
    radius = R.logit_radius(image.shape, model.prompt_encoder.mask_input_size[0])
    want = [m for m in R.snap_masks(image, np.stack([r["segmentation"] for r in plain]), radius) if m.any()]
    assert len(snapped) == len(want)
    for rec, m in zip(snapped, want):
        assert np.array_equal(rec["segmentation"], m) and rec["area"] == int(m.sum())
        ys, xs = np.nonzero(m)
        assert rec["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
    gen = SamAutomaticMaskGenerator(model, snap_edges=True, **kw)
    gen.predictor.set_image(image)
    with pytest.raises(ValueError, match="snap_edges needs the image"):
        gen.generate_from_embedding()


def test_generator_snap_edges_window_follows_each_masks_crop(files):
    # a mask from a crop layer had finer logits than the whole image's: its window is its crop's
    from segany.automatic import SamAutomaticMaskGenerator
    from segany.checkpoints import load_model

    model = load_model("tiny")  # the bundled model: real masks (a random model's are empty)
    photo = Image.open(os.path.join(os.path.dirname(__file__), "..", "examples", "cat.png")).convert("RGB")
    image = np.asarray(photo.resize((photo.width // 2, photo.height // 2)))
    kw = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, crop_n_layers=1)
    plain = SamAutomaticMaskGenerator(model, **kw).generate(image)
    snapped = SamAutomaticMaskGenerator(model, snap_edges=True, **kw).generate(image)
    low_res = model.prompt_encoder.mask_input_size[0]
    radii = [R.logit_radius((max(r["crop_box"][2:]),) * 2, low_res) for r in plain]
    assert len(set(radii)) > 1 and all(r["area"] for r in plain)  # masks from the whole image and from crops
    want = [m for m in (R.snap_masks(image, r["segmentation"][None], rad)[0] for r, rad in zip(plain, radii)) if m.any()]
    assert len(snapped) == len(want)
    for rec, m in zip(snapped, want):
        assert np.array_equal(rec["segmentation"], m)
