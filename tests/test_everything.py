"""``segany everything``: outputs in every format, a bad image skipped and counted, exit codes;
SA-1B / COCO helpers round-trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from segany import formats
from segany import masks as M
from segany.cli import main

from core_helpers import TINY_VIT, config_safetensors, test_image

ARGS = ["--points-per-side", "4", "--pred-iou-thresh", "-100", "--stability-score-thresh", "0", "--box-nms-thresh", "1.0", "--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(config_safetensors(TINY_VIT, tmp_path_factory.mktemp("ck") / "tiny.safetensors", seed=1))


@pytest.fixture()
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(test_image(60, 80, seed=1)).save(d / "a.png")
    Image.fromarray(test_image(50, 40, seed=2)).save(d / "b.jpg")
    (d / "broken.png").write_bytes(b"not a png")
    return d


def test_sa1b_and_overlay(ckpt, images, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["everything", str(images), "-o", str(out), "--checkpoint", ckpt, "--overlay", *ARGS])
    assert rc == 1  # one image failed, the others were done
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "1 failed" in captured.out and "2 image(s) done" in captured.out
    data = formats.read_sa1b(out / "a.json", decode=True)
    assert data["image"]["width"] == 80 and data["image"]["height"] == 60
    assert data["annotations"], "no masks written"
    for ann in data["annotations"]:
        assert ann["mask"].shape == (60, 80)
        assert ann["area"] == int(ann["mask"].sum())
        assert set(ann) >= {"id", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"}
    assert Image.open(out / "a.overlay.png").size == (80, 60)
    assert not (out / "broken.json").exists()


def test_coco_and_png(ckpt, images, tmp_path):
    (images / "broken.png").unlink()
    out = tmp_path / "coco"
    assert main(["everything", str(images), "-o", str(out), "--checkpoint", ckpt, "--format", "coco", *ARGS]) == 0
    res = formats.read_coco_results(out / "results.json")
    ids = {r["image_id"] for r in res}
    assert ids == {0, 1}
    imgs = json.loads((out / "images.json").read_text())
    assert [i["width"] for i in imgs] == [80, 40]
    out2 = tmp_path / "png"
    assert main(["everything", str(images / "a.png"), "-o", str(out2), "--checkpoint", ckpt, "--format", "png", *ARGS]) == 0
    meta = json.loads((out2 / "a" / "masks.json").read_text())
    m = np.array(Image.open(out2 / "a" / meta["masks"][0]["file"])) > 0
    assert m.shape == (60, 80) and int(m.sum()) == meta["masks"][0]["area"]


def test_errors(ckpt, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"xx")
    assert main(["everything", str(bad), "-o", str(tmp_path / "o"), "--checkpoint", ckpt, *ARGS]) == 2  # nothing done
    assert main(["everything", str(bad), "-o", str(tmp_path / "o"), "--checkpoint", ckpt, "--points-per-side", "0"]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["everything", str(empty), "-o", str(tmp_path / "o"), "--checkpoint", ckpt]) == 2


def test_formats_roundtrip(tmp_path):
    g = np.random.default_rng(0)
    masks = g.random((3, 9, 7)) > 0.5
    recs = [{"segmentation": m, "area": int(m.sum()), "bbox": M.box_xyxy_to_xywh(M.masks_to_boxes(m)).tolist(), "predicted_iou": 0.9,
             "point_coords": [[1.0, 2.0]], "stability_score": 0.95, "crop_box": [0, 0, 7, 9]} for m in masks]
    formats.write_sa1b(tmp_path / "x.json", recs, 5, "x.jpg", 7, 9)
    back = formats.read_sa1b(tmp_path / "x.json", decode=True)
    for ann, m in zip(back["annotations"], masks):
        np.testing.assert_array_equal(ann["mask"], m)
    (tmp_path / "y.json").write_text('{"image": {"width": 7, "height": 9}, "annotations": [{"segmentation": {"size": [9, 8], "counts": "0"}}]}')
    with pytest.raises(formats.FormatError, match="size"):
        formats.read_sa1b(tmp_path / "y.json")
    with pytest.raises(ValueError, match="size"):
        formats.sa1b_record(recs, 0, "x", 8, 9)


def test_calibration_picks_the_best_f1_thresholds():
    from segany.evaluate.calibrate import choose

    # (predicted_iou, stability, best gt IoU, image, gt index): two good proposals for gt 0 and 1
    # with high scores, junk below 0.5 predicted IoU or 0.6 stability
    table = np.array([
        [0.9, 0.9, 0.8, 0, 0], [0.7, 0.8, 0.7, 0, 1], [0.4, 0.9, 0.1, 0, 0],
        [0.3, 0.2, 0.0, 0, 1], [0.8, 0.5, 0.2, 0, 0], [0.6, 0.95, 0.9, 0, 1],
    ])
    best = choose(table, n_gt=2)
    assert best["precision"] == 1.0 and best["recall"] == 1.0 and best["kept"] == 3
    assert 0.4 <= best["pred_iou_thresh"] < 0.6 and 0.5 < best["stability_score_thresh"] <= 0.8


def test_model_thresholds_are_used_unless_given(ckpt, tmp_path, capsys):
    """A model that carries calibrated thresholds gets them in `segany everything` by default;
    options on the command line win; official models keep SAM's."""
    import shutil

    from segany.checkpoints import load_model, model_everything_defaults
    from segany.evaluate.calibrate import write_defaults
    from segany.everything import resolve_thresholds

    path = str(tmp_path / "calibrated.safetensors")
    shutil.copy(ckpt, path)
    before = load_model(path).state_dict()
    write_defaults(path, {"pred_iou_thresh": 0.25, "stability_score_thresh": 0.4, "f1": 0.5})
    assert model_everything_defaults(None, path) == {"pred_iou_thresh": 0.25, "stability_score_thresh": 0.4}
    after = load_model(path)
    assert after.everything_defaults == {"pred_iou_thresh": 0.25, "stability_score_thresh": 0.4}
    assert all(torch_equal(before[k], v) for k, v in after.state_dict().items())  # weights untouched
    assert resolve_thresholds(None, path) == {"pred_iou_thresh": 0.25, "stability_score_thresh": 0.4}
    assert resolve_thresholds(None, path, 0.5, None) == {"pred_iou_thresh": 0.5, "stability_score_thresh": 0.4}
    assert resolve_thresholds("vit_b", None) == {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}
    img = tmp_path / "a.png"
    Image.fromarray(test_image(60, 80, seed=1)).save(img)
    assert main(["everything", str(img), "-o", str(tmp_path / "o"), "--checkpoint", path, "--points-per-side", "4", "--no-progress"]) == 0
    assert "pred_iou_thresh 0.25, stability_score_thresh 0.4" in capsys.readouterr().out


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_snap_edges_writes_the_generators_snapped_masks(ckpt, images, tmp_path):
    from segany.automatic import SamAutomaticMaskGenerator
    from segany.checkpoints import load_model

    out = tmp_path / "out"
    assert main(["everything", str(images / "a.png"), "-o", str(out), "--checkpoint", ckpt, "--snap-edges", *ARGS]) == 0
    data = formats.read_sa1b(out / "a.json", decode=True)
    img = np.asarray(Image.open(images / "a.png").convert("RGB"))
    kw = dict(points_per_side=4, pred_iou_thresh=-100, stability_score_thresh=0, box_nms_thresh=1.0)  # ARGS
    want = SamAutomaticMaskGenerator(load_model(ckpt), snap_edges=True, **kw).generate(img)
    assert len(data["annotations"]) == len(want) > 0
    for ann, rec in zip(data["annotations"], want):
        assert np.array_equal(ann["mask"], rec["segmentation"]) and ann["area"] == rec["area"]
