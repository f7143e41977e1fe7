"""HTTP API of ``segany serve`` (segany/server): tiny random model, real requests through
FastAPI's TestClient and through a real uvicorn server on 127.0.0.1."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

fastapi = pytest.importorskip("fastapi", reason="the server extra (fastapi) is not installed")
pytest.importorskip("multipart", reason="python-multipart is not installed")
from fastapi.testclient import TestClient  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from segany.modeling.build import build_sam  # noqa: E402
from segany.predictor import PromptError, SamPredictor  # noqa: E402
from segany.server.app import create_app  # noqa: E402
from segany.server import wait_until_serving  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# A tiny SAM (image 64 px, 4x4 embedding grid, 16x16 low-res masks): fast on any CPU.
TINY = {
    "image_size": 64,
    "prompt_embed_dim": 32,
    "encoder": {"type": "vit", "embed_dim": 32, "depth": 1, "num_heads": 2, "global_attn_indexes": [], "patch_size": 16, "window_size": 2},
    "decoder": {"depth": 2, "mlp_dim": 64, "num_heads": 2, "iou_head_hidden_dim": 32},
}


def tiny_model():
    torch.manual_seed(0)
    return build_sam(TINY)


def make_image(w=96, h=72, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = np.full((h, w, 3), 235, np.uint8)
    a[h // 5 : h // 2, w // 4 : w // 2] = (200, 40, 40)
    a[h // 2 :, w // 2 : w - 5] = (40, 60, 200)
    a = np.clip(a.astype(int) + rng.integers(-10, 10, a.shape), 0, 255).astype(np.uint8)
    return a


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def make_dataset(tmp_path: Path) -> Path:
    ds = tmp_path / "data"
    (ds / "sub").mkdir(parents=True)
    Image.fromarray(make_image()).save(ds / "a.png")
    Image.fromarray(make_image(80, 60, 1)).save(ds / "sub" / "b.jpg", quality=95)
    outside = tmp_path / "secret"
    outside.mkdir()
    Image.fromarray(make_image(32, 32, 2)).save(outside / "outside.png")
    (outside / "outside.json").write_text('{"secret": true}')
    return ds


def wait_ready(client, image_id, timeout=60.0):
    st = client.post(f"/api/embed/{image_id}").json()
    t0 = time.time()
    while st["state"] != "ready":
        assert st["state"] in ("queued", "running"), st
        assert time.time() - t0 < timeout
        time.sleep(0.02)
        st = client.get(f"/api/status/{image_id}").json()
    return st


def decode(seg) -> np.ndarray:
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path)


@pytest.fixture
def client(dataset, model):
    with TestClient(create_app(dataset, model, cache_size=4)) as c:
        yield c


# ------------------------------------------------------------------ listing, schema
def test_list_images_and_openapi(client):
    ims = client.get("/api/images").json()["images"]
    assert [i["id"] for i in ims] == ["a.png", "sub/b.jpg"]
    assert (ims[0]["width"], ims[0]["height"]) == (96, 72)
    info = client.get("/api/image/sub/b.jpg").json()
    assert info["previous"] == "a.png" and info["next"] is None and info["embedding"]["state"] == "none"
    paths = client.get("/openapi.json").json()["paths"]
    for p in ["/api/images", "/api/predict/{image_id}", "/api/proposals/{image_id}", "/api/annotations/{image_id}", "/api/export", "/api/embed/{image_id}", "/api/status/{image_id}"]:
        assert p in paths, p
    assert client.get("/").status_code == 200 and b"canvas" in client.get("/").content
    assert client.get("/static/app.js").status_code == 200
    r = client.get("/api/file/a.png")
    assert r.status_code == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")), make_image())


# ------------------------------------------------------------------ predict
def test_predict_matches_predictor(client, model):
    st = wait_ready(client, "a.png")
    assert st["progress"] == 1.0
    r = client.post("/api/predict/a.png", json={"points": [[30, 20]], "labels": [1]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["masks"]) == 3
    ref = SamPredictor(model)
    ref.set_image(make_image())
    masks, scores, _ = ref.predict(np.array([[30.0, 20.0]]), np.array([1]), multimask_output=True)
    for i, m in enumerate(out["masks"]):
        assert m["segmentation"]["size"] == [72, 96]
        assert np.array_equal(decode(m["segmentation"]), masks[i])
        assert m["score"] == pytest.approx(float(scores[i]), abs=1e-5)
        assert m["area"] == int(masks[i].sum())
    assert out["best"] == int(np.argmax(scores))
    # refine with the previous low-res mask, plus a negative point and a box
    r2 = client.post("/api/predict/a.png", json={
        "points": [[30, 20], [80, 60]], "labels": [1, 0], "box": [10, 5, 60, 40],
        "mask_input_id": out["masks"][0]["logits_id"], "multimask": False,
    })
    assert r2.status_code == 200, r2.text
    assert len(r2.json()["masks"]) == 1
    _, _, low = ref.predict(np.array([[30.0, 20.0]]), np.array([1]), multimask_output=True)
    m2, _, _ = ref.predict(np.array([[30.0, 20.0], [80, 60]]), np.array([1, 0]), np.array([10, 5, 60, 40.0]), low[0:1], multimask_output=False)
    assert np.array_equal(decode(r2.json()["masks"][0]["segmentation"]), m2[0])


def test_predict_snap_edges(client, model, dataset):
    from segany import edges

    wait_ready(client, "a.png")
    body = {"points": [[30, 20]], "labels": [1]}
    plain = client.post("/api/predict/a.png", json=body).json()
    r = client.post("/api/predict/a.png", json={**body, "snap_edges": True})
    assert r.status_code == 200, r.text
    out = r.json()
    ref = SamPredictor(model)
    ref.set_image(make_image())
    full, scores, low = ref.predict(np.array([[30.0, 20.0]]), np.array([1]), multimask_output=True, return_logits=True)
    want = edges.snap_to_edges(make_image(), full, edges.logit_radius((72, 96), low.shape[-1]))
    for i, m in enumerate(out["masks"]):
        assert np.array_equal(decode(m["segmentation"]), want[i])
        assert m["score"] == pytest.approx(plain["masks"][i]["score"], abs=1e-5)  # scores are the model's
    assert "snap_ms" in out["timing"]
    # the service reads the image once, on the first request that snaps, and keeps it
    from segany.server.engine import ModelService
    from segany.server.storage import ImageRecord

    svc = ModelService(model)
    rec = ImageRecord("a.png", dataset / "a.png", 96, 72, 1, 2, False)
    reads = []

    def load(_rec=None):
        reads.append(1)
        return make_image()

    entry = svc.entry(rec, load)
    assert len(reads) == 1 and entry.pixels is None  # embedding alone keeps no pixels
    for _ in range(2):
        res = svc.predict(entry, [[30, 20]], [1], None, None, True, snap_edges=True, load_pixels=load)
        assert np.array_equal(decode(res["masks"][0]["segmentation"]), want[0])
    assert len(reads) == 2
    entry.pixels = None
    with pytest.raises(PromptError, match="image changed since it was embedded"):
        svc.predict(entry, [[30, 20]], [1], None, None, True, snap_edges=True, load_pixels=lambda: make_image(50, 40))


def test_cropped_upscale_equals_predictor(model):
    from segany.server.engine import _upscale_masks

    p = SamPredictor(model)
    p.set_image(make_image(300, 200, 3))
    g = torch.Generator().manual_seed(0)
    low = torch.randn(6, 16, 16, generator=g) - 1.5  # sparse foreground
    low[3] = -1.0  # empty
    low[4] = 1.0  # full
    low[5, 7, 9] = 5.0  # one positive low-res pixel
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    low[2] = 3.0 - ((yy - 5) ** 2 + (xx - 8) ** 2).sqrt()  # a smooth blob: mostly uniform tiles
    p.upscale(low[:1])
    ref = (p.upscale(low) > model.mask_threshold).numpy()
    got = _upscale_masks(p, low)
    assert np.array_equal(_upscale_masks(p, low, tile=7), ref)
    assert got.shape == (6, 200, 300) and np.array_equal(got, ref)
    assert not got[3].any() and got[4].all() and 0 < got[5].sum() < 2000


@pytest.mark.parametrize("body, status, words", [
    ({"points": [[500, 20]], "labels": [1]}, 400, "outside the image"),
    ({"points": [[-1, 20]], "labels": [1]}, 400, "outside the image"),
    ({"points": [[10, 20]], "labels": [1, 0]}, 400, "labels"),
    ({"points": [[10, 20]], "labels": [7]}, 400, "point_labels"),
    ({"box": [50, 40, 10, 5]}, 400, "x0 <= x1"),
    ({"box": [0, 0, 10, 500]}, 400, "outside the image"),
    ({}, 400, "at least one point or a box"),
    ({"points": [[10, 20]], "labels": [1], "mask_input_id": "nope"}, 400, "mask_input_id"),
    ({"points": [[10]], "labels": [1]}, 422, "points"),
    ({"points": "x"}, 422, "points"),
    ({"box": [1, 2, 3]}, 422, "box"),
])
def test_predict_bad_prompts(client, body, status, words):
    wait_ready(client, "a.png")
    r = client.post("/api/predict/a.png", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_malformed_requests(client):
    wait_ready(client, "a.png")
    r = client.post("/api/predict/a.png", content=b'{"points": [[1, 2]', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "invalid request" in r.json()["detail"]
    r = client.post("/api/predict/a.png", content=b'{"points": [[NaN, 2]], "labels": [1]}', headers={"content-type": "application/json"})
    assert r.status_code in (400, 422) and r.json()["detail"]
    r = client.post("/api/predict/nope.png", json={"points": [[1, 2]], "labels": [1]})
    assert r.status_code == 404 and "unknown image id" in r.json()["detail"]
    assert client.get("/api/status/nope.png").status_code == 404
    assert client.get("/api/nothing").status_code == 404
    r = client.put("/api/annotations/a.png", json={"annotations": "x"})
    assert r.status_code == 422
    r = client.post("/api/proposals/a.png", json={"points_per_side": 10000})
    assert r.status_code == 422 and "points_per_side" in r.json()["detail"]


# ------------------------------------------------------------------ path safety
def test_no_path_traversal(dataset, model, tmp_path):
    secret = tmp_path / "secret"
    os.symlink(secret / "outside.png", dataset / "link.png")  # a symlinked image leading outside
    os.symlink(secret, dataset / "linkdir")  # a symlinked folder leading outside
    os.symlink(secret / "outside.json", dataset / "a.json")  # annotation file leading outside
    with TestClient(create_app(dataset, model)) as c:
        ids = [i["id"] for i in c.get("/api/images").json()["images"]]
        assert ids == ["a.png", "sub/b.jpg"]
        for path in ["../secret/outside.png", "..%2Fsecret%2Foutside.png", "%2E%2E/secret/outside.png",
                     f"{secret}/outside.png", f"%2F{str(secret)[1:]}/outside.png", "link.png", "linkdir/outside.png",
                     "sub/../../secret/outside.png", "sub%2F..%2F..%2Fsecret%2Foutside.png", "a.png%00.json"]:
            for method, url in [("GET", "/api/file/"), ("GET", "/api/annotations/"), ("POST", "/api/embed/")]:
                r = c.request(method, url + path)
                assert r.status_code == 404, (method, url + path, r.status_code)
                assert r.headers["content-type"] == "application/json" and "detail" in r.json()
                assert b"PNG" not in r.content and b'"secret": true' not in r.content
            r = c.put("/api/annotations/" + path, json={"annotations": []})
            assert r.status_code == 404
        # a real server sees the raw path (no client-side normalisation of ../)
        import http.client

        with ServerThread(c.app) as srv:
            for raw in ["/api/file/../secret/outside.png", "/api/file/../../secret/outside.png", "/api/file//" + str(secret)[1:] + "/outside.png",
                        "/api/annotations/..%2f..%2fsecret%2foutside.png", "/api/file/sub/..%5c..%5csecret%5coutside.png", "/static/../../secret/outside.png"]:
                conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
                conn.request("GET", raw)
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                assert resp.status in (400, 404), (raw, resp.status)
                assert b"PNG" not in body and b'"secret": true' not in body
        # the symlinked annotation file is neither read nor written through
        r = c.get("/api/annotations/a.png")
        assert r.status_code == 403 and "symlink" in r.json()["detail"]
        assert c.put("/api/annotations/a.png", json={"annotations": []}).status_code == 403
        assert json.loads((secret / "outside.json").read_text()) == {"secret": True}
        # an upload's name cannot place it anywhere else
        r = c.post("/api/images", files={"file": ("../../evil.png", png_bytes(make_image(20, 20)), "image/png")})
        assert r.status_code == 201, r.text
        assert r.json()["id"] == "evil.png" and (dataset / "evil.png").is_file()
        r = c.post("/api/images", files={"file": ("/etc/x/..\\..\\evil2.png", png_bytes(make_image(20, 20)), "image/png")})
        assert r.status_code == 201 and r.json()["id"] == "evil2.png"
    assert not (tmp_path / "evil.png").exists() and sorted(os.listdir(secret)) == ["outside.json", "outside.png"]


def test_loopback_server_refuses_foreign_host_header(dataset, model):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends
    "Host: evil.example"; a server bound to loopback (what `segany serve` does by default) must
    not answer it, reads included, while its own names work with any port."""
    from segany.server.app import LOOPBACK_HOSTS, _host_name

    assert [_host_name(h) for h in ("[::1]:8000", "localhost:80", "127.0.0.1", "::1")] == ["::1", "localhost", "127.0.0.1", "::1"]
    with TestClient(create_app(dataset, model, allowed_hosts=LOOPBACK_HOSTS), base_url="http://127.0.0.1:8000") as c:
        assert c.get("/api/images").status_code == 200
        for host in ("localhost:8000", "[::1]:8000", "LOCALHOST"):
            assert c.get("/api/images", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""):
            r = c.get("/api/images", headers={"Host": host})
            assert r.status_code == 400 and "Host header" in r.json()["detail"], host
        assert c.get("/api/annotations/a.png", headers={"Host": "evil.example"}).status_code == 400


