"""ONNX export of SAM (image encoder; prompt encoder + mask decoder) and an onnxruntime-backed
predictor with ``SamPredictor``'s API.

``segany export-onnx --model vit_b -o out/`` writes:

* ``encoder.onnx``: ``image`` (1, 3, S, S) normalised, zero-padded (``Sam.preprocess``) ->
  ``image_embeddings`` (1, C, h, w).
* ``decoder.onnx``: the official ``SamOnnxModel`` interface: ``image_embeddings``,
  ``point_coords`` (B, N, 2) in the resized-input frame, ``point_labels`` (B, N) (1 fg, 0 bg,
  -1 padding, 2/3 box corners), ``mask_input`` (B, 1, 4h, 4w), ``has_mask_input`` (1,), and with
  postprocessing (the default) ``orig_im_size`` (2,) -> ``masks`` at the original size,
  ``iou_predictions`` (B, 4), ``low_res_masks`` (B, 4, 4h, 4w). The number of points and the
  batch are dynamic. ``--no-postprocess`` leaves out ``orig_im_size``/``masks``.

``OnnxPredictor`` runs both in onnxruntime and upscales with the same separable map as
``SamPredictor``; its masks equal the PyTorch ones up to float32 rounding. With ``int8=True`` it
uses onnxruntime's dynamic int8 quantisation of both files (``segany.quantize.quantize_onnx``).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .modeling import Sam
from .predictor import SamPredictor

OPSET = 17


class SamOnnxDecoder(nn.Module):
    """Prompt encoder + mask decoder (+ optional upscaling to the original size), traceable."""

    def __init__(self, model: Sam, postprocess: bool = True) -> None:
        super().__init__()
        self.model = model
        self.img_size = model.image_encoder.img_size
        self.postprocess = postprocess

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.model.prompt_encoder
        coords = (coords + 0.5) / self.img_size
        emb = pe.pe_layer._pe_encoding(coords)
        labels = labels.unsqueeze(-1).expand_as(emb)
        emb = emb * (labels != -1)
        emb = emb + pe.not_a_point_embed.weight * (labels == -1)
        for i in range(pe.num_point_embeddings):
            emb = emb + pe.point_embeddings[i].weight * (labels == i)
        return emb

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        pe = self.model.prompt_encoder
        emb = has_mask_input * pe.mask_downscaling(mask_input)
        return emb + (1 - has_mask_input) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def _upscale(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        size = orig_im_size.to(torch.float32)
        pre = torch.floor(size * (self.img_size / torch.max(size)) + 0.5).to(torch.int64)
        masks = masks[..., : pre[0], : pre[1]]
        orig = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(orig[0], orig[1]), mode="bilinear", align_corners=False)

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input, orig_im_size=None):
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        masks, scores = self.model.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        if self.postprocess:
            return self._upscale(masks, orig_im_size), scores, masks
        return scores, masks


def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


@torch.no_grad()
def export_onnx(model: Sam, out_dir, postprocess: bool = True, encoder: bool = True) -> dict:
    """Write ``encoder.onnx`` and ``decoder.onnx`` (and ``onnx.json``) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().float()
    S = model.image_encoder.img_size
    pe = model.prompt_encoder
    C = pe.embed_dim
    h, w = pe.image_embedding_size
    files = {}
    if encoder:
        _export(
            model.image_encoder, (torch.randn(1, 3, S, S),), out / "encoder.onnx",
            ["image"], ["image_embeddings"], None,
        )
        files["encoder"] = "encoder.onnx"
    dec = SamOnnxDecoder(model, postprocess=postprocess).eval()
    args = (
        torch.randn(1, C, h, w),
        torch.randint(0, S, (1, 3, 2), dtype=torch.float),
        torch.tensor([[1, 0, -1]], dtype=torch.float),
        torch.randn(1, 1, 4 * h, 4 * w),
        torch.tensor([1.0]),
    )
    inputs = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"]
    dyn = {"point_coords": {0: "batch", 1: "num_points"}, "point_labels": {0: "batch", 1: "num_points"},
           "mask_input": {0: "mask_batch"}}
    if postprocess:
        args = args + (torch.tensor([S * 3 // 4, S], dtype=torch.float),)
        inputs.append("orig_im_size")
        outputs = ["masks", "iou_predictions", "low_res_masks"]
        dyn.update({"masks": {0: "batch", 2: "height", 3: "width"}, "iou_predictions": {0: "batch"}, "low_res_masks": {0: "batch"}})
    else:
        outputs = ["iou_predictions", "low_res_masks"]
        dyn.update({"iou_predictions": {0: "batch"}, "low_res_masks": {0: "batch"}})
    _export(dec, args, out / "decoder.onnx", inputs, outputs, dyn)
    files["decoder"] = "decoder.onnx"
    meta = {
        "image_size": S,
        "embed_dim": C,
        "embedding_size": [h, w],
        "postprocess": postprocess,
        "pixel_mean": model.pixel_mean.flatten().tolist(),
        "pixel_std": model.pixel_std.flatten().tolist(),
        "mask_threshold": float(model.mask_threshold),
        "files": files,
    }
    (out / "onnx.json").write_text(json.dumps(meta, indent=2))
    return meta


def _session(path: Path, threads: Optional[int] = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _check_export_fits(d: Path, model: Sam) -> None:
    """An export of another model (e.g. an older checkpoint) fails deep inside onnxruntime with a
    shape error; compare the sizes its onnx.json records with ``model`` first."""
    meta_path = d / "onnx.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{d}: no onnx.json here; write the export with `segany export-onnx` (or export_onnx)")
    meta = json.loads(meta_path.read_text())
    want = {"image_size": int(model.image_encoder.img_size), "embed_dim": int(model.prompt_encoder.embed_dim),
            "embedding_size": [int(v) for v in model.prompt_encoder.image_embedding_size]}
    got = {k: meta.get(k) for k in want}
    if got != want:
        raise ValueError(f"{d}: the ONNX export is of another model ({got}) than the one given ({want}); export this model again")


class OnnxPredictor(SamPredictor):
    """``SamPredictor`` whose encoder and decoder run in onnxruntime.

    ``onnx_dir`` holds the files of ``export_onnx`` for this model; without it the model is
    exported to a temporary folder first. The PyTorch model supplies sizes and preprocessing."""

    decode_in_threads = False  # onnxruntime has its own thread pool per session

    def __init__(self, sam_model: Sam, onnx_dir=None, threads: Optional[int] = None, int8: bool = False) -> None:
        super().__init__(sam_model)
        if onnx_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="segany-onnx-")
            onnx_dir = self._tmp.name
            export_onnx(sam_model, onnx_dir, postprocess=False)
        d = Path(onnx_dir)
        self.onnx_dir = d
        _check_export_fits(d, sam_model)
        enc, dec = d / "encoder.onnx", d / "decoder.onnx"
        if int8:
            from .quantize import quantize_onnx

            q = quantize_onnx(d)
            enc, dec = q["encoder"], q["decoder"]
        self.encoder_session = _session(enc, threads)
        self.decoder_session = _session(dec, threads)
        self._dec_inputs = {i.name for i in self.decoder_session.get_inputs()}

    def _encode(self, input_image: torch.Tensor) -> torch.Tensor:
        (emb,) = self.encoder_session.run(["image_embeddings"], {"image": input_image.cpu().numpy()})
        return torch.from_numpy(emb)

    def _get_decoder_cache(self):
        return None  # the ONNX decoder runs whole; the torch fast path's per-image cache is unused

    def decode(self, point_coords, point_labels, boxes=None, mask_input=None, multimask_output=True, iou_thresh=None,
               *, scratch_masks=False, best_only=False, visible=None):
        # scratch_masks: the caller would accept workspace memory; these results are always fresh;
        # visible: the caller reads only that part of the logits; the exported decoder makes all
        if best_only:  # the exported decoder gives all candidates; the best is picked from them
            if iou_thresh is not None:
                raise ValueError("best_only and iou_thresh do not combine")
            low, iou = self.decode(point_coords, point_labels, boxes, mask_input, multimask_output)
            best = iou.argmax(1, keepdim=True)
            return low.gather(1, best[:, :, None, None].expand(-1, -1, *low.shape[2:])), iou.gather(1, best)
        bs = next((t.shape[0] for t in (point_coords, boxes, mask_input) if t is not None), 1)
        if bs > 1:  # the exported decoder takes one prompt (batch 1, like the official export)
            part = lambda t, i: None if t is None else t[i : i + 1]
            outs = [self.decode(part(point_coords, i), part(point_labels, i), part(boxes, i), part(mask_input, i), multimask_output)
                    for i in range(bs)]
            low, iou = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
            return (low[iou > iou_thresh] if iou_thresh is not None else low), iou
        coords, labels = [], []
        if point_coords is not None:
            coords.append(point_coords.float())
            labels.append(point_labels.float())
            if boxes is None:
                coords.append(torch.zeros(bs, 1, 2))
                labels.append(-torch.ones(bs, 1))
        if boxes is not None:
            coords.append(boxes.float().reshape(-1, 2, 2))
            labels.append(torch.tensor([[2.0, 3.0]]).expand(bs, 2))
        if not coords:  # no sparse prompt: the reference then has zero point tokens
            coords.append(torch.zeros(bs, 0, 2))
            labels.append(torch.zeros(bs, 0))
        h, w = self.model.prompt_encoder.mask_input_size
        feed = {
            "image_embeddings": self.features.cpu().numpy(),
            "point_coords": torch.cat(coords, 1).cpu().numpy().astype(np.float32),
            "point_labels": torch.cat(labels, 1).cpu().numpy().astype(np.float32),
            "mask_input": (mask_input.float().cpu().numpy() if mask_input is not None else np.zeros((1, 1, h, w), np.float32)),
            "has_mask_input": np.array([1.0 if mask_input is not None else 0.0], np.float32),
        }
        if "orig_im_size" in self._dec_inputs:
            feed["orig_im_size"] = np.array(self.original_size, np.float32)
        iou, low = self.decoder_session.run(["iou_predictions", "low_res_masks"], feed)
        sl = slice(1, None) if multimask_output else slice(0, 1)
        low, iou = torch.from_numpy(low[:, sl]).to(self.device), torch.from_numpy(iou[:, sl]).to(self.device)
        if iou_thresh is not None:  # same contract as SamPredictor.decode: only the kept masks
            low = low[iou > iou_thresh]
        return low, iou


# ------------------------------------------------------------------------------------ CLI
def _cmd_export(args: argparse.Namespace) -> int:
    from .checkpoints import load_model

    model = load_model(args.model, checkpoint=args.checkpoint)
    meta = export_onnx(model, args.output, postprocess=not args.no_postprocess, encoder=not args.decoder_only)
    for name in meta["files"].values():
        p = Path(args.output) / name
        print(f"wrote {p} ({os.path.getsize(p) / 2**20:.1f} MiB)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export-onnx",
        help="export the image encoder and the prompt decoder as ONNX",
        description="Write encoder.onnx and decoder.onnx (the official SamOnnxModel interface: dynamic "
        "number of points, has_mask_input flag, optional upscaling to orig_im_size) for onnxruntime.",
    )
    p.add_argument("--model", default="tiny", help="model name (see 'segany models') or checkpoint path")
    p.add_argument("--checkpoint", default=None, help="checkpoint file for the model")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--no-postprocess", action="store_true", help="decoder outputs low-res masks only (no orig_im_size input)")
    p.add_argument("--decoder-only", action="store_true", help="skip the image encoder")
    p.set_defaults(func=_cmd_export)
