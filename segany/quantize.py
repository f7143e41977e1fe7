"""Opt-in int8 inference (float32 stays the default everywhere).

Two backends:

* ``quantize_model(sam)`` (PyTorch): dynamic int8 quantisation of the image encoder's Linear
  layers (weights int8 per tensor, activations quantised per call; on x86 oneDNN's kernels where
  the CPU has AMX int8 tiles, else fbgemm: see :func:`int8_engine`). On CPUs with
  native bfloat16 matrix kernels (oneDNN's check: AVX-512 or AMX), the global-attention blocks'
  attention (scores, softmax, weighted sum: about half of the int8 encoder's time, and no Linear
  layer) runs in bfloat16: 0.46 -> 0.30 s a block for vit_b on the 2-core development machine
  when float32 attention was PyTorch's; against the native float32 kernel it came later, about
  even per block (368 vs 373 ms) and the whole int8 encoder 0.91-0.98x (2026-12-05).
  Windowed attention stays float32 (its small GEMMs were slower in bfloat16). The mask decoder
  stays float32: it is already cheap after the per-image cache of ``fast_decoder``, and the fast
  path folds its float weights.
* ``quantize_onnx(onnx_dir)`` (onnxruntime): ``onnxruntime.quantization.quantize_dynamic`` of
  the MatMul/Gemm nodes of ``encoder.onnx`` and ``decoder.onnx`` into ``encoder.int8.onnx``/``decoder.int8.onnx``
  (but the products with the prompt encoder's Fourier matrix, which feed sin/cos and stay float);
  use them with ``OnnxPredictor(sam, onnx_dir, int8=True)``.

int8 masks differ from float32 ones; ``benchmarks/bench_speed.py --agreement`` measures the
mask IoU against float32 on real photos.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .modeling import Sam


# oneDNN's instruction-set names, oldest first (its DNNL_MAX_CPU_ISA / ONEDNN_MAX_CPU_ISA values;
# the AVX10 names are the newer spellings of the AVX-512 ones).
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
                "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "ALL")


def _onednn_allows(isa: str) -> bool:
    """Whether the user's cap on oneDNN's instructions (``ONEDNN_MAX_CPU_ISA``, or its older name
    ``DNNL_MAX_CPU_ISA``), if any, lets it use ``isa``. The CPU's flags (:func:`int8_engine` reads
    them) know nothing of that cap: with it at AVX2 the AMX engine would be picked for kernels
    oneDNN may not run (and ``bench_speed.py --isa avx2``, which sets it, would measure an AVX2
    machine that runs them)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").strip().upper()
    if cap not in _ONEDNN_ISAS:
        return True  # (a name oneDNN would ignore too)
    return _ONEDNN_ISAS.index(cap) >= _ONEDNN_ISAS.index(isa)


