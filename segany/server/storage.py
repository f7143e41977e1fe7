"""The dataset folder behind the server: which images exist, their annotation files, uploads.

Safety rule: a request never names a file system path. Images are addressed by an *id* (their
path relative to the dataset folder, with ``/``), and an id is only honoured if it is in the
registry built by scanning the folder -- so ``../``, absolute paths, encoded slashes and the like
simply are not ids. Files whose real path (symlinks resolved) lies outside the folder are left out
of the registry, and annotation files are only read or written when their real location is inside
the folder too. Annotation writes are atomic (temporary file + rename, fsync'd), so a killed
server leaves either the old or the new file, never a torn one.
"""
from __future__ import annotations

import os
import re
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from PIL import Image

from ..io import IMAGE_EXTENSIONS, atomic_write_bytes, atomic_write_json, list_images, load_image
from . import rle as rle_utils

# Formats a browser shows directly; others (and EXIF-rotated files) are re-encoded to PNG.
BROWSER_FORMATS = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".gif": "image/gif", ".bmp": "image/bmp"}
UPLOAD_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class NotFound(LookupError):
    pass


class BadRequest(ValueError):
    pass


class Forbidden(PermissionError):
    pass


class TooLarge(ValueError):
    pass


@dataclass
class ImageRecord:
    id: str  # path relative to the dataset folder, "/"-separated
    path: Path  # real path, inside the dataset folder
    width: int
    height: int
    mtime_ns: int
    size: int
    exif_rotated: bool

    @property
    def ann_path(self) -> Path:
        return self.path.with_suffix(".json")

    @property
    def image_id(self) -> int:
        """A stable integer id (SA-1B / COCO ``image_id``) derived from the relative path."""
        return zlib.crc32(self.id.encode("utf-8")) & 0x7FFFFFFF

    def public(self) -> Dict[str, Any]:
        return {"id": self.id, "file_name": self.path.name, "width": self.width, "height": self.height}


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _image_size(path: Path) -> tuple:
    """(width, height, exif_rotated) as ``load_image`` will see it (EXIF orientation applied)."""
    with Image.open(path) as im:
        w, h = im.size
        try:
            orient = int(im.getexif().get(0x0112, 1))
        except Exception:
            orient = 1
    if orient in (5, 6, 7, 8):
        w, h = h, w
    return w, h, orient not in (1, 0)


