"""Model variants as data, and loading their weights safely.

``VARIANTS`` lists every model segany knows: its config (for ``build_sam``), where its weights
come from (the official URL with sha256 and size, or a file shipped inside the package), and a
one-line description. ``load_model`` builds a variant and loads weights strictly: every key and
shape must match, and files are read with ``torch.load(weights_only=True)`` or safetensors, so a
checkpoint can never execute code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from .modeling import Sam, build_sam

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, unsafe, or not of the expected variant."""


def _vit(embed_dim: int, depth: int, num_heads: int, global_attn: tuple) -> Dict[str, Any]:
    return {
        "image_size": 1024,
        "prompt_embed_dim": 256,
        "encoder": {
            "type": "vit",
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "global_attn_indexes": list(global_attn),
            "patch_size": 16,
            "window_size": 14,
        },
    }


# The bundled ``tiny`` model: EfficientNet-Lite0 + FPN neck at stride 16, SAM's prompt encoder and
# mask decoder at width 128, 512 px input (32x32 image embedding, 128x128 low-res masks). Its weights file carries this
# config in its metadata, which wins when loading; this copy builds fresh models for training.
TINY_CONFIG: Dict[str, Any] = {
    "image_size": 512,
    "prompt_embed_dim": 128,
    "encoder": {"type": "efficientnet", "stride": 16, "neck_depth": 1},
    "decoder": {"depth": 2, "mlp_dim": 1024, "num_heads": 8, "iou_head_hidden_dim": 256},
}


@dataclass(frozen=True)
class Variant:
    name: str
    config: Dict[str, Any]
    description: str
    url: Optional[str] = None  # official download
    filename: Optional[str] = None
    sha256: Optional[str] = None
    size: Optional[int] = None  # bytes
    bundled: Optional[str] = None  # file inside segany/weights/
    aliases: tuple = field(default=())


# sha256 and byte sizes of the official files: not computed here (no download in this project's
# build), but cross-checked against several independent public projects that hard-code them
# (download scripts and model registries, e.g. micro_sam's checksum table, which also lists
# MobileSAM's mobile_sam.pt at commit f706ad9; and projects that record sizes: ViT-H 2564550879,
# ViT-L 1249524607, ViT-B 375042383, mobile_sam.pt 40728226). Every value below appeared
# identically in at least two unrelated sources.
VARIANTS: Dict[str, Variant] = {
    v.name: v
    for v in [
        Variant(
            "vit_h",
            _vit(1280, 32, 16, (7, 15, 23, 31)),
            "Official SAM ViT-H (636M parameters)",
            url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
            filename="sam_vit_h_4b8939.pth",
            sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            size=2564550879,
            aliases=("default",),
        ),
        Variant(
            "vit_l",
            _vit(1024, 24, 16, (5, 11, 17, 23)),
            "Official SAM ViT-L (308M parameters)",
            url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
            filename="sam_vit_l_0b3195.pth",
            sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            size=1249524607,
        ),
        Variant(
            "vit_b",
            _vit(768, 12, 12, (2, 5, 8, 11)),
            "Official SAM ViT-B (91M parameters)",
            url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
            filename="sam_vit_b_01ec64.pth",
            sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            size=375042383,
        ),
        Variant(
            "vit_t",
            {
                "image_size": 1024,
                "prompt_embed_dim": 256,
                "encoder": {
                    "type": "tiny_vit",
                    "embed_dims": [64, 128, 160, 320],
                    "depths": [2, 2, 6, 2],
                    "num_heads": [2, 4, 5, 10],
                    "window_sizes": [7, 7, 14, 7],
                    "num_classes": 1000,
                },
            },
            "MobileSAM TinyViT (10M parameters)",
            url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
            filename="mobile_sam.pt",
            sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
            size=40728226,
        ),
        Variant(
            "tiny",
            TINY_CONFIG,
            "segany's own small model, shipped in the package (offline default; see MODEL_CARD.md)",
            bundled="tiny.safetensors",
        ),
    ]
}


def resolve_name(name: str) -> Variant:
    if name in VARIANTS:
        return VARIANTS[name]
    for v in VARIANTS.values():
        if name in v.aliases:
            return v
    raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(VARIANTS))}")


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a state dict from .pth/.pt (``weights_only``) or .safetensors; never runs code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(
                f"{path}: cannot be read as a weights-only checkpoint ({type(e).__name__}: {msg}). "
                "It may be truncated, not a PyTorch file, or contain pickled code, which segany refuses to run."
            ) from None
    if isinstance(sd, Mapping) and "model" in sd and isinstance(sd["model"], Mapping) and not any(
        isinstance(v, torch.Tensor) for v in sd.values()
    ):
        sd = sd["model"]  # training checkpoints that wrap the state dict
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return dict(sd)


