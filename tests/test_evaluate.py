"""segany.evaluate: metrics, the simulated user, the GrabCut baseline, reports and ``segany eval``."""
from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from segany.evaluate import (
    GrabCutMethod,
    SamMethod,
    evaluate,
    jitter_box,
    mask_box,
    mask_iou,
    next_click,
    noc,
    plot_miou,
    proposal_recall,
    simulate_clicks,
    summarize_clicks,
)

TINY = {
    "image_size": 64,
    "prompt_embed_dim": 16,
    "encoder": {"type": "vit", "embed_dim": 16, "depth": 1, "num_heads": 1, "global_attn_indexes": [0],
                "patch_size": 8, "window_size": 0},
    "decoder": {"depth": 1, "mlp_dim": 32, "num_heads": 1, "iou_head_hidden_dim": 16},
}


def rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# ----------------------------------------------------------------------------- metrics
def test_mask_iou_and_ignore():
    gt = rect(10, 10, 0, 5, 0, 10)  # 50 px
    pred = rect(10, 10, 0, 10, 0, 5)  # 50 px, overlap 25
    assert mask_iou(pred, gt) == pytest.approx(25 / 75)
    ignore = rect(10, 10, 5, 10, 0, 10)  # bottom half ignored: pred there does not count
    assert mask_iou(pred, gt, ignore) == pytest.approx(25 / 50)
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0
    with pytest.raises(ValueError):
        mask_iou(np.zeros((3, 3), bool), np.zeros((3, 4), bool))


def test_first_click_is_deepest_interior_point():
    gt = rect(40, 60, 5, 16, 20, 31)  # 11 x 11 square: centre row 10, column 25
    gt[20:40, 0:60] = True  # plus a thinner (20-row) band touching the image border
    gt[16:20, 20:31] = True
    c = next_click(np.zeros_like(gt), gt)
    assert c.positive and (c.x, c.y) != (25, 10)  # the band is deeper (10 px) than the square (6 px)
    sq = rect(40, 60, 5, 16, 20, 31)
    c = next_click(np.zeros_like(sq), sq)
    assert c.positive and (c.x, c.y) == (25, 10)
    assert c.xy == (25.5, 10.5)


def test_image_border_counts_as_boundary():
    # an 11 x 11 square in the top-left corner. Without the zero padding its deepest point would
    # be the image corner (0, 0), farthest from the object's only inner edges.
    gt = rect(31, 40, 0, 11, 0, 11)
    c = next_click(np.zeros_like(gt), gt)
    assert c.positive and (c.x, c.y) == (5, 5)


def test_next_click_negative_when_prediction_spills_over():
    gt = rect(50, 50, 20, 30, 20, 30)
    pred = rect(50, 50, 0, 50, 0, 50)  # covers everything: only false positives
    c = next_click(pred, gt)
    assert not c.positive and not gt[c.y, c.x]
    # a large false-negative region beats a thin false-positive one
    pred2 = rect(50, 50, 20, 22, 20, 45)
    gt2 = rect(50, 50, 20, 40, 20, 40)
    c2 = next_click(pred2, gt2)
    assert c2.positive and gt2[c2.y, c2.x] and not pred2[c2.y, c2.x]


def test_clicks_avoid_ignore_and_clicked_pixels():
    gt = rect(30, 30, 5, 25, 5, 25)
    ignore = rect(30, 30, 10, 20, 10, 20)  # the middle of the object is ignored
    c = next_click(np.zeros_like(gt), gt, ignore)
    assert gt[c.y, c.x] and not ignore[c.y, c.x]
    clicked = np.zeros_like(gt)
    clicked[c.y, c.x] = True
    c2 = next_click(np.zeros_like(gt), gt, ignore, clicked)
    assert (c2.x, c2.y) != (c.x, c.y)


def test_perfect_and_empty_predictors():
    gt = rect(40, 40, 10, 30, 5, 35)
    ious, clicks = simulate_clicks(lambda cl: gt, gt, max_clicks=20)
    assert ious == [1.0] * 20 and len(clicks) == 1  # nothing left to correct: user stops
    assert noc(ious, 0.85) == 1 and noc(ious, 0.90) == 1
    empty = np.zeros_like(gt)
    ious0, clicks0 = simulate_clicks(lambda cl: empty, gt, max_clicks=20)
    assert ious0 == [0.0] * 20 and len(clicks0) == 20 and all(c.positive for c in clicks0)
    s = summarize_clicks([ious, ious0], 20)
    assert s["miou"][0] == 0.5 and s["noc85"] == pytest.approx((1 + 20) / 2) and s["noc90"] == pytest.approx(10.5)
    assert s["nof90"] == 1 and s["nof90_pct"] == 50.0