class Dataset:
    def __init__(self, root: os.PathLike | str, max_upload_bytes: int = 32 << 20, max_pixels: int = 50_000_000) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder {root} does not exist")
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self._lock = threading.Lock()
        self._records: Dict[str, ImageRecord] = {}
        self._ann_locks: Dict[str, threading.Lock] = {}
        self.scan()

    # ------------------------------------------------------------ registry
    def scan(self) -> List[ImageRecord]:
        found: Dict[str, ImageRecord] = {}
        for p in list_images(self.root, recursive=True):
            try:
                real = p.resolve(strict=True)
            except (OSError, RuntimeError):
                continue
            if not _is_within(real, self.root) or not real.is_file():
                continue  # a symlink leading out of the dataset folder
            rel = p.relative_to(self.root).as_posix()
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            st = real.stat()
            old = self._records.get(rel)
            if old is not None and old.mtime_ns == st.st_mtime_ns and old.size == st.st_size and old.path == real:
                found[rel] = old
                continue
            try:
                w, h, rotated = _image_size(real)
            except Exception:
                continue  # unreadable files are not offered
            found[rel] = ImageRecord(rel, real, w, h, st.st_mtime_ns, st.st_size, rotated)
        with self._lock:
            self._records = found
        return list(found.values())

    def images(self) -> List[ImageRecord]:
        return sorted(self.scan(), key=lambda r: r.id)

    def get(self, image_id: str) -> ImageRecord:
        rec = self._records.get(image_id)
        if rec is None or not rec.path.is_file():
            self.scan()
            rec = self._records.get(image_id)
        if rec is None:
            raise NotFound(f"unknown image id {image_id!r} (ids are listed by GET /api/images)")
        return rec

    def neighbours(self, image_id: str) -> Dict[str, Optional[str]]:
        ids = [r.id for r in self.images()]
        if image_id not in ids:
            raise NotFound(f"unknown image id {image_id!r}")
        i = ids.index(image_id)
        return {"previous": ids[i - 1] if i > 0 else None, "next": ids[i + 1] if i + 1 < len(ids) else None}

    def load_pixels(self, rec: ImageRecord):
        return load_image(rec.path, max_pixels=self.max_pixels)

    def display_file(self, rec: ImageRecord) -> tuple:
        """(bytes or path, media type) for showing the image in a browser, upright."""
        media = BROWSER_FORMATS.get(rec.path.suffix.lower())
        if media is not None and not rec.exif_rotated:
            return rec.path, media
        import io

        buf = io.BytesIO()
        Image.fromarray(self.load_pixels(rec)).save(buf, format="PNG")
        return buf.getvalue(), "image/png"

    # ------------------------------------------------------------ uploads
    def save_upload(self, filename: str, data: bytes) -> ImageRecord:
        if len(data) > self.max_upload_bytes:
            raise TooLarge(f"upload is above the limit of {self.max_upload_bytes} bytes")
        if not data:
            raise BadRequest("upload is empty")
        base = os.path.basename((filename or "").replace("\\", "/"))
        stem, ext = os.path.splitext(base)
        ext = ext.lower()
        if ext not in UPLOAD_EXTENSIONS:
            raise BadRequest(f"file name must end in one of {sorted(UPLOAD_EXTENSIONS)}, got {base!r}")
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:80] or "upload"
        load_image(data, max_pixels=self.max_pixels)  # raises ImageError when not a readable image
        with self._lock:
            n = 0
            while True:
                name = f"{stem}{ext}" if n == 0 else f"{stem}_{n}{ext}"
                target = self.root / name
                s = Path(name).stem
                taken = os.path.lexists(target) or os.path.lexists(self.root / f"{s}.json") or any(
                    os.path.lexists(self.root / f"{s}{e}") for e in IMAGE_EXTENSIONS
                )
                if not taken:
                    break
                n += 1
            # reserve the name, then fill it atomically
            atomic_write_bytes(target, data)
        return self.get(name)

    # ------------------------------------------------------------ annotations
    def _ann_lock(self, image_id: str) -> threading.Lock:
        with self._lock:
            return self._ann_locks.setdefault(image_id, threading.Lock())

    def _ann_path_checked(self, rec: ImageRecord) -> Path:
        p = rec.ann_path
        if os.path.lexists(p):
            real = p.resolve()
            if os.path.islink(p) or not _is_within(real, self.root):
                raise Forbidden(f"annotation file for {rec.id!r} is a symlink; refusing to follow it")
        return p

    def empty_annotations(self, rec: ImageRecord) -> Dict[str, Any]:
        return {
            "image": {"image_id": rec.image_id, "file_name": rec.path.name, "width": rec.width, "height": rec.height},
            "annotations": [],
        }

    def read_annotations(self, rec: ImageRecord) -> Dict[str, Any]:
        import json

        p = self._ann_path_checked(rec)
        if not p.exists():
            return self.empty_annotations(rec)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BadRequest(f"annotation file {p.name} is not valid JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("annotations", []), list):
            raise BadRequest(f"annotation file {p.name} is not an SA-1B per-image JSON")
        data.setdefault("image", self.empty_annotations(rec)["image"])
        data.setdefault("annotations", [])
        return data

    def write_annotations(self, rec: ImageRecord, annotations: List[Dict[str, Any]]) -> Dict[str, Any]:
        clean = [self._clean_annotation(rec, a, i) for i, a in enumerate(annotations)]
        ids = [a["id"] for a in clean]
        if len(set(ids)) != len(ids):
            raise BadRequest("annotation ids must be unique")
        doc = self.empty_annotations(rec)
        doc["annotations"] = clean
        with self._ann_lock(rec.id):
            p = self._ann_path_checked(rec)
            atomic_write_json(p, doc)
        return doc

    def _clean_annotation(self, rec: ImageRecord, a: Any, index: int) -> Dict[str, Any]:
        where = f"annotations[{index}]"
        if not isinstance(a, dict):
            raise BadRequest(f"{where} must be an object")
        try:
            seg = rle_utils.validate(a.get("segmentation"), rec.height, rec.width)
        except rle_utils.RLEError as e:
            raise BadRequest(f"{where}.segmentation: {e}") from None
        area, bbox = rle_utils.area_bbox(seg)
        ann_id = a.get("id", index + 1)
        if not isinstance(ann_id, int) or isinstance(ann_id, bool) or ann_id < 0:
            raise BadRequest(f"{where}.id must be a non-negative integer")
        label = a.get("label")
        if label is not None and (not isinstance(label, str) or len(label) > 200):
            raise BadRequest(f"{where}.label must be a string of at most 200 characters")

        def num(key, default):
            v = a.get(key, default)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
                raise BadRequest(f"{where}.{key} must be a number")
            return float(v)

        pts = a.get("point_coords", [])
        if not (isinstance(pts, list) and all(isinstance(q, list) and len(q) == 2 and all(isinstance(c, (int, float)) for c in q) for q in pts)):
            raise BadRequest(f"{where}.point_coords must be a list of [x, y]")
        crop = a.get("crop_box", [0, 0, rec.width, rec.height])
        if not (isinstance(crop, list) and len(crop) == 4 and all(isinstance(c, (int, float)) for c in crop)):
            raise BadRequest(f"{where}.crop_box must be [x, y, w, h]")
        return {
            "id": ann_id,
            "segmentation": seg,
            "area": area,
            "bbox": bbox,
            "predicted_iou": num("predicted_iou", 1.0),
            "point_coords": [[float(x), float(y)] for x, y in pts],
            "stability_score": num("stability_score", 1.0),
            "crop_box": [float(c) for c in crop],
            "label": label or "",
        }

    # ------------------------------------------------------------ export
    def export_coco(self) -> Dict[str, Any]:
        images, anns, cats = [], [], {}
        next_ann = 1
        for rec in self.images():
            try:
                data = self.read_annotations(rec)
            except (BadRequest, Forbidden):
                continue
            images.append({"id": rec.image_id, "file_name": rec.id, "width": rec.width, "height": rec.height})
            for a in data.get("annotations", []):
                label = a.get("label") or "object"
                cat = cats.setdefault(label, len(cats) + 1)
                seg = a.get("segmentation")
                try:
                    seg = rle_utils.validate(seg, rec.height, rec.width)
                except rle_utils.RLEError:
                    continue
                area, bbox = rle_utils.area_bbox(seg)
                anns.append({
                    "id": next_ann, "image_id": rec.image_id, "category_id": cat, "segmentation": seg,
                    "area": area, "bbox": bbox, "iscrowd": 0,
                    "score": a.get("predicted_iou", 1.0),
                })
                next_ann += 1
        return {
            "info": {"description": "exported by segany serve"},
            "images": images,
            "annotations": anns,
            "categories": [{"id": i, "name": n} for n, i in cats.items()],
        }
