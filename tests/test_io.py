"""Image loading (every common pixel format to HxWx3 uint8 RGB, clear errors) and atomic writers.
All images are generated here, in pytest's temporary folders."""
from __future__ import annotations

import os
import io
import zlib

import numpy as np
import pytest
from PIL import Image

from segany.io import ImageError, atomic_save_png, atomic_write_json, load_image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def halves(w=40, h=20):
    """Left half red, right half blue: orientation changes are visible."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = RED
    a[:, w // 2 :] = BLUE
    return a


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(halves())
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored 40x20 image is shown 20x40
    path = tmp_path / "rotated.jpg"
    img.save(path, quality=95, exif=exif)
    out = load_image(path)
    assert out.shape == (40, 20, 3)
    # After a 90-degree clockwise turn the red (left) half is on top.
    assert out[2, 10, 0] > 200 and out[2, 10, 2] < 60
    assert out[37, 10, 2] > 200 and out[37, 10, 0] < 60


def test_grayscale_and_bilevel(tmp_path):
    g = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (5, 1))
    Image.fromarray(g).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (5, 25, 3) and np.array_equal(out[..., 0], g) and np.array_equal(out[..., 1], g)
    Image.fromarray(g > 100).save(tmp_path / "b.png")  # mode "1"
    out = load_image(tmp_path / "b.png")
    assert set(np.unique(out)) == {0, 255}


def test_rgba_and_la_composite_on_white_or_drop(tmp_path):
    a = np.zeros((4, 6, 4), np.uint8)
    a[..., :3] = (10, 20, 30)
    a[:, :3, 3] = 255  # left opaque, right fully transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[0, 5]) == (255, 255, 255)
    assert tuple(load_image(tmp_path / "rgba.png", alpha="drop")[0, 5]) == (10, 20, 30)
    la = np.stack([np.full((4, 6), 50, np.uint8), a[..., 3]], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    assert tuple(out[0, 0]) == (50, 50, 50) and tuple(out[0, 5]) == (255, 255, 255)


def test_palette_with_transparency(tmp_path):
    p = Image.new("P", (6, 4), 0)
    p.putpalette([200, 0, 0, 0, 200, 0] + [0] * 762)
    p.paste(1, (3, 0, 6, 4))
    p.info["transparency"] = 1  # palette index 1 (green) is transparent
    p.save(tmp_path / "p.png", transparency=1)
    out = load_image(tmp_path / "p.png")
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[0, 5]) == (255, 255, 255)
    p.save(tmp_path / "p.gif")
    assert load_image(tmp_path / "p.gif").shape == (4, 6, 3)


def test_cmyk(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "c.jpg", quality=100)
    out = load_image(tmp_path / "c.jpg")
    assert out.shape == (8, 8, 3) and out[4, 4, 0] > 240 and out[4, 4, 1] < 15 and out[4, 4, 2] > 240  # magenta


def test_16bit_uses_the_full_range(tmp_path):
    a = np.array([[0, 257 * 128, 65535, 200]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    out = load_image(tmp_path / "g16.png")
    assert out.shape == (1, 4, 3) and out[0, :, 0].tolist() == [0, 128, 255, 1]  # 200/65535: dark, not 8-bit 200
    assert load_image(a)[0, :, 0].tolist() == [0, 128, 255, 1]


def test_float_images(tmp_path):
    f = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(f).save(tmp_path / "f.tif")  # mode "F"
    assert load_image(tmp_path / "f.tif")[0, :, 0].tolist() == [0, 128, 255]
    assert load_image(np.array([[0.0, 127.6, 300.0]]))[0, :, 0].tolist() == [0, 128, 255]
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.array([[0.0, np.nan]]))


def test_arrays_and_pil_images_pass_through():
    a = halves()
    assert np.array_equal(load_image(a), a)
    assert np.array_equal(load_image(Image.fromarray(a)), a)
    assert np.array_equal(load_image(a[..., :1]), np.repeat(a[..., :1], 3, 2))
    with pytest.raises(ImageError, match=r"got shape \(4, 4, 2\)"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="empty"):
        load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ImageError, match="cannot read an image from a int"):
        load_image(5)


def test_pixel_limit_refuses_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(path)
    with pytest.raises(ImageError, match=r"big\.png: image is 40x30 = 1200 pixels, above the limit of 1000"):
        load_image(path, max_pixels=1000)
    assert load_image(path, max_pixels=1200).shape == (30, 40, 3)


def test_decompression_bomb_header(tmp_path):
    # A tiny PNG whose header claims 100000 x 100000 pixels: refused from the header alone.
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = (100000).to_bytes(4, "big") * 2  # IHDR width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # keep the chunk valid
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=r"bomb\.png: .*(limit|decompression bomb)"):
        load_image(path)


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"cut\.png: corrupt or truncated"):
        load_image(tmp_path / "cut.png")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:300])
    with pytest.raises(ImageError, match=r"cut\.jpg: corrupt or truncated"):
        load_image(tmp_path / "cut.jpg")


def test_non_images_missing_and_folders(tmp_path):
    (tmp_path / "notes.jpg").write_text("not really a jpeg")
    with pytest.raises(ImageError, match=r"notes\.jpg: not an image file"):
        load_image(tmp_path / "notes.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: not an image file"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match=r"absent\.png: no such file"):
        load_image(tmp_path / "absent.png")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)


def test_atomic_writers_leave_no_partial_file(tmp_path):
    out = tmp_path / "sub" / "mask.png"
    atomic_save_png(out, np.eye(5, dtype=bool))
    assert np.array_equal(np.asarray(Image.open(out)) > 0, np.eye(5, dtype=bool))
    before = out.read_bytes()
    with pytest.raises(Exception):
        atomic_save_png(out, np.zeros((2, 2, 7), np.uint8))  # not encodable as PNG
    assert out.read_bytes() == before  # the old file is untouched
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "x.json", {"a": object()})
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mask.png", "sub"]  # no temp files left


def test_atomic_writes_get_ordinary_file_permissions(tmp_path):
    """Outputs are read by other users and tools (web servers, rsync): not the 0600 of mkstemp."""
    from segany.io import atomic_write_text

    target = tmp_path / "report.json"
    atomic_write_text(target, "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)