def test_noc_and_click_feedback():
    assert noc([0.5, 0.86, 0.91], 0.85) == 2 and noc([0.5, 0.86, 0.91], 0.9) == 3
    assert noc([0.5, 0.6], 0.9, max_clicks=20) == 20
    # a predictor that paints disks of radius 6 around positive clicks and erases around
    # negative ones: the simulated user must keep improving it
    gt = rect(60, 60, 10, 50, 10, 50)
    yy, xx = np.mgrid[:60, :60]

    def paint(clicks):
        m = np.zeros_like(gt)
        for c in clicks:
            disk = (yy - c.y) ** 2 + (xx - c.x) ** 2 <= 36
            m = (m | disk) if c.positive else (m & ~disk)
        return m

    ious, _ = simulate_clicks(paint, gt, max_clicks=20)
    assert ious[0] < 0.15 and ious[-1] > ious[4] > ious[0]


def test_boxes():
    gt = rect(20, 30, 3, 9, 4, 11)
    assert mask_box(gt).tolist() == [4, 3, 11, 9]
    rng = np.random.default_rng(0)
    for _ in range(50):
        b = jitter_box(mask_box(gt), gt.shape, rng)
        assert 0 <= b[0] < b[2] <= 30 and 0 <= b[1] < b[3] <= 20
    a = jitter_box(mask_box(gt), gt.shape, np.random.default_rng(1))
    assert np.array_equal(a, jitter_box(mask_box(gt), gt.shape, np.random.default_rng(1)))


def test_proposal_recall():
    g1, g2 = rect(20, 20, 0, 10, 0, 10), rect(20, 20, 10, 20, 10, 20)
    near = rect(20, 20, 0, 10, 0, 8)  # IoU 0.8 with g1
    r = proposal_recall([near, g1, rect(20, 20, 0, 1, 0, 1)], [g1, g2], ks=(1, 2))
    # top-1 = near: recalls g1 at thresholds <= 0.8 (7 of 10); top-2 adds g1 exactly, but near
    # already took g1 at <= 0.8, so g1 exact only helps above 0.8 -> g1 recalled at all 10
    assert r[1] == [1] * 7 + [0] * 3
    assert r[2] == [1] * 10


# ---------------------------------------------------------------------------- GrabCut
def shape_image(seed=0):
    rng = np.random.default_rng(seed)
    h, w = 120, 160
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = (40, 90, 200)
    gt = np.zeros((h, w), np.uint8)
    cv2.ellipse(gt, (80, 60), (45, 30), 15, 0, 360, 1, -1)
    img[gt > 0] = (220, 60, 40)
    noise = rng.normal(0, 12, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8), gt.astype(bool)


def test_grabcut_box_and_clicks_on_a_generated_image():
    img, gt = shape_image()
    gc = GrabCutMethod()
    gc.set_image(img)
    assert mask_iou(gc.predict_box(mask_box(gt)), gt) > 0.8
    gc.reset()
    ious, clicks = simulate_clicks(gc.predict_clicks, gt, max_clicks=3)
    assert max(ious) > 0.8


# ------------------------------------------------------------------- reports and CLI
def tiny_model(seed=0):
    import torch

    from segany.modeling import build_sam

    torch.manual_seed(seed)
    return build_sam(TINY)


