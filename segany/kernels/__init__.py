"""Native kernels, compiled on first use with the machine's C compiler; PyTorch code is the fallback.

Why C here and nowhere else: bringing masks from SAM's low-res logits to the original image size
is a few multiply-adds per output pixel, followed by a threshold, counts (stability score) and
extents (boxes). PyTorch runs each of those as a separate pass over a full-size float temporary,
so at a few megapixels it costs more than the mask decoder itself; no library offers the fused
operation. ``upscale.c`` does it in one pass, with the same float32 operations in the same order
as ``segany.upscale`` (compiled without fused multiply-add), so results are bit-identical to the
PyTorch path.

``decoder.c`` is the mask decoder's output upscaling after its first convolution (LayerNorm2d,
GELU, the second transposed convolution, GELU, the hypernetwork dot products), which PyTorch
runs as six passes over multi-MB temporaries; one pass here, equal up to float32 rounding. It
also holds the two-way transformer's LayerNorm of the image-token stream, in place or statistics
only (PyTorch's writes a fresh multi-MB result on every call).

``tokens.c`` is the two-way transformer's token side: a click's ~7 prompt tokens through each
block's self-attention, the cross-attentions' projections, the MLP and three LayerNorms in two
calls per block (:class:`TokenBlock`), and the IoU head and hypernetworks (:class:`TokenChain`),
where PyTorch made ~400 small operations of a few microseconds each. ``decoder.c`` also holds the
factored image tokens' small per-prompt algebra (:func:`value_rows`, :func:`centered_gram`,
:func:`normed_rows`, :func:`factored_low`, :func:`factored_values`: ~90 operations a click), and
one prompt's attentions where PyTorch's GEMMs with 4096-long sums ran at a third of this CPU's
rate (:func:`t2i_attention` and :func:`i2t_softmax`: the first block's, against the cached image;
:func:`attend_values`: the later token->image attentions' softmax and both value products).

Each shared library is built once per machine and source version into
``<cache>/kernels/`` (``$SEGANY_HOME``, else the XDG cache; see ``segany.download``), written
to a temporary file and renamed. No compiler, a failed build, or ``SEGANY_KERNELS=0`` ->
:func:`available` / :func:`decoder_available` is False and callers use their PyTorch code. The
decoder's fast path also keeps its PyTorch code where the decoder kernels are built narrower
than AVX2 (:func:`decoder_preferred`).
Loading a build marks it used (its mtime); builds of the same kernel unused for
``STALE_DAYS`` (left by older segany versions, other compilers or CPUs sharing the cache) are
deleted then.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("segany.kernels")

_HERE = Path(__file__).parent
# upscale.c must match PyTorch bit for bit: no fused multiply-add there (see its header)
_FLAGS = {
    "upscale": ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"],
    "decoder": ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared"],
    "attention": ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared"],
    "tokens": ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared"],
}
STALE_DAYS = 30
_lock = threading.Lock()
_libs: dict = {}  # name -> loaded CDLL, or None once a build was tried and failed
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


def _cpu_key() -> str:
    """What -march=native depends on: the CPU model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor()


def _compile(cc: str, flags: List[str], src: Path, out: Path) -> None:
    if out.exists():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.{threading.get_ident()}.so")
    try:
        subprocess.run([cc, *flags, "-o", str(tmp), str(src)], check=True, capture_output=True, timeout=300)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _mark_used_and_prune(out: Path, name: str) -> None:
    """Touch ``out`` (loaded now) and delete the other builds of kernel ``name`` beside it that
    have not been loaded for STALE_DAYS. Best effort: a read-only cache stays as it is."""
    cutoff = time.time() - STALE_DAYS * 86400
    try:
        os.utime(out)
        for f in out.parent.glob(f"{name}-*.so"):
            if f != out and f.stat().st_mtime < cutoff:
                f.unlink()
    except OSError:
        pass


def _declare(name: str, lib: ctypes.CDLL) -> None:
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    if name == "upscale":
        lib.segany_upscale_batch.argtypes = [i64, i64, i64, i64, p, i64, p, p, i64, p, p, p, i64, i64, f32, f32, f32, p, p, p, p, p, ctypes.c_int]
        lib.segany_upscale_batch.restype = ctypes.c_int
        lib.segany_column_blocks_floats.argtypes = [i64, i64]
        lib.segany_column_blocks_floats.restype = i64
        lib.segany_column_blocks.argtypes = [p, p, i64, i64, p]
        lib.segany_column_blocks.restype = None
    elif name == "attention":
        lib.segany_rel_attention.argtypes = [i64, i64, i64, i64, i64, i64, p, i64, i64, i64, p, p, i64, i64, i64, p, i64, p, f32, p]
        lib.segany_rel_attention.restype = ctypes.c_int
        lib.segany_window_attention.argtypes = [i64, i64, i64, i64, i64, i64, i64, p, p, p, p, f32, p]
        lib.segany_window_attention.restype = ctypes.c_int
        lib.segany_rel_softmax_bf16.argtypes = [i64, i64, i64, i64, i64, p, p, p]
        lib.segany_rel_softmax_bf16.restype = ctypes.c_int
        lib.segany_vector_lanes.restype = ctypes.c_int
    elif name == "tokens":
        lib.segany_token_panel.restype = ctypes.c_int
        lib.segany_token_chain.argtypes = [i64, i64, i64, i64, i64, i64, p, p, p, p, p, p, p, p]
        lib.segany_token_chain.restype = ctypes.c_int
        lib.segany_token_block_pre.argtypes = [p, i64, i64, p, p, ctypes.c_int, p, p]
        lib.segany_token_block_pre.restype = ctypes.c_int
        lib.segany_token_block_post.argtypes = [p, i64, p, p, p, p, p, p]
        lib.segany_token_block_post.restype = ctypes.c_int
    else:
        lib.segany_decoder_tail.argtypes = [i64, i64, i64, i64, i64, i64, i64, p, p, p, i64, p, i64, p, p, f32, p, p, p, p, i64, i64]
        lib.segany_decoder_tail.restype = ctypes.c_int
        lib.segany_decoder_tail_fused.argtypes = [i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, p, p, i64, p, p, i64, p, i64, p, p, f32, p, p, p, p, i64]
        lib.segany_decoder_tail_fused.restype = ctypes.c_int
        lib.segany_layer_norm_rows.argtypes = [i64, i64, i64, i64, p, p, i64, p, p, f32, ctypes.c_int, p, p]
        lib.segany_update_row_stats.argtypes = [i64, i64, i64, i64, i64, p, i64, p, i64, p, p, f32, p, p]
        lib.segany_update_row_stats.restype = ctypes.c_int
        lib.segany_factored_stats.argtypes = [i64, i64, i64, i64, i64, i64, p, i64, i64, p, p, p, p, p, p, f32, p, p]
        lib.segany_factored_stats.restype = ctypes.c_int
        lib.segany_mask_downscale.argtypes = [i64, i64, i64, i64, i64, i64, p, p, p, p, p, f32, p, p, p, p, f32, p, i64]
        lib.segany_mask_downscale.restype = ctypes.c_int
        lib.segany_softmax_pixels.argtypes = [i64, i64, i64, i64, i64, i64, p, p, p, p]
        lib.segany_softmax_pixels.restype = None
        lib.segany_softmax_tokens.argtypes = [i64, i64, i64, i64, i64, i64, p, p, ctypes.c_int, i64]
        lib.segany_softmax_tokens.restype = None
        lib.segany_t2i_attention.argtypes = [i64, i64, i64, i64, i64, i64, f32, p, p, p, p]
        lib.segany_t2i_attention.restype = ctypes.c_int
        lib.segany_i2t_softmax.argtypes = [i64, i64, i64, i64, i64, i64, i64, p, f32, p, ctypes.c_int, p, i64]
        lib.segany_i2t_softmax.restype = ctypes.c_int
        lib.segany_attend_part_floats.argtypes = [i64, i64, i64, i64, i64]
        lib.segany_attend_part_floats.restype = i64
        lib.segany_attend_pieces.argtypes = [i64]
        lib.segany_attend_pieces.restype = i64
        lib.segany_attend_values.argtypes = [i64, i64, i64, i64, i64, i64, i64, p, p, p, p, p]
        lib.segany_attend_values.restype = ctypes.c_int
        lib.segany_attend_combine.argtypes = [i64, i64, i64, i64, i64, p, p, p]
        lib.segany_attend_combine.restype = None
        lib.segany_vector_lanes.restype = ctypes.c_int
        lib.segany_stats_block.restype = ctypes.c_int
        lib.segany_scores_block.restype = ctypes.c_int
        lib.segany_layer_norm_rows.restype = ctypes.c_int
        lib.segany_factored_scores.argtypes = [i64, i64, i64, i64, i64, i64, i64, i64, p, p, p, ctypes.c_int, p, p, p, i64, p, ctypes.c_int, ctypes.c_int, p, i64, p]
        lib.segany_factored_scores.restype = None
        lib.segany_value_rows.argtypes = [i64, i64, i64, i64, i64, p, p, p, p, i64]
        lib.segany_value_rows.restype = ctypes.c_int
        lib.segany_centered_gram.argtypes = [i64, i64, i64, i64, p, i64, p, i64, p, p]
        lib.segany_centered_gram.restype = ctypes.c_int
        lib.segany_normed_rows.argtypes = [i64, i64, i64, i64, i64, p, i64, p, i64, p, p, p, p, i64, p, p, p, p, i64, i64, p]
        lib.segany_normed_rows.restype = None
        lib.segany_factored_low.argtypes = [i64, i64, i64, i64, i64, i64, i64, i64, p, f32, p, p, i64, i64, p, p]
        lib.segany_factored_low.restype = ctypes.c_int
        lib.segany_factored_values.argtypes = [i64, i64, i64, i64, i64, i64, i64, i64, p, p, p, i64, p, p, p]
        lib.segany_factored_values.restype = ctypes.c_int
    lib.segany_has_openmp.restype = ctypes.c_int


def _march() -> str:
    """The ``-march`` the kernels are built for: ``$SEGANY_KERNEL_MARCH`` (a GCC/Clang CPU name,
    e.g. ``haswell`` for AVX2 machines, ``x86-64-v3``), else ``native``: this CPU. For a cache
    shared by machines with different CPUs, or to measure what an older CPU's users get (with
    PyTorch held to the same instructions: ``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``,
    ``DNNL_MAX_CPU_ISA``; see benchmarks/bench_speed.py ``--isa``)."""
    march = os.environ.get("SEGANY_KERNEL_MARCH", "").strip() or "native"
    if not all(c.isalnum() or c in "-_." for c in march):
        raise ValueError(f"SEGANY_KERNEL_MARCH={march!r} is not a CPU name (letters, digits, '-', '_', '.')")
    return march


