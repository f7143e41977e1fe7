"""The ``segany`` command. Each subcommand lives beside the code it drives and registers itself
here through a ``register(subparsers)`` function; exit codes: 0 ok, 2 usage or input error,
1 anything else."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# Modules that provide ``register(subparsers)``; each adds its subcommands with
# ``set_defaults(func=...)`` where func(args) -> int exit code.
COMMAND_MODULES = [
    "segany.commands",  # segment, embed, models
    "segany.onnx",  # export-onnx
    "segany.everything",  # everything
    "segany.server",  # serve
    "segany.evaluate.cli",  # eval
    "segany.engine.cli",  # annotate, dataset
    "segany.train.cli",  # train
]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments or input: printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segany",
        description="Segment Anything on your CPU: click, box, or segment everything.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'segany COMMAND --help' for a command's options and examples.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"segany {__version__}")
    parser.add_argument("--threads", dest="global_threads", type=int, default=None, metavar="N",  # (not annotate's/train's own)
                        help="PyTorch CPU threads (default: one per core); fewer when other programs keep cores busy")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:  # an optional extra that is not installed
            missing = getattr(e, "name", None) or str(e)
            if missing and missing.startswith("segany"):
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from .checkpoints import CheckpointError
    from .io import ImageError
    from .predictor import PromptError

    if args.global_threads is not None:
        if args.global_threads < 1:
            print(f"segany: error: --threads must be at least 1, got {args.global_threads}", file=sys.stderr)
            return EXIT_USAGE
        import torch

        torch.set_num_threads(args.global_threads)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ImageError, PromptError, CheckpointError, FileNotFoundError) as e:
        print(f"segany {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run through the importable module so that its exception classes are the ones raised.
    from segany.cli import main as _main

    sys.exit(_main())
