"""Pack what a training run on a lent GPU needs into ``.device/`` (git-ignored), within the device
tool's 64 MiB working-tree limit (the repository itself is ~11 MB of it).

The device machine reaches no network and its Python (3.12, CUDA PyTorch) lacks pycocotools, and
``../shared/data`` does not travel with the tree. So this copies the six training sets into
``.device/data/<set>/`` with their images re-encoded as WebP (the quality lowered until the whole
pack fits ``--budget-mb``; same pixels size, same file names, so ``segany.datasets.is_val`` still
splits them as before) and their COCO JSON as it is, and downloads the pycocotools wheel for the
device's Python into ``.device/wheels/``. The pack is a transient copy for one lent machine: it is
never committed (../shared/data/README.md).

    python tools/device/prepare.py                  # then: device run, carry [".device"],
                                                    # command "bash tools/device/train.sh 8"
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys

from PIL import Image

SETS = ["coco_mval", "coco128", "clothing", "feral_cats", "horses", "people"]


def _encode(path: str, quality: int) -> bytes:
    im = Image.open(path).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "WEBP", quality=quality, method=4)
    return buf.getvalue()


def pack(src_root: str, out: str, budget_mb: float) -> dict:
    files = []
    for s in SETS:
        with open(os.path.join(src_root, s, "annotations.json")) as f:
            coco = json.load(f)
        files += [(s, im["file_name"]) for im in coco["images"]]
    json_bytes = sum(os.path.getsize(os.path.join(src_root, s, "annotations.json")) for s in SETS)
    for quality in (55, 50, 45, 40, 35):
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        total = json_bytes
        for s, name in files:
            dst = os.path.join(tmp, s, "images", name)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            data = _encode(os.path.join(src_root, s, "images", name), quality)
            with open(dst, "wb") as f:  # WebP bytes under the original name (Pillow reads by content)
                f.write(data)
            total += len(data)
        if total <= budget_mb * 1e6:
            for s in SETS:
                shutil.copy(os.path.join(src_root, s, "annotations.json"), os.path.join(tmp, s, "annotations.json"))
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
            return {"images": len(files), "webp_quality": quality, "mb": round(total / 1e6, 1)}
        print(f"quality {quality}: {total / 1e6:.1f} MB, over {budget_mb} MB", file=sys.stderr)
    shutil.rmtree(out + ".tmp", ignore_errors=True)
    raise SystemExit(f"no WebP quality fits {budget_mb} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data"))
    ap.add_argument("--out", default=".device")
    ap.add_argument("--budget-mb", type=float, default=54.0, help="images + JSON (the tree adds ~11 MB, the wheel 0.5 MB; the limit is 64 MiB = 67 MB)")
    ap.add_argument("--python-version", default="3.12", help="the device's Python (device tool, KINDS.md)")
    ap.add_argument("--no-wheels", action="store_true")
    a = ap.parse_args()
    info = pack(a.data, os.path.join(a.out, "data"), a.budget_mb)
    if not a.no_wheels:
        wheels = os.path.join(a.out, "wheels")
        shutil.rmtree(wheels, ignore_errors=True)
        from importlib.metadata import version

        subprocess.run([sys.executable, "-m", "pip", "download", "-q", f"pycocotools=={version('pycocotools')}", "--no-deps",
                        "--only-binary=:all:", "--python-version", a.python_version, "--platform", "manylinux2014_x86_64",
                        "--platform", "manylinux_2_17_x86_64", "-d", wheels], check=True)
        info["wheels"] = sorted(os.listdir(wheels))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
