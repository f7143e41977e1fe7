"""Checkpoint download: cache location, resumable transfer, verification, offline errors.

A real HTTP server on 127.0.0.1 (stdlib, in a thread) serves a small file with Range support and
can misbehave on purpose (drop the connection, serve other bytes)."""
from __future__ import annotations

import hashlib
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from segany.checkpoints import VARIANTS, CheckpointError, Variant
from segany.download import cache_dir, checkpoint_path, download_url, ensure_checkpoint

PAYLOAD = os.urandom(300_000) + b"end"  # several 1 MiB-chunk-free reads; content is what matters


class FileServer:
    """Serves ``content`` at any path; honours ``Range: bytes=N-``; records each request."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.drop_after = None  # send only this many bytes of the first response, then close
        self.status = 200
        self.requests = []  # (path, Range header or None)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Range")))
                if outer.status != 200:
                    self.send_error(outer.status)
                    return
                data, start = outer.content, 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                body = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.drop_after is not None:
                    self.wfile.write(body[: outer.drop_after])
                    outer.drop_after = None
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/weights/test.pth"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def make_variant(content: bytes = PAYLOAD, **kw) -> Variant:
    args = dict(
        url="http://example.invalid/never-used.pth",  # tests always override it through the env
        filename="testnet.pth",
        sha256=hashlib.sha256(content).hexdigest(),
        size=len(content),
    )
    args.update(kw)
    return Variant("testnet", {}, "test weights", **args)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def server(monkeypatch):
    with FileServer(PAYLOAD) as s:
        monkeypatch.setenv("SEGANY_DOWNLOAD_URL_TESTNET", s.url)
        yield s


def test_full_download_verifies_and_renames_atomically(home, server):
    path = ensure_checkpoint(make_variant(), progress=False)
    assert path == home / "testnet.pth"
    assert path.read_bytes() == PAYLOAD
    assert not (home / "testnet.pth.part").exists()
    assert server.requests == [("/weights/test.pth", None)]
    # Second use: already verified (note matches), no network at all.
    assert ensure_checkpoint(make_variant(), progress=False) == path
    assert len(server.requests) == 1


def test_resumes_from_partial_file(home, server):
    home.mkdir(parents=True)
    (home / "testnet.pth.part").write_bytes(PAYLOAD[:123_456])
    path = ensure_checkpoint(make_variant(), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [("/weights/test.pth", "bytes=123456-")]


def test_resumes_after_connection_drop(home, server):
    server.drop_after = 50_000
    path = ensure_checkpoint(make_variant(), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert [r[1] for r in server.requests] == [None, "bytes=50000-"]


def test_sha_mismatch_deletes_file_and_says_so(home, server):
    server.content = bytes(len(PAYLOAD))  # right size, wrong bytes
    with pytest.raises(CheckpointError, match=r"sha256 .* expected .* deleted"):
        ensure_checkpoint(make_variant(), progress=False)
    assert not (home / "testnet.pth").exists()
    assert not (home / "testnet.pth.part").exists()


def test_size_mismatch_is_refused_before_downloading(home, server):
    server.content = PAYLOAD + b"extra"
    with pytest.raises(CheckpointError, match=r"serves \d+ bytes, expected \d+"):
        ensure_checkpoint(make_variant(), progress=False)
    assert not (home / "testnet.pth").exists()


def test_tampered_cached_file_is_rehashed_and_deleted(home, server):
    path = ensure_checkpoint(make_variant(), progress=False)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))  # same size, new mtime: the note no longer vouches for it
    with pytest.raises(CheckpointError, match="sha256"):
        ensure_checkpoint(make_variant(), progress=False)
    assert not path.exists()


def test_server_down_names_url_and_destination(home, monkeypatch):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w.pth"
    monkeypatch.setenv("SEGANY_DOWNLOAD_URL_TESTNET", url)
    with pytest.raises(CheckpointError) as e:
        ensure_checkpoint(make_variant(), progress=False)
    msg = str(e.value)
    assert url in msg and str(home / "testnet.pth") in msg and "--checkpoint" in msg


def test_http_error_names_status(home, server):
    server.status = 404
    with pytest.raises(CheckpointError, match="HTTP 404"):
        ensure_checkpoint(make_variant(), progress=False)


def test_no_download_gives_instructions(home, server):
    with pytest.raises(CheckpointError, match="downloading is off") as e:
        ensure_checkpoint(make_variant(), download=False)
    assert str(home / "testnet.pth") in str(e.value)
    assert server.requests == []


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("SEGANY_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert cache_dir() == tmp_path / "h" / ".cache" / "segany"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "segany"
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path / "s"))
    assert cache_dir() == tmp_path / "s"
    assert checkpoint_path("vit_b") == tmp_path / "s" / "sam_vit_b_01ec64.pth"


def test_url_overrides(monkeypatch):
    monkeypatch.delenv("SEGANY_DOWNLOAD_URL_VIT_B", raising=False)
    monkeypatch.delenv("SEGANY_DOWNLOAD_MIRROR", raising=False)
    assert download_url("vit_b") == VARIANTS["vit_b"].url
    monkeypatch.setenv("SEGANY_DOWNLOAD_MIRROR", "http://mirror.local/sam/")
    assert download_url("vit_b") == "http://mirror.local/sam/sam_vit_b_01ec64.pth"
    monkeypatch.setenv("SEGANY_DOWNLOAD_URL_VIT_B", "http://other/x.pth")
    assert download_url("vit_b") == "http://other/x.pth"


def test_official_registry_entries_are_complete():
    for name in ("vit_h", "vit_l", "vit_b", "vit_t"):
        v = VARIANTS[name]
        assert v.url and v.filename and v.size and len(v.sha256) == 64, name