def make_coco(root, n=3, missing_one=False):
    from pycocotools import mask as mask_utils

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, anns = [], []
    for i in range(n):
        img, gt = shape_image(i)
        Image.fromarray(img).save(os.path.join(root, "images", f"im{i}.jpg"))
        images.append({"id": i + 1, "file_name": f"im{i}.jpg", "height": img.shape[0], "width": img.shape[1]})
        for k, m in enumerate([gt, rect(*gt.shape, 2, 20, 2, 30)]):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "segmentation": rle,
                         "area": int(m.sum()), "bbox": [0, 0, 1, 1], "iscrowd": 0})
    if missing_one:
        images.append({"id": 99, "file_name": "gone.jpg", "height": 10, "width": 10})
        anns.append({"id": 999, "image_id": 99, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5]],
                     "area": 8, "bbox": [1, 1, 4, 4], "iscrowd": 0})
    with open(os.path.join(root, "annotations.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}, f)


def test_evaluate_sam_report_and_plot(tmp_path):
    from segany.datasets import open_dataset

    make_coco(str(tmp_path / "d"), n=2)
    ds = open_dataset(str(tmp_path / "d"))
    rep = evaluate(ds, SamMethod(tiny_model()), ("clicks", "box"), max_clicks=4, progress=False)
    assert rep["objects"] == 4 and rep["skipped"] == []
    c = rep["clicks"]
    assert len(c["miou"]) == 4 and all(0 <= v <= 1 for v in c["miou"])
    assert 1 <= c["noc90"] <= 4 and 0 <= c["nof90_pct"] <= 100
    assert 0 <= rep["box"]["miou_gt_box"] <= 1
    # the per-object records hold what the summary was made from
    assert np.allclose(np.mean([o["clicks"] for o in rep["per_object"]], 0), c["miou"], atol=1e-4)
    out = tmp_path / "p.png"
    plot_miou(out, {"a": c["miou"], "b": [0.2, 0.5, 0.7, 0.9]})
    im = Image.open(out)
    assert im.format == "PNG" and im.size == (900, 600)


def _main(argv, monkeypatch):
    import segany.cli as cli

    # only this command: the suite must not depend on other subcommands being importable
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["segany.evaluate.cli"])
    return cli.main(argv)


def test_cli_eval_tiny_coco(tmp_path, monkeypatch, capsys):
    make_coco(str(tmp_path / "data"), n=2, missing_one=True)
    model = tiny_model()
    ckpt = tmp_path / "tiny_test.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt), metadata={"config": json.dumps(TINY)})
    out = tmp_path / "rep"
    rc = _main(["eval", str(tmp_path / "data"), "--checkpoint", str(ckpt), "--method", "sam", "--method", "grabcut",
                "--split", "all", "--max-clicks", "3", "--no-progress", "-o", str(out)], monkeypatch)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "gone.jpg" in cap.err  # the bad sample is reported and skipped
    assert "NoC90" in cap.out and "grabcut" in cap.out
    for m in ("tiny_test", "grabcut"):
        rep = json.loads((out / f"data.{m}.json").read_text())
        assert rep["objects"] == 4 and len(rep["skipped"]) == 1 and len(rep["clicks"]["miou"]) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["tiny_test", "grabcut"]
    assert Image.open(out / "miou_vs_clicks.png").format == "PNG"
    assert Image.open(out / "data.miou.png").format == "PNG"
    md = (out / "summary.md").read_text().splitlines()
    assert md[0].startswith("| dataset | method") and len(md) == 4
    # --zoom-in / --snap-edges add the model with zoom-in / edge snapping as a method of its own
    # (both: each, and the two together)
    for flags, suffixes in ((["--zoom-in"], ["+zoom"]), (["--snap-edges"], ["+edges"]),
                            (["--zoom-in", "--snap-edges"], ["+zoom", "+edges", "+zoom+edges"])):
        out = tmp_path / "_".join(f.strip("-") for f in flags)
        rc = _main(["eval", str(tmp_path / "data"), "--checkpoint", str(ckpt), *flags, "--protocol", "clicks",
                    "--split", "all", "--max-clicks", "3", "--no-progress", "-o", str(out)], monkeypatch)
        assert rc == 0, capsys.readouterr().err
        summary = json.loads((out / "summary.json").read_text())
        assert [r["method"] for r in summary["rows"]] == ["tiny_test"] + ["tiny_test" + s for s in suffixes]
        assert json.loads((out / f"data.tiny_test{suffixes[-1]}.json").read_text())["objects"] == 4


def test_cli_eval_bad_input(tmp_path, monkeypatch, capsys):
    assert _main(["eval", str(tmp_path / "nope"), "--method", "grabcut", "-o", str(tmp_path / "r")], monkeypatch) == 2
    assert "no such data set" in capsys.readouterr().err
    make_coco(str(tmp_path / "d"), n=1)
    rc = _main(["eval", str(tmp_path / "d"), "--checkpoint", str(tmp_path / "missing.pth"), "--split", "all", "-o", str(tmp_path / "r")], monkeypatch)
    assert rc == 2 and "missing.pth" in capsys.readouterr().err
    assert _main(["eval", str(tmp_path / "d"), "--method", "grabcut", "--zoom-in", "-o", str(tmp_path / "r")], monkeypatch) == 2
    assert "--zoom-in needs --method sam" in capsys.readouterr().err
    assert _main(["eval", str(tmp_path / "d"), "--method", "grabcut", "--snap-edges", "-o", str(tmp_path / "r")], monkeypatch) == 2
    assert "--snap-edges needs --method sam" in capsys.readouterr().err


class _Oracle:
    """Returns the ground truth (plus junk inside the ignore band), and proposals."""

    name = "oracle"
    supports_everything = True

    def __init__(self, gts, band, proposals):
        self.gts, self.band, self.proposals, self.k = gts, band, proposals, 0

    def set_image(self, image):
        pass

    def reset(self):
        pass

    def predict_clicks(self, clicks):
        gt = next(g for g in self.gts if g[clicks[0].y, clicks[0].x])
        return gt | self.band

    def predict_box(self, box):
        x0, y0 = int(box[0]), int(box[1])
        return next(g for g in self.gts if g[y0:int(box[3]), x0:int(box[2])].any()) | self.band

    def generate(self, image, **kw):
        return [{"segmentation": p, "predicted_iou": 1.0 - 0.1 * i} for i, p in enumerate(self.proposals)]


def test_mask_folder_ignore_band_and_everything(tmp_path):
    from segany.datasets import open_dataset

    root = tmp_path / "gc"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    img, gt = shape_image()
    label = np.zeros(gt.shape, np.uint8)
    label[gt] = 255
    band = (cv2.dilate(gt.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0) & ~gt
    label[band] = 128
    Image.fromarray(img).save(root / "images" / "a.png")
    Image.fromarray(label).save(root / "masks" / "a.png")
    ds = open_dataset(str(root))
    _, masks, ignore = ds[0]
    assert len(masks) == 1 and np.array_equal(ignore, band)
    rep = evaluate(ds, _Oracle(masks, band, [masks[0]]), ("clicks", "box", "everything"), max_clicks=5, progress=False)
    assert rep["clicks"]["miou"] == [1.0] * 5 and rep["clicks"]["noc90"] == 1
    assert rep["box"]["miou_gt_box"] == 1.0 and rep["everything"]["ar100"] == 1.0
    far = np.zeros_like(gt)
    far[:5, :5] = True
    rep2 = evaluate(ds, _Oracle(masks, band, [far]), ("everything",), progress=False)
    assert rep2["everything"]["ar100"] == 0.0 and rep2["everything"]["objects"] == 1


def test_pool_reports():
    from segany.evaluate import pool

    def rep(curves, box, recalled, objects):
        r = {"method": "m", "protocols": ["clicks", "box", "everything"], "max_clicks": 2, "images": 1,
             "objects": len(curves), "skipped": [],
             "per_object": [{"clicks": c, "box_iou": b, "jitter_box_iou": b} for c, b in zip(curves, box)]}
        from segany.evaluate.runner import everything_summary

        r["everything"] = everything_summary({100: np.array(recalled), 1000: np.array(recalled)}, objects)
        return r

    p = pool([rep([[0.5, 0.95]], [0.4], [1] * 10, 2), rep([[0.9, 1.0], [0.0, 0.0]], [0.8, 0.0], [0] * 10, 1)])
    assert p["objects"] == 3 and p["clicks"]["miou"] == pytest.approx([1.4 / 3, 1.95 / 3], abs=1e-4)
    assert p["clicks"]["noc90"] == pytest.approx((2 + 1 + 2) / 3, abs=1e-3)
    assert p["box"]["miou_gt_box"] == pytest.approx(0.4, abs=1e-4)
    assert p["everything"]["ar100"] == pytest.approx(1 / 3, abs=1e-4)


def test_sam_method_follows_the_paper_protocol():
    m = SamMethod(tiny_model())
    img, gt = shape_image()
    m.set_image(img)
    calls = []
    real = m.predictor.predict

    def spy(pc=None, pl=None, box=None, mask_input=None, multimask_output=True, return_logits=False):
        out = real(pc, pl, box, mask_input, multimask_output, return_logits)
        calls.append((None if pc is None else pc.copy(), pl, mask_input, multimask_output, out))
        return out

    real_best = m.predictor.predict_best

    def spy_best(pc=None, pl=None, box=None, mask_input=None, return_logits=False):
        # the best of the three candidates alone (what predict + argmax gives: test_speed_paths)
        out = real_best(pc, pl, box, mask_input, return_logits)
        calls.append((None if pc is None else pc.copy(), pl, mask_input, True, out))
        return out

    m.predictor.predict = spy
    m.predictor.predict_best = spy_best
    simulate_clicks(m.predict_clicks, gt, max_clicks=3)
    assert [c[3] for c in calls] == [True, False, False]  # multimask on the first click only
    assert calls[0][2] is None
    for prev, cur in zip(calls, calls[1:]):
        masks, scores, logits = prev[4]
        best = int(np.argmax(scores))
        assert np.array_equal(cur[2], logits[best : best + 1])  # previous best logits fed back
        assert len(cur[0]) == len(prev[0]) + 1  # all clicks so far
    assert np.allclose(calls[0][0][0] % 1, 0.5)  # pixel centres


def test_sam_method_zoom_in_predicts_later_clicks_in_a_crop_around_the_object():
    from segany.evaluate.metrics import Click

    m = SamMethod(tiny_model(), zoom_in=True)
    assert m.name.endswith("+zoom")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)
    m.set_image(img)
    first = m.predict_clicks([Click(110, 50, True)])  # whole image, multimask
    assert first.shape == (200, 300) and first.dtype == bool
    # a known current state: the object predicted at rows 40-59, columns 100-119
    prev = np.full((200, 300), -5.0, np.float32)
    prev[40:60, 100:120] = 5.0
    m._full = prev
    crops = []
    real_set = m._crop_predictor.set_image
    m._crop_predictor.set_image = lambda image: (crops.append(image.shape), real_set(image))[1]
    clicks = [Click(110, 50, True), Click(130, 45, True)]
    mask = m.predict_clicks(clicks)
    x0, y0, x1, y1 = m._crop
    assert crops == [(y1 - y0, x1 - x0, 3)]
    # the crop holds the previous mask and every positive click, grown around them, and is
    # far smaller than the image
    assert x0 <= 100 and x1 >= 131 and y0 <= 40 and y1 >= 60
    assert (x1 - x0) * (y1 - y0) < 0.2 * 200 * 300
    assert max(x1 - x0, y1 - y0) >= 0.2 * 300 - 1  # the minimum crop side
    # outside the crop nothing changed; inside it, the crop model's prediction
    outside = np.ones((200, 300), bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(mask[outside], prev[outside] > 0)
    assert np.array_equal(m._full[outside], prev[outside])
    from segany.evaluate.methods import _mask_prompt

    cp = m._crop_predictor
    prompt = _mask_prompt(cp, prev[y0:y1, x0:x1])
    assert prompt.shape == (1, *m.model.prompt_encoder.mask_input_size)
    local, _, _ = cp.predict(np.array([[c.x + 0.5 - x0, c.y + 0.5 - y0] for c in clicks]), np.array([1, 1]),
                             mask_input=prompt, multimask_output=False, return_logits=True)
    assert np.array_equal(mask[y0:y1, x0:x1], local[0] > m.model.mask_threshold)
    assert m._logits.shape == (1, *m.model.prompt_encoder.mask_input_size)
    # the same state again gives the same crop, which is not re-encoded
    m._full = prev
    m.predict_clicks(clicks)
    assert len(crops) == 1
    # an object that fills most of the image: the whole image is used
    m._full = np.full((200, 300), 5.0, np.float32)
    m._crop = None
    m.predict_clicks(clicks + [Click(10, 10, True)])
    assert m._crop is None and len(crops) == 1
    m.reset()
    assert m._full is None and m._logits is None


def test_zoom_in_method_skips_segment_everything_which_it_would_not_change(tmp_path):
    from segany.datasets import open_dataset

    root = tmp_path / "c"
    make_coco(str(root), n=1)
    ds = open_dataset(str(root))
    generated = []
    for zoom in (False, True):
        m = SamMethod(tiny_model(), zoom_in=zoom)
        m.generate = lambda image, **kw: generated.append(zoom) or []
        rep = evaluate(ds, m, ("box", "everything"), max_clicks=1, progress=False)
        assert ("everything" in rep) == (not zoom) and "box" in rep
    assert generated == [False]
