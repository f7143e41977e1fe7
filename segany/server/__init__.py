"""Interactive annotation web app and HTTP API (``segany serve``; needs the ``server`` extra)."""
from __future__ import annotations


def create_app(*args, **kwargs):
    """See :func:`segany.server.app.create_app` (imported lazily: FastAPI is an optional extra)."""
    from .app import create_app as _create

    return _create(*args, **kwargs)


def register(subparsers) -> None:
    from .command import register as _register

    _register(subparsers)
