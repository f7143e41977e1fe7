"""Fetching official checkpoints into a local cache, verified before use.

``ensure_checkpoint(variant)`` returns the path of a variant's weights in the cache, downloading
them first if needed:

* cache folder: ``$SEGANY_HOME``, else ``$XDG_CACHE_HOME/segany``, else ``~/.cache/segany``;
* the download goes to ``<file>.part`` and resumes from there (HTTP ``Range``) after an
  interruption; a tqdm bar shows progress on a terminal;
* size and sha256 are checked before the file is renamed into place (atomically), so a
  half-written or tampered file is never used; a mismatching file is deleted and the error says so;
* a ``<file>.sha256`` note (size, mtime, digest) records a successful check, so the 2.5 GB ViT-H
  is hashed once, not on every start; a file whose size or mtime changed is hashed again;
* with no network the error names the URL to fetch and the exact path to put the file at.

The URL can be overridden, for mirrors and for tests: ``SEGANY_DOWNLOAD_URL_<NAME>`` (the
variant name upper-cased, e.g. ``SEGANY_DOWNLOAD_URL_VIT_B``) gives a variant's full URL;
``SEGANY_DOWNLOAD_MIRROR`` gives a base URL to which the official file name is appended.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional, Union

from .checkpoints import CheckpointError, Variant, resolve_name

CHUNK = 1 << 20  # 1 MiB reads: large enough for throughput, small enough for a smooth bar
TIMEOUT_S = 30.0  # per socket operation; a stalled server should fail, not hang forever
MAX_ATTEMPTS = 5  # connection drops mid-file are retried (resuming) while progress is made


def cache_dir() -> Path:
    """Where downloaded checkpoints live (see module doc)."""
    if os.environ.get("SEGANY_HOME"):
        return Path(os.environ["SEGANY_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "segany"
    return Path.home() / ".cache" / "segany"


def _variant(variant: Union[str, Variant]) -> Variant:
    if isinstance(variant, Variant):
        return variant
    try:
        return resolve_name(variant)
    except KeyError as e:
        raise CheckpointError(str(e.args[0])) from None


def checkpoint_path(variant: Union[str, Variant]) -> Path:
    """The cache path of a downloadable variant's weights (whether or not it exists yet)."""
    v = _variant(variant)
    if not v.filename:
        raise CheckpointError(f"model {v.name!r} is not downloadable (it ships inside segany)")
    return cache_dir() / v.filename


def download_url(variant: Union[str, Variant]) -> str:
    """The URL the weights are fetched from, after the environment overrides."""
    v = _variant(variant)
    env_name = "SEGANY_DOWNLOAD_URL_" + re.sub(r"[^A-Z0-9]", "_", v.name.upper())
    if os.environ.get(env_name):
        return os.environ[env_name]
    if os.environ.get("SEGANY_DOWNLOAD_MIRROR") and v.filename:
        return os.environ["SEGANY_DOWNLOAD_MIRROR"].rstrip("/") + "/" + v.filename
    if not v.url:
        raise CheckpointError(f"model {v.name!r} has no download URL")
    return v.url


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def ensure_checkpoint(variant: Union[str, Variant], download: bool = True, progress: Optional[bool] = None) -> Path:
    """Path to the verified weights of ``variant`` (a name or a ``Variant``), downloading them
    into the cache first when ``download`` is true. Raises ``CheckpointError`` with what to do
    when the file is absent and cannot be fetched, or fails verification."""
    v = _variant(variant)
    path = checkpoint_path(v)
    if path.is_file():
        _verify(v, path, source="cached file")
        return path
    url = download_url(v)
    if not download:
        raise CheckpointError(_manual_instructions(v, path, url, "it is not in the cache and downloading is off"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.with_name(path.name + ".lock")):
        if path.is_file():  # another process finished it while we waited for the lock
            _verify(v, path, source="cached file")
            return path
        part = path.with_name(path.name + ".part")
        _download_resumable(url, part, v, progress)
        _verify(v, part, source=f"download from {url}", note=False)
        os.replace(part, path)  # atomic: the final name only ever holds a verified file
        _write_note(path, v.sha256)
    return path


# ----------------------------------------------------------------------------- verification
def _note_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_note(path: Path, digest: Optional[str]) -> None:
    if digest is None:
        return
    st = path.stat()
    from .io import atomic_write_json

    atomic_write_json(_note_path(path), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})


