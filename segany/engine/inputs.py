"""Which images a job covers, and where each one's outputs go.

Inputs are folders (searched recursively), image files, or text files listing paths (one per
line, ``#`` comments; relative paths are relative to the list file). Every image gets a
relative path ``rel``: for a folder, its path inside the folder; for a file named directly, its
name; for a list, its path relative to the deepest folder that holds all listed images. The
outputs mirror ``rel`` under OUTDIR: ``<rel without suffix>.json`` (and ``.overlay.jpg``, and the
image itself with ``--copy-images``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..io import IMAGE_EXTENSIONS, list_images

LIST_EXTENSIONS = (".txt", ".lst", ".list")
OVERLAY_SUFFIX = ".overlay.jpg"


class InputError(ValueError):
    """An input path is missing, or two inputs map to the same output."""


@dataclass(frozen=True)
class Item:
    source: str  # absolute path of the image
    rel: str  # posix path relative to its input root; the job-wide key of this image

    @property
    def json_rel(self) -> str:
        return str(Path(self.rel).with_suffix(".json").as_posix())

    @property
    def overlay_rel(self) -> str:
        return str(Path(self.rel).with_suffix("").as_posix()) + OVERLAY_SUFFIX


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.endswith(OVERLAY_SUFFIX)


def _within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _from_list(path: Path) -> List[Item]:
    base = path.parent
    paths = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line)
            p = (p if p.is_absolute() else base / p).resolve()
            if not p.is_file():
                raise InputError(f"{path}:{n}: {line}: no such file")
            paths.append(p)
    if not paths:
        return []
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [Item(str(p), p.relative_to(root).as_posix()) for p in paths]


def collect(inputs: Sequence[str], outdir: Optional[str] = None) -> List[Item]:
    """All images of the job, in a fixed order, each once; raises ``InputError`` on a missing
    input or when two images would write the same output file. Images inside ``outdir`` (the
    job's own outputs, e.g. ``--copy-images`` copies when OUTDIR lies inside an input folder) are
    left out, unless OUTDIR is the input folder itself (annotations written beside the images)."""
    out = Path(outdir).resolve() if outdir else None
    items: List[Item] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            root = p.resolve()
            skip = out if out is not None and out != root and _within(out, root) else None
            items += [Item(str(f.resolve()), f.resolve().relative_to(root).as_posix()) for f in list_images(root)
                      if _is_image(f) and not (skip is not None and _within(f.resolve(), skip))]
        elif p.is_file() and p.suffix.lower() in LIST_EXTENSIONS:
            items += _from_list(p)
        elif p.is_file():
            # Any file named directly is attempted (an unsupported or corrupt one is recorded as
            # failed, not dropped silently).
            items.append(Item(str(p.resolve()), p.name))
        else:
            raise InputError(f"{spec}: no such file or folder")
    seen: Dict[str, Item] = {}
    unique: List[Item] = []
    for it in items:
        prev = seen.get(it.json_rel)
        if prev is not None:
            if prev.source == it.source:
                continue  # the same image named twice
            raise InputError(
                f"{prev.source} and {it.source} would both be written to {it.json_rel}; "
                "annotate them in separate jobs (or separate output folders)"
            )
        seen[it.json_rel] = it
        unique.append(it)
    return unique
