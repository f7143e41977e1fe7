"""Data-set readers, the fixed validation split and the weighted mixture."""
import json
import os

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segany.datasets import (
    CocoDataset,
    MaskFolderDataset,
    Mixture,
    SA1BDataset,
    is_val,
    masks_from_label_map,
    open_dataset,
    split,
)


def _scene(h=48, w=64):
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 200
    a = np.zeros((h, w), bool)
    a[5:20, 10:30] = True
    b = np.zeros((h, w), bool)
    b[25:40, 35:60] = True
    return img, a, b


def _rle(m):
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def test_coco_rle_polygon_and_crowd(tmp_path):
    img, a, b = _scene()
    os.makedirs(tmp_path / "images")
    cv2.imwrite(str(tmp_path / "images" / "x.png"), img[..., ::-1])
    crowd = np.zeros_like(a)
    crowd[42:46, :] = True
    poly = [[35.0, 25.0, 60.0, 25.0, 60.0, 40.0, 35.0, 40.0]]  # b's outline
    data = {
        "images": [{"id": 1, "file_name": "x.png", "height": 48, "width": 64}, {"id": 2, "file_name": "empty.png", "height": 4, "width": 4}],
        "annotations": [
            {"id": 1, "image_id": 1, "segmentation": _rle(a), "iscrowd": 0, "category_id": 1},
            {"id": 2, "image_id": 1, "segmentation": poly, "iscrowd": 0, "category_id": 1},
            {"id": 3, "image_id": 1, "segmentation": _rle(crowd), "iscrowd": 1, "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(data))
    ds = open_dataset(str(tmp_path))
    assert isinstance(ds, CocoDataset) and len(ds) == 1 and ds.names == ["x.png"]
    image, masks, ignore = ds[0]
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8 and image[0, 0, 0] == 200  # RGB order
    assert len(masks) == 2 and masks[0].dtype == bool
    assert np.array_equal(masks[0], a)
    inter = (masks[1] & b).sum() / (masks[1] | b).sum()
    assert inter > 0.85  # polygon rasterised onto b
    assert np.array_equal(ignore, crowd)


@pytest.mark.parametrize("seg, message", [
    ({"size": [48, 64], "counts": [100, 5000]}, "sum to 5100"),  # past the mask: pycocotools would overrun
    ({"size": [48, 64], "counts": [3000, -5, 77]}, "negative"),
    ({"size": [48, 64], "counts": "0N\\"}, "RLE"),  # a compressed string that ends mid-number
    ({"size": [24, 32], "counts": [768]}, "not the image's"),
    ({"size": "48x64", "counts": [3072]}, "size must be"),
    ({"counts": [3072]}, "polygons or an RLE"),
    ([[1.0, 2.0, "x", 4.0, 5.0, 6.0]], "numbers"),
    ([[1.0, 2.0, 3.0, 4.0, 5.0]], "x, y pairs"),
    ([], "x, y pairs"),
])
def test_coco_malformed_segmentation_names_the_annotation(tmp_path, seg, message):
    """A malformed segmentation in a training set is a ValueError naming the image and the
    annotation, before pycocotools' C decoder (which trusts its input) sees it."""
    img, _, _ = _scene()
    os.makedirs(tmp_path / "images")
    cv2.imwrite(str(tmp_path / "images" / "x.png"), img[..., ::-1])
    data = {"images": [{"id": 1, "file_name": "x.png", "height": 48, "width": 64}],
            "annotations": [{"id": 7, "image_id": 1, "segmentation": seg, "iscrowd": 0, "category_id": 1}],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "annotations.json").write_text(json.dumps(data))
    ds = open_dataset(str(tmp_path))
    with pytest.raises(ValueError, match=message) as e:
        ds[0]
    assert "x.png" in str(e.value) and "annotation 7" in str(e.value)


def test_sa1b_folder(tmp_path):
    img, a, b = _scene()
    cv2.imwrite(str(tmp_path / "sa_1.jpg"), img[..., ::-1])
    rec = {"image": {"file_name": "sa_1.jpg", "height": 48, "width": 64},
           "annotations": [{"segmentation": _rle(a)}, {"segmentation": _rle(b)}]}
    (tmp_path / "sa_1.json").write_text(json.dumps(rec))
    ds = open_dataset(str(tmp_path))
    assert isinstance(ds, SA1BDataset) and len(ds) == 1
    image, masks, ignore = ds[0]
    assert image.shape == (48, 64, 3) and ignore is None
    assert [m.sum() for m in masks] == [a.sum(), b.sum()]


def test_mask_folder_ids_binary_and_ignore(tmp_path):
    img, a, b = _scene()
    os.makedirs(tmp_path / "images")
    os.makedirs(tmp_path / "masks")
    lab = np.zeros(a.shape, np.uint8)
    lab[a] = 1
    lab[b] = 2
    lab[0:2, :] = 128
    cv2.imwrite(str(tmp_path / "images" / "p.jpg"), img)
    cv2.imwrite(str(tmp_path / "masks" / "p.png"), lab)
    binary = (a * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "images" / "q.jpg"), img)
    cv2.imwrite(str(tmp_path / "masks" / "q.png"), binary)
    ds = open_dataset(str(tmp_path))
    assert isinstance(ds, MaskFolderDataset) and ds.names == ["p.jpg", "q.jpg"]
    _, masks, ignore = ds[0]
    assert len(masks) == 2 and np.array_equal(masks[0], a) and np.array_equal(masks[1], b)
    assert ignore.sum() == 2 * 64 and ignore[:2].all()
    _, masks, ignore = ds[1]
    assert len(masks) == 1 and np.array_equal(masks[0], a) and ignore is None


def test_label_map_ignore_not_an_object():
    lab = np.array([[0, 128, 3], [3, 255, 0]], np.uint8)
    masks, ignore = masks_from_label_map(lab)
    assert len(masks) == 2 and ignore.sum() == 1


def test_split_is_deterministic_and_about_ten_percent():
    names = [f"img_{i:05d}.jpg" for i in range(5000)]
    val = [n for n in names if is_val(n)]
    assert 0.08 < len(val) / len(names) < 0.12
    assert val == [n for n in names if is_val("some/dir/" + n)]  # base name only

    class Fake:
        def __init__(self):
            self.names = names

        def __len__(self):
            return len(names)

        def __getitem__(self, i):
            return self.names[i]

    tr, va = split(Fake(), "train"), split(Fake(), "val")
    assert len(tr) + len(va) == len(names) and not set(tr.names) & set(va.names)
    assert va.names == val and va[0] == val[0]


def test_mixture_follows_weights():
    class Const:
        def __init__(self, v, n):
            self.v, self.names = v, [str(i) for i in range(n)]

        def __len__(self):
            return len(self.names)

        def __getitem__(self, i):
            return self.v

    mix = Mixture([Const("a", 3), Const("b", 100)], weights=[3, 1])
    rng = np.random.default_rng(0)
    draws = [mix.sample(rng) for _ in range(4000)]
    assert 0.70 < draws.count("a") / len(draws) < 0.80
    with pytest.raises(ValueError):
        Mixture([Const("a", 3)], weights=[1, 2])
