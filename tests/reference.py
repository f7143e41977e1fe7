"""Import the reference implementations (``segment_anything`` 1.0 and ``mobile_sam``) for parity
tests, without torchvision or timm.

The reference imports torchvision for two things only: ``resize``/``to_pil_image`` (a PIL
bilinear resize) and ``batched_nms``/``box_area``; MobileSAM imports timm for ``DropPath``,
``to_2tuple``, ``trunc_normal_`` and ``register_model``. The stand-ins below do exactly what those
functions do for the arguments the reference passes. They are installed only when the real
packages are absent, and only in the test process.
"""
from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import torch
from PIL import Image


def _resize(img: Image.Image, size, interpolation=None, max_size=None, antialias=None):
    h, w = size  # torchvision's (h, w); PIL bilinear is what torchvision uses for PIL images
    return img.resize((w, h), Image.BILINEAR)


def _to_pil_image(pic, mode=None):
    if isinstance(pic, torch.Tensor):
        pic = pic.numpy()
    return Image.fromarray(np.ascontiguousarray(pic))


def _box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = boxes[order].double()
    area = _box_area(boxes)
    lt = torch.max(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], boxes[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    iou = inter / (area[:, None] + area[None, :] - inter)
    keep = []
    removed = torch.zeros(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if removed[i]:
            continue
        keep.append(i)
        removed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long)]


def _batched_nms(boxes, scores, idxs, iou_threshold):
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return _nms(boxes + offsets[:, None], scores, iou_threshold)


def _install_torchvision_standin() -> None:
    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize = _resize
    functional.to_pil_image = _to_pil_image
    ops = types.ModuleType("torchvision.ops")
    boxes = types.ModuleType("torchvision.ops.boxes")
    boxes.batched_nms = _batched_nms
    boxes.box_area = _box_area
    tv.transforms, transforms.functional, tv.ops, ops.boxes = transforms, functional, ops, boxes
    sys.modules.update({
        "torchvision": tv,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
        "torchvision.ops": ops,
        "torchvision.ops.boxes": boxes,
    })


def _install_timm_standin() -> None:
    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    registry = types.ModuleType("timm.models.registry")

    class DropPath(torch.nn.Module):
        def __init__(self, drop_prob=None):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):  # inference only
            return x

    layers.DropPath = DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = lambda t, mean=0.0, std=1.0, a=-2.0, b=2.0: torch.nn.init.trunc_normal_(t, mean, std, a, b)
    registry.register_model = lambda fn: fn
    timm.models, models.layers, models.registry = models, layers, registry
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry})


def load_reference():
    """Returns the modules (segment_anything, mobile_sam)."""
    # Check sys.modules first: once a stand-in is installed, find_spec raises on it (no __spec__),
    # so a second call must not ask again.
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        _install_torchvision_standin()
    if "timm" not in sys.modules and importlib.util.find_spec("timm") is None:
        _install_timm_standin()
    import mobile_sam
    import segment_anything

    return segment_anything, mobile_sam


def reference_decoder_model(sa, ours, model_config: dict):
    """The reference's own ``Sam`` with segany model ``ours``'s prompt encoder and mask decoder
    weights (``model_config``: its segany config, e.g. a .safetensors' metadata), for comparing
    what follows the embedding with a model the reference cannot build (the bundled
    EfficientNet encoder). Its image encoder is never run: callers give it segany's embeddings;
    only its ``img_size`` is read."""
    m = sa.modeling
    dim, size = model_config["prompt_embed_dim"], model_config["image_size"]
    dec = model_config["decoder"]

    class _NoEncoder(torch.nn.Module):
        img_size = size

    ref = m.Sam(
        image_encoder=_NoEncoder(),
        prompt_encoder=m.PromptEncoder(embed_dim=dim, image_embedding_size=tuple(ours.prompt_encoder.image_embedding_size),
                                       input_image_size=(size, size), mask_in_chans=16),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=dec["depth"], embedding_dim=dim, mlp_dim=dec["mlp_dim"], num_heads=dec["num_heads"]),
            transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dec["iou_head_hidden_dim"],
        ),
    ).eval()
    ref.prompt_encoder.load_state_dict(ours.prompt_encoder.state_dict())
    ref.mask_decoder.load_state_dict(ours.mask_decoder.state_dict())
    return ref
