"""``segany segment / embed / models`` through ``segany.cli.main`` (in-process: fast, and the same
code path as the console script)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from core_helpers import TINY_VIT, config_safetensors, test_image
from segany.cli import build_parser, main
from segany.predictor import Segmenter


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    Image.fromarray(test_image(90, 120, seed=4)).save(d / "photo.png")
    # Until the bundled "tiny" model exists, commands use a checkpoint written here: a small ViT
    # saved with its config, the format segany's trainer exports.
    config_safetensors(TINY_VIT, d / "model.safetensors", seed=5)
    return d


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_segment_writes_best_mask_and_prints_scores(files, tmp_path, capsys):
    out = tmp_path / "mask.png"
    code, stdout, err = run(capsys, "segment", files / "photo.png", "--point", "60,40", "--checkpoint", files / "model.safetensors", "-o", out)
    assert code == 0, err
    mask = np.asarray(Image.open(out))
    assert mask.shape == (90, 120) and set(np.unique(mask)) <= {0, 255}
    assert "(best)" in stdout and "score" in stdout
    # Same result as the Python API with the same prompt.
    seg = Segmenter(str(files / "model.safetensors"))
    seg.set_image(str(files / "photo.png"))
    assert np.array_equal(mask > 0, seg.predict(points=[(60, 40)]).best)


def test_segment_json_all_masks_and_overlay(files, tmp_path, capsys):
    out, overlay = tmp_path / "m.png", tmp_path / "over.png"
    code, stdout, err = run(
        capsys, "segment", files / "photo.png", "--point", "60,40", "--checkpoint", files / "model.safetensors",
        "-o", out, "--all-masks", "--json", "--overlay", overlay,
    )
    assert code == 0, err
    result = json.loads(stdout)
    assert (result["height"], result["width"]) == (90, 120)
    assert len(result["masks"]) == 3 and result["best"] == int(np.argmax([m["score"] for m in result["masks"]]))
    for m in result["masks"]:
        decoded = mask_utils.decode({"size": m["segmentation"]["size"], "counts": m["segmentation"]["counts"].encode()})
        on_disk = np.asarray(Image.open(m["file"])) > 0
        assert np.array_equal(decoded.astype(bool), on_disk) and decoded.sum() == m["area"]
    assert [m["file"] for m in result["masks"]] == [str(tmp_path / f"m_{i}.png") for i in range(3)]
    assert np.asarray(Image.open(overlay)).shape == (90, 120, 3)


def test_box_and_background_points(files, tmp_path, capsys):
    code, stdout, err = run(
        capsys, "segment", files / "photo.png", "--box", "10,10,100,80", "--point", "50,40,1", "--point", "20,70,0",
        "--checkpoint", files / "model.safetensors", "-o", tmp_path / "m.png", "--json",
    )
    assert code == 0, err
    assert len(json.loads(stdout)["masks"]) == 1  # box / several points: one unambiguous mask


def test_embed_then_segment_from_embedding_matches(files, tmp_path, capsys):
    emb = tmp_path / "photo.emb.pt"
    code, _, err = run(capsys, "embed", files / "photo.png", "-o", emb, "--checkpoint", files / "model.safetensors")
    assert code == 0, err and emb.is_file()
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    common = ["--point", "60,40", "--checkpoint", files / "model.safetensors"]
    assert run(capsys, "segment", files / "photo.png", *common, "-o", a)[0] == 0
    assert run(capsys, "segment", files / "photo.png", *common, "-o", b, "--embedding", emb)[0] == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_embedding_of_another_image_is_refused(files, tmp_path, capsys):
    emb = tmp_path / "e.pt"
    assert run(capsys, "embed", files / "photo.png", "-o", emb, "--checkpoint", files / "model.safetensors")[0] == 0
    other = tmp_path / "other.png"
    Image.fromarray(test_image(50, 60)).save(other)
    code, _, err = run(capsys, "segment", other, "--point", "5,5", "--embedding", emb, "--checkpoint", files / "model.safetensors", "-o", tmp_path / "m.png")
    assert code == 2 and "120x90" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--point", "1,2,3,4"], "expected 2 or 3"),
        (["--point", "a,b"], "comma-separated numbers"),
        (["--point", "10,10,5"], "label must be 1"),
        (["--box", "1,2,3"], "expected 4"),
        (["--point", "500,10"], "outside the image"),
        (["--box", "50,50,10,10"], "x0 <= x1"),
        ([], "give at least one --point"),
    ],
)
def test_bad_prompts_exit_2_with_message(files, tmp_path, capsys, argv, message):
    code, _, err = run(capsys, "segment", files / "photo.png", *argv, "--checkpoint", files / "model.safetensors", "-o", tmp_path / "m.png")
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "m.png").exists()


def test_bad_inputs_exit_2(files, tmp_path, capsys):
    notimg = tmp_path / "notes.png"
    notimg.write_text("hello")
    code, _, err = run(capsys, "segment", notimg, "--point", "1,1", "--checkpoint", files / "model.safetensors")
    assert code == 2 and str(notimg) in err and "not an image" in err
    code, _, err = run(capsys, "segment", files / "photo.png", "--point", "1,1", "--checkpoint", tmp_path / "missing.pth")
    assert code == 2 and "no such file" in err
    code, _, err = run(capsys, "segment", files / "photo.png", "--point", "1,1", "--model", "vit_zz")
    assert code == 2 and "unknown model 'vit_zz'" in err
    code, _, err = run(capsys, "segment", files / "photo.png", "--point", "1,1", "--checkpoint", files / "model.safetensors", "--dtype", "bfloat16")
    assert code == 2 and "cuda" in err


def test_offline_model_download_is_a_clear_error(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("SEGANY_DOWNLOAD_URL_VIT_B", "http://127.0.0.1:9/nothing.pth")  # discard port: refused
    code, _, err = run(capsys, "segment", files / "photo.png", "--point", "1,1", "--model", "vit_b")
    assert code == 2 and "http://127.0.0.1:9/nothing.pth" in err and str(tmp_path / "cache" / "sam_vit_b_01ec64.pth") in err


def test_models_lists_cache_status(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path))
    (tmp_path / "sam_vit_b_01ec64.pth").write_bytes(b"x" * 10)
    code, stdout, _ = run(capsys, "models", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(stdout)}
    assert {"vit_h", "vit_l", "vit_b", "vit_t"} <= set(rows)
    assert rows["vit_b"]["present"] and rows["vit_b"]["size"] == 10 and rows["vit_b"]["path"] == str(tmp_path / "sam_vit_b_01ec64.pth")
    assert not rows["vit_h"]["present"] and rows["vit_h"]["size"] == 2564550879
    code, stdout, _ = run(capsys, "models")
    assert "vit_b" in stdout and "present" in stdout and "absent" in stdout


@pytest.mark.parametrize("command", ["segment", "embed", "models"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_global_threads_option(files, tmp_path, capsys):
    """``segany --threads N COMMAND`` runs the command with N PyTorch threads (on a machine where
    other programs keep cores busy, PyTorch's default of one thread per core waits on the busy
    ones); 0 or less is refused."""
    import torch

    before = torch.get_num_threads()
    try:
        code, _, err = run(capsys, "--threads", 1, "segment", files / "photo.png", "--point", "60,40",
                           "--checkpoint", files / "model.safetensors", "-o", tmp_path / "m.png")
        assert code == 0, err
        assert torch.get_num_threads() == 1 and (tmp_path / "m.png").exists()
    finally:
        torch.set_num_threads(before)
    code, _, err = run(capsys, "--threads", 0, "models")
    assert code == 2 and "--threads" in err
    # a command's own --threads (annotate, train) is its own option
    args = build_parser().parse_args(["--threads", "2", "annotate", "x", "-o", "y", "--threads", "1"])
    assert args.global_threads == 2 and args.threads == 1
