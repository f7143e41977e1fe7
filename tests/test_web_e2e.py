"""End to end in a real browser: the annotation page of ``segany serve`` in headless Chromium
(Playwright driving the system ``chromium``), against a real uvicorn server on 127.0.0.1.

Open the page, click on an object, check the mask is drawn on the canvas (pixel by pixel against
the mask the server returned), refine with a right click, undo, accept, save, and find the object
in the per-image JSON on disk. A screenshot is written to the test's tmp folder and to
/tmp/segany_e2e.png.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does this)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytest.importorskip("fastapi", reason="the server extra (fastapi) is not installed")

from test_server import ServerThread, decode, tiny_model  # noqa: E402

from segany.server.app import create_app  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CURRENT_COLOR = np.array([30, 144, 255], float)


def scene(w=160, h=120) -> np.ndarray:
    a = np.full((h, w, 3), (225, 230, 235), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    a[(xx - 50) ** 2 + (yy - 60) ** 2 < 28 ** 2] = (210, 50, 40)  # a red disc
    a[20:100, 100:145] = (40, 70, 190)  # a blue block
    return a


def canvas_pixels(page) -> np.ndarray:
    data = page.evaluate("""() => { const c = document.getElementById('canvas');
        return {w: c.width, h: c.height, px: Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)}; }""")
    return np.array(data["px"], np.float64).reshape(data["h"], data["w"], 4)[..., :3]


def test_click_mask_accept_save(tmp_path):
    ds = tmp_path / "data"
    ds.mkdir()
    img = scene()
    Image.fromarray(img).save(ds / "scene.png")
    Image.fromarray(scene()[:, ::-1].copy()).save(ds / "scene2.png")
    with ServerThread(create_app(ds, tiny_model())) as srv, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/")
            page.wait_for_function("window.segany && window.segany.ready === true", timeout=60_000)
            assert page.locator("#image-name").inner_text() == "scene.png"
            assert page.locator("#image-list li").count() == 2

            # left click on the red disc at image pixel (50, 60)
            box = page.locator("#canvas").bounding_box()
            scale = box["width"] / 160

            def at(x, y):
                return box["x"] + (x + 0.5) * scale, box["y"] + (y + 0.5) * scale

            with page.expect_response(lambda r: "/api/predict/" in r.url) as resp:
                page.mouse.click(*at(50, 60))
            body = resp.value.json()
            req = json.loads(resp.value.request.post_data)
            assert req["labels"] == [1] and abs(req["points"][0][0] - 50.5) < 1.5 and abs(req["points"][0][1] - 60.5) < 1.5
            assert len(body["masks"]) == 3
            page.wait_for_function("window.segany.prediction !== null")
            best = body["best"]
            mask = decode(body["masks"][best]["segmentation"])
            assert 0 < mask.sum() < mask.size, "the model must give a non-trivial mask for this test"

            # the canvas shows the image tinted exactly where the mask is
            px = canvas_pixels(page)
            yy, xx = np.mgrid[:120, :160]
            far = (xx - 50) ** 2 + (yy - 60) ** 2 > 8 ** 2  # away from the drawn click marker
            blend = 0.5 * img + 0.5 * CURRENT_COLOR
            inside, outside = mask & far, ~mask & far
            assert inside.sum() > 0 and outside.sum() > 0
            assert np.mean(np.abs(px[inside] - blend[inside]).max(-1) <= 3) > 0.99
            assert np.mean(np.abs(px[outside] - img[outside]).max(-1) <= 2) > 0.99
            # the three candidates are listed with scores and switchable with the keyboard
            assert page.locator("#candidates button").count() == 3
            other = (best + 1) % 3
            page.keyboard.press(str(other + 1))
            assert page.evaluate("window.segany.selected") == other
            page.keyboard.press(str(best + 1))

            # right click adds a negative point; undo removes it again
            with page.expect_response(lambda r: "/api/predict/" in r.url) as resp2:
                page.mouse.click(*at(120, 60), button="right")
            assert json.loads(resp2.value.request.post_data)["labels"] == [1, 0]
            with page.expect_response(lambda r: "/api/predict/" in r.url):
                page.keyboard.press("Control+z")
            page.wait_for_function("window.segany.prompt.points.length === 1 && window.segany.seq >= 3")
            page.wait_for_timeout(100)
            final = page.evaluate("window.segany.prediction.masks[window.segany.selected].segmentation")
            assert np.array_equal(decode(final), mask)

            # E snaps the outlines to the image's edges (the same prompt again); E again turns it off
            with page.expect_response(lambda r: "/api/predict/" in r.url) as resp3:
                page.keyboard.press("e")
            assert json.loads(resp3.value.request.post_data)["snap_edges"] is True
            assert resp3.value.status == 200 and "snap_ms" in resp3.value.json()["timing"]
            assert page.locator("#snap").inner_text() == "Snap edges: on"
            with page.expect_response(lambda r: "/api/predict/" in r.url) as resp4:
                page.keyboard.press("e")
            assert json.loads(resp4.value.request.post_data)["snap_edges"] is False
            assert page.locator("#snap").inner_text() == "Snap edges: off"
            page.wait_for_timeout(100)
            final = page.evaluate("window.segany.prediction.masks[window.segany.selected].segmentation")
            assert np.array_equal(decode(final), mask)

            # accept with a label, save, and find the object on disk
            page.fill("#label", "disc")
            page.press("#label", "Enter")  # Enter accepts (also from the label field)
            assert page.locator("#objects li").count() == 1
            with page.expect_response(lambda r: "/api/annotations/" in r.url and r.request.method == "PUT") as saved:
                page.keyboard.press("s")
            assert saved.value.status == 200
            page.wait_for_function("document.getElementById('save-state').textContent === 'saved'")
            shot = tmp_path / "segany_e2e.png"
            page.screenshot(path=str(shot))
            shutil.copy(shot, "/tmp/segany_e2e.png")
            assert not errors, errors
        finally:
            browser.close()
    data = json.loads((ds / "scene.json").read_text())
    assert data["image"]["file_name"] == "scene.png" and (data["image"]["width"], data["image"]["height"]) == (160, 120)
    (ann,) = data["annotations"]
    assert ann["label"] == "disc" and ann["area"] == int(mask.sum())
    assert np.array_equal(decode(ann["segmentation"]), mask)
    assert Image.open(shot).size == (1100, 700)
