"""Segmentation data sets for training and evaluation.

Every data set is a sequence of samples; ``ds[i]`` returns ``(image, masks, ignore)``:

* ``image``: uint8 numpy array (H, W, 3), RGB;
* ``masks``: list of bool numpy arrays (H, W), one per object (may be empty);
* ``ignore``: bool (H, W) array of pixels to leave out of losses and scores, or ``None``.

``ds.names[i]`` is the image's file name (used by the train/validation split).

Readers:

* :class:`CocoDataset` -- COCO instance JSON, segmentation as RLE (compressed or not) or
  polygons; ``iscrowd`` annotations become ignore regions.
* :class:`SA1BDataset` -- an SA-1B folder: ``sa_N.jpg`` next to ``sa_N.json`` (per-image JSON with
  ``annotations[*].segmentation`` as COCO RLE).
* :class:`MaskFolderDataset` -- ``images/`` and ``masks/`` with the same file stems; a mask file
  holds 0 for background, 128 for "ignore", and any other value > 0 as an object id (a binary
  0/255 mask is one object).

:func:`open_dataset` picks the reader from a path. :func:`is_val` / :func:`split` give the fixed
validation split (10 % of each set by a hash of the file name); :class:`Mixture` samples from
several data sets with weights.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

Sample = Tuple[np.ndarray, List[np.ndarray], Optional[np.ndarray]]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IGNORE_VALUE = 128


def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(path)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _decode_segmentation(seg, h: int, w: int) -> np.ndarray:
    """COCO segmentation (polygons, uncompressed RLE or compressed RLE) -> bool mask, (h, w) for
    polygons and the RLE's own ``size`` otherwise. Raises ``ValueError`` for a malformed one.

    RLE counts are checked (``segany.masks.validate_rle_counts``) before pycocotools' C decoder
    sees them: it trusts its input, and counts summing past height*width overrun its buffer."""
    from pycocotools import mask as mask_utils

    from .masks import validate_rle_counts

    if isinstance(seg, list):  # polygons
        try:
            polys = [[float(v) for v in poly] for poly in seg]
        except (TypeError, ValueError):
            raise ValueError("polygon segmentation must be lists of numbers") from None
        if not polys or any(len(poly) < 6 or len(poly) % 2 for poly in polys):
            raise ValueError("polygon segmentation must be lists of x, y pairs, at least 3 points each")
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)
    if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
        raise ValueError("segmentation must be polygons or an RLE {\"size\": [h, w], \"counts\": ...}")
    size = seg["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v >= 0 for v in size)):
        raise ValueError(f"RLE size must be [height, width], got {size!r}")
    counts = seg["counts"]
    if not isinstance(counts, (str, bytes)) and not (isinstance(counts, list) and all(isinstance(v, int) for v in counts)):
        raise ValueError("RLE counts must be a compressed string or a list of integers")
    values = validate_rle_counts(counts, *size)
    if isinstance(counts, (str, bytes)):  # checked: decoded as it is
        rle = {"size": list(size), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        rle = mask_utils.frPyObjects({"size": list(size), "counts": values}, *size)
    return mask_utils.decode(rle).astype(bool)


def _annotation_mask(a, h: int, w: int, where: str) -> np.ndarray:
    try:
        return _decode_segmentation(a["segmentation"], h, w)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{where}: annotation {a.get('id', '?')}: {e}") from None


class CocoDataset:
    """COCO instance annotations. ``root`` is a folder holding ``annotations.json`` and
    ``images/``, or the JSON file itself (then ``image_dir`` defaults to ``images/`` beside it,
    else to the JSON's folder). Images without objects are skipped unless ``keep_empty``."""

    def __init__(self, root: str, image_dir: Optional[str] = None, keep_empty: bool = False) -> None:
        json_path = os.path.join(root, "annotations.json") if os.path.isdir(root) else root
        base = os.path.dirname(os.path.abspath(json_path))
        if image_dir is None:
            image_dir = os.path.join(base, "images") if os.path.isdir(os.path.join(base, "images")) else base
        self.image_dir = image_dir
        with open(json_path) as f:
            data = json.load(f)
        anns_by_image: dict = {}
        for a in data.get("annotations", []):
            anns_by_image.setdefault(a["image_id"], []).append(a)
        self.images = [im for im in data["images"] if keep_empty or anns_by_image.get(im["id"])]
        self.anns = [anns_by_image.get(im["id"], []) for im in self.images]
        self.names = [os.path.basename(im["file_name"]) for im in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Sample:
        info = self.images[i]
        image = read_image(os.path.join(self.image_dir, info["file_name"]))
        h, w = image.shape[:2]
        masks, ignore = [], None
        for a in self.anns[i]:
            m = _annotation_mask(a, h, w, info["file_name"])
            if m.shape != (h, w):
                raise ValueError(f"{info['file_name']}: annotation {a.get('id', '?')}: mask size {list(m.shape)} "
                                 f"is not the image's {[h, w]}")
            if a.get("iscrowd", 0):
                ignore = m if ignore is None else (ignore | m)
            elif m.any():
                masks.append(m)
        return image, masks, ignore


class SA1BDataset:
    """SA-1B layout: ``<folder>/sa_N.jpg`` and ``<folder>/sa_N.json`` per image."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        stems = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json"))
        self.items = []
        for s in stems:
            img = next((s + e for e in IMAGE_EXTS if os.path.exists(os.path.join(folder, s + e))), None)
            if img is not None:
                self.items.append((img, s + ".json"))
        self.names = [img for img, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        img_name, json_name = self.items[i]
        image = read_image(os.path.join(self.folder, img_name))
        h, w = image.shape[:2]
        with open(os.path.join(self.folder, json_name)) as f:
            data = json.load(f)
        masks = []
        for a in data.get("annotations", []):
            m = _annotation_mask(a, h, w, json_name)
            if m.shape != (h, w):  # SA-1B masks are at the image's stored size; resize if not
                m = cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
            if m.any():
                masks.append(m)
        return image, masks, None


def masks_from_label_map(label: np.ndarray) -> Tuple[List[np.ndarray], Optional[np.ndarray]]:
    """(H, W) integer map (0 background, 128 ignore, other > 0 object ids) -> (masks, ignore)."""
    if label.ndim == 3:
        label = label[..., 0]
    ignore = label == IGNORE_VALUE
    ids = [v for v in np.unique(label) if v != 0 and v != IGNORE_VALUE]
    masks = [label == v for v in ids]
    return [m for m in masks if m.any()], (ignore if ignore.any() else None)


class MaskFolderDataset:
    """``<root>/images/x.jpg`` with ``<root>/masks/x.png`` (see module doc for mask values)."""

    def __init__(self, root: str, image_dir: str = "images", mask_dir: str = "masks") -> None:
        self.image_dir = os.path.join(root, image_dir)
        self.mask_dir = os.path.join(root, mask_dir)
        masks = {os.path.splitext(f)[0]: f for f in os.listdir(self.mask_dir)}
        self.items = []
        for f in sorted(os.listdir(self.image_dir)):
            stem, ext = os.path.splitext(f)
            if ext.lower() in IMAGE_EXTS and stem in masks:
                self.items.append((f, masks[stem]))
        self.names = [f for f, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        img_name, mask_name = self.items[i]
        image = read_image(os.path.join(self.image_dir, img_name))
        label = cv2.imread(os.path.join(self.mask_dir, mask_name), cv2.IMREAD_UNCHANGED)
        if label is None:
            raise FileNotFoundError(os.path.join(self.mask_dir, mask_name))
        if label.shape[:2] != image.shape[:2]:
            label = cv2.resize(label, image.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        masks, ignore = masks_from_label_map(label)
        return image, masks, ignore


def open_dataset(path: str):
    """Reader for ``path``: a COCO JSON file or folder with ``annotations.json``, a folder with
    ``images/`` + ``masks/``, or an SA-1B folder of per-image JSON files."""
    if os.path.isfile(path) and path.endswith(".json"):
        return CocoDataset(path)
    if os.path.isfile(os.path.join(path, "annotations.json")):
        return CocoDataset(path)
    if os.path.isdir(os.path.join(path, "images")) and os.path.isdir(os.path.join(path, "masks")):
        return MaskFolderDataset(path)
    if os.path.isdir(path) and any(f.endswith(".json") for f in os.listdir(path)):
        return SA1BDataset(path)
    raise ValueError(f"cannot tell the data set format of {path!r}")


# --- the fixed train / validation split -------------------------------------------------------

VAL_FRACTION = 0.10


def is_val(name: str, fraction: float = VAL_FRACTION) -> bool:
    """The split rule: an image is validation iff the first 8 hex digits of the SHA-1 of its
    base file name, as an integer, modulo 10000, is below ``fraction * 10000``. It depends on the
    file name only, so it is stable across machines, orderings and data-set versions."""
    h = int(hashlib.sha1(os.path.basename(name).encode("utf-8")).hexdigest()[:8], 16)
    return (h % 10000) < round(fraction * 10000)


class Subset:
    """A view of ``dataset`` restricted to ``indices`` (keeps ``names``)."""

    def __init__(self, dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.names = [dataset.names[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample:
        return self.dataset[self.indices[i]]


def split(dataset, part: str, fraction: float = VAL_FRACTION) -> Subset:
    """``part`` = "train" or "val" subset of ``dataset`` by :func:`is_val`."""
    if part not in ("train", "val"):
        raise ValueError(part)
    want = part == "val"
    return Subset(dataset, [i for i, n in enumerate(dataset.names) if is_val(n, fraction) == want])


class Mixture:
    """Several data sets sampled with weights (a weight per set; default: by size).

    ``sample(rng)`` draws a set by weight, then an image uniformly in it; ``__iter__`` yields an
    endless stream of samples from a seeded generator.
    """

    def __init__(self, datasets: Sequence, weights: Optional[Sequence[float]] = None, seed: int = 0) -> None:
        self.datasets = [d for d in datasets]
        if any(len(d) == 0 for d in self.datasets):
            raise ValueError("empty data set in mixture")
        w = np.asarray(weights if weights is not None else [len(d) for d in self.datasets], dtype=np.float64)
        if w.shape != (len(self.datasets),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError("need one non-negative weight per data set")
        self.weights = w / w.sum()
        self.seed = seed

    def sample(self, rng: np.random.Generator) -> Sample:
        d = self.datasets[rng.choice(len(self.datasets), p=self.weights)]
        return d[int(rng.integers(len(d)))]

    def __iter__(self) -> Iterator[Sample]:
        rng = np.random.default_rng(self.seed)
        while True:
            yield self.sample(rng)
