"""MobileSAM's TinyViT image encoder (``vit_t``), with the official module and parameter names so
that ``mobile_sam.pt`` loads strictly (its unused classification head included).

At float32 CPU inference (no autograd, not traced or exported; ``common.inference_fast_path``)
each ``Conv2d_BN`` runs as one convolution with the BatchNorm folded in (kept, rebuilt when a
parameter or statistic changes), the GELU after it inside oneDNN's convolution, the convolution
stage channels-last, and the windowed attention as the official code writes it (two products and
a softmax, the bias table gathered once) instead of PyTorch's masked SDPA, whose checks for
fully-masked rows cost more than the softmax. The same function up to float32 rounding.
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import (FoldedWeights, LayerNorm2d, _act_name, _has_hooks, apply_linear, conv_act, fold_conv_bn,
                     inference_fast_path)
from .image_encoder import _window_indices


class Conv2d_BN(nn.Sequential):
    """Conv (no bias) + BatchNorm, named ``c`` and ``bn`` as in TinyViT."""

    def __init__(self, a, b, ks=1, stride=1, pad=0, dilation=1, groups=1, bn_weight_init=1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, dilation, groups, bias=False))
        bn = nn.BatchNorm2d(b)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0)
        self.add_module("bn", bn)

    def forward(self, x: torch.Tensor, act: Optional[nn.Module] = None) -> torch.Tensor:
        """``act(bn(c(x)))`` (``act`` None: none)."""
        name = None if act is not None and _has_hooks(act) else _act_name(act)  # (a hooked activation runs as a module)
        if name is not None and inference_fast_path(x) and not (_has_hooks(self) or _has_hooks(self.c) or _has_hooks(self.bn)):
            if getattr(self, "_folded", None) is None:
                self._folded = FoldedWeights()
            c, bn = self.c, self.bn
            w, b = self._folded.get((c.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var), lambda: fold_conv_bn(c, bn))
            return conv_act(x, w, b, c, name)
        y = self.bn(self.c(x))
        return y if act is None else act(y)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, embed_dim: int, resolution: int, activation) -> None:
        super().__init__()
        self.patches_resolution = (resolution // 4, resolution // 4)
        n = embed_dim
        self.seq = nn.Sequential(Conv2d_BN(in_chans, n // 2, 3, 2, 1), activation(), Conv2d_BN(n // 2, n, 3, 2, 1))

    def forward(self, x):
        if not inference_fast_path(x) or _has_hooks(self.seq):
            return self.seq(x)
        x = x.contiguous(memory_format=torch.channels_last)  # channels-last through the convolution stage
        return self.seq[2](self.seq[0](x, self.seq[1]))


class MBConv(nn.Module):
    def __init__(self, in_chans, out_chans, expand_ratio, activation):
        super().__init__()
        hidden = int(in_chans * expand_ratio)
        self.conv1 = Conv2d_BN(in_chans, hidden, ks=1)
        self.act1 = activation()
        self.conv2 = Conv2d_BN(hidden, hidden, ks=3, stride=1, pad=1, groups=hidden)
        self.act2 = activation()
        self.conv3 = Conv2d_BN(hidden, out_chans, ks=1, bn_weight_init=0.0)
        self.act3 = activation()

    def forward(self, x):
        shortcut = x
        x = self.conv1(x, self.act1)
        x = self.conv2(x, self.act2)
        x = self.conv3(x)
        return self.act3(x + shortcut)


class PatchMerging(nn.Module):
    def __init__(self, input_resolution, dim, out_dim, activation):
        super().__init__()
        self.input_resolution = input_resolution
        self.act = activation()
        self.conv1 = Conv2d_BN(dim, out_dim, 1, 1, 0)
        # MobileSAM keeps the last stage at 1/16 (64x64 for a 1024 input) by not striding into
        # the widest stage; these are the widths it uses for that stage.
        stride = 1 if out_dim in (320, 448, 576) else 2
        self.conv2 = Conv2d_BN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2d_BN(out_dim, out_dim, 1, 1, 0)

    def forward(self, x):
        if x.ndim == 3:
            H, W = self.input_resolution
            x = x.view(len(x), H, W, -1).permute(0, 3, 1, 2)
        x = self.conv1(x, self.act)
        x = self.conv2(x, self.act)
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class ConvLayer(nn.Module):
    def __init__(self, dim, input_resolution, depth, activation, downsample=None, out_dim=None, conv_expand_ratio=4.0):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, dim, conv_expand_ratio, activation) for _ in range(depth))
        self.downsample = downsample(input_resolution, dim=dim, out_dim=out_dim, activation=activation) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, act_layer=nn.GELU):
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.act = act_layer()

    def forward(self, x):
        # (apply_linear: large products through oneDNN with the GELU fused, as in SAM's ViT MLP)
        return apply_linear(self.fc2, apply_linear(self.fc1, self.norm(x), self.act))


class Attention(nn.Module):
    """Windowed attention with a learned bias per (|dy|, |dx|) offset and head."""

    def __init__(self, dim, key_dim, num_heads=8, attn_ratio=4, resolution=(14, 14)):
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.key_dim = key_dim
        nh_kd = key_dim * num_heads
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, self.dh + nh_kd * 2)
        self.proj = nn.Linear(self.dh, dim)
        points = list(itertools.product(range(resolution[0]), range(resolution[1])))
        offsets: dict = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer("attention_bias_idxs", torch.LongTensor(idxs).view(len(points), len(points)), persistent=False)

    def forward(self, x):  # (B, N, C)
        B, N, _ = x.shape
        x = self.norm(x)
        q, k, v = apply_linear(self.qkv, x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        if inference_fast_path(x):
            if getattr(self, "_bias", None) is None:
                self._bias = FoldedWeights()
            bias = self._bias.get((self.attention_biases,), lambda: self.attention_biases[:, self.attention_bias_idxs])
            attn = torch.matmul(q, k.transpose(-2, -1)).mul_(self.scale).add_(bias).softmax(-1)
            x = torch.matmul(attn, v)
        else:
            bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return apply_linear(self.proj, x.transpose(1, 2).reshape(B, N, self.dh))


class TinyViTBlock(nn.Module):
    def __init__(self, dim, input_resolution, num_heads, window_size=7, mlp_ratio=4.0, local_conv_size=3, activation=nn.GELU):
        super().__init__()
        self.input_resolution = input_resolution
        self.window_size = window_size
        head_dim = dim // num_heads
        self.attn = Attention(dim, head_dim, num_heads, attn_ratio=1, resolution=(window_size, window_size))
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=activation)
        self.local_conv = Conv2d_BN(dim, dim, ks=local_conv_size, stride=1, pad=local_conv_size // 2, groups=dim)

    def forward(self, x):
        H, W = self.input_resolution
        B, L, C = x.shape
        ws = self.window_size
        res_x = x
        fresh = inference_fast_path(x)  # then x is this block's own tensor after the attention: adds in place
        if H == ws and W == ws:
            x = self.attn(x)
        elif fresh:
            # pad + partition as one row gather, unpartition + crop as another (the official
            # code's four copies are two)
            gather, scatter, pad_rows = _window_indices(H, W, ws, str(x.device))
            windows = x.index_select(1, gather.to(x.device))
            if pad_rows.numel():
                windows[:, pad_rows.to(x.device)] = 0.0  # the official zero padding (before the attention's LayerNorm)
            x = self.attn(windows.view(-1, ws * ws, C)).view(B, -1, C).index_select(1, scatter.to(x.device))
        else:
            x = x.view(B, H, W, C)
            pad_b = (ws - H % ws) % ws
            pad_r = (ws - W % ws) % ws
            if pad_b or pad_r:
                x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
            pH, pW = H + pad_b, W + pad_r
            nH, nW = pH // ws, pW // ws
            x = x.view(B, nH, ws, nW, ws, C).transpose(2, 3).reshape(B * nH * nW, ws * ws, C)
            x = self.attn(x)
            x = x.view(B, nH, nW, ws, ws, C).transpose(2, 3).reshape(B, pH, pW, C)
            if pad_b or pad_r:
                x = x[:, :H, :W].contiguous()
            x = x.view(B, L, C)
        x = x.add_(res_x) if fresh else res_x + x
        x = x.transpose(1, 2).reshape(B, C, H, W)
        x = self.local_conv(x)
        x = x.view(B, C, L).transpose(1, 2)
        return self.mlp(x).add_(x) if fresh else x + self.mlp(x)


class BasicLayer(nn.Module):
    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio=4.0, downsample=None,
                 local_conv_size=3, activation=nn.GELU, out_dim=None):
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, input_resolution, num_heads, window_size, mlp_ratio, local_conv_size, activation)
            for _ in range(depth)
        )
        self.downsample = downsample(input_resolution, dim=dim, out_dim=out_dim, activation=activation) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """(B, 3, img_size, img_size) -> (B, 256, img_size/16, img_size/16)."""

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        activation = nn.GELU
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], img_size, activation)
        pr = self.patch_embed.patches_resolution
        self.layers = nn.ModuleList()
        n = len(depths)
        for i in range(n):
            # The last stage stays at the resolution of the one before (see PatchMerging).
            div = 2 ** (i - 1 if i == 3 else i)
            kwargs = dict(
                dim=embed_dims[i],
                input_resolution=(pr[0] // div, pr[1] // div),
                depth=depths[i],
                downsample=PatchMerging if i < n - 1 else None,
                out_dim=embed_dims[min(i + 1, n - 1)],
                activation=activation,
            )
            if i == 0:
                self.layers.append(ConvLayer(conv_expand_ratio=mbconv_expand_ratio, **kwargs))
            else:
                self.layers.append(
                    BasicLayer(num_heads=num_heads[i], window_size=window_sizes[i], mlp_ratio=mlp_ratio,
                               local_conv_size=local_conv_size, **kwargs)
                )
        self.final_resolution = kwargs["input_resolution"]
        # Unused by SAM but part of the official checkpoint.
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        B, _, C = x.shape
        h, w = self.final_resolution
        x = x.view(B, h, w, C).permute(0, 3, 1, 2)
        return self.neck(x)
