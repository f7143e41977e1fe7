"""The data engine: segany annotate (outputs, bad images, resume, kill -9 safety) and segany dataset
(stats / verify / to-coco / from-coco), and the annotate -> train -> annotate cycle."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from segany.engine import EngineOptions, collect, run_job
from segany.engine import dataset as D
from segany.engine.cli import run_dataset  # noqa: F401  (import check: the CLI module loads)
from segany.engine.inputs import InputError
from segany.engine.manifest import ManifestWriter, read_manifest
from segany.modeling.build import build_sam, randomize_

# A very small ViT-SAM (128 px input); random weights chosen (std/seed) so that the generator
# returns a few non-empty, non-full masks on the test images.
CONFIG = {
    "image_size": 128,
    "prompt_embed_dim": 32,
    "encoder": {"type": "vit", "embed_dim": 32, "depth": 1, "num_heads": 2, "global_attn_indexes": [0],
                "patch_size": 16, "window_size": 0},
    "decoder": {"depth": 1, "mlp_dim": 64, "num_heads": 2, "iou_head_hidden_dim": 32},
}
AMG = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
AMG_ARGS = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


def save_model(path, seed=1, std=0.1):
    from segany.train.export import save_safetensors

    m = build_sam(CONFIG)
    randomize_(m, seed=seed, std=std)
    save_safetensors(m, str(path), half=False)
    return str(path)


def make_images(root, n, seed=0, nested=True):
    """``n`` small PNGs with a few flat-coloured rectangles and ellipses, half of them in sub/."""
    import cv2

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(48, 96)), int(rng.integers(48, 96))
        a = np.empty((h, w, 3), np.uint8)
        a[:] = rng.integers(0, 256, 3)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w - 16)), int(rng.integers(0, h - 16))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                cv2.rectangle(a, (x0, y0), (x0 + int(rng.integers(8, 30)), y0 + int(rng.integers(8, 30))), colour, -1)
            else:
                cv2.ellipse(a, (x0 + 8, y0 + 8), (int(rng.integers(4, 14)), int(rng.integers(4, 14))), 0, 0, 360, colour, -1)
        sub = "sub/" if nested and i % 2 else ""
        p = root / f"{sub}img{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("model") / "tiny_random.safetensors")


def opts(model_path, **kw):
    return EngineOptions(model="custom", checkpoint=model_path, amg=dict(AMG), threads=1, **kw)


def output_files(outdir):
    """Relative path -> bytes of every output file (the lock file is empty; the summary holds
    this run's timings and is compared separately)."""
    out = {}
    for dirpath, _, files in os.walk(outdir):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), outdir)
            if rel in ("summary.json", "manifest.jsonl"):
                continue
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[rel] = fh.read()
    return out