def test_cross_origin_writes_refused(client, dataset):
    png = png_bytes(make_image(20, 20))
    r = client.post("/api/images", files={"file": ("x.png", png, "image/png")}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    r = client.put("/api/annotations/a.png", json={"annotations": []}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and not (dataset / "a.json").exists()
    assert client.get("/api/images", headers={"Origin": "http://evil.example"}).status_code == 200
    r = client.post("/api/images", files={"file": ("x.png", png, "image/png")}, headers={"Origin": "http://testserver"})
    assert r.status_code == 201  # the page itself


# ------------------------------------------------------------------ uploads
def test_upload_and_limits(dataset, model):
    with TestClient(create_app(dataset, model, max_upload_bytes=30_000, max_pixels=100 * 100)) as c:
        ok = png_bytes(make_image(50, 40))
        r = c.post("/api/images", files={"file": ("my photo!.png", ok, "image/png")})
        assert r.status_code == 201, r.text
        assert r.json() == {"id": "my_photo.png", "file_name": "my_photo.png", "width": 50, "height": 40}
        r = c.post("/api/images", files={"file": ("my photo!.png", ok, "image/png")})
        assert r.json()["id"] == "my_photo_1.png"  # never overwrites
        r = c.post("/api/images", files={"file": ("a.jpg", ok, "image/jpeg")})
        assert r.json()["id"] == "a_1.jpg"  # a.png exists: would share a.json
        assert "my_photo.png" in [i["id"] for i in c.get("/api/images").json()["images"]]
        r = c.post("/api/images", files={"file": ("x.png", b"not an image at all", "image/png")})
        assert r.status_code == 400 and "not an image" in r.json()["detail"]
        r = c.post("/api/images", files={"file": ("x.exe", ok, "image/png")})
        assert r.status_code == 400 and "file name must end" in r.json()["detail"]
        r = c.post("/api/images", files={"file": ("big.png", png_bytes(np.full((150, 200, 3), 128, np.uint8)), "image/png")})
        assert r.status_code == 400 and "above the limit" in r.json()["detail"]
        noise = np.random.default_rng(0).integers(0, 255, (100, 100, 3), dtype=np.uint8)
        r = c.post("/api/images", files={"file": ("noise.png", png_bytes(noise), "image/png")})
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        # any request body above the upload limit + 1 MiB is cut off by the middleware
        r = c.post("/api/predict/a.png", content=b"[" + b"0," * 600_000 + b"0]", headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit" in r.json()["detail"]

        def chunks():  # streamed, no Content-Length
            for _ in range(20):
                yield b" " * 100_000

        r = c.post("/api/predict/a.png", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = c.post("/api/images", files={"file": ("e.png", b"", "image/png")})
        assert r.status_code == 400
    assert not (dataset / "big.png").exists() and not (dataset / "noise.png").exists()


# ------------------------------------------------------------------ annotations, export
def test_annotations_roundtrip_and_export(client, dataset):
    wait_ready(client, "a.png")
    m = client.post("/api/predict/a.png", json={"points": [[30, 20]], "labels": [1]}).json()["masks"][0]
    seg = m["segmentation"]
    box_mask = np.zeros((72, 96), bool)
    box_mask[10:20, 30:50] = True
    rle2 = mask_utils.encode(np.asfortranarray(box_mask.astype(np.uint8)))
    seg2 = {"size": [72, 96], "counts": rle2["counts"].decode()}
    anns = [
        {"id": 1, "segmentation": seg, "predicted_iou": m["score"], "point_coords": [[30, 20]], "label": "thing", "area": 1, "bbox": [0, 0, 1, 1]},
        {"id": 7, "segmentation": seg2, "label": "box"},
    ]
    r = client.put("/api/annotations/a.png", json={"annotations": anns})
    assert r.status_code == 200, r.text
    on_disk = json.loads((dataset / "a.json").read_text())
    assert on_disk == r.json() == client.get("/api/annotations/a.png").json()
    assert on_disk["image"]["file_name"] == "a.png" and (on_disk["image"]["width"], on_disk["image"]["height"]) == (96, 72)
    a0, a1 = on_disk["annotations"]
    assert a0["area"] == m["area"] and a0["label"] == "thing" and a0["point_coords"] == [[30.0, 20.0]]
    assert a1["area"] == 200 and a1["bbox"] == [30.0, 10.0, 20.0, 10.0] and a1["id"] == 7
    for key in ["id", "segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box", "label"]:
        assert key in a1
    assert [p.name for p in dataset.iterdir() if p.name.startswith(".")] == []  # no temp files left
    assert [i["annotated"] for i in client.get("/api/images").json()["images"]] == [True, False]

    # malformed RLE never reaches pycocotools' C decoder and never replaces the file
    bad = [
        {"size": [72, 95], "counts": seg2["counts"]},
        {"size": [72, 96], "counts": seg2["counts"] + "0"},
        {"size": [72, 96], "counts": "\x7f\x7f"},
        {"size": [72, 96], "counts": "o"},  # ends in the middle of a number
        {"size": [72, 96], "counts": [72 * 96 + 5]},
        {"size": [72, 96], "counts": [-5, 72 * 96 + 5]},
        {"size": [72, 96]},
        "polygon",
    ]
    for s in bad:
        r = client.put("/api/annotations/a.png", json={"annotations": [{"segmentation": s}]})
        assert r.status_code == 400, (s, r.text)
        assert "segmentation" in r.json()["detail"]
    r = client.put("/api/annotations/a.png", json={"annotations": [{"id": 1, "segmentation": seg2}, {"id": 1, "segmentation": seg2}]})
    assert r.status_code == 400 and "unique" in r.json()["detail"]
    assert json.loads((dataset / "a.json").read_text()) == on_disk
    # uncompressed RLE is accepted and stored compressed
    r = client.put("/api/annotations/sub/b.jpg", json={"annotations": [{"segmentation": {"size": [60, 80], "counts": [100, 50, 60 * 80 - 150]}}]})
    assert r.status_code == 200 and r.json()["annotations"][0]["area"] == 50
    assert (dataset / "sub" / "b.json").is_file()

    coco = client.get("/api/export").json()
    assert {im["file_name"] for im in coco["images"]} == {"a.png", "sub/b.jpg"}
    assert sorted(c["name"] for c in coco["categories"]) == ["box", "object", "thing"]
    from pycocotools.coco import COCO

    api = COCO()
    api.dataset = coco
    api.createIndex()
    a_id = next(im["id"] for im in coco["images"] if im["file_name"] == "a.png")
    masks = [api.annToMask(a) for a in api.loadAnns(api.getAnnIds(imgIds=[a_id]))]
    assert any(np.array_equal(mk.astype(bool), box_mask) for mk in masks)


def test_annotations_readable_by_sa1b_reader(client, dataset):
    datasets = pytest.importorskip("segany.datasets")
    m = np.zeros((72, 96), bool)
    m[5:30, 5:40] = True
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    seg = {"size": [72, 96], "counts": rle["counts"].decode()}
    assert client.put("/api/annotations/a.png", json={"annotations": [{"segmentation": seg}]}).status_code == 200
    ds = datasets.SA1BDataset(str(dataset))
    assert len(ds) == 1
    sample = ds[0]
    masks = getattr(sample, "masks", None)
    if masks is None:
        masks = sample["masks"] if isinstance(sample, dict) else sample[1]
    assert np.array_equal(np.asarray(masks[0]).astype(bool), m)


# ------------------------------------------------------------------ proposals
def test_proposals(client):
    wait_ready(client, "a.png")
    r = client.post("/api/proposals/a.png", json={"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0})
    assert r.status_code == 200, r.text
    props = r.json()["proposals"]
    assert props, "with zero thresholds there must be proposals"
    assert props == sorted(props, key=lambda p: -p["predicted_iou"])
    for p in props:
        mk = decode(p["segmentation"])
        assert mk.shape == (72, 96) and mk.sum() == p["area"] > 0
        assert 0 <= p["point_coords"][0][0] <= 96 and 0 <= p["point_coords"][0][1] <= 72
    strict = client.post("/api/proposals/a.png", json={"points_per_side": 8, "pred_iou_thresh": 1.0, "stability_score_thresh": 1.0}).json()
    assert len(strict["proposals"]) <= len(props)


def test_proposal_defaults_come_from_the_model(dataset, model):
    """Without thresholds in the request the model's calibrated ones apply (else 0.80/0.85):
    zero thresholds carried by the model give the same proposals as zero thresholds asked for."""
    model.everything_defaults = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    try:
        with TestClient(create_app(dataset, model, cache_size=2)) as c:
            wait_ready(c, "a.png")
            asked = c.post("/api/proposals/a.png", json={"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}).json()
            default = c.post("/api/proposals/a.png", json={"points_per_side": 8}).json()
            assert asked["proposals"] and default["proposals"] == asked["proposals"]
    finally:
        del model.everything_defaults


# ------------------------------------------------------------------ cache, concurrency
def test_lru_cache_is_bounded(dataset, model):
    with TestClient(create_app(dataset, model, cache_size=1)) as c:
        for _ in range(2):
            for iid in ["a.png", "sub/b.jpg"]:
                r = c.post(f"/api/predict/{iid}", json={"points": [[10, 10]], "labels": [1]})  # embeds on demand
                assert r.status_code == 200, r.text
                cache = c.get("/api/info").json()["cache"]
                assert cache["size"] == 1 and cache["images"] == [iid]


class ServerThread:
    """uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert self.thread.is_alive() and time.time() - t0 < 30, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def test_concurrent_clients_same_and_different_images(dataset, model):
    import httpx

    points = {"a.png": [[30, 20], [70, 50], [10, 60]], "sub/b.jpg": [[20, 20], [60, 40], [5, 5]]}
    expected = {}
    for iid, pts in points.items():
        p = SamPredictor(model)
        from segany.io import load_image

        p.set_image(load_image(dataset / iid))
        for pt in pts:
            expected[(iid, tuple(pt))] = p.predict(np.array([pt], float), np.array([1]))[0]
    errors, statuses = [], []

    def worker(k):
        with httpx.Client(base_url=srv.url, timeout=60) as cl:
            for j in range(12):
                iid = ["a.png", "sub/b.jpg"][(k + j) % 2]
                pt = points[iid][(k * 7 + j) % 3]
                r = cl.post(f"/api/predict/{iid}", json={"points": [pt], "labels": [1]})
                statuses.append(r.status_code)
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                got = [decode(m["segmentation"]) for m in r.json()["masks"]]
                if not all(np.array_equal(g, e) for g, e in zip(got, expected[(iid, tuple(pt))])):
                    errors.append(f"wrong masks for {iid} {pt}")

    with ServerThread(create_app(dataset, model, cache_size=2)) as srv:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(statuses) == 72 and not errors, errors[:3]


# ------------------------------------------------------------------ the command, kill -9
def test_serve_command_and_kill_keeps_annotations(dataset, model, tmp_path):
    import httpx
    from safetensors.torch import save_file

    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt), metadata={"config": json.dumps(TINY)})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = "import sys; from segany.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(dataset), "--checkpoint", str(ckpt), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_serving(url, proc, timeout=60)
        except RuntimeError as e:
            out = proc.stdout.read().decode() if proc.poll() is not None else ""
            pytest.fail(f"{e}\n{out}")
        assert httpx.get(url + "/api/info").json()["model"] == "custom"
        r = httpx.post(url + "/api/predict/a.png", json={"points": [[30, 20]], "labels": [1]}, timeout=60)
        assert r.status_code == 200, r.text
        seg = r.json()["masks"][0]["segmentation"]
        versions = []
        stop = threading.Event()

        def writer():
            with httpx.Client(base_url=url, timeout=10) as cl:
                n = 0
                while not stop.is_set():
                    n += 1
                    anns = [{"id": i + 1, "segmentation": seg, "label": f"v{n}"} for i in range(n % 5 + 1)]
                    try:
                        if cl.put("/api/annotations/a.png", json={"annotations": anns}).status_code == 200:
                            versions.append(n)
                    except httpx.TransportError:
                        return

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(1.5)
        os.kill(proc.pid, signal.SIGKILL)  # killed in the middle of a stream of saves
        proc.wait(10)
        stop.set()
        t.join(15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert versions, "no save succeeded before the kill"
    data = json.loads((dataset / "a.json").read_text())  # complete, parseable
    n = int(data["annotations"][0]["label"][1:])
    assert n >= versions[-1] and len(data["annotations"]) == n % 5 + 1
    assert all(a["label"] == f"v{n}" for a in data["annotations"])


def test_wait_until_serving_reports_a_dead_server_or_a_timeout():
    """Scripts waiting for `segany serve` get a clear error instead of hanging."""
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match="exited with code 3"):
        wait_until_serving(f"http://127.0.0.1:{port}", dead, timeout=5)
    with pytest.raises(RuntimeError, match="did not answer"):
        wait_until_serving(f"http://127.0.0.1:{port}", None, timeout=0.3)
