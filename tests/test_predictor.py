"""Predictor behaviour beyond single-prompt parity: batched prompts, mask feedback, saved
embeddings, and prompt validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core_helpers import TINY_VIT, reference_model, test_image
from reference import load_reference
from segany.modeling.build import build_sam, randomize_
from segany.predictor import PromptError, SamPredictor, Segmenter, load_embedding_file

H, W = 90, 140


@pytest.fixture(scope="module")
def models():
    ours = randomize_(build_sam(TINY_VIT), seed=21)
    ref = reference_model(TINY_VIT)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.fixture(scope="module")
def predictors(models):
    sa, _ = load_reference()
    ours, ref = models
    p, r = SamPredictor(ours), sa.SamPredictor(ref)
    image = test_image(H, W, seed=5)
    p.set_image(image)
    r.set_image(image)
    return p, r


def close(a, b, rel=1e-4):  # float32 reordering noise relative to the tensor's scale; see test_parity.py
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and np.abs(a - b).max() <= rel * max(1e-12, np.abs(b).max())


def test_batched_boxes_match_reference_and_single_calls(predictors):
    p, r = predictors
    boxes = np.array([[5, 5, 60, 50], [30, 20, 130, 85], [0, 0, 140, 90], [70, 10, 100, 40]], dtype=np.float64)
    bt = torch.as_tensor(p.transform.apply_boxes(boxes, p.original_size), dtype=torch.float)
    m1, s1, l1 = p.predict_torch(None, None, boxes=bt, multimask_output=False, return_logits=True)
    m2, s2, l2 = r.predict_torch(None, None, boxes=bt, multimask_output=False, return_logits=True)
    assert m1.shape == (4, 1, H, W) and s1.shape == (4, 1) and l1.shape[:2] == (4, 1)
    assert close(s1, s2) and close(l1, l2) and close(m1, m2)
    for i, box in enumerate(boxes):  # a batch row equals the same prompt on its own
        _, s, l = p.predict(box=box, multimask_output=False)
        assert close(s, s1[i]) and close(l, l1[i])


def test_batched_point_sets_match_reference(predictors):
    p, r = predictors
    pts = np.array([[[10, 10], [50, 40]], [[100, 70], [20, 80]], [[70, 45], [71, 46]]], dtype=np.float64)
    labels = torch.tensor([[1, 0], [1, 1], [1, -1]])
    pt = torch.as_tensor(p.transform.apply_coords(pts, p.original_size), dtype=torch.float)
    m1, s1, l1 = p.predict_torch(pt, labels, multimask_output=True)
    m2, s2, l2 = r.predict_torch(pt, labels, multimask_output=True)
    assert m1.shape == (3, 3, H, W) and m1.dtype == torch.bool
    assert close(s1, s2) and close(l1, l2)
    agree = (m1 == m2).float().mean().item()
    assert agree > 0.999


def test_prompt_encoder_matches_reference_exactly(models):
    """The sparse embeddings of points (labels 1, 0, -1, a box-corner label 2 and an invalid
    -3, which add nothing), boxes, both, and batches: the reference's values to the bit, in
    inference (numpy's path) and with autograd (PyTorch's), and gradients reach every embedding a
    label picks (training goes through the same code)."""
    ours, ref = models
    pe_o, pe_r = ours.prompt_encoder, ref.prompt_encoder
    g = torch.Generator().manual_seed(3)
    pts = torch.rand(3, 4, 2, generator=g) * 128
    labels = torch.tensor([[1, 0, -1, 1], [0, 0, 1, 2], [-1, 1, -3, 0]])
    boxes = torch.rand(3, 4, generator=g).sort(-1).values * 128
    with torch.no_grad():
        for kw in (dict(points=(pts, labels), boxes=None), dict(points=None, boxes=boxes), dict(points=(pts, labels), boxes=boxes),
                   dict(points=(pts[:1, :1], labels[:1, :1]), boxes=None)):
            (so, do), (sr, dr) = pe_o(**kw, masks=None), pe_r(**kw, masks=None)
            assert so.shape == sr.shape and torch.equal(so, sr), kw.keys()
            assert torch.equal(do, dr)
            with torch.enable_grad():
                assert torch.equal(pe_o(**kw, masks=None)[0], sr), kw.keys()
    ours.zero_grad()
    sparse, _ = pe_o(points=(pts[:1, :3], labels[:1, :3]), boxes=None, masks=None)
    sparse.square().sum().backward()
    for e in (pe_o.point_embeddings[0], pe_o.point_embeddings[1], pe_o.not_a_point_embed):
        assert e.weight.grad is not None and e.weight.grad.abs().sum() > 0
    assert pe_o.point_embeddings[2].weight.grad is None or pe_o.point_embeddings[2].weight.grad.abs().sum() == 0
    ours.zero_grad()


def test_mask_feedback_changes_result_and_matches_reference(predictors):
    p, r = predictors
    kw = dict(point_coords=np.array([[70.0, 45.0]]), point_labels=np.array([1]))
    _, s, low = p.predict(**kw)
    feed = low[int(np.argmax(s))][None]
    a = p.predict(**kw, mask_input=feed, multimask_output=False, return_logits=True)
    b = r.predict(**kw, mask_input=feed, multimask_output=False, return_logits=True)
    assert all(close(x, y) for x, y in zip(a, b))
    plain = p.predict(**kw, multimask_output=False, return_logits=True)
    assert not close(plain[2], a[2], rel=1e-3)  # the feedback is actually used


def test_segmenter_saved_embedding_gives_identical_masks(models, tmp_path):
    ours, _ = models
    seg = Segmenter(ours)
    seg.set_image(test_image(H, W, seed=6))
    first = seg.predict(points=[(40, 30)])
    second = seg.predict(points=[(40, 30), (100, 60)], labels=[1, 0], mask=first.best_logits)
    seg.save_embedding(tmp_path / "e.pt")

    other = Segmenter(ours)
    other.load_embedding(tmp_path / "e.pt")
    again1 = other.predict(points=[(40, 30)])
    again2 = other.predict(points=[(40, 30), (100, 60)], labels=[1, 0], mask=again1.best_logits[0])  # 2-D mask ok
    for x, y in ((first, again1), (second, again2)):
        assert np.array_equal(x.masks, y.masks) and np.array_equal(x.scores, y.scores)
    assert first.masks.shape == (3, H, W) and second.masks.shape == (1, H, W)


def test_embedding_file_errors(tmp_path):
    (tmp_path / "x.pt").write_text("nope")
    with pytest.raises(ValueError, match="not a segany embedding"):
        load_embedding_file(tmp_path / "x.pt")
    torch.save({"features": torch.zeros(1)}, tmp_path / "y.pt")
    with pytest.raises(ValueError, match="missing features/original_size/input_size"):
        load_embedding_file(tmp_path / "y.pt")


def test_predict_before_image_is_set(models):
    with pytest.raises(RuntimeError, match="set_image"):
        SamPredictor(models[0]).predict(point_coords=np.array([[1.0, 1.0]]), point_labels=np.array([1]))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(point_coords=np.array([[np.nan, 3.0]]), point_labels=np.array([1])), "point_coords contains NaN"),
        (dict(point_coords=np.array([[np.inf, 3.0]]), point_labels=np.array([1])), "NaN or infinite"),
        (dict(point_coords=np.array([1.0, 2.0]), point_labels=np.array([1])), r"shape \(N, 2\)"),
        (dict(point_coords=np.array([[1.0, 2.0, 3.0]]), point_labels=np.array([1])), r"shape \(N, 2\)"),
        (dict(point_coords=np.array([[1.0, 2.0]]), point_labels=np.array([1, 1])), r"point_labels must have shape \(1,\)"),
        (dict(point_coords=np.array([[1.0, 2.0]]), point_labels=np.array([2])), r"1 \(foreground\), 0 \(background\) or -1"),
        (dict(point_coords=np.array([[1.0, 2.0]]), point_labels=np.array([0.5])), "point_labels must be"),
        (dict(point_coords=np.array([[1.0, 2.0]])), "point_labels must be supplied"),
        (dict(point_labels=np.array([1])), "without point_coords"),
        (dict(point_coords=np.array([[W + 1.0, 2.0]]), point_labels=np.array([1])), "outside the image"),
        (dict(point_coords=np.array([[-1.0, 2.0]]), point_labels=np.array([1])), "outside the image"),
        (dict(box=np.array([1.0, 2.0, 3.0])), "box must have 4 values"),
        (dict(box=np.array([50.0, 2.0, 10.0, 30.0])), "x0 <= x1"),
        (dict(box=np.array([0.0, 0.0, 10.0, H + 5.0])), "outside the image"),
        (dict(box=np.array([0.0, np.nan, 10.0, 10.0])), "box contains NaN"),
        (dict(box=np.array([0.0, 0.0, 10.0, 10.0]), mask_input=np.zeros((1, 16, 16))), "mask_input must have shape"),
        (dict(box=np.array([0.0, 0.0, 10.0, 10.0]), mask_input=np.full((1, 32, 32), np.nan)), "mask_input contains NaN"),
        (dict(point_coords=np.array([[1.0, 2.0]]), point_labels=np.array(["fg"])), "point_labels must be numbers"),
        (dict(point_coords=[["a", 2.0]], point_labels=[1]), "point_coords must be numbers"),
        (dict(box=["left", 0.0, 10.0, 10.0]), "box must be numbers"),
        (dict(box=np.array([0.0, 0.0, 10.0, 10.0]), mask_input=[[["x"]]]), "mask_input must be numbers"),
    ],
)
def test_bad_prompts_raise_prompt_error(predictors, kw, message):
    p, _ = predictors
    with pytest.raises(PromptError, match=message):
        p.predict(**kw)


@pytest.mark.parametrize("shape", [(3, 2000, 3), (2000, 2, 3)])
def test_extreme_aspect_ratio_strip_is_segmented(models, shape):
    """A strip so thin that resizing its long side rounds the short side to 0 still gets an
    embedding and full-size masks (the reference crashes in its resize there)."""
    p = SamPredictor(models[0])
    p.set_image(np.full(shape, 120, np.uint8))
    assert min(p.input_size) == 1
    masks, scores, _ = p.predict(point_coords=np.array([[1.0, 1.0]]), point_labels=np.array([1]))
    assert masks.shape == (3,) + shape[:2] and np.isfinite(scores).all()
