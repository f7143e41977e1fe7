"""Shared pieces of the core tests: tiny model configs that both segany and the reference can
build, reference models built from the reference's own classes, and checkpoint writers."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from reference import load_reference
from segany.modeling.build import build_sam, randomize_

# A ViT small enough for every test run: 128 px input, 8x8 embedding grid, windowed + global
# attention with relative positions (the parts most likely to go wrong).
TINY_VIT: Dict[str, Any] = {
    "image_size": 128,
    "prompt_embed_dim": 32,
    "encoder": {"type": "vit", "embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1], "patch_size": 16, "window_size": 4},
    "decoder": {"depth": 2, "mlp_dim": 64, "num_heads": 2, "iou_head_hidden_dim": 32},
}

# A TinyViT with MobileSAM's layout but narrow and one block per stage. The reference TinyViT
# reshapes its output to a fixed 64x64 grid, i.e. it only runs at 1024 px input, and its neck is
# fixed at 256 channels; its last patch merging keeps the resolution only when the last width is
# 320, 448 or 576 (MobileSAM's rule, which segany follows); so this keeps those and shrinks the rest.
TINY_TINYVIT: Dict[str, Any] = {
    "image_size": 1024,
    "prompt_embed_dim": 256,
    "encoder": {"type": "tiny_vit", "embed_dims": [16, 32, 48, 320], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 3, 4], "window_sizes": [7, 7, 14, 7], "num_classes": 10},
    "decoder": {"depth": 1, "mlp_dim": 64, "num_heads": 8, "iou_head_hidden_dim": 32},
}


def reference_model(config: Dict[str, Any]) -> torch.nn.Module:
    """The same architecture as ``build_sam(config)``, built from the reference's classes."""
    sa, ms = load_reference()
    enc = dict(config["encoder"])
    kind = enc.pop("type")
    size, dim = config["image_size"], config["prompt_embed_dim"]
    dec = config.get("decoder", {})
    mod = ms if kind == "tiny_vit" else sa
    m = mod.modeling
    if kind == "vit":
        encoder = m.ImageEncoderViT(
            img_size=size, patch_size=enc["patch_size"], embed_dim=enc["embed_dim"], depth=enc["depth"],
            num_heads=enc["num_heads"], mlp_ratio=4, out_chans=dim, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            window_size=enc["window_size"], global_attn_indexes=tuple(enc["global_attn_indexes"]),
        )
        grid = size // enc["patch_size"]
    elif kind == "tiny_vit":
        encoder = m.TinyViT(
            img_size=size, in_chans=3, num_classes=enc.get("num_classes", 1000), embed_dims=enc["embed_dims"],
            depths=enc["depths"], num_heads=enc["num_heads"], window_sizes=enc["window_sizes"], mlp_ratio=4.0,
            drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0,
            local_conv_size=3, layer_lr_decay=0.8,
        )
        grid = size // 16
    else:
        raise ValueError(kind)
    sam = m.Sam(
        image_encoder=encoder,
        prompt_encoder=m.PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(size, size), mask_in_chans=16),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=dec.get("depth", 2), embedding_dim=dim, mlp_dim=dec.get("mlp_dim", 2048), num_heads=dec.get("num_heads", 8)),
            transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dec.get("iou_head_hidden_dim", 256),
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def random_checkpoint(config: Dict[str, Any], path: Path, seed: int = 0) -> Path:
    """Random weights for ``config`` saved the way the official checkpoints are:
    ``torch.save(state_dict)`` to a .pth file."""
    sam = randomize_(build_sam(config), seed=seed)
    torch.save(sam.state_dict(), path)
    return path


def config_safetensors(config: Dict[str, Any], path: Path, seed: int = 0) -> Path:
    """Random weights plus their config in the metadata (segany's own checkpoint format)."""
    import json

    from safetensors.torch import save_file

    sam = randomize_(build_sam(config), seed=seed)
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(path), metadata={"config": json.dumps(config)})
    return path


def test_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth structure plus noise, uint8 RGB: random enough to exercise every weight."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), ((xx // 8 + yy // 8) % 2) * 200], -1)
    noise = np.random.default_rng(seed).integers(-30, 30, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


test_image.__test__ = False  # not a pytest test despite the name


def randomize_batchnorm_(model: torch.nn.Module, seed: int = 7) -> torch.nn.Module:
    """Random affine parameters and running statistics for every BatchNorm2d of ``model`` (fresh
    ones are identities, under which folding them into convolutions would go unchecked)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model
