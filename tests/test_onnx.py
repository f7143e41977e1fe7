"""ONNX export: encoder and decoder run in onnxruntime and give PyTorch's masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from core_helpers import TINY_VIT, test_image  # noqa: E402
from segany.modeling.build import build_sam, randomize_  # noqa: E402
from segany.onnx import OnnxPredictor, export_onnx  # noqa: E402
from segany.predictor import SamPredictor  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return randomize_(build_sam(TINY_VIT), seed=4, std=0.2).eval()


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    export_onnx(tiny, d, postprocess=True)
    return d


def _iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def test_files_and_interface(exported):
    import onnx

    for name in ("encoder.onnx", "decoder.onnx"):
        onnx.checker.check_model(str(exported / name))
    sess = ort.InferenceSession(str(exported / "decoder.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [
        "image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
    assert [o.name for o in sess.get_outputs()] == ["masks", "iou_predictions", "low_res_masks"]


def test_official_style_postprocessing_in_onnx(tiny, exported):
    """Raw session with orig_im_size: masks at the original size equal the torch predictor's."""
    img = test_image(90, 120, seed=2)
    p = SamPredictor(tiny)
    p.set_image(img)
    sess = ort.InferenceSession(str(exported / "decoder.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 3):  # dynamic number of points
        pts = np.array([[60.0, 40.0], [10.0, 80.0], [100.0, 20.0]])[:n]
        lab = np.array([1, 0, 1])[:n]
        want_m, want_s, want_low = p.predict(point_coords=pts, point_labels=lab, return_logits=True)
        coords = np.concatenate([p.transform.apply_coords(pts, img.shape[:2]), [[0.0, 0.0]]])[None].astype(np.float32)
        labels = np.concatenate([lab, [-1]])[None].astype(np.float32)
        masks, iou, low = sess.run(None, {
            "image_embeddings": p.features.numpy(), "point_coords": coords, "point_labels": labels,
            "mask_input": np.zeros((1, 1, 32, 32), np.float32), "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array(img.shape[:2], np.float32)})
        assert masks.shape == (1, 4, 90, 120)
        np.testing.assert_allclose(iou[0, 1:], want_s, atol=1e-5)
        np.testing.assert_allclose(low[0, 1:], want_low, atol=1e-4)
        np.testing.assert_allclose(masks[0, 1:], want_m, atol=1e-4)


@pytest.mark.parametrize("prompt", ["points", "box", "points+box", "mask"])
def test_onnx_predictor_matches_torch(tiny, exported, prompt):
    img = test_image(100, 80, seed=3)
    ref, onx = SamPredictor(tiny), OnnxPredictor(tiny, exported)
    ref.set_image(img)
    onx.set_image(img)
    np.testing.assert_allclose(onx.features.numpy(), ref.features.numpy(), atol=1e-4)
    kw = {}
    if "points" in prompt:
        kw.update(point_coords=np.array([[30.0, 40.0], [60.0, 10.0]]), point_labels=np.array([1, 0]))
    if "box" in prompt:
        kw.update(box=np.array([5, 10, 70, 90]))
    if prompt == "mask":
        first = ref.predict(point_coords=np.array([[30.0, 40.0]]), point_labels=np.array([1]))
        kw.update(point_coords=np.array([[30.0, 40.0]]), point_labels=np.array([1]), mask_input=first[2][:1])
    for mm in (True, False):
        a = ref.predict(multimask_output=mm, **kw)
        b = onx.predict(multimask_output=mm, **kw)
        assert a[0].shape == b[0].shape
        np.testing.assert_allclose(b[1], a[1], atol=1e-4)
        np.testing.assert_allclose(b[2], a[2], atol=1e-3)
        for x, y in zip(a[0], b[0]):
            assert _iou(x, y) >= 0.999 or (x.sum() + y.sum()) < 5
    # the best candidate alone (an interactive click's call): the one predict's argmax picks
    a, b = ref.predict(**kw), onx.predict_best(**kw)
    i = int(np.argmax(a[1]))
    assert b[0].shape == (1, *a[0].shape[1:]) and b[1].shape == (1,)
    np.testing.assert_allclose(b[1][0], a[1][i], atol=1e-4)
    np.testing.assert_allclose(b[2][0], a[2][i], atol=1e-3)
    assert _iou(b[0][0], a[0][i]) >= 0.999 or (a[0][i].sum() + b[0][0].sum()) < 5
    m, s, none = onx.predict_best(**kw, return_low_res=False)  # (the exported decoder makes all the logits)
    assert none is None and np.array_equal(m, b[0]) and np.array_equal(s, b[1])


def test_export_cli(tmp_path, monkeypatch):
    from segany import cli

    assert "segany.onnx" in cli.COMMAND_MODULES
    parser = cli.build_parser()
    args = parser.parse_args(["export-onnx", "--model", "x", "-o", str(tmp_path), "--no-postprocess"])
    assert args.no_postprocess and args.output == str(tmp_path)


def test_onnx_int8_predictor_runs(tiny, exported):
    img = test_image(100, 80, seed=5)
    p = OnnxPredictor(tiny, exported, int8=True)
    assert (exported / "encoder.int8.onnx").exists() and (exported / "decoder.int8.onnx").exists()
    p.set_image(img)
    m, s, low = p.predict(point_coords=np.array([[30.0, 40.0]]), point_labels=np.array([1]))
    assert m.shape == (3, 100, 80) and s.shape == (3,) and low.shape == (3, 32, 32)
    assert np.isfinite(low).all()


def test_segmenter_backends(tiny, exported):
    from segany.predictor import Segmenter

    img = test_image(64, 96, seed=6)
    a = Segmenter(tiny)
    b = Segmenter(tiny, backend="onnxruntime")
    assert isinstance(b.predictor, OnnxPredictor)
    a.set_image(img)
    b.set_image(img)
    pa, pb = a.predict(points=[(20, 30)]), b.predict(points=[(20, 30)])
    np.testing.assert_allclose(pb.scores, pa.scores, atol=1e-4)
    assert _iou(pa.best, pb.best) >= 0.999 or pa.best.sum() < 5
    for seg in (a, b):  # best=True: that mask alone
        one = seg.predict(points=[(20, 30)], best=True)
        assert one.masks.shape == (1, 64, 96) and np.array_equal(one.best, pa.best if seg is a else pb.best)
        np.testing.assert_allclose(one.scores, [pa.scores.max() if seg is a else pb.scores.max()], atol=1e-6)


def test_segment_everything_on_the_onnxruntime_backend_gives_the_torch_masks(tiny, exported):
    """`segany everything --backend onnxruntime` runs the generator on an OnnxPredictor."""
    from segany.automatic import SamAutomaticMaskGenerator

    img = test_image(64, 96, seed=7)
    kw = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.7)
    want = SamAutomaticMaskGenerator(SamPredictor(tiny), **kw).generate(img)
    got = SamAutomaticMaskGenerator(OnnxPredictor(tiny, exported), **kw).generate(img)
    assert want and len(got) == len(want)
    assert any(r["area"] > 100 for r in want)  # not only the random model's empty masks
    for g, w in zip(sorted(got, key=lambda r: r["predicted_iou"]), sorted(want, key=lambda r: r["predicted_iou"])):
        assert abs(g["predicted_iou"] - w["predicted_iou"]) < 1e-3
        assert abs(g["area"] - w["area"]) <= 0.01 * w["area"] + 1
        if w["area"] > 10:
            assert _iou(g["segmentation"], w["segmentation"]) >= 0.99


def test_export_of_another_model_is_refused(tiny, exported, tmp_path):
    """Pointing the predictor at an export of a different model (another grid size) gives a clear
    error before onnxruntime runs, not a shape error from inside it; a folder with no export too."""
    from segany.onnx import OnnxPredictor

    other = build_sam({**TINY_VIT, "image_size": TINY_VIT["image_size"] * 2})
    with pytest.raises(ValueError, match="another model"):
        OnnxPredictor(other, exported)
    with pytest.raises(FileNotFoundError, match="onnx.json"):
        OnnxPredictor(tiny, tmp_path)


def test_cli_backend_onnxruntime_gives_torch_masks(tmp_path):
    """`segany segment --backend onnxruntime --onnx-dir D` exports once into D, then reuses it, and
    writes the mask torch gives; a mismatched export is a usage error."""
    from PIL import Image

    from core_helpers import config_safetensors
    from segany.cli import main

    ckpt = str(config_safetensors(TINY_VIT, tmp_path / "m.safetensors", seed=3))
    Image.fromarray(test_image(90, 120, seed=5)).save(tmp_path / "img.png")
    common = ["segment", str(tmp_path / "img.png"), "--checkpoint", ckpt, "--point", "60,40"]
    assert main([*common, "-o", str(tmp_path / "torch.png")]) == 0
    d = tmp_path / "onnx"
    assert main([*common, "-o", str(tmp_path / "ort.png"), "--backend", "onnxruntime", "--onnx-dir", str(d)]) == 0
    assert (d / "encoder.onnx").is_file() and (d / "decoder.onnx").is_file()
    stamp = (d / "encoder.onnx").stat().st_mtime_ns
    assert main([*common, "-o", str(tmp_path / "ort2.png"), "--backend", "onnxruntime", "--onnx-dir", str(d)]) == 0
    assert (d / "encoder.onnx").stat().st_mtime_ns == stamp  # reused, not exported again
    a = np.array(Image.open(tmp_path / "torch.png")) > 0
    b = np.array(Image.open(tmp_path / "ort.png")) > 0
    assert a.shape == b.shape == (90, 120) and a.any()
    assert _iou(a, b) >= 0.99 and np.array_equal(b, np.array(Image.open(tmp_path / "ort2.png")) > 0)
    other = str(config_safetensors(TINY_VIT | {"prompt_embed_dim": 64}, tmp_path / "o.safetensors", seed=3))
    assert main(["segment", str(tmp_path / "img.png"), "--checkpoint", other, "--point", "60,40",
                 "-o", str(tmp_path / "x.png"), "--backend", "onnxruntime", "--onnx-dir", str(d)]) == 2
    assert main([*common, "-o", str(tmp_path / "x.png"), "--onnx-dir", str(d)]) == 2  # torch backend: no --onnx-dir


def test_onnx_int8_keeps_the_fourier_products_float(exported):
    """The products with the prompt encoder's random Fourier matrix feed sin/cos: int8 there
    shifts phases by whole fractions of a period (the bundled model's int8 best-mask IoU against
    float32: 0.962 with them quantised, 0.985 without, on 60 photos). The rest stays int8."""
    import onnx

    from segany.quantize import quantize_onnx

    for part in ("encoder", "decoder"):
        (exported / f"{part}.int8.onnx").unlink(missing_ok=True)
    m = onnx.load(str(quantize_onnx(exported)["decoder"]))
    fourier = [n for n in m.graph.node if any(x.endswith("positional_encoding_gaussian_matrix") for x in n.input)]
    assert len(fourier) == 2 and all(n.op_type == "MatMul" for n in fourier)  # the points' and the grid's
    matrix = next(i for i in m.graph.initializer if i.name.endswith("positional_encoding_gaussian_matrix"))
    assert matrix.data_type == onnx.TensorProto.FLOAT
    assert sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in m.graph.node) >= 20


def test_quantize_onnx_redoes_older_recipes_and_never_half_writes(exported, tmp_path, monkeypatch):
    import json
    import os
    import shutil

    import onnx
    import onnxruntime.quantization

    from segany.quantize import ONNX_INT8_RECIPE, quantize_onnx

    shutil.copy(exported / "decoder.onnx", tmp_path / "decoder.onnx")
    old = tmp_path / "decoder.int8.onnx"
    old.write_bytes(b"int8 file of an older segany")  # newer than its source, but no recipe stamp
    assert quantize_onnx(tmp_path) == {"decoder": old}
    onnx.checker.check_model(str(old))
    assert json.loads((tmp_path / "int8.json").read_text()) == {"decoder": ONNX_INT8_RECIPE}
    stamp = old.stat().st_mtime_ns
    quantize_onnx(tmp_path)  # current recipe, newer than the source: reused
    assert old.stat().st_mtime_ns == stamp

    def interrupted(src, dst, **kw):
        with open(dst, "wb") as f:
            f.write(b"half a model")
        raise KeyboardInterrupt

    old.unlink()
    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_onnx(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["decoder.onnx", "int8.json"]  # no int8 file, no temporary

    def read_only(src, dst, **kw):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", read_only)
    with pytest.raises(OSError, match=r"cannot write decoder\.int8\.onnx beside the export.*writable folder"):
        quantize_onnx(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["decoder.onnx", "int8.json"]


def test_cli_int8_backend_on_an_unwritable_export_is_a_usage_error(tmp_path, monkeypatch, capsys):
    from PIL import Image

    import onnxruntime.quantization

    from core_helpers import config_safetensors
    from segany.cli import main

    def read_only(src, dst, **kw):
        raise PermissionError(13, "Permission denied", str(dst))

    ckpt = str(config_safetensors(TINY_VIT, tmp_path / "m.safetensors", seed=3))
    Image.fromarray(test_image(90, 120, seed=5)).save(tmp_path / "img.png")
    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", read_only)
    assert main(["segment", str(tmp_path / "img.png"), "--checkpoint", ckpt, "--point", "60,40", "-o", str(tmp_path / "m.png"),
                 "--backend", "onnxruntime-int8", "--onnx-dir", str(tmp_path / "onnx")]) == 2
    assert "cannot write encoder.int8.onnx beside the export" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()
