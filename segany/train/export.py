"""Save / load models as .safetensors with their config in the metadata (key "config").

Large floating tensors may be stored as float16 (halves the file); loading casts everything back
to float32. ``load_bundled("tiny")`` restores the model shipped in ``segany/weights``.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Tuple

import torch

from ..checkpoints import TINY_CONFIG  # the bundled model's config, kept in the registry
from ..modeling.build import build_sam
from ..modeling.sam import Sam

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")


def save_safetensors(model: Sam, path: str, half: bool = True, extra: Dict[str, str] | None = None) -> None:
    """Write ``model``'s state dict and ``model.config`` to ``path`` atomically. With ``half``,
    floating tensors of 4096+ elements are stored as float16 (small ones, e.g. BatchNorm
    statistics and the positional-encoding matrix, stay float32)."""
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if half and v.is_floating_point() and v.numel() >= 4096:
            v = v.half()
        tensors[k] = v.contiguous()
    meta = {"config": json.dumps(model.config), "format": "pt"}
    meta.update(extra or {})
    write_safetensors(tensors, path, meta)


def write_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str]) -> None:
    """Write a .safetensors file atomically (temporary file, then rename), world-readable."""
    from safetensors.torch import save_file

    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_safetensors(path: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor], Dict[str, str]]:
    """(config, float32 state dict, metadata) of a file written by :func:`save_safetensors`."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    if "config" not in meta:
        raise ValueError(f"{path}: no 'config' in the safetensors metadata")
    return json.loads(meta["config"]), state, meta


def load_safetensors(path: str) -> Sam:
    """A ready model (eval mode, float32, CPU) from a .safetensors file with its config."""
    config, state, _ = read_safetensors(path)
    model = build_sam(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def bundled_path(name: str = "tiny") -> str:
    return os.path.join(WEIGHTS_DIR, f"{name}.safetensors")


def load_bundled(name: str = "tiny") -> Sam:
    """The model shipped with the package under ``segany/weights/<name>.safetensors``."""
    path = bundled_path(name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no bundled model {name!r} at {path}")
    return load_safetensors(path)
