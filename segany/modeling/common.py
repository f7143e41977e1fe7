"""Small building blocks shared by the encoders and the decoder.

Parameter names match the official SAM checkpoints (``lin1``/``lin2``, ``weight``/``bias``).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

# oneDNN only for products at least this large. On the 2-core development machine MKL won on
# few rows: (7 x 256) @ (256 x 256) 43 vs oneDNN's 88 us, and the decoder MLP's
# (7 x 256) @ (256 x 2048) 101 vs 173 us and (7 x 2048) @ (2048 x 256) 96 vs 184 us (caches
# flushed between calls, as in a click, 2026-12-04); from ~28 rows on they were even, and oneDNN
# won on the encoder's large products.
_ONEDNN_MIN_WEIGHT = 1 << 20  # in x out elements
_ONEDNN_MIN_MACS = 1 << 26  # rows x in x out
_onednn: Optional[bool] = None


def _onednn_works(probe) -> bool:
    """oneDNN is on (``SEGANY_ONEDNN=0`` turns it off) and ``probe()``, a tiny call of one of its
    private ops checked against PyTorch, is true (a build without the op raises)."""
    if os.environ.get("SEGANY_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(probe())
    except (AttributeError, RuntimeError):
        return False


def _onednn_available() -> bool:
    global _onednn
    if _onednn is None:
        _onednn = _onednn_works(lambda: torch.allclose(
            torch.ops.mkldnn._linear_pointwise(torch.ones(2, 3), torch.ones(4, 3), torch.zeros(4), "gelu", [], "none"),
            F.gelu(torch.full((2, 4), 3.0))))
    return _onednn


_onednn_bf16: Optional[bool] = None


def _onednn_bf16_available() -> bool:
    """oneDNN's products take bfloat16 on this CPU. Not on AVX2 CPUs (AMD EPYC, 2026-12-06:
    "could not create a primitive descriptor for the inner product"), where PyTorch's own
    bfloat16 matmul runs instead."""
    global _onednn_bf16
    if _onednn_bf16 is None:
        b = torch.ones(2, 3, dtype=torch.bfloat16)
        _onednn_bf16 = _onednn_works(lambda: torch.equal(
            torch.ops.mkldnn._linear_pointwise(b, torch.ones(4, 3, dtype=torch.bfloat16), None, "none", [], "").float(),
            torch.full((2, 4), 3.0)))
    return _onednn_bf16


try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # (a PyTorch without it has no dispatch modes to watch for)
    _get_current_dispatch_mode = None


def _tracing_or_exporting() -> bool:
    """A TorchScript trace or script, or an ONNX export, is recording the operations: keep to
    PyTorch's own (native kernels and numpy would not be recorded)."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


def _dispatch_mode_active() -> bool:
    """A TorchDispatchMode (FLOP counter, fake tensors, ...) is watching: keep to standard ops.
    (Asked several times per decoder call: the import is done once, above.)"""
    return _get_current_dispatch_mode is not None and _get_current_dispatch_mode() is not None


def _global_hooks() -> bool:
    """Whether forward hooks for every module are registered (``register_module_forward_hook``)."""
    return bool(getattr(_torch_module, "_global_forward_hooks", None) or getattr(_torch_module, "_global_forward_pre_hooks", None))


def _has_hooks(layer: nn.Module) -> bool:
    return bool(layer._forward_hooks or layer._forward_pre_hooks or _global_hooks())


def _onednn_eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        not torch.is_grad_enabled()
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and (weight.numel() >= _ONEDNN_MIN_WEIGHT or x.numel() * weight.shape[0] >= _ONEDNN_MIN_MACS)
        and not _tracing_or_exporting()
        and _onednn_available()
        and not _dispatch_mode_active()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, act: str = "none") -> torch.Tensor:
    """``act(F.linear(x, weight, bias))``, ``act`` one of ``none``, ``gelu`` (exact), ``relu``.

    At float32 CPU inference (no autograd, not being traced or exported) a large product goes
    through oneDNN's matmul with the activation fused into it: 10-25% faster than PyTorch's
    default (MKL) GEMM plus a separate activation pass on the development machine (e.g. the ViT
    MLP's first layer, 512 x 768 -> 3072 with GELU: 11.9 vs 16.1 ms), same results up to float32
    rounding (~1e-6 relative). ``SEGANY_ONEDNN=0`` turns this off."""
    if _onednn_eligible(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, act, [], "none" if act == "gelu" else "")
    y = F.linear(x, weight, bias)
    if act == "gelu":
        return F.gelu(y)
    if act == "relu":
        return F.relu(y)
    return y


def inference_fast_path(x: torch.Tensor) -> bool:
    """Float32 CPU inference where the fused and folded paths may replace modules as written: no
    autograd, not traced, scripted or exported, no dispatch mode watching."""
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not _tracing_or_exporting()
        and not _dispatch_mode_active()
    )


