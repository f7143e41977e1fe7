"""The bundled `tiny` model: the README's offline quick start on the sample photo that ships in
examples/, and the segment-everything thresholds the weights file carries."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from segany.checkpoints import model_everything_defaults
from segany.cli import main

CAT = Path(__file__).resolve().parents[1] / "examples" / "cat.png"


def test_quick_start_segments_the_cat_offline(tmp_path, monkeypatch):
    import segany.download as download

    def no_network(*a, **k):
        raise AssertionError("the bundled model must not download anything")

    monkeypatch.setattr(download, "ensure_checkpoint", no_network)
    out = tmp_path / "mask.png"
    assert main(["segment", str(CAT), "--point", "200,150", "-o", str(out), "--overlay", str(tmp_path / "o.png")]) == 0
    mask = np.array(Image.open(out)) > 0
    w, h = Image.open(CAT).size
    assert mask.shape == (h, w)
    # the click is on the cat's face; the cat fills most of the photo
    assert mask[150, 200] and 0.3 < mask.mean() < 0.98


def test_bundled_model_carries_everything_thresholds(tmp_path, capsys):
    t = model_everything_defaults("tiny")
    assert set(t) == {"pred_iou_thresh", "stability_score_thresh"}
    assert all(0 < v < 0.88 for v in t.values())  # below SAM's: its IoU head is less confident
    assert main(["everything", str(CAT), "-o", str(tmp_path / "ev"), "--points-per-side", "8", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"pred_iou_thresh {t['pred_iou_thresh']:g}" in printed and " 0 mask(s)" not in printed