def load_state_dict_strict(model: Sam, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> Sam:
    """Load with every key and shape matching, or raise ``CheckpointError`` listing the mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(expected[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)})")
        raise CheckpointError(f"{source} does not match this model variant: " + "; ".join(parts))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()}, strict=True)
    return model


def build_variant(name: str) -> Sam:
    v = resolve_name(name)
    sam = build_sam(v.config)
    sam.model_name = v.name
    return sam


def load_model(
    name: str = "tiny",
    checkpoint: Optional[PathLike] = None,
    device: Optional[str] = None,
    download: bool = True,
) -> Sam:
    """Build ``name`` and load its weights: from ``checkpoint`` if given, else the bundled file or
    the verified download cache. ``name`` may also be a path to a checkpoint, in which case the
    variant is inferred from its keys and shapes."""
    if checkpoint is None and name not in VARIANTS and os.path.exists(str(name)):
        config = safetensors_config(name)
        if config is not None:  # a model saved with its own config (e.g. by segany's trainer)
            return _load_with_config(Path(name), config, "custom", device)
        checkpoint, name = name, infer_variant(read_state_dict(name))
    v = resolve_name(name)
    if checkpoint is None:
        if v.bundled is not None:
            return _load_bundled(v, device)
        from .download import ensure_checkpoint

        checkpoint = ensure_checkpoint(v, download=download)
    sam = build_variant(v.name)
    load_state_dict_strict(sam, read_state_dict(checkpoint), source=str(checkpoint))
    return sam.to(device or "cpu").eval()


def _load_bundled(v: Variant, device: Optional[str]) -> Sam:
    path = Path(__file__).parent / "weights" / v.bundled
    if not path.is_file():
        raise CheckpointError(f"bundled weights {path} are missing from this installation")
    return _load_with_config(path, safetensors_config(path) or v.config, v.name, device)


def safetensors_metadata(path: PathLike) -> Dict[str, str]:
    """The string metadata of a .safetensors file ({} for other files)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def safetensors_config(path: PathLike) -> Optional[Dict[str, Any]]:
    """The model config stored in a .safetensors file's metadata (key "config"), if any."""
    import json

    meta = safetensors_metadata(path)
    try:
        return json.loads(meta["config"]) if "config" in meta else None
    except ValueError as e:
        raise CheckpointError(f"{path}: its stored model config is not valid JSON ({e})") from None


# Generator settings a trained model may carry (metadata key "everything", written by
# ``python -m segany.evaluate.calibrate --write``): its own segment-everything thresholds.
EVERYTHING_KEYS = ("pred_iou_thresh", "stability_score_thresh")


def everything_defaults(path: PathLike) -> Dict[str, float]:
    """The calibrated segment-everything thresholds stored with a .safetensors model ({} if none)."""
    import json

    raw = safetensors_metadata(path).get("everything")
    if not raw:
        return {}
    try:
        d = json.loads(raw)
        return {k: float(d[k]) for k in EVERYTHING_KEYS if k in d}
    except (ValueError, TypeError, AttributeError):
        return {}  # advisory settings only: a damaged entry leaves SAM's defaults in force


def model_everything_defaults(name: Optional[str], checkpoint: Optional[PathLike] = None) -> Dict[str, float]:
    """Calibrated segment-everything thresholds of ``--model name`` / ``--checkpoint`` without
    loading it: those stored in a .safetensors file (the checkpoint, a model path, or a bundled
    model's file); {} for official checkpoints (SAM's defaults fit them)."""
    if checkpoint is not None:
        return everything_defaults(checkpoint)
    name = name or "tiny"
    if name not in VARIANTS and os.path.exists(str(name)):
        return everything_defaults(name)
    try:
        v = resolve_name(name)
    except KeyError:
        bundled = Path(__file__).parent / "weights" / f"{name}.safetensors"
        return everything_defaults(bundled) if bundled.is_file() else {}
    return everything_defaults(Path(__file__).parent / "weights" / v.bundled) if v.bundled else {}


def _load_with_config(path: Path, config: Dict[str, Any], model_name: str, device: Optional[str]) -> Sam:
    try:
        sam = build_sam(config)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its stored model config cannot be built ({type(e).__name__}: {e})") from None
    sam.model_name = model_name
    load_state_dict_strict(sam, read_state_dict(path), source=str(path))
    sam.everything_defaults = everything_defaults(path)
    return sam.to(device or "cpu").eval()


def infer_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which official variant a state dict belongs to (by its encoder keys and shapes)."""
    for name, v in VARIANTS.items():
        if v.bundled is not None:
            continue
        expected = build_sam_shapes(name)
        if set(expected) == set(state_dict) and all(tuple(state_dict[k].shape) == s for k, s in expected.items()):
            return name
    raise CheckpointError("checkpoint matches none of the known variants (vit_h, vit_l, vit_b, vit_t)")


_SHAPES: Dict[str, Dict[str, tuple]] = {}


def build_sam_shapes(name: str) -> Dict[str, tuple]:
    """Key -> shape of a variant's state dict, built on the meta device (no memory)."""
    if name not in _SHAPES:
        with torch.device("meta"):
            sam = build_sam(VARIANTS[name].config)
        _SHAPES[name] = {k: tuple(t.shape) for k, t in sam.state_dict().items()}
    return _SHAPES[name]


def _registry_builder(name: str):
    def build(checkpoint: Optional[PathLike] = None) -> Sam:
        """Same contract as ``segment_anything.sam_model_registry[...]``: a model in eval mode,
        with the checkpoint's weights when one is given (random weights otherwise)."""
        sam = build_variant(name)
        if checkpoint is not None:
            load_state_dict_strict(sam, read_state_dict(checkpoint), source=str(checkpoint))
        return sam.eval()

    return build


# Drop-in for ``segment_anything.sam_model_registry`` (and MobileSAM's "vit_t").
sam_model_registry = {
    "default": _registry_builder("vit_h"),
    "vit_h": _registry_builder("vit_h"),
    "vit_l": _registry_builder("vit_l"),
    "vit_b": _registry_builder("vit_b"),
    "vit_t": _registry_builder("vit_t"),
}


def list_models() -> list:
    return list(VARIANTS.values())
