"""``segany serve``: the annotation web app over a folder of images."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

EXAMPLES = """examples:
  segany serve photos/                      # http://127.0.0.1:8000, bundled tiny model
  segany serve photos/ --model vit_b        # official ViT-B (downloaded and verified once)
  segany serve photos/ --checkpoint my.safetensors --port 8080
Annotations are saved beside each image as <stem>.json (SA-1B per-image format); the page and
the API (docs at /docs) never read or write outside the folder."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="annotation web app and HTTP API over a folder of images",
        description="Serve the interactive annotation page and its JSON API.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", nargs="?", default=".", metavar="DATASET_DIR", help="folder of images (default: current folder)")
    p.add_argument("--model", default="tiny", help="model name (default: tiny, the bundled model)")
    p.add_argument("--checkpoint", default=None, help="weights file; a .safetensors with a 'config' entry in its metadata needs no --model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.add_argument("--cache-size", type=int, default=8, help="image embeddings kept in memory (LRU, default 8)")
    p.add_argument("--max-upload-mb", type=float, default=32.0, help="largest upload accepted (default 32 MB)")
    p.add_argument("--max-pixels", type=int, default=50_000_000, help="largest image accepted, in pixels (default 50M)")
    p.set_defaults(func=run)


def load_server_model(name: str, checkpoint=None, device=None):
    """``load_model``; a .safetensors checkpoint that carries its own config (as ``segany train``
    writes them) is built from that config, whatever ``--model`` says."""
    from ..checkpoints import load_model, safetensors_config

    if checkpoint is not None and safetensors_config(checkpoint) is not None:
        return load_model(str(checkpoint), device=device)
    return load_model(name, checkpoint=checkpoint, device=device)


def run(args) -> int:
    from ..cli import UsageError

    try:
        import uvicorn

        from .app import LOOPBACK_HOSTS, create_app
    except ImportError as e:
        raise UsageError(f"segany serve needs the server extra: pip install 'segany[server]' ({e})") from None
    if not os.path.isdir(args.dataset):
        raise UsageError(f"{args.dataset}: not a folder")
    model = load_server_model(args.model, args.checkpoint, args.device)
    app = create_app(
        args.dataset, model, cache_size=args.cache_size,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_pixels=args.max_pixels,
        # bound to this machine only: answer only to its loopback names (DNS-rebinding guard)
        allowed_hosts=LOOPBACK_HOSTS if args.host in LOOPBACK_HOSTS else None,
    )
    if args.host not in LOOPBACK_HOSTS:
        print(f"warning: serving on {args.host}: anyone who can reach this address can read and write {args.dataset}")
    print(f"segany serve: {Path(args.dataset).resolve()} with model {getattr(model, 'model_name', args.model)} "
          f"on http://{args.host}:{args.port}/  (API docs: /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