def native_bf16() -> bool:
    """Whether this CPU runs bfloat16 matrix products natively (else they are emulated: slower
    than float32): PyTorch's check and the oneDNN cap as it stands now (oneDNN reads it once, at
    its first use in the process)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and _onednn_allows("AVX512_CORE")
    except (AttributeError, RuntimeError):
        return False


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def int8_engine() -> Optional[str]:
    """The quantized engine for the dynamic int8 Linear layers: ``onednn`` where the CPU has AMX
    int8 tiles (Linux's ``amx_int8`` flag) and oneDNN may use them, else ``fbgemm``; None where
    neither is built in.

    On the development machine (Xeon with AMX, 2 threads) oneDNN's dynamic int8 linear took 21.8
    ms for 4096 x 768 -> 3072 against fbgemm's 46.1 (and 36.8 for PyTorch's ``x86`` engine),
    with the same error against float32; without AMX it is unmeasured here, so fbgemm stays."""
    engines = torch.backends.quantized.supported_engines
    if "onednn" in engines and "amx_int8" in _cpu_flags() and _onednn_allows("AVX512_CORE_AMX"):
        return "onednn"
    return "fbgemm" if "fbgemm" in engines else None


def quantize_model(model: Sam, inplace: bool = False, bf16_attention: Optional[bool] = None) -> Sam:
    """A copy of ``model`` (or ``model`` itself with ``inplace``) whose image-encoder Linear
    layers run in dynamic int8, and, with ``bf16_attention`` (default: when ``native_bf16()``),
    whose global-attention blocks attend in bfloat16. Inference only."""
    from torch.ao.quantization import quantize_dynamic

    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    # The weights are packed for the engine set while quantising and keep it: the packed layers
    # run the same bits at the same speed whatever the process's engine is later (oneDNN-packed
    # 4096 x 768 -> 3072: 35.2 ms under onednn, 34.4 ms under x86, identical outputs). So the
    # process-wide setting is only borrowed and put back.
    engine = int8_engine()
    before = torch.backends.quantized.engine
    try:
        if engine is not None and before != engine:
            torch.backends.quantized.engine = engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
            model.image_encoder = quantize_dynamic(model.image_encoder, {nn.Linear}, dtype=torch.qint8)
    finally:
        if torch.backends.quantized.engine != before:
            torch.backends.quantized.engine = before
    if bf16_attention is None:
        bf16_attention = native_bf16()
    n_bf16 = 0
    for block in getattr(model.image_encoder, "blocks", ()):
        if bf16_attention and getattr(block, "window_size", None) == 0:
            block.attn.attn_dtype = torch.bfloat16
            n_bf16 += 1
    model.quantized = "int8-dynamic"
    model.bf16_attention_blocks = n_bf16  # global blocks attending in bfloat16
    return model


# Bumped when the recipe below changes, so int8 files written by an older one are redone.
ONNX_INT8_RECIPE = "dynamic QInt8 MatMul/Gemm; Fourier-feature products kept float (2)"


def _fourier_feature_products(model) -> list:
    """Names of the MatMul nodes that multiply by the prompt encoder's random Fourier matrix
    (``pe_layer.positional_encoding_gaussian_matrix``): point coordinates and the image grid
    going into sin/cos. Their outputs are phases, so int8 rounding of the coordinates (1/128 of
    the image) and of the matrix turns into errors of whole fractions of a period; on the
    bundled model these two products alone took the int8 decoder's best-mask IoU against
    float32 from 0.985 to 0.962 (60 photos, 3 random clicks each). They cost nothing in float."""
    weights = {i.name for i in model.graph.initializer} | {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and any(
        x in weights and x.endswith("positional_encoding_gaussian_matrix") for x in n.input)]


def quantize_onnx(onnx_dir, parts=("encoder", "decoder")) -> dict:
    """Write ``<part>.int8.onnx`` beside each ``<part>.onnx`` in ``onnx_dir``; returns their paths.

    An int8 file is reused while it is newer than its source and ``int8.json`` records it as made
    by the current recipe; each is written to a temporary name and renamed, so an interrupted run
    leaves none."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    d = Path(onnx_dir)
    stamp = d / "int8.json"
    try:
        recipes = dict(json.loads(stamp.read_text()))  # {part: recipe}
    except (OSError, ValueError, TypeError):
        recipes = {}
    made = dict(recipes)
    out = {}
    for part in parts:
        src = d / f"{part}.onnx"
        dst = d / f"{part}.int8.onnx"
        if not src.exists():
            continue
        if recipes.get(part) != ONNX_INT8_RECIPE or not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
            keep_float = _fourier_feature_products(onnx.load(str(src), load_external_data=False))
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    # MatMul/Gemm only: quantised convolutions (ConvInteger) are slower than float32
                    # convolutions in onnxruntime on CPU and cost most of the accuracy (measured on
                    # the bundled EfficientNet model: mean mask IoU 0.85 with them, 0.998 without).
                    quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8,
                                     op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=keep_float)
                os.replace(tmp, dst)
            except OSError as e:  # (a read-only export folder, a full disk)
                raise OSError(f"{d}: cannot write {dst.name} beside the export ({e}); "
                              "copy the export to a writable folder") from e
            finally:
                tmp.unlink(missing_ok=True)
            made[part] = ONNX_INT8_RECIPE
        out[part] = dst
    if made != recipes:
        tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(made, indent=1) + "\n")
            os.replace(tmp, stamp)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OSError(f"{d}: cannot write {stamp.name} beside the export ({e})") from e
    return out
