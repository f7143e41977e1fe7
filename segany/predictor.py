"""Interactive prediction: embed an image once, then prompt it any number of times.

``SamPredictor`` has the constructor, methods, arguments and return values of
``segment_anything.SamPredictor`` 1.0, so switching is a one-line import change. ``Segmenter``
is segany's own, simpler API on top of it (paths or arrays in, a ``Prediction`` out, embeddings
that can be saved and loaded).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import kernels
from .modeling import Sam
from .modeling.fast_decoder import build_cache as build_decoder_cache
from .modeling.fast_decoder import cache_current as decoder_cache_current
from .modeling.fast_decoder import mask_prompt_factor, predict_masks_fast
from .transforms import ResizeLongestSide
from .upscale import CellUpscaler

ImageLike = Union[str, "os.PathLike[str]", np.ndarray, Any]


class PromptError(ValueError):
    """A prompt has the wrong shape, a non-finite value, or lies outside the image."""


def _numbers(name: str, x, dtype=np.float64) -> np.ndarray:
    """``x`` as a numpy array of ``dtype``; anything that is not numbers is a PromptError naming it."""
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise PromptError(f"{name} must be numbers: {e}") from None


def _finite(name: str, a: np.ndarray) -> None:
    if not np.all(np.isfinite(a)):
        raise PromptError(f"{name} contains NaN or infinite values")


def _check_in_image(name: str, xy: np.ndarray, size: Tuple[int, int]) -> None:
    h, w = size
    bad = (xy[..., 0] < 0) | (xy[..., 0] > w) | (xy[..., 1] < 0) | (xy[..., 1] > h)
    if np.any(bad):
        first = xy[bad][0]
        raise PromptError(
            f"{name} ({first[0]:g}, {first[1]:g}) lies outside the image "
            f"(x in [0, {w}], y in [0, {h}])"
        )


class _SeparableResize:
    """The official two-step mask upscaling (bilinear to the padded input, crop, bilinear to the
    original size) as one precomputed separable linear map with at most 4 taps per output pixel.

    Built once per image; applying it touches only the output pixels, where the official code
    first writes a full (img_size x img_size) float map per mask. Results equal the official ones
    up to float32 rounding.
    """

    _BLOCK = 64  # output rows per block of the banded row map
    _THRESHOLD_ROWS = 256  # output rows per piece when thresholding on the fly

    def __init__(self, low_res: int, img_size: int, input_size: Tuple[int, int], original_size: Tuple[int, int], device) -> None:
        self.axes = [
            self._taps(low_res, img_size, input_size[i], original_size[i], device) for i in range(2)
        ]
        # Each axis is a banded (out x low) map: blocks of _BLOCK output indices read a window of
        # S consecutive low-res indices, so each step is one batched GEMM that writes each output
        # pixel once (no per-tap gathers of full-width intermediates).
        self.row_window, self.row_blocks = self._banded(*self.axes[0], int(original_size[0]), low_res)
        self.col_window, col_blocks = self._banded(*self.axes[1], int(original_size[1]), low_res)
        self.col_blocks_t = col_blocks.transpose(1, 2).contiguous()  # (nb, S, bk)
        self.height = int(original_size[0])
        self.width = int(original_size[1])

    @classmethod
    def _banded(cls, idx: torch.Tensor, wts: torch.Tensor, n_out: int, low_res: int):
        dense = torch.zeros(n_out, low_res, dtype=torch.float32)
        dense.scatter_add_(1, idx.cpu(), wts.cpu())
        bk = cls._BLOCK
        nb = (n_out + bk - 1) // bk
        spans = []
        for b in range(nb):
            nz = (dense[b * bk : (b + 1) * bk] != 0).any(0).nonzero().flatten()
            spans.append((int(nz.min()), int(nz.max())) if len(nz) else (0, 0))
        S = min(low_res, max(hi - lo + 1 for lo, hi in spans))
        starts = torch.tensor([max(0, min(lo, low_res - S)) for lo, _ in spans])
        blocks = torch.zeros(nb, bk, S)
        for b in range(nb):
            rows = dense[b * bk : (b + 1) * bk]
            blocks[b, : rows.shape[0]] = rows[:, int(starts[b]) : int(starts[b]) + S]
        window = starts[:, None] + torch.arange(S)[None]  # (nb, S)
        return window.to(idx.device), blocks.to(idx.device)

    @staticmethod
    def _taps(n_low: int, n_pad: int, n_crop: int, n_out: int, device):
        # Push an identity through the same two interpolations: column j of the result is the
        # weight of low-res index j for every output index.
        eye = torch.eye(n_low, dtype=torch.float64).view(n_low, 1, n_low, 1)
        up = F.interpolate(eye, (n_pad, 1), mode="bilinear", align_corners=False)[:, :, :n_crop]
        out = F.interpolate(up, (n_out, 1), mode="bilinear", align_corners=False)
        weights = out.view(n_low, n_out).T  # (n_out, n_low), at most 4 non-zeros per row
        k = min(4, n_low)
        w, idx = torch.topk(weights.abs(), k, dim=1)
        w = torch.gather(weights, 1, idx)
        return idx.to(device), w.to(device=device, dtype=torch.float32)

    def __call__(self, logits: torch.Tensor, threshold: Optional[float] = None) -> torch.Tensor:
        """(..., low, low) -> (..., H, W); with ``threshold``, the bool map ``result > threshold``
        computed a few row blocks at a time (the full-size float map is never materialised)."""
        dtype = logits.dtype
        x = logits.float()
        lead = x.shape[:-2]
        L = x.shape[-1]
        x = x.reshape(-1, L, L)
        n = x.shape[0]
        # The row blocks' windows of low-res rows are gathered first, on the small grid (the
        # same rows gathered from the column-upscaled map would be a ~H x W copy)...
        nbr, Sr = self.row_window.shape
        rows = x[:, self.row_window].reshape(-1, L)  # (n*nbr*Sr, L)
        # ...then columns: (nbc, rows, S) @ (nbc, S, bk)...
        nbc, S = self.col_window.shape
        win = rows.index_select(-1, self.col_window.flatten()).view(-1, nbc, S).transpose(0, 1)
        cols = torch.bmm(win, self.col_blocks_t)  # (nbc, rows, bk)
        win = cols.permute(1, 0, 2).reshape(n, nbr, Sr, -1)[..., : self.width]  # (n, nbr, S, W)
        # ...then rows: (nbr, bk, S) @ (n, nbr, S, W).
        if threshold is not None:
            bk = self.row_blocks.shape[1]
            masks = torch.empty(n, self.height, self.width, dtype=torch.bool, device=win.device)
            step = max(1, self._THRESHOLD_ROWS // bk)
            for b0 in range(0, nbr, step):
                b1 = min(nbr, b0 + step)
                part = torch.matmul(self.row_blocks[b0:b1], win[:, b0:b1]).view(n, -1, self.width)
                r0 = b0 * bk
                r1 = min(self.height, b1 * bk)
                torch.gt(part[:, : r1 - r0], threshold, out=masks[:, r0:r1])
            return masks.view(*lead, self.height, self.width)
        out = torch.matmul(self.row_blocks, win)  # (n, nbr, bk, W)
        out = out.reshape(*lead, -1, self.width)[..., : self.height, :]
        return out.to(dtype)


class SamPredictor:
    """Same API as ``segment_anything.SamPredictor``."""

    # ``decode`` may run in several threads at once on one image (segment everything does, on a
    # CPU, with PyTorch single-threaded); the per-image decoder cache is built first
    decode_in_threads = True

    def __init__(self, sam_model: Sam) -> None:
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.image_encoder.img_size)
        self.reset_image()

    # ----------------------------------------------------------------- image
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed an HxWx3 uint8 image (RGB or BGR) for the following ``predict`` calls."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', is {image_format!r}")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"set_image expects an HxWx3 uint8 array, got shape {image.shape} dtype {image.dtype}")
        if min(image.shape[:2]) < 1:
            raise ValueError(f"image is empty: shape {image.shape}")
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        input_image = self.transform.apply_image(image)
        input_image_torch = torch.as_tensor(input_image, device=self.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(input_image_torch, image.shape[:2])

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: Tuple[int, ...]) -> None:
        """Embed a 1x3xHxW image already resized with ``ResizeLongestSide``."""
        size = self.model.image_encoder.img_size
        if not (transformed_image.ndim == 4 and transformed_image.shape[1] == 3 and max(*transformed_image.shape[2:]) == size):
            raise ValueError(f"set_torch_image input must be BCHW with long side {size}, got {tuple(transformed_image.shape)}")
        self.reset_image()
        self.original_size = tuple(int(s) for s in original_image_size)
        self.input_size = tuple(int(s) for s in transformed_image.shape[-2:])
        self.features = self._encode(self.model.preprocess(transformed_image.to(self.device).float()))
        self.is_image_set = True
        self._get_decoder_cache()

    def _encode(self, input_image: torch.Tensor) -> torch.Tensor:
        """(1, 3, S, S) normalised, padded image -> (1, C, h, w) float32 embedding. Other backends
        (ONNX Runtime) override this and nothing else of ``set_torch_image``."""
        encoder_dtype = next(self.model.image_encoder.parameters()).dtype
        return self.model.image_encoder(input_image.to(encoder_dtype)).float()

    def set_embedding(self, features: torch.Tensor, original_size: Sequence[int], input_size: Sequence[int]) -> None:
        """Use a precomputed image embedding (1, C, h, w) instead of running the encoder."""
        pe = self.model.prompt_encoder
        expected = (1, pe.embed_dim, *pe.image_embedding_size)
        if tuple(features.shape) != expected:
            raise ValueError(f"embedding has shape {tuple(features.shape)}, this model expects {expected}")
        size = self.model.image_encoder.img_size
        exp_input = ResizeLongestSide.get_preprocess_shape(int(original_size[0]), int(original_size[1]), size)
        if tuple(int(s) for s in input_size) != exp_input:
            raise ValueError(f"input_size {tuple(input_size)} does not match original_size {tuple(original_size)} for this model")
        self.reset_image()
        self.features = features.to(self.device, torch.float32)
        self.original_size = tuple(int(s) for s in original_size)
        self.input_size = exp_input
        self.is_image_set = True
        self._get_decoder_cache()

    # --------------------------------------------------------------- prompts
    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks (C, H, W) at the original size, scores (C,), low-res logits (C, 256, 256).

        point_coords: (N, 2) xy pixels; point_labels: (N,) 1 foreground, 0 background;
        box: (4,) xyxy; mask_input: (1, 256, 256) logits from a previous call.
        """
        prompts = self._prompt_tensors(point_coords, point_labels, box, mask_input)
        masks, iou, low_res = self.predict_torch(*prompts, multimask_output, return_logits=return_logits)
        return masks[0].cpu().numpy(), iou[0].cpu().numpy(), low_res[0].cpu().numpy()

    def predict_best(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        return_logits: bool = False,
        return_low_res: bool = True,
    ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """The best of ``predict``'s three candidates (``multimask_output=True``): the one with the
        highest predicted IoU, as ``i = argmax(scores)`` picks it, returned as mask (1, H, W),
        score (1,), low-res logits (1, 256, 256) (the next click's ``mask_input``).

        An interactive click shows that one mask; here the IoU head picks it before the output
        upscaling, so the other two are never upscaled or resized to the image (segany's own API;
        the official package has no such call).

        ``return_low_res=False``: no low-res logits (the third value is None), for tools that
        prompt again with all their clicks instead of feeding the logits back (as the official
        web demo does). Then the part of the mask that lies in the input's padding, which the
        mask at the image's size never reads, is not computed either: for a 3:2 photo a third
        of the output upscaling (none for a square one). The mask and score are the same."""
        prompts = self._prompt_tensors(point_coords, point_labels, box, mask_input)
        visible = None if return_low_res else self._visible_embedding()
        low_res, iou = self.decode(*prompts, multimask_output=True, best_only=True, visible=visible)
        if return_logits:
            masks = self.upscale(low_res)
        else:
            masks = self.upscale(low_res, threshold=self.model.mask_threshold)
        return masks[0].cpu().numpy(), iou[0].cpu().numpy(), low_res[0].cpu().numpy() if return_low_res else None

    def _visible_embedding(self) -> Tuple[int, int]:
        """The embedding rows and columns whose low-res logits the upscale to the original size
        reads (see ``segany.upscale.used_extent``)."""
        from .upscale import used_extent

        h, w = self.features.shape[-2:]
        n_low = self.model.prompt_encoder.mask_input_size[0]
        rows, cols = used_extent(n_low, self.model.image_encoder.img_size, tuple(self.input_size), tuple(self.original_size))
        return -(-rows * h // n_low), -(-cols * w // n_low)

    def _prompt_tensors(self, point_coords, point_labels, box, mask_input):
        """``predict``'s numpy prompts, checked (``PromptError`` names the bad one), as the input
        frame's tensors for ``predict_torch``/``decode``."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        coords_t = labels_t = box_t = mask_t = None
        if point_coords is not None:
            if point_labels is None:
                raise PromptError("point_labels must be supplied if point_coords is supplied.")
            pc = _numbers("point_coords", point_coords)
            pl = np.asarray(point_labels)
            if pc.ndim != 2 or pc.shape[1] != 2:
                raise PromptError(f"point_coords must have shape (N, 2), got {pc.shape}")
            if pl.shape != (pc.shape[0],):
                raise PromptError(f"point_labels must have shape ({pc.shape[0]},), got {pl.shape}")
            _finite("point_coords", pc)
            _finite("point_labels", _numbers("point_labels", pl))
            if not ((pl == 1) | (pl == 0) | (pl == -1)).all():  # (np.isin: ~70 us of a click's Python time)
                raise PromptError(f"point_labels must be 1 (foreground), 0 (background) or -1 (ignore), got {np.unique(pl).tolist()}")
            _check_in_image("point", pc, self.original_size)
            pc = self.transform.apply_coords(pc, self.original_size)
            coords_t = torch.as_tensor(pc, dtype=torch.float, device=self.device)[None]
            labels_t = torch.as_tensor(pl.astype(np.int64), dtype=torch.int, device=self.device)[None]
        elif point_labels is not None:
            raise PromptError("point_labels given without point_coords")
        if box is not None:
            b = _numbers("box", box)
            if b.size != 4:
                raise PromptError(f"box must have 4 values (x0, y0, x1, y1), got shape {b.shape}")
            b = b.reshape(4)
            _finite("box", b)
            if b[2] < b[0] or b[3] < b[1]:
                raise PromptError(f"box must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, got {b.tolist()}")
            _check_in_image("box corner", b.reshape(2, 2), self.original_size)
            b = self.transform.apply_boxes(b, self.original_size)
            box_t = torch.as_tensor(b, dtype=torch.float, device=self.device)
        if mask_input is not None:
            m = _numbers("mask_input", mask_input, np.float32)
            exp = (1, *self.model.prompt_encoder.mask_input_size)
            if m.shape != exp:
                raise PromptError(f"mask_input must have shape {exp} (low-res logits of a previous prediction), got {m.shape}")
            _finite("mask_input", m)
            mask_t = torch.as_tensor(m, device=self.device)[None]
        return coords_t, labels_t, box_t, mask_t

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prompts already in the input frame: point_coords (B, N, 2), point_labels (B, N),
        boxes (B, 4), mask_input (B, 1, 256, 256). Returns masks (B, C, H, W), iou (B, C),
        low-res logits (B, C, 256, 256)."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        low_res, iou = self.decode(point_coords, point_labels, boxes, mask_input, multimask_output)
        if return_logits:
            return self.upscale(low_res), iou, low_res
        return self.upscale(low_res, threshold=self.model.mask_threshold), iou, low_res

    def decode(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        iou_thresh: Optional[float] = None,
        *,
        scratch_masks: bool = False,
        best_only: bool = False,
        visible: Optional[Tuple[int, int]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder only: low-res logits (B, C, 4h, 4w) and iou (B, C).

        With ``iou_thresh``, only the masks with predicted IoU above it are upscaled and returned,
        as (K, 4h, 4w) in (prompt, mask) order; with ``scratch_masks`` the logits may live in the
        thread's decoder workspace until its next decoder call; with ``best_only`` (C = 1) each
        prompt's candidate with the highest predicted IoU; with ``visible`` (rows, cols of the
        embedding) only the logits the upscale to the image reads are needed, the rest may be
        left zero (see ``predict_masks_fast``)."""
        points = (point_coords, point_labels) if point_coords is not None else None
        pe = self.model.prompt_encoder
        with torch.no_grad():
            # Prompt-independent decoder work is done once per image (see fast_decoder); a mask
            # prompt's image tokens are the cached ones plus a low-rank product.
            if mask_input is not None and (mask_input.ndim != 4 or mask_input.shape[1] != 1
                                           or tuple(mask_input.shape[-2:]) != tuple(pe.mask_input_size)):
                raise PromptError(f"mask_input must have shape (B, 1, {pe.mask_input_size[0]}, {pe.mask_input_size[1]}) "
                                  f"(low-res logits of a previous prediction), got {tuple(mask_input.shape)}")
            factor = None if mask_input is None else mask_prompt_factor(pe, mask_input)
            if mask_input is None or factor is not None:
                sparse, _ = pe(points=points, boxes=boxes, masks=None)
                if factor is not None and sparse.shape[0] != mask_input.shape[0]:
                    n, m = sparse.shape[0], mask_input.shape[0]
                    if sparse.shape[1] == 0:  # masks alone: no sparse tokens
                        sparse = sparse.expand(m, -1, -1)
                    elif m == 1:  # one mask for every prompt, as the official decoder broadcasts it
                        factor = tuple(f.expand(n, -1, -1) for f in factor)
                    else:
                        raise ValueError(f"{n} point/box prompts but {m} mask prompts")
                return predict_masks_fast(
                    self.model.mask_decoder, sparse, self._get_decoder_cache(), multimask_output=multimask_output,
                    iou_thresh=iou_thresh, scratch_masks=scratch_masks, best_only=best_only, mask_factor=factor,
                    visible=visible,
                )
            sparse, dense = pe(points=points, boxes=boxes, masks=mask_input)
            return predict_masks_fast(
                self.model.mask_decoder,
                sparse,
                image_embeddings=self.features,
                image_pe=pe.get_dense_pe(),
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
                iou_thresh=iou_thresh,
                scratch_masks=scratch_masks,
                best_only=best_only,
                visible=visible,
            )

    def _get_decoder_cache(self):
        """Prompt-independent decoder state for the current embedding: built once per image, and
        again when what it was made from changes (``fast_decoder.cache_current``: the weights,
        the embedding overwritten in place; the official predictor reads the weights on every
        call, so a decoder fine-tuned or reloaded after ``set_image`` must give its new masks here
        too)."""
        kept = self._decoder_cache
        if kept is None or kept[0] is not self.features or not decoder_cache_current(kept[1]):
            pe = self.model.prompt_encoder
            with torch.no_grad():
                cache = build_decoder_cache(self.model.mask_decoder, self.features, pe.get_dense_pe(), pe.no_mask_embed.weight,
                                            prompt_encoder=pe)
            self._decoder_cache = kept = (self.features, cache)
        return kept[1]

    def upscale(self, low_res_logits: torch.Tensor, threshold: Optional[float] = None) -> torch.Tensor:
        """Low-res logits (..., 4h, 4w) -> logits at the original image size (..., H, W), or with
        ``threshold`` the bool masks ``logits > threshold``."""
        if self._resize is None:
            args = (low_res_logits.shape[-1], self.model.image_encoder.img_size, self.input_size, self.original_size)
            native = None
            if low_res_logits.device.type == "cpu" and kernels.available():
                # the fused native kernel, with segment-everything's taps (same bits as its masks)
                native = CellUpscaler(*args).native()
            self._resize = native if native is not None else _SeparableResize(*args, self.device)
        return self._resize(low_res_logits, threshold)

    def get_image_embedding(self) -> torch.Tensor:
        """The (1, C, h, w) embedding of the current image."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return self.features

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features = None
        self.orig_h = self.orig_w = self.input_h = self.input_w = None
        self.original_size = None
        self.input_size = None
        self._resize = None
        self._decoder_cache = None


@dataclass
class Prediction:
    """Result of ``Segmenter.predict``: masks (C, H, W) bool, scores (C,), logits (C, 256, 256)
    low-res, to feed back as ``mask=`` on the next click."""

    masks: np.ndarray
    scores: np.ndarray
    logits: np.ndarray

    @property
    def best(self) -> np.ndarray:
        """The mask with the highest predicted IoU, (H, W) bool."""
        return self.masks[int(np.argmax(self.scores))]

    @property
    def best_logits(self) -> np.ndarray:
        """Low-res logits (1, 256, 256) of the best mask, ready for the next ``mask=``."""
        i = int(np.argmax(self.scores))
        return self.logits[i : i + 1]


class Segmenter:
    """segany's own interactive API.

    >>> seg = Segmenter("tiny")                    # bundled model; or "vit_b", or a checkpoint path
    >>> seg.set_image("photo.jpg")                 # path, PIL image or HxWx3 uint8 array
    >>> p = seg.predict(points=[(120, 80)])        # labels default to foreground
    >>> p = seg.predict(points=[(120, 80), (40, 40)], labels=[1, 0], mask=p.best_logits)
    >>> seg.save_embedding("photo.emb.pt")         # reuse later with load_embedding
    """

    BACKENDS = ("torch", "torch-int8", "onnxruntime", "onnxruntime-int8")

    def __init__(
        self,
        model: Union[str, Sam] = "tiny",
        device: Optional[str] = None,
        checkpoint: Optional[str] = None,
        backend: str = "torch",
        onnx_dir: Optional[str] = None,
    ) -> None:
        """``backend``: "torch" (default, fastest float32 here), "onnxruntime" (same masks),
        or their opt-in int8 variants "torch-int8" / "onnxruntime-int8" (approximate masks).
        ``onnx_dir``: an ``export_onnx`` folder of this model for the onnxruntime backends
        (default: exported to a temporary folder)."""
        if backend not in self.BACKENDS:
            raise ValueError(f"backend must be one of {self.BACKENDS}, got {backend!r}")
        if isinstance(model, Sam):
            sam = model if device is None else model.to(device)
            self.model_name = getattr(model, "model_name", "custom")
        else:
            from .checkpoints import load_model

            sam = load_model(model, checkpoint=checkpoint, device=device)
            self.model_name = getattr(sam, "model_name", model)
        self.backend = backend
        self._image: Optional[np.ndarray] = None  # the embedded image, for snap_edges
        if backend == "torch":
            self.predictor = SamPredictor(sam)
        elif backend == "torch-int8":
            from .quantize import quantize_model

            self.predictor = SamPredictor(quantize_model(sam))
        else:
            from .onnx import OnnxPredictor

            self.predictor = OnnxPredictor(sam, onnx_dir=onnx_dir, int8=backend == "onnxruntime-int8")

    @property
    def model(self) -> Sam:
        return self.predictor.model

    def set_image(self, image: ImageLike) -> np.ndarray:
        """Embed an image; returns it as the HxWx3 uint8 RGB array that was embedded."""
        from .io import load_image

        arr = load_image(image)
        self.predictor.set_image(arr)
        self._image = arr
        return arr

    def predict(
        self,
        points: Optional[Sequence[Sequence[float]]] = None,
        labels: Optional[Sequence[int]] = None,
        box: Optional[Sequence[float]] = None,
        mask: Optional[np.ndarray] = None,
        multimask: Optional[bool] = None,
        snap_edges: bool = False,
        best: bool = False,
    ) -> Prediction:
        """Points (N, 2) xy with labels (default all 1), a box xyxy, and/or previous low-res logits.

        ``multimask`` defaults to True for a single point without box (an ambiguous prompt, as in
        the paper) and False otherwise. ``snap_edges``: snap the masks' outlines to the image's edges
        (:mod:`segany.edges`; not SAM's output, opt-in; needs the pixels: ``set_image``, or
        ``load_embedding(path, image=...)``). Scores and logits are the model's either way.
        ``best``: only the candidate with the highest score (one mask; with ``multimask`` the
        others are never upscaled: ``SamPredictor.predict_best``)."""
        pc = None if points is None or len(points) == 0 else np.asarray(points, dtype=np.float64)
        pl = None
        if pc is not None:
            pl = np.ones(len(pc), dtype=np.int64) if labels is None else np.asarray(labels)
        if multimask is None:
            multimask = box is None and (pc is None or len(pc) == 1)
        b = None if box is None else np.asarray(box, dtype=np.float64)
        if mask is not None:
            mask = np.asarray(mask, dtype=np.float32)
            if mask.ndim == 2:
                mask = mask[None]
        if snap_edges and getattr(self, "_image", None) is None:
            raise RuntimeError("snap_edges needs the image itself: call set_image, or load_embedding(path, image=...)")
        if best and multimask:
            masks, scores, logits = self.predictor.predict_best(pc, pl, b, mask, return_logits=snap_edges)
        else:
            masks, scores, logits = self.predictor.predict(pc, pl, b, mask, multimask_output=multimask, return_logits=snap_edges)
        if snap_edges:
            from . import edges

            masks = edges.snap_to_edges(self._image, masks, edges.logit_radius(self._image.shape, logits.shape[-1]))
        return Prediction(masks=masks, scores=scores, logits=logits)

    def save_embedding(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Write the current image embedding (with sizes and model name) atomically."""
        from .io import atomic_torch_save

        p = self.predictor
        if not p.is_image_set:
            raise RuntimeError("set an image before saving its embedding")
        atomic_torch_save(
            {
                "features": p.features.cpu(),
                "original_size": torch.tensor(p.original_size),
                "input_size": torch.tensor(p.input_size),
                "model": self.model_name,
            },
            path,
        )

    def load_embedding(self, path: Union[str, "os.PathLike[str]"], image: Optional[np.ndarray] = None) -> None:
        """Use an embedding written by ``save_embedding`` (or ``segany embed``). ``image``: the
        HxWx3 uint8 RGB picture it was made from, if at hand (``predict(snap_edges=True)`` needs it)."""
        data = load_embedding_file(path)
        if image is not None and tuple(np.asarray(image).shape[:2]) != tuple(data["original_size"]):
            h, w = data["original_size"]
            raise ValueError(f"{path}: embedding was made from a {w}x{h} image, the image given is {image.shape[1]}x{image.shape[0]}")
        self._image = image
        if data["model"] not in (self.model_name, "custom") and self.model_name != "custom":
            raise ValueError(f"{path}: embedding was made with model {data['model']!r}, this segmenter uses {self.model_name!r}")
        self.predictor.set_embedding(data["features"], data["original_size"], data["input_size"])


def load_embedding_file(path: Union[str, "os.PathLike[str]"]) -> dict:
    """Read an embedding file safely (``weights_only``); clear error if it is not one."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle errors, truncation, not a torch file
        raise ValueError(f"{path}: not a segany embedding file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not {"features", "original_size", "input_size"} <= set(data):
        raise ValueError(f"{path}: not a segany embedding file (missing features/original_size/input_size)")
    return {
        "features": data["features"].float(),
        "original_size": tuple(int(v) for v in data["original_size"].tolist()),
        "input_size": tuple(int(v) for v in data["input_size"].tolist()),
        "model": str(data.get("model", "custom")),
    }