def _note_matches(path: Path, digest: str) -> bool:
    try:
        note = json.loads(_note_path(path).read_text())
        st = path.stat()
        return note == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    except (OSError, ValueError):
        return False


def _verify(v: Variant, path: Path, source: str, note: bool = True) -> None:
    """Size, then sha256 (skipped when a note says this exact file was already checked).
    A file that fails is deleted: keeping it would only fail again on the next run."""
    size = path.stat().st_size
    if v.size is not None and size != v.size:
        _delete(path)
        raise CheckpointError(
            f"{source} {path} has {size} bytes, expected {v.size} for {v.name}; the file was deleted "
            "(it was incomplete or is a different file). Run again to download it afresh."
        )
    if v.sha256 is None:
        return  # nothing to check against (the registry says why)
    if note and _note_matches(path, v.sha256):
        return
    digest = sha256_file(path)
    if digest != v.sha256:
        _delete(path)
        raise CheckpointError(
            f"{source} {path} has sha256 {digest}, expected {v.sha256} for {v.name}; the file was deleted. "
            "Run again to download it afresh; if this repeats, the server (or mirror) is serving a different file."
        )
    if note:
        _write_note(path, digest)


def _delete(path: Path) -> None:
    for p in (path, _note_path(path)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _manual_instructions(v: Variant, path: Path, url: str, reason: str) -> str:
    sha = f" (sha256 {v.sha256})" if v.sha256 else ""
    return (
        f"cannot get the {v.name} weights: {reason}. Download {url} yourself and save it as {path}{sha}, "
        "or pass the file with --checkpoint PATH (Python: checkpoint=PATH)."
    )


# ------------------------------------------------------------------------------- downloading
def _download_resumable(url: str, part: Path, v: Variant, progress: Optional[bool]) -> None:
    """Fill ``part`` with the whole file, resuming from what it already holds."""
    attempts = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if v.size is not None and have > v.size:  # cannot be a prefix of the right file
            part.unlink()
            have = 0
        if v.size is not None and have == v.size:
            return
        try:
            done = _fetch_into(url, part, have, v, progress)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have > 0:  # our range starts at/after the end: start over
                part.unlink()
                attempts += 1
                if attempts < MAX_ATTEMPTS:
                    continue
            raise CheckpointError(_manual_instructions(v, part.with_suffix(""), url, f"the server answered HTTP {e.code} {e.reason}")) from None
        except (urllib.error.URLError, OSError, socket.timeout, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            new = part.stat().st_size if part.exists() else 0
            attempts += 1
            if new > have and attempts < MAX_ATTEMPTS:
                continue  # the connection dropped after some progress: resume
            raise CheckpointError(
                _manual_instructions(v, part.with_suffix(""), url, f"the download failed ({reason})")
                + (f" The {new} bytes received so far are kept in {part} and the next run resumes from there." if new else "")
            ) from None
        if done:
            return


def _fetch_into(url: str, part: Path, have: int, v: Variant, progress: Optional[bool]) -> bool:
    """One HTTP request appending to ``part``; True when the server sent everything it had."""
    from tqdm.auto import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": "segany", **({"Range": f"bytes={have}-"} if have else {})})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
        status = getattr(resp, "status", 200)
        if have and status != 206:  # server ignored the range: it sends the whole file
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else v.size
        if v.size is not None and total is not None and total != v.size:
            raise CheckpointError(
                f"{url} serves {total} bytes, expected {v.size} for {v.name}: not the right file "
                "(check SEGANY_DOWNLOAD_URL_* / SEGANY_DOWNLOAD_MIRROR)."
            )
        bar = tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"downloading {v.filename}", disable=(None if progress is None else not progress),
        )
        with bar, open(part, "ab" if have else "wb") as f:
            while True:
                block = resp.read(CHUNK)
                if not block:
                    break
                f.write(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
    got = part.stat().st_size
    if total is not None and got < total:
        raise ConnectionError(f"connection closed after {got} of {total} bytes")
    return True


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Two processes downloading the same file would interleave their writes into one .part."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent first downloads are rare
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