def manifest_view(outdir):
    """Manifest lines without timings, as a sorted list (and checks one line per image)."""
    recs = read_manifest(os.path.join(outdir, "manifest.jsonl"))
    images = [r["image"] for r in recs]
    assert len(images) == len(set(images)), f"duplicate manifest lines: {images}"
    with open(os.path.join(outdir, "manifest.jsonl"), "rb") as f:
        raw = f.read()
    assert raw == b"" or raw.endswith(b"\n")
    for line in raw.splitlines():
        json.loads(line)  # every line parses
    return sorted((r["image"], r["status"], r["masks"], r["output"], r["reason"]) for r in recs)


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "segany.cli", *args], capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- annotate
def test_annotate_writes_sa1b_records_and_records_bad_images(tmp_path, model_path):
    src = tmp_path / "in"
    imgs = make_images(src, 4)
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (src / "sub" / "notes.jpg").write_text("hello")
    Image.new("RGB", (300, 200), (10, 20, 30)).save(src / "huge.png")  # above --max-pixels below
    out = tmp_path / "out"
    s = run_job([str(src)], str(out), opts(model_path, overlay=True, max_pixels=150 * 150), progress=False)

    assert (s["images"], s["ok"], s["failed"], s["rejected"]) == (7, 4, 3, 0)
    reasons = {f["image"]: f["reason"] for f in s["failures"]}
    assert "corrupt or truncated" in reasons["corrupt.jpg"] and "not an image" in reasons["sub/notes.jpg"]
    assert "above the limit" in reasons["huge.png"]
    assert s["masks"] > 0 and s["masks_per_image"] == round(s["masks"] / 4, 2)
    for p in imgs:
        rel = p.relative_to(src).with_suffix("")
        rec = json.loads((out / f"{rel}.json").read_text())
        h, w = np.asarray(Image.open(p)).shape[:2]
        assert rec["image"]["file_name"] == p.relative_to(src).as_posix()
        assert (rec["image"]["height"], rec["image"]["width"]) == (h, w)
        assert rec["annotations"], "the test model should find some masks"
        for a in rec["annotations"]:
            assert a["segmentation"]["size"] == [h, w] and a["area"] > 0
            assert {"bbox", "predicted_iou", "stability_score", "point_coords", "crop_box"} <= set(a)
        assert (out / f"{rel}.overlay.jpg").is_file()
    man = manifest_view(out)
    assert [m[1] for m in man].count("ok") == 4 and [m[1] for m in man].count("failed") == 3
    assert json.loads((out / "summary.json").read_text())["ok"] == 4
    # the folder verifies against the source images; a tampered record is caught
    problems, n = D.verify(str(out), images=str(src))
    assert problems == [] and n == 4
    rec_path = out / f"{imgs[0].relative_to(src).with_suffix('')}.json"
    rec = json.loads(rec_path.read_text())
    rec["annotations"][0]["area"] += 5
    rec_path.write_text(json.dumps(rec))
    problems, _ = D.verify(str(out), images=str(src))
    assert len(problems) == 1 and "area" in problems[0]


def test_resume_skips_done_images_and_pins_options(tmp_path, model_path):
    src = tmp_path / "in"
    make_images(src, 3, nested=False)
    (src / "bad.png").write_bytes(b"garbage")
    out = tmp_path / "out"
    o = opts(model_path)
    s1 = run_job([str(src)], str(out), o, progress=False)
    before = output_files(out)
    mtimes = {p: os.stat(out / p).st_mtime_ns for p in before if p.endswith(".json") and p != "job.json"}
    s2 = run_job([str(src)], str(out), o, progress=False)
    assert s2["skipped_done"] == 3 and s2["processed_this_run"] == 1  # only the failed one is retried
    assert {p: os.stat(out / p).st_mtime_ns for p in mtimes} == mtimes
    assert output_files(out) == before and (s1["ok"], s1["failed"]) == (s2["ok"], s2["failed"]) == (3, 1)
    assert len(manifest_view(out)) == 4
    # other options into the same folder: refused with a clear message
    r = cli("annotate", str(src), "-o", str(out), "--checkpoint", model_path, "--points-per-side", "8",
            "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--no-progress")
    assert r.returncode == 2 and "other options" in r.stderr and "amg" in r.stderr


def test_annotate_snap_edges_pins_the_option_and_writes_snapped_masks(tmp_path, model_path):
    from segany import formats
    from segany.automatic import SamAutomaticMaskGenerator
    from segany.checkpoints import load_model

    src = tmp_path / "in"
    make_images(src, 1, nested=False)
    out = tmp_path / "out"
    r = cli("annotate", str(src), "-o", str(out), "--checkpoint", model_path, *AMG_ARGS, "--snap-edges", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "job.json").read_text())["amg"]["snap_edges"] is True
    img = np.asarray(Image.open(src / "img000.png").convert("RGB"))
    want = SamAutomaticMaskGenerator(load_model(model_path), snap_edges=True, **AMG).generate(img)
    anns = formats.read_sa1b(out / "img000.json", decode=True)["annotations"]
    assert len(anns) == len(want) > 0
    assert all(np.array_equal(a["mask"], w["segmentation"]) for a, w in zip(anns, want))


