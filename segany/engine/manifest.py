"""``manifest.jsonl``: one JSON line per image of a job (image, status, masks, seconds, reason).

Written by one process only (the driver, also under Ray: workers return their records to it).
Crash safety:

* each record is appended with a single ``write`` of one complete line, so a crash leaves at
  worst one torn line at the end of the file;
* readers (:func:`read_manifest`) skip a torn last line instead of failing;
* at the start of every run the manifest is rewritten atomically (:func:`compact`) to hold one
  line per image: the last record of each image whose output is done and valid, a recovered record
  for outputs that exist without one (crash between the output's rename and the append), and
  nothing for images that will be processed again. The run then appends one line per image it
  processes, so however often a job is killed and rerun, the final manifest has exactly one line
  per image, like an uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, Iterable, List

from ..io import atomic_write_text

MANIFEST = "manifest.jsonl"


def read_manifest(path: str, warn: bool = False) -> List[Dict[str, Any]]:
    """All records in file order; a torn or garbled line is skipped (with a warning if ``warn``)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    records = []
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or "image" not in rec:
            if warn:
                what = "torn last line" if i == len(lines) - 1 else f"unreadable line {i + 1}"
                print(f"warning: {path}: skipping {what}", file=sys.stderr)
            continue
        records.append(rec)
    return records


def latest_by_image(records: Iterable[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for r in records:
        out[r["image"]] = r
    return out


def compact(path: str, records: List[Dict[str, Any]]) -> None:
    """Replace the manifest with ``records`` (one per line), atomically."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


class ManifestWriter:
    """Appends records; every record is one ``os.write`` of one whole line, fsync'd by ``sync``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # A torn line can only be at the end; compact() has removed it before a run starts, but
        # guard anyway: never glue a new record onto a partial line.
        size = os.fstat(self.fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self.fd, b"\n")

    def append(self, record: Dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        n = os.write(self.fd, line)
        if n != len(line):  # a short write on a regular file means the disk is full
            raise OSError(f"{self.path}: short write ({n} of {len(line)} bytes); is the disk full?")

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
