"""Reading images and writing files safely.

``load_image`` turns a path, PIL image or numpy array into an HxWx3 uint8 RGB array: EXIF
orientation applied; grayscale, palette, CMYK, 16-bit and float images converted; alpha
composited on white (``alpha="white"``, default) or dropped (``alpha="drop"``). Decompression bombs
and corrupt files give an ``ImageError`` naming the file.

Writers go to a temporary file in the destination folder and are renamed into place, so a
reader never sees half a file.
"""
from __future__ import annotations

import io as _io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union

import numpy as np
from PIL import Image, ImageOps

PathLike = Union[str, "os.PathLike[str]"]

# Largest image accepted, in pixels (the default: 16k x 16k). Larger is refused rather than
# decoded, as a guard against decompression bombs. Override with SEGANY_MAX_PIXELS.
MAX_PIXELS = int(os.environ.get("SEGANY_MAX_PIXELS", 16384 * 16384))

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


class ImageError(ValueError):
    """An image could not be read or converted; the message names the file and the reason."""


def _name(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return f"<{type(src).__name__}>"


def load_image(src: Any, alpha: str = "white", max_pixels: int | None = None) -> np.ndarray:
    """Path / PIL image / numpy array -> HxWx3 uint8 RGB (see module doc)."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src, alpha, limit, "<array>")
    if isinstance(src, Image.Image):
        return _pil_to_rgb(src, alpha, limit, "<PIL image>")
    if isinstance(src, (bytes, bytearray)):
        return _open_and_convert(_io.BytesIO(src), "<bytes>", alpha, limit)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise ImageError(f"{path}: no such file")
        if path.is_dir():
            raise ImageError(f"{path}: is a folder, not an image")
        with open(path, "rb") as f:
            return _open_and_convert(f, str(path), alpha, limit)
    raise ImageError(f"cannot read an image from a {type(src).__name__}")


def _open_and_convert(fp, name: str, alpha: str, limit: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            w, h = img.size
            if w * h > limit:
                raise ImageError(f"{name}: image is {w}x{h} = {w * h} pixels, above the limit of {limit} (set SEGANY_MAX_PIXELS to raise it)")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: refused as a possible decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: corrupt or truncated image ({e})") from None
    return _pil_to_rgb(img, alpha, limit, name)


def _pil_to_rgb(img: Image.Image, alpha: str, limit: int, name: str) -> np.ndarray:
    if alpha not in ("white", "drop"):
        raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}")
    w, h = img.size
    if w * h > limit:
        raise ImageError(f"{name}: image is {w}x{h} pixels, above the limit of {limit}")
    if w == 0 or h == 0:
        raise ImageError(f"{name}: image is empty ({w}x{h})")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF must not make a readable image unreadable
        pass
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_rgb(np.asarray(img), alpha, limit, name)
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        if alpha == "white":
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgba = Image.alpha_composite(bg, rgba)
        return np.asarray(rgba.convert("RGB"), dtype=np.uint8).copy()
    if mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return np.asarray(img, dtype=np.uint8).copy()


def _array_to_rgb(a: np.ndarray, alpha: str, limit: int, name: str) -> np.ndarray:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"{name}: expected an HxW, HxWx3 or HxWx4 image, got shape {a.shape}")
    if a.shape[0] * a.shape[1] > limit:
        raise ImageError(f"{name}: image is {a.shape[1]}x{a.shape[0]} pixels, above the limit of {limit}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"{name}: image is empty ({a.shape})")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:  # 16-bit files (PIL "I;16"): the range is 0..65535 even if dark
        a = np.clip(a.astype(np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8:
        # Wider integers (PIL "I") carry no range: 16-bit if anything exceeds 8 bits.
        top = 65535.0 if a.max(initial=0) > 255 else 255.0
        a = np.clip(a.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ImageError(f"{name}: float image contains NaN or infinite values")
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
        a = np.clip(a.astype(np.float64) * scale + 0.5, 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported pixel type {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.shape[2] == 4:
        rgb, al = a[..., :3].astype(np.float32), a[..., 3:].astype(np.float32) / 255.0
        a = (rgb * al + 255.0 * (1 - al) + 0.5).astype(np.uint8) if alpha == "white" else a[..., :3]
    return np.ascontiguousarray(a)


# ------------------------------------------------------------------ atomic writes
_UMASK = os.umask(0)
os.umask(_UMASK)

def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync, then rename it over ``path``:
    readers see the old file or the complete new one, and a failure leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and an atomic rename."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any, indent: int | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent))


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` streamed into a temporary file, then renamed (no copy of a large training
    checkpoint in memory)."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_png(path: PathLike, array: np.ndarray) -> None:
    """Save a uint8/bool array (HxW or HxWx3/4) as PNG atomically."""
    a = np.asarray(array)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    buf = _io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def list_images(folder: PathLike, recursive: bool = True) -> list:
    """Image files under ``folder`` (by extension), sorted."""
    folder = Path(folder)
    it = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
