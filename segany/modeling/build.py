"""Build a SAM-family model from a plain config (a dict of JSON-able values).

A config names the image encoder by ``type`` with its keyword arguments; the prompt encoder and
mask decoder are SAM's, sized by ``prompt_embed_dim``/``image_size``. Example (official ViT-B)::

    {"image_size": 1024, "prompt_embed_dim": 256,
     "encoder": {"type": "vit", "embed_dim": 768, "depth": 12, "num_heads": 12,
                 "global_attn_indexes": [2, 5, 8, 11], "patch_size": 16, "window_size": 14}}
"""
from __future__ import annotations

import copy
from functools import partial
from typing import Any, Callable, Dict

import torch
from torch import nn

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .tiny_vit import TinyViT
from .transformer import TwoWayTransformer


def _vit(image_size: int, out_chans: int, **kw: Any) -> nn.Module:
    kw = dict(kw)
    kw.setdefault("patch_size", 16)
    kw.setdefault("window_size", 14)
    kw["global_attn_indexes"] = tuple(kw.get("global_attn_indexes", ()))
    return ImageEncoderViT(
        img_size=image_size,
        mlp_ratio=kw.pop("mlp_ratio", 4.0),
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        qkv_bias=True,
        use_rel_pos=kw.pop("use_rel_pos", True),
        out_chans=out_chans,
        **kw,
    )


def _tiny_vit(image_size: int, out_chans: int, **kw: Any) -> nn.Module:
    return TinyViT(img_size=image_size, out_chans=out_chans, **kw)


def _efficientnet(image_size: int, out_chans: int, **kw: Any) -> nn.Module:
    from .efficientnet import EfficientNetEncoder  # our own small encoder (bundled model)

    return EfficientNetEncoder(img_size=image_size, out_chans=out_chans, **kw)


# Image-encoder constructors by config ``type``: (image_size, out_chans, **kwargs) -> module
# whose forward maps (B, 3, S, S) to (B, out_chans, S/stride, S/stride) and which has ``img_size``.
ENCODERS: Dict[str, Callable[..., nn.Module]] = {
    "vit": _vit,
    "tiny_vit": _tiny_vit,
    "efficientnet": _efficientnet,
}


def embedding_size(config: Dict[str, Any]) -> int:
    """Side of the image-embedding grid for a config (64 for the official models)."""
    enc = config["encoder"]
    stride = enc.get("stride") or enc.get("patch_size") or 16
    return config["image_size"] // stride


def build_sam(config: Dict[str, Any]) -> Sam:
    """A freshly initialised model (in eval mode) for ``config``."""
    config = copy.deepcopy(config)
    image_size = int(config.get("image_size", 1024))
    dim = int(config.get("prompt_embed_dim", 256))
    enc = dict(config["encoder"])
    enc_type = enc.pop("type")
    if enc_type not in ENCODERS:
        raise ValueError(f"unknown image encoder type {enc_type!r}; known: {sorted(ENCODERS)}")
    if enc_type != "efficientnet":  # the ViTs' stride follows from their patch size
        enc.pop("stride", None)
    image_encoder = ENCODERS[enc_type](image_size, dim, **enc)
    grid = embedding_size(config)
    dec = config.get("decoder", {})
    sam = Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=int(config.get("mask_in_chans", 16)),
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=int(dec.get("depth", 2)),
                embedding_dim=dim,
                mlp_dim=int(dec.get("mlp_dim", 2048)),
                num_heads=int(dec.get("num_heads", 8)),
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=int(dec.get("iou_head_hidden_dim", 256)),
        ),
        pixel_mean=config.get("pixel_mean", (123.675, 116.28, 103.53)),
        pixel_std=config.get("pixel_std", (58.395, 57.12, 57.375)),
    )
    sam.config = copy.deepcopy(config)
    return sam.eval()


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Fill every parameter and buffer with seeded noise (for parity tests: zero-initialised
    tensors such as relative positions would otherwise hide bugs). BatchNorm variances stay
    positive."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point():
            continue
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif name.endswith("positional_encoding_gaussian_matrix"):
            t.copy_(torch.randn(t.shape, generator=g))
        elif name.endswith("pixel_mean") or name.endswith("pixel_std"):
            continue
        elif t.ndim == 1 and (name.endswith("weight")) and "norm" in name.lower():
            t.copy_(1.0 + std * torch.randn(t.shape, generator=g))
        else:
            t.copy_(std * torch.randn(t.shape, generator=g))
    return model
