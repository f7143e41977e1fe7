"""Interactive annotation web app and HTTP API (``segany serve``; needs the ``server`` extra)."""
from __future__ import annotations


def create_app(*args, **kwargs):
    """See :func:`segany.server.app.create_app` (imported lazily: FastAPI is an optional extra)."""
    from .app import create_app as _create

    return _create(*args, **kwargs)


def register(subparsers) -> None:
    from .command import register as _register

    _register(subparsers)


def wait_until_serving(url: str, proc=None, timeout: float = 60.0, poll: float = 0.1) -> None:
    """Block until ``segany serve`` at ``url`` answers ``GET /api/info`` with 200.

    ``proc`` (a ``subprocess.Popen`` running the server) makes an early exit an immediate error
    instead of a timeout. Standard library only, so scripts and tests need no HTTP client for it.
    """
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/api/info", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"segany serve exited with code {proc.returncode} before answering at {url}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"segany serve did not answer at {url} within {timeout:g} s")
        time.sleep(poll)