def test_filters_min_masks_max_masks(tmp_path, model_path):
    src = tmp_path / "in"
    make_images(src, 3, nested=False)
    full = run_job([str(src)], str(tmp_path / "a"), opts(model_path), progress=False)
    counts = {m[0]: m[2] for m in manifest_view(tmp_path / "a")}
    assert max(counts.values()) >= 2
    s = run_job([str(src)], str(tmp_path / "b"), opts(model_path, max_masks=1), progress=False)
    assert s["masks"] == s["ok"] == 3
    need = max(counts.values())
    # --redo into the first folder with the new options: rejected images lose their old JSON
    s = run_job([str(src)], str(tmp_path / "a"), opts(model_path, min_masks=need), progress=False, redo=True)
    rejected = sorted(k for k, v in counts.items() if v < need)
    assert rejected and s["rejected"] == len(rejected) and s["ok"] == 3 - len(rejected) and full["ok"] == 3
    for k in counts:
        assert (tmp_path / "a" / k.replace(".png", ".json")).exists() == (k not in rejected)
    assert len(manifest_view(tmp_path / "a")) == 3


def test_inputs_lists_files_and_collisions(tmp_path):
    a = make_images(tmp_path / "a", 2, nested=False)
    b = make_images(tmp_path / "b", 1, nested=False)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# images\n{a[0]}\n../{tmp_path.name}/b/{b[0].name}\n")
    items = collect([str(lst)])
    assert [i.rel for i in items] == ["a/img000.png", "b/img000.png"]
    assert [i.rel for i in collect([str(tmp_path / "a"), str(a[0])])] == ["img000.png", "img001.png"]
    # the job's own outputs inside an input folder are not inputs; annotating in place keeps all
    make_images(tmp_path / "a" / "ann", 1, nested=False)
    assert len(collect([str(tmp_path / "a")], outdir=str(tmp_path / "a" / "ann"))) == 2
    assert len(collect([str(tmp_path / "a")], outdir=str(tmp_path / "a"))) == 3
    with pytest.raises(InputError, match="would both be written"):
        collect([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(InputError, match="no such file"):
        collect([str(tmp_path / "nope")])


def test_cli_errors_are_clear_and_write_nothing(tmp_path):
    make_images(tmp_path / "in", 1, nested=False)
    r = cli("annotate", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "no_such_model", "--no-progress")
    assert r.returncode == 2 and "unknown model 'no_such_model'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    r = cli("annotate", str(tmp_path / "missing"), "-o", str(tmp_path / "out"), "--checkpoint", str(tmp_path / "none.safetensors"))
    assert r.returncode == 2 and "no such" in r.stderr and "Traceback" not in r.stderr


def test_manifest_tolerates_a_torn_last_line(tmp_path):
    path = str(tmp_path / "manifest.jsonl")
    with ManifestWriter(path) as w:
        w.append({"image": "a.png", "status": "ok"})
    with open(path, "ab") as f:
        f.write(b'{"image": "b.png", "sta')  # torn by a crash
    assert [r["image"] for r in read_manifest(path)] == ["a.png"]
    with ManifestWriter(path) as w:  # a new record never glues onto the torn line
        w.append({"image": "c.png", "status": "ok"})
    assert [r["image"] for r in read_manifest(path)] == ["a.png", "c.png"]


def test_kill_9_mid_run_then_rerun_equals_uninterrupted_run(tmp_path, model_path):
    src = tmp_path / "in"
    make_images(src, 16)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = ["--checkpoint", model_path, "--points-per-side", "8", "--pred-iou-thresh", "0",
            "--stability-score-thresh", "0", "--threads", "1", "--overlay", "--no-progress"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    r = cli("annotate", str(src), "-o", str(ref), *args)
    assert r.returncode == 0, r.stderr

    proc = subprocess.Popen([sys.executable, "-m", "segany.cli", "annotate", str(src), "-o", str(out), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.is_dir() and len(list(out.rglob("img*.json"))) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.rglob("img*.json")))
    assert 3 <= done < 16, f"the kill came too late to test anything ({done} images done)"
    # What else a crash can leave: a temporary file never renamed, a torn manifest line, and an
    # output whose manifest line was never written.
    (out / "sub" / ".img001.json.abc123.tmp").parent.mkdir(exist_ok=True)
    (out / "sub" / ".img001.json.abc123.tmp").write_bytes(b'{"image": {"wid')
    lines = (out / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    ok_lines = [ln for ln in lines if b'"ok"' in ln]
    assert ok_lines
    (out / "manifest.jsonl").write_bytes(b"".join(ln for ln in lines if ln != ok_lines[0]) + b'{"image": "img0')

    r = cli("annotate", str(src), "-o", str(out), *args)
    assert r.returncode == 0, r.stderr
    assert "already done" in r.stderr
    assert output_files(out) == output_files(ref)  # same files, byte for byte
    assert manifest_view(out) == manifest_view(ref)
    s_ref, s_out = (json.loads((d / "summary.json").read_text()) for d in (ref, out))
    for k in ("images", "ok", "failed", "masks"):
        assert s_ref[k] == s_out[k]
    assert s_out["ok"] == 16 and s_out["failed"] == 1


# --------------------------------------------------------------------------- dataset
def test_dataset_stats_coco_round_trip(tmp_path, model_path):
    src = tmp_path / "in"
    make_images(src, 3)
    out = tmp_path / "out"
    s = run_job([str(src)], str(out), opts(model_path, copy_images=True), progress=False)
    st = D.stats(str(out))
    assert st["images"] == 3 and st["masks"] == s["masks"] and st["manifest"] == {"ok": 3}
    assert D.verify(str(out))[0] == []  # images were copied next to the records

    r = cli("dataset", "to-coco", str(out), "-o", str(out / "annotations.json"))
    assert r.returncode == 0, r.stderr
    coco = json.loads((out / "annotations.json").read_text())
    assert len(coco["images"]) == 3 and len(coco["annotations"]) == s["masks"]
    from segany.datasets import open_dataset

    ds = open_dataset(str(out))  # what segany train --data OUT reads
    assert len(ds) == 3 and sum(len(ds[i][1]) for i in range(3)) == s["masks"]

    back = tmp_path / "back"
    n_img, n_ann = D.from_coco(str(out / "annotations.json"), str(back), images=str(out), copy_images=True)
    assert (n_img, n_ann) == (3, s["masks"])
    for _, rel, rec, _ in D.records(str(out)):
        rb = json.loads((back / rel).read_text())
        assert rb["image"] == rec["image"]
        assert [a["segmentation"] for a in rb["annotations"]] == [a["segmentation"] for a in rec["annotations"]]
        assert [a["predicted_iou"] for a in rb["annotations"]] == [a["predicted_iou"] for a in rec["annotations"]]
    assert D.verify(str(back))[0] == []
    r = cli("dataset", "verify", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no such folder" in r.stderr


def test_cycle_annotate_train_annotate(tmp_path, model_path):
    """The data-engine loop on small generated images: annotate -> verify -> to-coco -> train a few
    steps on the result (the training engineer's API) -> annotate again with the new weights."""
    from segany.train.loop import TrainConfig, train

    src = tmp_path / "in"
    make_images(src, 6)
    round1 = tmp_path / "round1"
    s1 = run_job([str(src)], str(round1), opts(model_path, copy_images=True), progress=False)
    assert s1["ok"] == 6 and s1["masks"] > 0
    assert D.verify(str(round1))[0] == []
    D.to_coco(str(round1), str(round1 / "annotations.json"))

    run = tmp_path / "run"
    new_weights = tmp_path / "round1.safetensors"
    cfg = TrainConfig(data=[str(round1)], out=str(run), init=model_path, export=str(new_weights), steps=3,
                      objects_per_image=2, iters=2, grad_iters=1, warmup_steps=1, val_every=1000, val_images=2,
                      imagenet_backbone=False, progress=False, threads=1)
    train(cfg)
    assert new_weights.is_file()
    from segany.train.export import read_safetensors

    _, old_sd, _ = read_safetensors(model_path)
    _, new_sd, _ = read_safetensors(str(run / "last.safetensors"))
    assert any(not np.allclose(old_sd[k].numpy(), new_sd[k].numpy()) for k in old_sd), "training changed nothing"

    round2 = tmp_path / "round2"
    s2 = run_job([str(src)], str(round2), opts(str(run / "last.safetensors"), copy_images=True), progress=False)
    assert s2["ok"] + s2["rejected"] == 6 and s2["failed"] == 0
    assert D.verify(str(round2))[0] == []
