"""segany.masks against pycocotools, the reference's amg utilities and brute force."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

from segany import masks as M


def _cases():
    rng = np.random.default_rng(0)
    cases = {
        "empty": np.zeros((7, 5), bool),
        "full": np.ones((7, 5), bool),
        "one_pixel": np.pad(np.ones((1, 1), bool), ((3, 3), (2, 2))),
        "first_pixel": np.eye(6, 4, dtype=bool)[:, ::-1][::-1].copy(),
        "last_pixel": np.zeros((4, 6), bool),
        "single_row": rng.random((1, 37)) > 0.5,
        "single_col": rng.random((29, 1)) > 0.5,
        "borders": np.pad(np.zeros((5, 6), bool), 1, constant_values=True),
        "random_sparse": rng.random((33, 41)) > 0.9,
        "random_dense": rng.random((40, 31)) > 0.2,
        "blob": np.hypot(*np.mgrid[-30:30, -20:25]) < 15,
    }
    cases["last_pixel"][-1, -1] = True
    big = np.zeros((300, 200), bool)
    big[10:290, 5:195] = True  # long runs: multi-character deltas, negative deltas
    big[100:120, 50:60] = False
    cases["long_runs"] = big
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_rle_matches_pycocotools(name):
    m = CASES[name]
    ref = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
    ours = M.encode_rle(m)
    assert ours["size"] == list(ref["size"])
    assert ours["counts"] == ref["counts"].decode()
    assert isinstance(ours["counts"], str)
    np.testing.assert_array_equal(M.decode_rle(ours), m)
    np.testing.assert_array_equal(M.decode_rle({"size": ref["size"], "counts": ref["counts"]}), m)
    assert M.area_from_rle(ours) == int(coco_mask.area(ref)) == int(m.sum())
    # uncompressed: same counts pycocotools decodes from the same RLE
    unc = M.mask_to_rle(m)[0]
    assert sum(unc["counts"]) == m.size
    assert M.area_from_rle(unc) == int(m.sum())
    np.testing.assert_array_equal(M.rle_to_mask(unc), m)
    fr = coco_mask.frPyObjects(unc, *unc["size"])
    assert fr["counts"].decode() == ours["counts"]
    assert M.coco_to_rle(ours) == unc


def test_rle_batch_and_reference_amg():
    from reference import load_reference  # noqa: F401  (installs stand-ins)

    load_reference()
    from segment_anything.utils import amg

    rng = np.random.default_rng(1)
    masks = rng.random((6, 23, 17)) > 0.6
    masks[0] = False
    masks[1] = True
    ours = M.mask_to_rle(masks)
    ref = amg.mask_to_rle_pytorch(torch.as_tensor(masks))
    assert ours == ref
    for r, m in zip(ours, masks):
        np.testing.assert_array_equal(amg.rle_to_mask(r), m)
        assert M.area_from_rle(r) == amg.area_from_rle(r)
        assert M.rle_to_coco(r) == amg.coco_encode_rle(r)
    np.testing.assert_array_equal(M.decode_rle(M.encode_rle(masks)), masks)


def test_rle_bad_input():
    with pytest.raises(ValueError, match="sum"):
        M.rle_to_mask({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(ValueError):
        M.rle_to_mask({"size": [2, 2], "counts": "\x7f"})
    with pytest.raises(ValueError, match="shape"):
        M.mask_to_rle(np.zeros(5, bool))


def test_validate_rle_counts():
    m = np.zeros((6, 7), bool)
    m[1:4, 2:6] = True
    coco = M.encode_rle(m)
    unc = M.mask_to_rle(m)[0]
    assert M.validate_rle_counts(coco["counts"], 6, 7) == unc["counts"]
    assert M.validate_rle_counts(coco["counts"].encode(), 6, 7) == unc["counts"]
    assert M.validate_rle_counts(unc["counts"], 6, 7) == unc["counts"]
    assert M.validate_rle_counts([], 0, 5) == []
    bad = [
        (coco["counts"], 6, 8, "sum to"),  # wrong size
        (coco["counts"] + "0", 6, 7, "sum to"),  # an extra run
        ([40, 5], 6, 7, "sum to"),
        ([-5, 47], 6, 7, "negative"),
        ("\x7f\x7f", 6, 7, "invalid character"),
        ("o", 6, 7, "middle of a number"),  # continuation bit set on the last character
        ("o" * 14 + "0", 6, 7, "too large"),
    ]
    for counts, h, w, msg in bad:
        with pytest.raises(ValueError, match=msg):
            M.validate_rle_counts(counts, h, w)
        with pytest.raises(ValueError, match=msg):
            M.rle_to_mask({"size": [h, w], "counts": counts})


def test_boxes_and_stability_match_reference():
    from reference import load_reference

    load_reference()
    from segment_anything.utils import amg

    rng = np.random.default_rng(2)
    masks = torch.as_tensor(rng.random((2, 5, 19, 13)) > 0.97)
    masks[0, 0] = False
    masks[0, 1] = True
    masks[1, 2, 0, 0] = True
    masks[1, 3] = False
    masks[1, 3, -1, -1] = True
    assert torch.equal(M.masks_to_boxes(masks), amg.batched_mask_to_box(masks))
    logits = torch.randn(4, 30, 20) * 3
    torch.testing.assert_close(M.stability_score(logits, 0.0, 1.0), amg.calculate_stability_score(logits, 0.0, 1.0))
    b = torch.tensor([[1, 2, 5, 9], [0, 0, 0, 0]])
    assert M.box_xyxy_to_xywh(b).tolist() == [[1, 2, 4, 7], [0, 0, 0, 0]]


def _brute_nms(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python sort is stable
    keep = []
    for i in order:
        ok = True
        for j in keep:
            b1, b2 = boxes[i], boxes[j]
            iw = max(0.0, min(b1[2], b2[2]) - max(b1[0], b2[0]))
            ih = max(0.0, min(b1[3], b2[3]) - max(b1[1], b2[1]))
            inter = iw * ih
            a1 = (b1[2] - b1[0]) * (b1[3] - b1[1])
            a2 = (b2[2] - b2[0]) * (b2[3] - b2[1])
            if inter / (a1 + a2 - inter) > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", range(4))
def test_nms_matches_brute_force_and_reference_standin(seed):
    from reference import _batched_nms

    g = np.random.default_rng(seed)
    n = 200
    xy = g.integers(0, 50, (n, 2))
    wh = g.integers(1, 30, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = g.random(n).astype(np.float32)
    if seed % 2:
        scores = np.round(scores * 4) / 4  # many ties: stable order decides
    for thr in (0.0, 0.3, 0.7, 1.0):
        ours = M.nms(torch.as_tensor(boxes), torch.as_tensor(scores), thr).tolist()
        assert ours == _brute_nms(boxes.tolist(), scores.tolist(), thr)
        ref = _batched_nms(torch.as_tensor(boxes), torch.as_tensor(scores), torch.zeros(n), thr).tolist()
        assert ours == ref
    cats = torch.as_tensor(g.integers(0, 3, n))
    ours = M.batched_nms(torch.as_tensor(boxes), torch.as_tensor(scores), cats, 0.5)
    ref = _batched_nms(torch.as_tensor(boxes), torch.as_tensor(scores), cats, 0.5)
    assert sorted(ours.tolist()) == sorted(ref.tolist())
    assert M.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_remove_small_regions_matches_reference(mode):
    from reference import load_reference

    load_reference()
    from segment_anything.utils import amg

    g = np.random.default_rng(3)
    for _ in range(5):
        m = g.random((40, 50)) > 0.55
        for area in (1, 3, 10, 1000):
            ours, ch = M.remove_small_regions(m, area, mode)
            ref, ch_ref = amg.remove_small_regions(m, area, mode)
            assert ch == ch_ref
            np.testing.assert_array_equal(ours, ref)
    with pytest.raises(ValueError):
        M.remove_small_regions(m, 3, "both")