def _build(name: str) -> Optional[ctypes.CDLL]:
    if os.environ.get("SEGANY_KERNELS", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        log.info("no C compiler found: native kernels off, using the PyTorch code")
        return None
    from ..download import cache_dir

    src_path = _HERE / f"{name}.c"
    src = src_path.read_bytes() + (_HERE / "common.h").read_bytes()  # the key covers what it includes
    # with OpenMP first (PyTorch's own threads, see upscale.c), else without (a thread pool here)
    for extra in (["-fopenmp"], []):
        flags = [f"-march={_march()}" if f == "-march=native" else f for f in _FLAGS[name]] + extra
        key = hashlib.sha256(b"\0".join([src, cc.encode(), " ".join(flags).encode(), platform.machine().encode(), _cpu_key().encode()])).hexdigest()[:16]
        out = cache_dir() / "kernels" / f"{name}-{key}.so"
        try:
            _compile(cc, flags, src_path, out)
            lib = ctypes.CDLL(str(out))
            _declare(name, lib)
            _mark_used_and_prune(out, name)
        except (OSError, AttributeError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            # (asked for a CPU by name, a failed build is the user's to see; natively it may just be no OpenMP)
            (log.warning if _march() != "native" else log.info)(
                "native kernel %s could not be built with %s (%s %s)", name, flags, e, detail.decode(errors="replace")[:500])
            continue
        return lib
    log.info("native kernel %s off, using the PyTorch code", name)
    return None


def _get(name: str) -> Optional[ctypes.CDLL]:
    if name not in _libs:
        with _lock:
            if name not in _libs:
                _libs[name] = _build(name)
    return _libs[name]


def available() -> bool:
    """Whether the native mask upscaling is built and loaded (builds it on the first call)."""
    return _get("upscale") is not None


def decoder_available() -> bool:
    """Whether the native decoder kernels (:func:`decoder_tail`, :func:`layer_norm_rows_`) are built and loaded."""
    return _get("decoder") is not None


_lanes: Optional[int] = None  # decoder_lanes(), asked once (the fast path asks on every call)


def decoder_lanes() -> int:
    """The decoder kernels' vector width in floats as built for this CPU (16 with AVX-512, 8 with
    AVX2, 4 otherwise); 0 when they are not built."""
    global _lanes
    if _lanes is None:
        lib = _get("decoder")
        _lanes = int(lib.segany_vector_lanes()) if lib is not None else 0
    return _lanes


def decoder_preferred() -> bool:
    """Whether the mask decoder's fast path should use the decoder kernels: built, and built with
    vectors of at least 8 floats (AVX2 or AVX-512). On AVX-512 they were measured faster than the
    PyTorch code since they exist (segment everything 32x32: 5.3-5.6 vs 6.6-6.8 s). At AVX2 width
    a click took 19.4 ms against 17.2 ms without them on 2026-12-04, when they covered only the
    image side; with the token side and the factored algebra native too they are faster there as
    well (2026-12-06, an AVX2 machine emulated on the AVX-512 VM: kernels built with
    ``-march=haswell``, PyTorch, MKL and oneDNN held to AVX2; in-process A/Bs): vit_b click
    0.88-0.92x, refinement click 0.84x, the bundled model's click 0.79x and refinement 0.77x,
    segment everything 0.93x. SSE2-only builds (4 lanes) keep the PyTorch code.
    ``SEGANY_DECODER_KERNELS=1`` uses them wherever built, ``=0`` never."""
    force = os.environ.get("SEGANY_DECODER_KERNELS")
    if force == "0":
        return False
    if force == "1":
        return decoder_available()
    return decoder_lanes() >= 8


_forked = False  # this process is a fork of one that may have run an OpenMP region


def _after_fork_in_child() -> None:
    # A forked child has none of the parent's threads: not the pool's (a lock may even be held by
    # one) and not OpenMP's, whose team an OpenMP region would then wait for forever.
    global _pool, _pool_size, _lock, _forked
    _pool, _pool_size, _lock, _forked = None, 0, threading.Lock(), True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _run_pieces(lib: ctypes.CDLL, call, n_pieces: int) -> None:
    """``call(p0, p1)`` over pieces 0..n_pieces-1: once, where the build has OpenMP (PyTorch's
    threads take the pieces), else a contiguous range per thread on a pool here (ctypes releases
    the GIL during each call). A forked child always takes the pool (see _after_fork_in_child)."""
    global _pool, _pool_size
    n = _threads()
    omp = lib.__dict__.get("openmp")
    if omp is None:
        omp = lib.openmp = bool(lib.segany_has_openmp())  # (asked once: a ctypes call per kernel call otherwise)
    if (not _forked and omp) or n == 1 or n_pieces == 1:
        if call(0, n_pieces) != 0:
            raise MemoryError("segany native kernel: out of memory for its row buffer")
        return
    else:
        with _lock:
            if _pool is None or _pool_size != n:
                if _pool is not None:
                    _pool.shutdown(wait=False)
                _pool, _pool_size = ThreadPoolExecutor(max_workers=n, thread_name_prefix="segany-kernel"), n
            pool = _pool
        step = -(-n_pieces // n)
        codes = list(pool.map(lambda p0: call(p0, p0 + step), range(0, n_pieces, step)))
    if any(c != 0 for c in codes):
        raise MemoryError("segany native kernel: out of memory for its row buffer")


class Taps:
    """An upscale's tap tables, as the kernel reads them: rows (H, S) low-res row index (int64)
    and weight (float32), columns (W, S) likewise."""

    def __init__(self, ridx: torch.Tensor, rw: torch.Tensor, cidx: torch.Tensor, cw: torch.Tensor) -> None:
        self.ridx = ridx.to(torch.int64).contiguous()
        self.rw = rw.to(torch.float32).contiguous()
        self.cidx = cidx.to(torch.int64).contiguous()
        self.cw = cw.to(torch.float32).contiguous()
        self.H, self.S = self.ridx.shape
        self.W = self.cidx.shape[0]
        if self.cidx.shape[1] != self.S:
            raise ValueError("row and column tap tables need the same number of taps")
        # Thresholded outputs may skip blocks whose values are bounded away from the threshold
        # (see upscale.c): sound when every output value is a convex combination of its taps.
        self.skip = all(bool((w >= 0).all() and ((w.double().sum(1) - 1).abs() <= 1e-6).all()) for w in (self.rw, self.cw))
        self._blocks: Optional[torch.Tensor] = None  # the column pass's tap blocks, built on first use

    def _column_blocks(self, lib: ctypes.CDLL) -> torch.Tensor:
        """The column taps regrouped per vector of output columns (upscale.c's column blocks):
        once per table, not per call."""
        if self._blocks is None:
            blocks = torch.empty(int(lib.segany_column_blocks_floats(self.W, self.S)), dtype=torch.float32)
            lib.segany_column_blocks(self.cidx.data_ptr(), self.cw.data_ptr(), self.W, self.S, blocks.data_ptr())
            self._blocks = blocks
        return self._blocks

    def _compute(self, L: torch.Tensor, thresholds, out: Optional[torch.Tensor], out_is_float: bool,
                 counts=None, rows=None, cols=None) -> None:
        """Fill ``out`` (or counts/rows/cols) for all masks of ``L``, in pieces: whole masks, or
        with few masks (a click's 3) and only ``out``, each mask cut into one piece of rows per
        thread, so that the threads stay balanced."""
        B, H = L.shape[0], self.H
        T = _threads()
        whole = B >= 4 * T or counts is not None or rows is not None or cols is not None
        rows_per_piece = H if whole else -(-H // T)
        pieces = B * -(-H // rows_per_piece)
        o = None if out is None else out.data_ptr()
        lib = _libs["upscale"]
        args = (
            B, rows_per_piece, L.data_ptr(), L.shape[-1], self.ridx.data_ptr(), self.rw.data_ptr(), H,
            self.cidx.data_ptr(), self.cw.data_ptr(), self._column_blocks(lib).data_ptr(), self.W, self.S, *thresholds,
            o if out_is_float else None, None if out_is_float else o,
            None if counts is None else counts.data_ptr(), None if rows is None else rows.data_ptr(),
            None if cols is None else cols.data_ptr(), int(self.skip),
        )
        _run_pieces(lib, lambda p0, p1: lib.segany_upscale_batch(p0, p1, *args), pieces)

    def values(self, L: torch.Tensor, threshold: Optional[float] = None) -> torch.Tensor:
        """(B, n, n) logits -> (B, H, W) float32 upscaled values, or with ``threshold`` the bool
        map ``values > threshold`` (the float map is never formed)."""
        L = _check(L)
        B = L.shape[0]
        # numpy's allocator (glibc malloc) for the output: it reuses freed heap memory, where
        # PyTorch's (on 2 MB huge pages under THP_MEM_ALLOC_ENABLE, see segany.allocator) faults
        # in and zeroes fresh pages for every multi-MB result: 9 MB took 1.5-7 ms that way, 0.1
        # ms this way, on the development machine
        out = torch.from_numpy(np.empty((B, self.H, self.W), dtype=np.float32 if threshold is None else np.uint8))
        t = float(threshold) if threshold is not None else 0.0
        if B:
            self._compute(L, (t, t, t), out, threshold is None)
        return out if threshold is None else out.view(torch.bool)

    def __call__(self, logits: torch.Tensor, threshold: Optional[float] = None) -> torch.Tensor:
        """(..., n, n) -> (..., H, W) in the dtype of ``logits``, or with ``threshold`` bool (the
        interface of ``segany.predictor._SeparableResize``)."""
        lead, n = logits.shape[:-2], logits.shape[-1]
        out = self.values(logits.reshape(-1, n, n), threshold)
        out = out.view(*lead, self.H, self.W)
        return out if threshold is not None else out.to(logits.dtype)

    def stats(self, L: torch.Tensor, t_hi: float, t_lo: float, t_mid: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, n, n) logits -> counts (B, 2) int64 of values > t_hi and > t_lo, and the rows
        (B, H) and columns (B, W) with any value > t_mid (bool)."""
        L = _check(L)
        B = L.shape[0]
        counts = torch.zeros(B, 2, dtype=torch.int64)
        rows = torch.zeros(B, self.H, dtype=torch.uint8)
        cols = torch.zeros(B, self.W, dtype=torch.uint8)
        if B:
            self._compute(L, (float(t_hi), float(t_lo), float(t_mid)), None, False, counts, rows, cols)
        return counts, rows.view(torch.bool), cols.view(torch.bool)


def _decoder_lib() -> ctypes.CDLL:
    lib = _get("decoder")
    if lib is None:
        raise RuntimeError("the native decoder kernel is not available")
    return lib


def _attention_lib() -> ctypes.CDLL:
    lib = _get("attention")
    if lib is None:
        raise RuntimeError("the native attention kernel is not available")
    return lib


def _check(L: torch.Tensor) -> torch.Tensor:
    if L.ndim != 3 or L.shape[1] != L.shape[2]:
        raise ValueError(f"expected (B, n, n) low-res logits, got {tuple(L.shape)}")
    if not L.is_cpu:
        raise ValueError("native kernels run on CPU tensors")
    return L.to(torch.float32).contiguous()


def _check_f32(kernel: str, *ts: torch.Tensor) -> None:
    if any(t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous() for t in ts):
        raise ValueError(f"{kernel} needs contiguous float32 CPU tensors")


def _batch_stride(kernel: str, t: torch.Tensor) -> int:
    """For a (B, rows, N) float32 CPU tensor whose rows are contiguous and N floats apart (any
    stride between its B matrices, e.g. the first rows of a larger buffer): that stride."""
    # (strides, not t[0].is_contiguous(): the view costs more than the rest of the check)
    if t.dtype != torch.float32 or not t.is_cpu or t.ndim != 3 \
            or (t.shape[0] and ((t.shape[2] > 1 and t.stride(2) != 1) or (t.shape[1] > 1 and t.stride(1) != t.shape[2]))):
        raise ValueError(f"{kernel} needs float32 CPU (B, rows, N) tensors with contiguous matrices")
    return t.stride(0) if t.shape[0] > 1 else t.shape[1] * t.shape[2]


def decoder_tail(yT: torch.Tensor, w: int, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                 w2: torch.Tensor, bias2: torch.Tensor, hyper_in: torch.Tensor, out: torch.Tensor, row0: int,
                 bias1: torch.Tensor, base: Optional[torch.Tensor] = None, alpha: Optional[torch.Tensor] = None) -> None:
    """The mask decoder's output upscaling after its first transposed convolution's GEMM, into ``out``.

    yT (B, 4*c1, R*w): the first convolution's product for R embedding rows of width w, without
    its bias, channels ordered (a, bb, c) for the 2x2 sub-pixel (a, bb); bias1 (c1,) its bias,
    added here; base (4*c1, R*w), optional, any row stride: a per-image part of the first
    convolution's output, added here, the sum times alpha (B, R*w; the factored image tokens'
    row scales, see ``segany.modeling.fast_decoder``), so that the first convolution's output is
    ``(yT + base) * alpha + bias1``; ln_weight/ln_bias (c1,): the LayerNorm2d; w2 (2, c1, 2, c2):
    the second convolution's weight as [a2][c][b2][o]; bias2 (2*c2,): its bias repeated per b2;
    hyper_in (B, M, c2); out (B, M, OH, 4w) float32, rows 4*row0 .. 4*(row0+R)-1 are written.
    GELU after both, as in SAM."""
    lib = _decoder_lib()
    B, C4, N = yT.shape
    c1 = C4 // 4
    R = N // w
    M, c2 = hyper_in.shape[1:]
    _check_f32("decoder_tail", yT, ln_weight, ln_bias, w2, bias2, hyper_in, out, bias1)
    if R * w != N or tuple(w2.shape) != (2, c1, 2, c2) or bias2.numel() != 2 * c2 or out.shape[:2] != (B, M) \
            or out.shape[3] != 4 * w or out.shape[2] < 4 * (row0 + R) or hyper_in.shape[0] != B or bias1.numel() != c1:
        raise ValueError("decoder_tail: inconsistent shapes")
    base_args = (None, 0, None, 0) if base is None else _base_alpha_args("decoder_tail", base, alpha, C4, B, N)
    args = (R, w, c1, c2, M, yT.data_ptr(), bias1.data_ptr(), *base_args,
            ln_weight.data_ptr(), ln_bias.data_ptr(), float(eps), w2.data_ptr(), bias2.data_ptr(), hyper_in.data_ptr(),
            out.data_ptr(), row0, out.shape[2])
    _run_pieces(lib, lambda p0, p1: lib.segany_decoder_tail(p0, p1, *args), B * R)


def _base_alpha_args(kernel: str, base: torch.Tensor, alpha: Optional[torch.Tensor], C4: int, B: int, N: int):
    """The decoder tails' per-image part and row scales, checked: (base address, its row stride,
    alpha address, its row stride)."""
    if alpha is None or tuple(base.shape) != (C4, N) or tuple(alpha.shape) != (B, N) or base.stride(1) != 1 or alpha.stride(1) != 1:
        raise ValueError(f"{kernel}: base (4*c1, R*w) and alpha (B, R*w) with unit column strides")
    if base.dtype != torch.float32 or alpha.dtype != torch.float32 or not base.is_cpu or not alpha.is_cpu:
        raise ValueError(f"{kernel} needs float32 CPU tensors")
    return base.data_ptr(), base.stride(0), alpha.data_ptr(), alpha.stride(0)


def fused_tail_ok(w: int, c1: int) -> bool:
    """Whether :func:`decoder_tail_fused` takes embedding rows ``w`` wide (whole vectors of the
    build's width; ``c1`` any: its 4*c1 rows fill the GEMM's 4-row blocks)."""
    lanes = decoder_lanes()
    return lanes > 0 and w % lanes == 0


def decoder_tail_fused(qw: torch.Tensor, P: torch.Tensor, w: int, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                       eps: float, w2: torch.Tensor, bias2: torch.Tensor, hyper_in: torch.Tensor, out: torch.Tensor,
                       bias1: torch.Tensor, base: torch.Tensor, alpha: torch.Tensor,
                       visible: Optional[Tuple[int, int]] = None) -> None:
    """:func:`decoder_tail` over all embedding rows with the first convolution's product formed
    row by row inside the kernel: ``yT = qw @ P`` (qw (B, 4*c1, r) contiguous, P (B, r, h*w) with
    contiguous matrices, any batch stride) never goes through memory. base (4*c1, h*w) and alpha
    (B, h*w) as there (required: this is the factored tokens' path); out (B, M, 4h, 4w).
    ``visible`` (rows, cols): only embedding rows < rows and columns < cols are computed, the rest
    of ``out`` is set to zero."""
    lib = _decoder_lib()
    B, C4, r = qw.shape
    c1 = C4 // 4
    N = P.shape[2]
    h = N // w
    M, c2 = hyper_in.shape[1:]
    _check_f32("decoder_tail_fused", qw, ln_weight, ln_bias, w2, bias2, hyper_in, out, bias1)
    p_bstride = _batch_stride("decoder_tail_fused", P)
    if not fused_tail_ok(w, c1) or h * w != N or tuple(P.shape[:2]) != (B, r) or tuple(w2.shape) != (2, c1, 2, c2) \
            or bias2.numel() != 2 * c2 or tuple(out.shape) != (B, M, 4 * h, 4 * w) or hyper_in.shape[0] != B \
            or bias1.numel() != c1:
        raise ValueError("decoder_tail_fused: inconsistent shapes")
    rv, wv = (h, w) if visible is None else (int(visible[0]), int(visible[1]))
    if not (0 < rv <= h and 0 < wv <= w):
        raise ValueError(f"decoder_tail_fused: visible {visible} outside the {h}x{w} embedding")
    base_args = _base_alpha_args("decoder_tail_fused", base, alpha, C4, B, N)
    args = (h, w, rv, wv, c1, c2, M, r, qw.data_ptr(), P.data_ptr(), p_bstride, bias1.data_ptr(), *base_args,
            ln_weight.data_ptr(), ln_bias.data_ptr(), float(eps), w2.data_ptr(),
            bias2.data_ptr(), hyper_in.data_ptr(), out.data_ptr(), out.shape[2])
    _run_pieces(lib, lambda p0, p1: lib.segany_decoder_tail_fused(p0, p1, *args), B * rv)
    if rv < h:
        out[:, :, 4 * rv:].zero_()
    if wv < w:
        out[:, :, : 4 * rv, 4 * wv:].zero_()


def layer_norm_rows_(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                     normalise: bool = True, add: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last axis of ``y`` (..., C) in place (``normalise``) or statistics only:
    returns mean and rstd (y.shape[:-1]), as ``torch.native_layer_norm`` computes them (up to
    float32 rounding). ``add`` (optional; (..., C) whose rows repeat over y's, e.g. (1, N, C) for
    y (B, N, C)) is first added to ``y`` in place, in the same pass. Contiguous float32 CPU
    tensors; C a multiple of 64 (:func:`rows_ok`)."""
    lib = _decoder_lib()
    C = y.shape[-1]
    _check_f32("layer_norm_rows_", y, weight, bias)
    if weight.numel() != C or bias.numel() != C or not rows_ok(C):
        raise ValueError(f"layer_norm_rows_: {C} channels, weight {weight.numel()}, bias {bias.numel()} (C a multiple of 64)")
    rows = y.numel() // C
    add_ptr, add_rows = None, 1
    if add is not None:
        _check_f32("layer_norm_rows_", add)
        add_rows = add.numel() // C if C else 0
        if add.shape[-1] != C or add_rows == 0 or rows % add_rows:
            raise ValueError(f"layer_norm_rows_: add {tuple(add.shape)} does not repeat over y {tuple(y.shape)}")
        add_ptr = add.data_ptr()
    mean, rstd = torch.empty(y.shape[:-1]), torch.empty(y.shape[:-1])
    args = (rows, C, y.data_ptr(), add_ptr, add_rows, weight.data_ptr(), bias.data_ptr(), float(eps), int(normalise),
            mean.data_ptr(), rstd.data_ptr())
    _run_pieces(lib, lambda p0, p1: lib.segany_layer_norm_rows(p0, p1, *args), -(-rows // 256))
    return mean, rstd


def update_row_stats(x: torch.Tensor, aT: torch.Tensor, u: torch.Tensor, eps: float,
                     scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm statistics mean, rstd (B, N) of the rows of ``x + (aT * scale[:, None])^T u``
    without forming it: x (B or 1, N, C), aT (B, k, N) (matrices contiguous, any batch stride),
    scale (B, N) optional, u (B, k, C), float32 CPU tensors, C a multiple of 64
    (:func:`rows_ok`). Up to float32 rounding what ``layer_norm_rows_`` returns for the sum."""
    lib = _decoder_lib()
    _check_f32("update_row_stats", x, u)
    a_bstride = _batch_stride("update_row_stats", aT)
    B, k, N = aT.shape
    C = x.shape[-1]
    if x.ndim != 3 or x.shape[0] not in (1, B) or x.shape[1] != N or tuple(u.shape) != (B, k, C) or not rows_ok(C):
        raise ValueError(f"update_row_stats: x {tuple(x.shape)}, aT {tuple(aT.shape)}, u {tuple(u.shape)} (C a multiple of 64)")
    if scale is not None:
        _check_f32("update_row_stats", scale)
        if tuple(scale.shape) != (B, N):
            raise ValueError(f"update_row_stats: scale {tuple(scale.shape)}, expected {(B, N)}")
    mean, rstd = torch.empty(B, N), torch.empty(B, N)
    args = (N, C, k, x.data_ptr(), 0 if x.shape[0] == 1 else N * C, aT.data_ptr(), a_bstride,
            None if scale is None else scale.data_ptr(), u.data_ptr(), float(eps), mean.data_ptr(), rstd.data_ptr())
    _run_pieces(lib, lambda p0, p1: lib.segany_update_row_stats(p0, p1, *args), B * -(-N // 256))
    return mean, rstd


def mask_downscale(masks: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, g1: torch.Tensor, e1: torch.Tensor, eps1: float,
                   w2: torch.Tensor, b2: torch.Tensor, g2: torch.Tensor, e2: torch.Tensor, eps2: float,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SAM's mask embedding before its last 1x1 convolution: conv 2x2/2 (w1 (c1, 1, 2, 2), b1),
    LayerNorm2d (g1, e1, eps1), GELU, conv 2x2/2 (w2 (c2, c1, 2, 2), b2), LayerNorm2d (g2, e2,
    eps2), GELU, for masks (B, 1, 4h, 4w) -> (B, c2 + 1, h*w): the c2 channels and a row of ones
    (``fast_decoder.mask_prompt_factor``'s P0), into ``out`` where given (matrices contiguous, any
    batch stride). Float32 CPU tensors; c1 <= 16, c2 <= 64."""
    lib = _decoder_lib()
    _check_f32("mask_downscale", masks, w1, b1, g1, e1, w2, b2, g2, e2)
    B, one, H, W = masks.shape
    c1, c2 = w1.shape[0], w2.shape[0]
    h, w = H // 4, W // 4
    if one != 1 or H % 4 or W % 4 or tuple(w1.shape) != (c1, 1, 2, 2) or tuple(w2.shape) != (c2, c1, 2, 2) \
            or any(t.numel() != c1 for t in (b1, g1, e1)) or any(t.numel() != c2 for t in (b2, g2, e2)) or c1 > 16 or c2 > 64:
        raise ValueError(f"mask_downscale: masks {tuple(masks.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    if out is None:
        out = torch.empty(B, c2 + 1, h * w)
    elif tuple(out.shape) != (B, c2 + 1, h * w):
        raise ValueError(f"mask_downscale: out {tuple(out.shape)}, expected {(B, c2 + 1, h * w)}")
    bstride = _batch_stride("mask_downscale", out)
    if B * h * w:
        args = (h, w, c1, c2, masks.data_ptr(), w1.data_ptr(), b1.data_ptr(), g1.data_ptr(), e1.data_ptr(), float(eps1),
                w2.data_ptr(), b2.data_ptr(), g2.data_ptr(), e2.data_ptr(), float(eps2), out.data_ptr(), bstride)
        _run_pieces(lib, lambda p0, p1: lib.segany_mask_downscale(p0, p1, *args), B * h)
    return out


def factored_stats(P: torch.Tensor, groups: list, G: torch.Tensor, qbar: torch.Tensor, sbar: torch.Tensor,
                   sq: torch.Tensor, alpha: Optional[torch.Tensor], eps: float, C: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm statistics mean, rstd (B, N) of the rows ``alpha (S + P^T Q)`` (C channels)
    without forming them (``fast_decoder._factored_stats``): P (B, r, N) (matrices contiguous, any
    batch stride), G (B, r, r) the Gram matrix of Q's rows less their means qbar (B, r), sbar and
    sq (N,) the rows of S's channel means and squared norms less them, alpha (B, N) or None (one).

    ``groups``: the dot products R = Q S^T in P's row order, as ``("rows", X)`` with X (k, N)
    the same for every prompt, or ``("values", maps, bias, v)`` for an image->token update's
    reduced value rows: maps (nh, hd, N) out_proj's per-head slices against S, or the same in
    tiles of pixels (:func:`stats_tiles`), bias (N,) its bias against S, v (B, t, nh*hd) the
    layer's values (nh*(t-1)+1 rows). Float32 CPU tensors."""
    lib = _decoder_lib()
    p_bstride = _batch_stride("factored_stats", P)
    B, r, N = P.shape
    _check_f32("factored_stats", G, qbar, sbar, sq, *(() if alpha is None else (alpha,)))
    desc, rows = [], 0
    for grp in groups:
        if grp[0] == "rows":
            X = grp[1]
            _check_f32("factored_stats", X)
            if X.ndim != 2 or X.shape[1] != N:
                raise ValueError(f"factored_stats: rows {tuple(X.shape)}, expected (k, {N})")
            desc += [0, X.shape[0], X.data_ptr(), 0, 0, 0]
            rows += X.shape[0]
        else:
            _, maps, bias, v = grp
            _check_f32("factored_stats", maps, bias, v)
            if maps.ndim == 4:  # tiles (n_tiles, nh, hd, tile)
                n_tiles, nh, hd, tile = maps.shape
                ok = tile % stats_block() == 0 and (n_tiles - 1) * tile < N <= n_tiles * tile
            else:
                (nh, hd, n_), tile = maps.shape, 0
                ok = n_ == N
            t = v.shape[1]
            if not ok or tuple(bias.shape) != (N,) or tuple(v.shape) != (B, t, nh * hd) or not (0 < hd <= 64 and 0 < t < 65536):
                raise ValueError(f"factored_stats: maps {tuple(maps.shape)}, bias {tuple(bias.shape)}, values {tuple(v.shape)}")
            desc += [1, nh, maps.data_ptr(), bias.data_ptr(), v.data_ptr(), (tile << 40) | (t << 16) | hd]
            rows += nh * (t - 1) + 1
    if rows != r or tuple(G.shape) != (B, r, r) or tuple(qbar.shape) != (B, r) or tuple(sbar.shape) != (N,) \
            or tuple(sq.shape) != (N,) or (alpha is not None and tuple(alpha.shape) != (B, N)):
        raise ValueError(f"factored_stats: P {tuple(P.shape)}, {rows} rows in the groups, G {tuple(G.shape)}, "
                         f"qbar {tuple(qbar.shape)}, sbar {tuple(sbar.shape)}, sq {tuple(sq.shape)}")
    d = torch.tensor(desc, dtype=torch.int64)
    mean, rstd = torch.empty(B, N), torch.empty(B, N)
    args = (B, r, N, int(C), P.data_ptr(), p_bstride, len(groups), d.data_ptr(), G.data_ptr(), qbar.data_ptr(),
            sbar.data_ptr(), sq.data_ptr(), None if alpha is None else alpha.data_ptr(), float(eps), mean.data_ptr(), rstd.data_ptr())
    _run_pieces(lib, lambda p0, p1: lib.segany_factored_stats(p0, p1, *args), B * -(-N // stats_block()))
    return mean, rstd


def stats_block() -> int:
    """Pixels per piece of :func:`factored_stats` in this build (FS_BLOCK: two vectors)."""
    return _lib_constant(_decoder_lib(), "segany_stats_block")


def stats_tiles(maps: torch.Tensor) -> torch.Tensor:
    """Per-image maps (nh, hd, N) for :func:`factored_stats` in its tiles of pixels, (ceil(N /
    tile), nh, hd, tile) with tile = :func:`stats_block` (the last tile zero-padded): each piece
    of the kernel then reads one contiguous block of them."""
    return pixel_tiles(maps, stats_block())


def pixel_tiles(maps: torch.Tensor, tile: int) -> torch.Tensor:
    """(nh, hd, N) -> (ceil(N / tile), nh, hd, tile), the last tile zero-padded."""
    nh, hd, N = maps.shape
    n_tiles = -(-N // tile)
    padded = maps.new_zeros(nh, hd, n_tiles * tile)
    padded[..., :N] = maps
    return padded.view(nh, hd, n_tiles, tile).permute(2, 0, 1, 3).contiguous()


def untile_maps(tiles: torch.Tensor, N: int) -> torch.Tensor:
    """:func:`pixel_tiles`' inverse: (n_tiles, nh, hd, tile) -> (nh, hd, N)."""
    n_tiles, nh, hd, tile = tiles.shape
    return tiles.permute(1, 2, 0, 3).reshape(nh, hd, n_tiles * tile)[..., :N].contiguous()


def value_rows(v: torch.Tensor, wo: torch.Tensor, bo: torch.Tensor) -> torch.Tensor:
    """An image->token update's reduced value rows (``fast_decoder._reduced_values`` of
    ``_value_update``): v (B, t, nh*hd) the layer's projected values, wo (nh, hd, C) out_proj's
    weight transposed and split by head, bo (C,) its bias -> (B, nh*(t-1)+1, C): per head and
    token k < t-1 ``(v[k,h] - v[t-1,h]) wo[h]``, then ``sum_h v[t-1,h] wo[h] + bo``. Contiguous
    float32 CPU tensors, C a multiple of the build's vector width, hd <= 64."""
    lib = _decoder_lib()
    _check_f32("value_rows", v, wo, bo)
    nh, hd, C = wo.shape
    B, t = v.shape[:2] if v.ndim == 3 else (0, 0)
    if v.ndim != 3 or v.shape[2] != nh * hd or tuple(bo.shape) != (C,) or t < 1:
        raise ValueError(f"value_rows: v {tuple(v.shape)}, wo {tuple(wo.shape)}, bo {tuple(bo.shape)}")
    rows = reduced_rows(nh, t)
    out = torch.empty(B, rows, C)
    if B and lib.segany_value_rows(B, t, nh, hd, C, v.data_ptr(), wo.data_ptr(), bo.data_ptr(), out.data_ptr(), rows * C):
        raise ValueError(f"value_rows: sizes it does not take (C {C} a multiple of {decoder_lanes()}, hd {hd} <= 64)")
    return out


def transposed_rows(Q: torch.Tensor) -> torch.Tensor:
    """Q (B, r, C) -> (B, C, rp): its rows as columns, padded with zeros to whole vectors of the
    build (:func:`factored_low`'s operand)."""
    B, r, C = Q.shape
    rp = -(-r // decoder_lanes()) * decoder_lanes()
    QT = Q.new_zeros(B, C, rp)
    QT[:, :, :r] = Q.transpose(1, 2)
    return QT


def factored_low(x: torch.Tensor, nh: int, scale: float, weight: torch.Tensor, QT: torch.Tensor,
                 r: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The token side of attention scores against factored image tokens (``factored_scores``'
    ``q`` and ``low``): x (B, t, nh*hd) a projection's outputs for the tokens, weight (nh*hd, C)
    the image side's projection, the factored rows Q (B, r, C) given transposed as QT (B, C, rp)
    (:func:`transposed_rows`; matrices contiguous, any batch stride) -> h (nh, B*t, hd) = x split
    by head times ``scale``, and low (B, nh, t, r) with
    ``low[b, i, k] = h[i, b*t+k] @ (Q[b] @ weight[i*hd:(i+1)*hd].T).T``. Contiguous float32 CPU
    tensors, C a multiple of the build's vector width."""
    lib = _decoder_lib()
    _check_f32("factored_low", x, weight)
    B, t, I = x.shape
    C = weight.shape[1]
    qt_bstride = _batch_stride("factored_low", QT)
    rp = QT.shape[2]
    if nh < 1 or I % nh or tuple(weight.shape) != (I, C) or QT.shape[:2] != (B, C) or not 0 <= r <= rp:
        raise ValueError(f"factored_low: x {tuple(x.shape)}, {nh} heads, weight {tuple(weight.shape)}, QT {tuple(QT.shape)}, r {r}")
    if C % decoder_lanes() or rp % decoder_lanes():
        raise ValueError(f"factored_low: C {C} and QT's rows {rp} must be multiples of {decoder_lanes()}")
    hd = I // nh
    h, low = torch.empty(nh, B * t, hd), torch.empty(B, nh, t, r)
    if B and t:
        _run_pieces(lib, lambda p0, p1: lib.segany_factored_low(p0, p1, B, t, nh, hd, C, r, x.data_ptr(), float(scale), weight.data_ptr(),
                                                                QT.data_ptr(), rp, qt_bstride, h.data_ptr(), low.data_ptr()), B * nh)
    return h, low


def factored_values(o: torch.Tensor, aP: torch.Tensor, Q: torch.Tensor, weight_t: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The heads' outputs of token->image attention over factored image tokens (see
    ``fast_decoder._t2i_factored``): o (nh, B*t, hd) the attention against the per-image map,
    aP (B, nh, t, r) against P's rows, Q (B, r, C) the factored rows (matrices contiguous, any
    batch stride), weight_t (C, nh*hd) the value projection's weight transposed, bias (nh*hd,) or
    None -> (B, t, nh*hd) = o (heads joined) + aP @ Q @ weight_t[:, head] per head + bias.
    Contiguous float32 CPU tensors, C a multiple of the build's vector width."""
    lib = _decoder_lib()
    _check_f32("factored_values", o, aP, weight_t, *(() if bias is None else (bias,)))
    nh, Bt, hd = o.shape
    B, _, t, _ = aP.shape if aP.ndim == 4 else (0, 0, 0, 0)
    C = weight_t.shape[0]
    r, q_bstride, q_ptr = _rows_stride("factored_values", Q, C)
    I = nh * hd
    if aP.ndim != 4 or tuple(aP.shape) != (B, nh, t, r) or B * t != Bt or tuple(weight_t.shape) != (C, I) \
            or Q.shape[0] != B or (bias is not None and tuple(bias.shape) != (I,)):
        raise ValueError(f"factored_values: o {tuple(o.shape)}, aP {tuple(aP.shape)}, Q {tuple(Q.shape)}, weight_t {tuple(weight_t.shape)}")
    if C % decoder_lanes():
        raise ValueError(f"factored_values: C {C} is not a multiple of {decoder_lanes()}")
    out = torch.empty(B, t, I)
    if B and t:
        _run_pieces(lib, lambda p0, p1: lib.segany_factored_values(p0, p1, B, t, nh, hd, C, r, o.data_ptr(), aP.data_ptr(), q_ptr,
                                                                   q_bstride, weight_t.data_ptr(),
                                                                   None if bias is None else bias.data_ptr(), out.data_ptr()), B * nh)
    return out


def _rows_stride(kernel: str, t: Optional[torch.Tensor], C: int) -> Tuple[int, int, int]:
    """(rows, batch stride, data pointer) of an optional (B, rows, C) float32 CPU tensor whose
    matrices are contiguous (any batch stride); (0, 0, None) for None."""
    if t is None:
        return 0, 0, None
    if t.ndim != 3 or t.shape[2] != C:
        raise ValueError(f"{kernel}: expected (B, rows, {C}), got {tuple(t.shape)}")
    return t.shape[1], _batch_stride(kernel, t), t.data_ptr()


def centered_gram(Q1: Optional[torch.Tensor], Q2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The rows of Q = [Q1; Q2] (B, r, C) (Q1 may be None): G (B, r, r) = Qc Qc^T with Qc = Q less
    its row means, and those means qbar (B, r), as ``fast_decoder._factored_stats`` needs them.
    Float32 CPU tensors, matrices contiguous (any batch stride), C a multiple of the build's vector
    width."""
    lib = _decoder_lib()
    B, r2, C = Q2.shape
    r1, s1, p1 = _rows_stride("centered_gram", Q1, C)
    _, s2, p2 = _rows_stride("centered_gram", Q2, C)
    if Q1 is not None and Q1.shape[0] != B:
        raise ValueError(f"centered_gram: Q1 {tuple(Q1.shape)}, Q2 {tuple(Q2.shape)}")
    r = r1 + r2
    G, qbar = torch.empty(B, r, r), torch.empty(B, r)
    code = lib.segany_centered_gram(B, r1, r2, C, p1, s1, p2, s2, qbar.data_ptr(), G.data_ptr()) if B and r else 0
    if code == 2:
        raise ValueError(f"centered_gram: C {C} is not a multiple of {decoder_lanes()}")
    if code:
        raise MemoryError("segany native kernel: out of memory for centered_gram's buffer")
    return G, qbar


def normed_rows(Q1: Optional[torch.Tensor], U: torch.Tensor, g: torch.Tensor, b: torch.Tensor, mean: torch.Tensor,
                rstd: torch.Tensor, alpha: Optional[torch.Tensor], P: torch.Tensor,
                row0: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A LayerNorm of factored image tokens as new factors (``fast_decoder._normed``): returns
    Q (B, r1+k+2, C) = [Q1 g; U g; g; b] (Q1 (B, r1, C) or None, U (B, k, C)), the same transposed
    with its rows padded with zeros to whole vectors (B, C, rp) (:func:`factored_low`'s operand),
    and alpha_out (B, N) = alpha rstd (alpha None: one), and writes P[:, row0] = -mean / alpha and
    P[:, row0 + 1] = 1 / alpha_out. mean, rstd (B, N); float32 CPU tensors, matrices contiguous."""
    lib = _decoder_lib()
    B, k, C = U.shape
    r1, s1, p1 = _rows_stride("normed_rows", Q1, C)
    _, su, pu = _rows_stride("normed_rows", U, C)
    _check_f32("normed_rows", g, b, mean, rstd, *(() if alpha is None else (alpha,)))
    p_bstride = _batch_stride("normed_rows", P)
    N = P.shape[2]
    if (Q1 is not None and Q1.shape[0] != B) or tuple(g.shape) != (C,) or tuple(b.shape) != (C,) \
            or tuple(mean.shape) != (B, N) or tuple(rstd.shape) != (B, N) or (alpha is not None and tuple(alpha.shape) != (B, N)) \
            or P.shape[0] != B or not 0 <= row0 <= P.shape[1] - 2:
        raise ValueError(f"normed_rows: U {tuple(U.shape)}, P {tuple(P.shape)}, row {row0}, mean {tuple(mean.shape)}")
    rows = r1 + k + 2
    rp = -(-rows // decoder_lanes()) * decoder_lanes()
    Q, QT, alpha_out = torch.empty(B, rows, C), torch.empty(B, C, rp), torch.empty(B, N)
    lib.segany_normed_rows(B, r1, k, C, N, p1, s1, pu, su, g.data_ptr(), b.data_ptr(), Q.data_ptr(), QT.data_ptr(), rp,
                           mean.data_ptr(), rstd.data_ptr(), None if alpha is None else alpha.data_ptr(), P.data_ptr(),
                           p_bstride, row0, alpha_out.data_ptr())
    return Q, QT, alpha_out


def softmax_pixels(s: torch.Tensor, alpha: torch.Tensor, a_bt: torch.Tensor, w: torch.Tensor) -> None:
    """Token->image attention over the pixels: scores s (nh, B, t, N) -> a = softmax(s, -1) times
    alpha[b] (alpha (B, N)) into a_bt laid out (B, nh, t, N) and into w (nh, B, t, N), which may
    be s itself (and with one prompt, B = 1, where the two layouts coincide, a_bt too).
    Contiguous float32 CPU tensors. The softmax's exp is a polynomial (relative
    error ~1e-7, as in :func:`factored_scores`)."""
    lib = _decoder_lib()
    _check_f32("softmax_pixels", s, alpha, a_bt, w)
    nh, B, t, N = s.shape
    if tuple(alpha.shape) != (B, N) or tuple(a_bt.shape) != (B, nh, t, N) or tuple(w.shape) != (nh, B, t, N):
        raise ValueError(f"softmax_pixels: s {tuple(s.shape)}, alpha {tuple(alpha.shape)}, a_bt {tuple(a_bt.shape)}, w {tuple(w.shape)}")
    if s.numel():
        args = (B, nh, t, N, s.data_ptr(), alpha.data_ptr(), a_bt.data_ptr(), w.data_ptr())

        def call(p0, p1):
            lib.segany_softmax_pixels(p0, p1, *args)
            return 0

        _run_pieces(lib, call, nh * B * t)


I2T_TOKENS_MAX = 16  # tokens per prompt up to which i2t_softmax runs (its scores stay in registers)


def i2t_softmax(keys: torch.Tensor, nh: int, scale: float, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Image->token attention against per-image queries: the tokens' projected keys (B, t, nh*hd)
    times ``scale``, queries q (nh, hd, N) (or in :func:`scores_tiles`' pixel tiles) -> per head,
    prompt and pixel the softmax over the t tokens of the scores, into out (B, nh*(t-1)+1, N;
    matrices contiguous, any batch stride) in :func:`softmax_tokens`' reduced layout. t at most
    :data:`I2T_TOKENS_MAX`, hd at most 64. Returns ``out``."""
    lib = _decoder_lib()
    _check_f32("i2t_softmax", keys, q)
    out_bstride = _batch_stride("i2t_softmax", out)
    B, t, I = keys.shape
    hd = I // nh if nh > 0 else 0
    N = out.shape[-1]
    tiled, block = q.ndim == 4, scores_block()
    maps = (-(-N // block), nh, hd, block) if tiled else (nh, hd, N)
    if nh < 1 or I != nh * hd or tuple(q.shape) != maps or tuple(out.shape) != (B, reduced_rows(nh, t), N) \
            or not 1 <= t <= I2T_TOKENS_MAX or hd > 64:
        raise ValueError(f"i2t_softmax: keys {tuple(keys.shape)}, {nh} heads, q {tuple(q.shape)}, out {tuple(out.shape)}")
    if B and N:
        args = (nh, B, t, hd, N, keys.data_ptr(), float(scale), q.data_ptr(), int(tiled), out.data_ptr(), out_bstride)
        _run_pieces(lib, lambda p0, p1: lib.segany_i2t_softmax(p0, p1, *args), nh * B * -(-N // 256))
    return out


def t2i_attention_ok(hd: int, N: int) -> bool:
    """Whether :func:`t2i_attention` takes heads ``hd`` channels wide over ``N`` pixels: both
    whole vectors of this build, ``hd`` at most two of them."""
    lanes = decoder_lanes()
    return lanes > 0 and hd % lanes == 0 and hd <= 2 * lanes and N % lanes == 0


def t2i_attention(q: torch.Tensor, kT: torch.Tensor, v: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Token->image attention against per-image keys and values: queries q (Q, nh*hd), keys kT
    (nh, hd, N), values v (nh, N, hd) -> out (Q, nh*hd), per head ``softmax(scale q k^T) v``.
    Contiguous float32 CPU tensors, widths as :func:`t2i_attention_ok` says; the softmax's exp as
    in :func:`softmax_pixels`. Returns ``out``."""
    lib = _decoder_lib()
    _check_f32("t2i_attention", q, kT, v, out)
    nh, hd, N = kT.shape
    Q = q.shape[0]
    if q.shape != (Q, nh * hd) or v.shape != (nh, N, hd) or out.shape != (Q, nh * hd) or not t2i_attention_ok(hd, N):
        raise ValueError(f"t2i_attention: q {tuple(q.shape)}, kT {tuple(kT.shape)}, v {tuple(v.shape)}, out {tuple(out.shape)}")
    if Q and N:
        args = (nh, Q, hd, N, float(scale), q.data_ptr(), kT.data_ptr(), v.data_ptr(), out.data_ptr())
        _run_pieces(lib, lambda p0, p1: lib.segany_t2i_attention(p0, p1, *args), nh * -(-Q // 8))
    return out


@functools.lru_cache(maxsize=64)  # (a click asks twice; the answer only depends on the sizes)
def attend_part_floats(nh: int, t: int, r: int, hd: int, N: int) -> int:
    """The size of :func:`attend_values`' ``part`` buffer, in floats."""
    return int(_decoder_lib().segany_attend_part_floats(nh, t, r, hd, N))


def attend_values(s: torch.Tensor, alpha: torch.Tensor, v: torch.Tensor, P: torch.Tensor, o: torch.Tensor,
                  aP: torch.Tensor, part: Optional[torch.Tensor] = None) -> None:
    """The value side of one prompt's token->image attention on factored image tokens: with
    ``a = softmax(s, -1) * alpha`` (scores s (nh, t, N), alpha (N,)), ``o = a @ v`` (values v
    (nh, N, hd); o (nh, t, hd)) and ``aP = a @ P^T`` (P (r, N); aP (nh, t, r)). Contiguous float32
    CPU tensors, hd a multiple of :func:`decoder_lanes`; the exp as in :func:`softmax_pixels`.
    ``part``: the pieces' workspace (at least :func:`attend_part_floats` floats; else allocated)."""
    lib = _decoder_lib()
    _check_f32("attend_values", s, alpha, v, P, o, aP)
    nh, t, N = s.shape
    r, hd = P.shape[0], v.shape[-1]
    if alpha.shape != (N,) or v.shape != (nh, N, hd) or P.shape != (r, N) or o.shape != (nh, t, hd) \
            or aP.shape != (nh, t, r) or hd % max(decoder_lanes(), 1):
        raise ValueError(f"attend_values: s {tuple(s.shape)}, alpha {tuple(alpha.shape)}, v {tuple(v.shape)}, "
                         f"P {tuple(P.shape)}, o {tuple(o.shape)}, aP {tuple(aP.shape)}")
    if not (s.numel() and hd):
        o.zero_()
        aP.zero_()
        return
    pieces = int(lib.segany_attend_pieces(N))
    need = attend_part_floats(nh, t, r, hd, N)
    if part is None:
        part = torch.empty(need)
    elif part.dtype != torch.float32 or not part.is_cpu or not part.is_contiguous() or part.numel() < need:
        raise ValueError(f"attend_values: part needs {need} contiguous float32 CPU floats")
    args = (nh, t, N, r, hd, s.data_ptr(), alpha.data_ptr(), v.data_ptr(), P.data_ptr(), part.data_ptr())
    _run_pieces(lib, lambda p0, p1: lib.segany_attend_values(p0, p1, *args), pieces)
    lib.segany_attend_combine(pieces, nh, t, r, hd, part.data_ptr(), o.data_ptr(), aP.data_ptr())


def reduced_rows(nh: int, t: int) -> int:
    """Rows per prompt of the reduced layout of :func:`softmax_tokens`."""
    return nh * (t - 1) + 1


def softmax_tokens(s: torch.Tensor, out: torch.Tensor, reduced: bool = False) -> torch.Tensor:
    """Image->token attention over the tokens: scores s (nh, B, t, N) -> out (B, nh, t, N), per
    pixel and head the softmax over the t tokens. Contiguous float32 CPU tensors; the exp as in
    :func:`softmax_pixels`. Returns ``out``.

    ``reduced``: out (B, nh*(t-1) + 1, N) instead (matrices contiguous, any batch stride), per
    head the first t-1 tokens' rows, then a row of ones (a head's weights sum to one: see
    ``fast_decoder._reduced_values``)."""
    lib = _decoder_lib()
    _check_f32("softmax_tokens", s)
    if reduced:
        out_bstride = _batch_stride("softmax_tokens", out)
    else:
        _check_f32("softmax_tokens", out)
        out_bstride = 0
    nh, B, t, N = s.shape
    want = (B, reduced_rows(nh, t), N) if reduced else (B, nh, t, N)
    if tuple(out.shape) != want or (reduced and t < 1):
        raise ValueError(f"softmax_tokens: s {tuple(s.shape)}, out {tuple(out.shape)} (expected {want})")
    if s.numel():
        args = (nh, B, t, N, s.data_ptr(), out.data_ptr(), int(reduced), out_bstride)

        def call(p0, p1):
            lib.segany_softmax_tokens(p0, p1, *args)
            return 0

        _run_pieces(lib, call, nh * B * -(-N // 256))
    return out


def attention_preferred(w: Optional[int], hd: int, window: int = 0) -> bool:
    """Whether the encoder's attention should run in this module's kernels: global attention
    (:func:`rel_attention`) over a grid ``w`` tokens wide, or windows ``window`` tokens wide
    (:func:`window_attention`, w None), heads ``hd`` channels wide. The kernels built with vectors of at
    least 8 floats (AVX2 or AVX-512), the widths multiples of their blocks. At AVX2 width the vit_b
    encoder took 0.92-0.97x the time of the PyTorch attention (2026-12-06, an AVX2 machine
    emulated on the AVX-512 VM: kernels ``-march=haswell``, PyTorch, MKL and oneDNN held to AVX2;
    two in-process A/Bs of 3 and 4 alternating pairs); SSE2 builds were not measured.
    ``SEGANY_ATTENTION_KERNEL=0`` never uses them, ``=1`` wherever built."""
    force = os.environ.get("SEGANY_ATTENTION_KERNEL")
    if force == "0":
        return False
    lib = _get("attention")
    if lib is None:
        return False
    lanes = int(lib.segany_vector_lanes())
    if hd % lanes or (w is not None and (w % lanes or w % 4)) or window > 4 * lanes:
        return False
    return force == "1" or lanes >= 8


def rel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, Rh: torch.Tensor, Rw: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale + rel_h + rel_w) v`` over an h x w grid, fused (``attention.c``),
    with SAM's decomposed relative positions ``rel_h = einsum("bnhwc,hkc->bnhwk", q, Rh)`` and
    ``rel_w = einsum("bnhwc,wkc->bnhwk", q, Rw)`` of the unscaled queries, formed inside.

    q, k, v (B, nh, h*w, hd) float32 (q and v any strides with contiguous channels, e.g. views
    of the qkv projection); Rh (h, h, hd) and Rw (w, w, hd): ``get_rel_pos`` of the block's
    tables. Returns (B, nh, h*w, hd), equal to the unfused computation up to float32 rounding."""
    lib = _attention_lib()
    B, nh, N, hd = q.shape
    h, w = Rh.shape[0], Rw.shape[0]
    if k.shape != q.shape or v.shape != q.shape or h * w != N or tuple(Rh.shape) != (h, h, hd) \
            or tuple(Rw.shape) != (w, w, hd):
        raise ValueError("rel_attention: inconsistent shapes")
    lanes = int(lib.segany_vector_lanes())
    if w % lanes or hd % lanes or w % 4:
        raise ValueError(f"rel_attention: grid width {w} and head width {hd} must be multiples of {lanes} (and the width of 4)")
    if any(t.dtype != torch.float32 or not t.is_cpu for t in (q, k, v, Rh, Rw)):
        raise ValueError("rel_attention needs float32 CPU tensors")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if v.stride(-1) != 1 or v.stride(-2) != hd:
        # Each (query row, key row) step reads that key row's w value rows 16 times. As a view of the
        # qkv projection their rows lie 3C floats apart (9 KB for vit_b), which maps them to a
        # quarter of the L1 cache's sets: every read came from L2. Copied once per block (12.6 MB
        # for vit_b, a few ms): a global block's attention 318 -> 266 ms (2-core Xeon, medians of 15).
        v = v.contiguous()
    kt = k.reshape(B, nh, h, w, hd).transpose(-1, -2).contiguous()  # (B, nh, h, hd, w)
    hp = -(-h // lanes) * lanes
    rht = Rh.new_zeros(h, hd, hp)
    rht[:, :, :h] = Rh.transpose(1, 2)
    rwt = Rw.transpose(1, 2).contiguous()  # (w, hd, w)
    out = q.new_empty(B, nh, N, hd)
    args = (nh, h, w, hd, q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), kt.data_ptr(), v.data_ptr(),
            v.stride(0), v.stride(1), v.stride(2), rht.data_ptr(), hp, rwt.data_ptr(), float(scale), out.data_ptr())
    _run_pieces(lib, lambda p0, p1: lib.segany_rel_attention(p0, p1, *args), B * nh * h)
    return out


def rel_softmax_bf16_(s: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """In place: ``s = softmax(s + rel_h[..., key row] + rel_w[..., key column])`` over the keys of
    an h x w grid, for bfloat16 scores ``s`` (R, h*w) of R queries, rel_h (R, h), rel_w (R, w)
    bfloat16 (the int8 mode's bfloat16 global attention). Sums and the softmax in float32, the
    result rounded to bfloat16 (to nearest even). Contiguous CPU tensors; w a multiple of the
    attention build's vector width (16 floats with AVX-512)."""
    lib = _attention_lib()
    R, n = s.shape
    h, w = rel_h.shape[-1], rel_w.shape[-1]
    if h * w != n or tuple(rel_h.shape) != (R, h) or tuple(rel_w.shape) != (R, w):
        raise ValueError("rel_softmax_bf16_: inconsistent shapes")
    if any(t.dtype != torch.bfloat16 or not t.is_cpu or not t.is_contiguous() for t in (s, rel_h, rel_w)):
        raise ValueError("rel_softmax_bf16_ needs contiguous bfloat16 CPU tensors")
    if w % int(lib.segany_vector_lanes()):
        raise ValueError(f"rel_softmax_bf16_: grid width {w} must be a multiple of {int(lib.segany_vector_lanes())}")
    args = (R, h, w, s.data_ptr(), rel_h.data_ptr(), rel_w.data_ptr())
    _run_pieces(lib, lambda p0, p1: lib.segany_rel_softmax_bf16(p0, p1, *args), -(-R // 16))  # (RS_ROWS rows a piece)
    return s


def window_attention(qkv: torch.Tensor, pad: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, num_heads: int,
                     window_size: int, scale: float) -> torch.Tensor:
    """The encoder's windowed attention with decomposed relative positions (``attention.c``),
    read straight from the qkv projection and written straight to the token grid: no window
    partition, padding or unpartition copies.

    qkv (B, H, W, 3C) float32, channels (q|k|v, head, hd); pad (3C,) what a padding token holds
    (the qkv bias); rel_h, rel_w (ws, ws, hd): ``get_rel_pos(ws, ws, rel_pos_h/w)``. Returns
    (B, H, W, C), equal to partition + attention + unpartition up to float32 rounding."""
    lib = _attention_lib()
    B, H, W, C3 = qkv.shape
    ws, nh = int(window_size), int(num_heads)
    hd = C3 // (3 * nh)
    if C3 != 3 * nh * hd or tuple(pad.shape) != (C3,) or tuple(rel_h.shape) != (ws, ws, hd) or tuple(rel_w.shape) != (ws, ws, hd):
        raise ValueError("window_attention: inconsistent shapes")
    lanes = int(lib.segany_vector_lanes())
    if hd % lanes:
        raise ValueError(f"window_attention: head width {hd} must be a multiple of {lanes}")
    wsp = -(-ws // lanes) * lanes
    if wsp > 4 * lanes:
        raise ValueError(f"window_attention: windows at most {4 * lanes} tokens wide")
    # (ws, hd, wsp): per query row (column) of the window, its terms against each key row
    # (column) as vectors, zero-padded to whole ones
    rel_h, rel_w = (F.pad(r.transpose(1, 2), (0, wsp - ws)) for r in (rel_h, rel_w))
    qkv, pad, rel_h, rel_w = qkv.contiguous(), pad.contiguous(), rel_h.contiguous(), rel_w.contiguous()
    _check_f32("window_attention", qkv, pad, rel_h, rel_w)
    out = torch.empty(B, H, W, C3 // 3)
    n_windows = B * (-(-H // ws)) * (-(-W // ws))
    args = (H, W, nh, hd, ws, qkv.data_ptr(), pad.data_ptr(), rel_h.data_ptr(), rel_w.data_ptr(), float(scale), out.data_ptr())
    # (the kernel also refuses windows over 4 vectors wide, with code 2: checked above)
    _run_pieces(lib, lambda p0, p1: lib.segany_window_attention(p0, p1, *args), n_windows * nh)
    return out


def rows_ok(C: int) -> bool:
    """Whether :func:`layer_norm_rows_` takes ``C`` channels (a multiple of its vector step)."""
    return C % 64 == 0


def factored_scores(q: torch.Tensor, base: torch.Tensor, pe: Optional[torch.Tensor], alpha: torch.Tensor, low: torch.Tensor,
                    P: torch.Tensor, out: torch.Tensor, softmax_over_tokens: bool = False,
                    reduced: Optional[torch.Tensor] = None, reduced_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention scores of tokens against factored image tokens (``segany.modeling.fast_decoder``):

    ``out[h, b, k, n] = alpha[b, n] (q[h, b*t+k] . base[h, :, n] + low[b, h, k] . P[b, :, n])
    + q[h, b*t+k] . pe[h, :, n]`` (no such term where ``pe`` is None)

    q (nh, B*t, hd), base and pe (nh, hd, N) (or both in :func:`scores_tiles`), alpha (B, N), low (B, nh, t, r), P (B, r, N)
    (matrices contiguous, any batch stride); out
    (nh, B, t, N), or with ``softmax_over_tokens`` (B, nh, t, N) holding, per pixel and head, the
    softmax of the scores over the t tokens. Contiguous float32 CPU tensors. Returns ``out``, or
    with ``reduced`` (B, nh*(t-1) + 1, N) (needs ``softmax_over_tokens``; matrices contiguous,
    any batch stride) the softmax in :func:`softmax_tokens`'s reduced layout there, times
    ``reduced_scale`` (B, N) where given (its row of ones too), out then holding only the scores."""
    lib = _decoder_lib()
    nh, Bt, hd = q.shape
    B, r, N = P.shape
    t = Bt // B if B else 0
    _check_f32("factored_scores", q, base, alpha, low, out, *(() if pe is None else (pe,)))
    p_bstride = _batch_stride("factored_scores", P)
    want = (B, nh, t, N) if softmax_over_tokens else (nh, B, t, N)
    tiled, block = base.ndim == 4, scores_block()
    maps = (-(-N // block), nh, hd, block) if tiled else (nh, hd, N)
    if B * t != Bt or tuple(base.shape) != maps or (pe is not None and tuple(pe.shape) != maps) \
            or tuple(alpha.shape) != (B, N) \
            or tuple(low.shape) != (B, nh, t, r) or tuple(out.shape) != want:
        raise ValueError("factored_scores: inconsistent shapes")
    red_bstride = 0
    if reduced is not None:
        red_bstride = _batch_stride("factored_scores", reduced)
        if not softmax_over_tokens or tuple(reduced.shape) != (B, reduced_rows(nh, t), N):
            raise ValueError("factored_scores: reduced needs softmax_over_tokens and shape (B, nh*(t-1)+1, N)")
    if reduced_scale is not None:
        _check_f32("factored_scores", reduced_scale)
        if reduced is None or tuple(reduced_scale.shape) != (B, N):
            raise ValueError("factored_scores: reduced_scale (B, N) goes with reduced")
    if B and t and N:
        args = (B, nh, t, hd, r, N, q.data_ptr(), base.data_ptr(), None if pe is None else pe.data_ptr(), int(tiled),
                alpha.data_ptr(), low.data_ptr(),
                P.data_ptr(), p_bstride, out.data_ptr(), int(softmax_over_tokens), int(softmax_over_tokens),
                None if reduced is None else reduced.data_ptr(), red_bstride,
                None if reduced_scale is None else reduced_scale.data_ptr())

        def call(p0, p1):
            lib.segany_factored_scores(p0, p1, *args)
            return 0

        _run_pieces(lib, call, -(-N // block))
    return out


def _lib_constant(lib: ctypes.CDLL, fn: str) -> int:
    """A build constant the library reports, asked once per library (a ctypes call per decoder
    call otherwise)."""
    v = lib.__dict__.get("const:" + fn)
    if v is None:
        v = lib.__dict__["const:" + fn] = int(getattr(lib, fn)())
    return v


def scores_block() -> int:
    """Pixels per piece of :func:`factored_scores` (SC_BLOCK), the width of its maps' tiles."""
    return _lib_constant(_decoder_lib(), "segany_scores_block")


def scores_tiles(maps: torch.Tensor) -> torch.Tensor:
    """Per-image maps (nh, hd, N) for :func:`factored_scores` in its pieces' pixel tiles."""
    return pixel_tiles(maps, scores_block())


# --- the decoder's token side (tokens.c) ---------------------------------------------------------

TOKEN_ROWS_MAX = 64  # token rows (prompts x tokens) up to which the token kernels run; PyTorch's GEMMs above


def tokens_usable() -> bool:
    """Whether the token-side kernels (:class:`TokenChain`, :class:`TokenBlock`) can run
    now: built, not turned off (``SEGANY_TOKEN_KERNELS=0``, read on every call), and not an
    OpenMP build in a forked child (whose OpenMP team is gone; those kernels have barriers
    inside, so they cannot take the thread pool the other kernels fall back to there). The
    decoder's fast path uses them only where it uses the decoder kernels
    (:func:`decoder_preferred`)."""
    if os.environ.get("SEGANY_TOKEN_KERNELS") == "0":
        return False
    lib = _get("tokens")
    return lib is not None and not (_forked and lib.segany_has_openmp())


def _token_lib() -> ctypes.CDLL:
    lib = _get("tokens")
    if lib is None:
        raise RuntimeError("the native token kernel is not available")
    return lib


def pack_token_weight(weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight (O, K) in the token kernels' layout: panels of the build's panel
    width pw of outputs, (ceil(O / pw), K, pw), zero-padded; float32, contiguous."""
    pw = int(_token_lib().segany_token_panel())
    O, K = weight.shape
    n = -(-O // pw)
    w = weight.detach().to(torch.float32)
    if n * pw != O:
        w = torch.cat((w, w.new_zeros(n * pw - O, K)))
    return w.reshape(n, pw, K).transpose(1, 2).contiguous()


def _token_rows(kernel: str, x: torch.Tensor, width: int) -> int:
    if x.dtype != torch.float32 or not x.is_cpu or not x.is_contiguous() or x.shape[-1] != width:
        raise ValueError(f"{kernel}: expected a contiguous float32 CPU tensor (..., {width}), got {x.dtype} {tuple(x.shape)}")
    return x.numel() // width if width else 0


class TokenChain:
    """1-3 linear layers over token rows with ReLU between them (``mask_decoder.MLP``: the IoU
    head, a hypernetwork) in one call of tokens.c.

    ``layers``: (weight (O, K), bias (O,)) float32 pairs, each K the previous O. The weights are
    packed here: a chain is built once for a set of parameters (see ``fast_decoder._token_plan``)."""

    def __init__(self, layers) -> None:
        if not 1 <= len(layers) <= 3:
            raise ValueError(f"TokenChain: 1 to 3 layers, got {len(layers)}")
        self.dims = [int(layers[0][0].shape[1])] + [int(w.shape[0]) for w, _ in layers]
        for (w, b), k in zip(layers, self.dims):
            if w.shape[1] != k or b is None or b.numel() != w.shape[0]:
                raise ValueError("TokenChain: layer shapes do not chain (or a bias is missing)")
        self.packed = [pack_token_weight(w) for w, _ in layers]
        self.biases = [b.detach().to(torch.float32).contiguous() for _, b in layers]
        pointers = [(w.data_ptr(), b.data_ptr()) for w, b in zip(self.packed, self.biases)] + [(None, None)] * (3 - len(layers))
        self._args = (len(layers), *(self.dims + [0] * (4 - len(self.dims))))
        self._weights = tuple(ptr for pair in pointers for ptr in pair)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., O)."""
        lib = _token_lib()
        M = _token_rows("TokenChain", x, self.dims[0])
        out = torch.empty(*x.shape[:-1], self.dims[-1])
        if M:
            code = lib.segany_token_chain(M, *self._args, x.data_ptr(), *self._weights, out.data_ptr())
            if code:
                raise MemoryError("segany native token kernel: out of memory") if code == -1 else ValueError("TokenChain: bad sizes")
        return out


class _TokenBlockStruct(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int64) for n in ("C", "sa_I", "sa_nh", "x_I", "mlp")]
                + [(n, ctypes.c_void_p) for n in ("sa_wqk", "sa_bqk", "sa_wv", "sa_bv", "sa_wo", "sa_bo", "ln1_g", "ln1_b",
                                                  "q_w", "q_b", "o_w", "o_b", "ln2_g", "ln2_b",
                                                  "mlp_w1", "mlp_b1", "mlp_w2", "mlp_b2", "ln3_g", "ln3_b",
                                                  "k_w", "k_b", "v_w", "v_b")]
                + [(n, ctypes.c_float) for n in ("ln1_eps", "ln2_eps", "ln3_eps")])


class TokenBlock:
    """A two-way block's token side around its two cross-attentions, in two calls of tokens.c
    (segany.modeling.fast_decoder._token_steps):

    * :meth:`pre`: ``x = norm1(self_attn(...))`` (SAM's block: q = k = x + pe and the residual,
      or for its first block neither), then the token->image attention's ``q = q_proj(x + pe)``;
    * :meth:`post`: from that attention's heads (before out_proj),
      ``x = norm2(x + out_proj(heads))``, ``x = norm3(x + mlp(x))``, and the image->token
      attention's ``k = k_proj(x + pe)``, ``v = v_proj(x)``.

    Parts given as None are skipped: the final attention is a block with only ``q``, ``o`` and
    ``ln2``. Each part is (weight, bias) pairs of its linear layers (self_attn: q, k, v, out;
    mlp: lin1, lin2, with ReLU between) and LayerNorms (weight, bias, eps). Float32 parameters,
    packed here: a block is built once for a set of parameters (see ``fast_decoder._token_plan``)."""

    def __init__(self, q, o, ln2, self_attn=None, sa_heads: int = 0, ln1=None, mlp=None, ln3=None, k=None, v=None) -> None:
        st = _TokenBlockStruct()
        keep = []

        def put(name, t, pack=False):
            t = pack_token_weight(t) if pack else t.detach().to(torch.float32).contiguous()
            keep.append(t)
            setattr(st, name, t.data_ptr())
            return t

        def linear(prefix, wb, n_in, n_out):
            w, b = wb
            if tuple(w.shape) != (n_out, n_in) or b is None or b.numel() != n_out:
                raise ValueError(f"TokenBlock: {prefix} is {tuple(w.shape)}, expected ({n_out}, {n_in}) with a bias")
            put(prefix + "_w", w, pack=True)
            put(prefix + "_b", b)

        def norm(prefix, ln, n):
            if ln is None or ln[0].numel() != n or ln[1].numel() != n:
                raise ValueError(f"TokenBlock: {prefix} needs a LayerNorm over {n} channels")
            put(prefix + "_g", ln[0])
            put(prefix + "_b", ln[1])
            setattr(st, prefix + "_eps", float(ln[2]))

        x_I, C = (int(d) for d in q[0].shape)
        st.C, st.x_I = C, x_I
        linear("q", q, C, x_I)
        linear("o", o, x_I, C)
        norm("ln2", ln2, C)
        if self_attn is not None:
            (wq, bq), (wk, bk), (wv, bv), (wo, bo) = self_attn
            I = int(wq.shape[0])
            if sa_heads < 1 or I % sa_heads or wk.shape != wq.shape or wv.shape != wq.shape or tuple(wq.shape) != (I, C) \
                    or tuple(wo.shape) != (C, I):
                raise ValueError("TokenBlock: self-attention projections do not fit")
            st.sa_I, st.sa_nh = I, int(sa_heads)
            put("sa_wqk", torch.cat((wq, wk)), pack=True)
            put("sa_bqk", torch.cat((bq, bk)))
            put("sa_wv", wv, pack=True)
            put("sa_bv", bv)
            put("sa_wo", wo, pack=True)
            put("sa_bo", bo)
            norm("ln1", ln1, C)
        if mlp is not None:
            hidden = int(mlp[0][0].shape[0])
            st.mlp = hidden
            w1, b1 = mlp[0]
            w2, b2 = mlp[1]
            if tuple(w1.shape) != (hidden, C) or tuple(w2.shape) != (C, hidden) or b1 is None or b2 is None:
                raise ValueError("TokenBlock: MLP shapes do not fit")
            put("mlp_w1", w1, pack=True)
            put("mlp_b1", b1)
            put("mlp_w2", w2, pack=True)
            put("mlp_b2", b2)
            norm("ln3", ln3, C)
        if (k is None) != (v is None):
            raise ValueError("TokenBlock: k and v go together")
        if k is not None:
            linear("k", k, C, x_I)
            linear("v", v, C, x_I)
        self._struct, self._keep = st, keep
        self._ref = ctypes.byref(st)
        self.C, self.x_I, self.has_self_attn = C, x_I, self_attn is not None

    def _call(self, code: int, what: str) -> None:
        if code:
            raise MemoryError("segany native token kernel: out of memory") if code == -1 else ValueError(f"TokenBlock.{what}: bad sizes")

    def pre(self, x: torch.Tensor, pe: torch.Tensor, skip_pe: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """x, pe (B, t, C) -> (x after the self-attention and norm1, q (B, t, x_I))."""
        if x.ndim != 3 or pe.shape != x.shape:
            raise ValueError(f"TokenBlock.pre: x {tuple(x.shape)}, pe {tuple(pe.shape)}: (B, t, C) both")
        _token_rows("TokenBlock.pre", x, self.C)
        _token_rows("TokenBlock.pre", pe, self.C)
        B, t, C = x.shape
        x_out = torch.empty_like(x) if self.has_self_attn else x
        q = torch.empty(B, t, self.x_I)
        if B * t:
            self._call(_token_lib().segany_token_block_pre(self._ref, B, t, x.data_ptr(), pe.data_ptr(), int(skip_pe),
                                                           x_out.data_ptr(), q.data_ptr()), "pre")
        return x_out, q

    def post(self, heads: torch.Tensor, x: torch.Tensor, pe: Optional[torch.Tensor]):
        """heads (..., x_I), x and pe (..., C) -> x after norm2 (and the MLP and norm3 where the
        block has them), and with the image->token projections k, v (..., x_I) (else None)."""
        M = _token_rows("TokenBlock.post", heads, self.x_I)
        if _token_rows("TokenBlock.post", x, self.C) != M or (pe is not None and _token_rows("TokenBlock.post", pe, self.C) != M):
            raise ValueError(f"TokenBlock.post: heads {tuple(heads.shape)}, x {tuple(x.shape)}: one row each")
        has_kv = bool(self._struct.k_w)
        if has_kv and pe is None:
            raise ValueError("TokenBlock.post: the k projection needs pe")
        x_out = torch.empty_like(x)
        k = torch.empty(*x.shape[:-1], self.x_I) if has_kv else None
        v = torch.empty(*x.shape[:-1], self.x_I) if has_kv else None
        if M:
            self._call(_token_lib().segany_token_block_post(self._ref, M, heads.data_ptr(), x.data_ptr(),
                                                            None if pe is None else pe.data_ptr(), x_out.data_ptr(),
                                                            None if k is None else k.data_ptr(),
                                                            None if v is None else v.data_ptr()), "post")
        return x_out, k, v