_fused_conv: Optional[bool] = None


def fused_conv_available() -> bool:
    """oneDNN's convolution with a fused activation (``SEGANY_ONEDNN=0`` turns it off)."""
    global _fused_conv
    if _fused_conv is None:
        _fused_conv = _onednn_works(lambda: torch.equal(
            torch.ops.mkldnn._convolution_pointwise(torch.full((1, 1, 2, 2), 4.0), torch.full((1, 1, 1, 1), 2.0), torch.zeros(1),
                                                    [0, 0], [1, 1], [1, 1], 1, "hardtanh", [0.0, 6.0], ""),
            torch.full((1, 1, 2, 2), 6.0)))
    return _fused_conv


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the one convolution equal to ``bn(conv(x))`` with ``bn`` in eval mode."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    w = conv.weight * scale.reshape(-1, 1, 1, 1)
    b = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        b = b + conv.bias * scale
    return w.contiguous(memory_format=torch.channels_last), b


def conv_act(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, conv: nn.Conv2d, act: str = "none") -> torch.Tensor:
    """``act(F.conv2d(x, w, b))`` with ``conv``'s stride, padding, dilation and groups; ``act`` one of
    ``none``, ``relu6``, ``gelu`` (exact). Inside oneDNN's convolution where it has one (a pass less
    per activation), else the activation in place."""
    if x.device.type == "cpu" and fused_conv_available():
        attr, scalars, algorithm = {"none": ("none", [], ""), "relu6": ("hardtanh", [0.0, 6.0], ""),
                                    "gelu": ("gelu", [], "none")}[act]
        return torch.ops.mkldnn._convolution_pointwise(x, w, b, list(conv.padding), list(conv.stride), list(conv.dilation),
                                                       conv.groups, attr, scalars, algorithm)
    y = F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
    if act == "relu6":
        return y.clamp_(0.0, 6.0)
    return F.gelu(y) if act == "gelu" else y


_weights_generation = 0


def weights_changed() -> None:
    """Tell segany that parameters changed where their version counters do not show it: writes
    through ``.data`` (``p.data.copy_(x)``, as older EMA code does). Every kept derivative of
    weights (folded layers, the decoder's packed and transposed weights, a predictor's per-image
    decoder state) is then rebuilt on its next use. In-place updates under ``torch.no_grad()``,
    ``load_state_dict``, optimizers, and new parameters or modules assigned are noticed without
    it."""
    global _weights_generation
    _weights_generation += 1


def weights_generation() -> int:
    """How many times :func:`weights_changed` was called (part of every weight cache's key)."""
    return _weights_generation


def tensor_version(t: torch.Tensor) -> Optional[int]:
    """``t._version``, or None for tensors made under ``inference_mode`` (no version counter)."""
    try:
        return t._version
    except RuntimeError:
        return None


class FoldedWeights:
    """Derived tensors of some parameters and buffers (folded convolutions), kept while none of
    those changes: the key is each tensor's storage and version counter (a device or dtype move
    replaces the one, in-place updates bump the other). Tensors made under ``inference_mode`` have
    no version counter: then nothing is kept."""

    def __init__(self) -> None:
        self._key = None
        self._value = None

    def get(self, tensors, make):
        try:
            key = (_weights_generation,) + tuple((t.data_ptr(), t._version) for t in tensors)
        except RuntimeError:
            return make()
        if self._value is None or self._key != key:
            self._value, self._key = make(), key
        return self._value


def apply_linear(layer: nn.Module, x: torch.Tensor, act: Optional[nn.Module] = None) -> torch.Tensor:
    """``act(layer(x))``, through :func:`linear`'s oneDNN path when ``layer`` is a plain
    ``nn.Linear``, ``act`` is None, exact ``nn.GELU`` or ``nn.ReLU``, and the call is eligible;
    otherwise (training, a dynamically quantised layer, another activation, a layer with forward
    hooks) exactly as written."""
    name = _act_name(act)
    if type(layer) is nn.Linear and name is not None and not _has_hooks(layer) and _onednn_eligible(x, layer.weight):
        return linear(x, layer.weight, layer.bias, name)
    y = layer(x)
    return act(y) if act is not None else y


def _act_name(act: Optional[nn.Module]) -> Optional[str]:
    if act is None:
        return "none"
    if type(act) is nn.GELU and act.approximate == "none":
        return "gelu"
    if type(act) is nn.ReLU:
        return "relu"
    return None


class MLPBlock(nn.Module):
    """Two linear layers with an activation between: (..., D) -> (..., D)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(self.lin2, apply_linear(self.lin1, x, self.act))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between (the decoder's hypernetworks and IoU head)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        if self.sigmoid_output:
            x = torch.sigmoid(x)
        return x
