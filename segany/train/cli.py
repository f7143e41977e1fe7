"""``segany train``: train from scratch or fine-tune a SAM-family model.

Examples::

    segany train --data ../shared/data/coco128 --data ../shared/data/horses:0.5 \\
        --model tiny --steps 3000 --out runs/tiny --export segany/weights/tiny.safetensors
    segany train --data my_set --init segany/weights/tiny.safetensors --freeze-image-encoder
    torchrun --nproc_per_node 4 -m segany.cli train ...   # multi-GPU (DDP), add --amp
"""
from __future__ import annotations

import argparse
import json
import os

from .loop import TrainConfig, TrainSetupError, train


def _model_config(spec: str | None):
    """A registry name (tiny, vit_b, vit_t, ...), a config JSON file, or a JSON string."""
    from ..checkpoints import VARIANTS

    if spec is None:
        return {}
    if spec in VARIANTS:
        return json.loads(json.dumps(VARIANTS[spec].config))
    if os.path.exists(spec):
        with open(spec) as f:
            return json.load(f)
    try:
        return json.loads(spec)
    except json.JSONDecodeError:
        from ..cli import UsageError

        raise UsageError(
            f"--model {spec!r} is neither a known model ({', '.join(sorted(VARIANTS))}), "
            "an existing config file, nor a JSON config"
        ) from None


def run(args: argparse.Namespace) -> int:
    cfg = TrainConfig(
        data=args.data, out=args.out, model=_model_config(args.model), init=args.init,
        imagenet_backbone=not args.no_imagenet, resume=args.resume, export=args.export,
        steps=args.steps, time_budget_min=args.time_budget_min, objects_per_image=args.objects,
        images_per_step=args.images_per_step, batch_images=args.batch_images, iters=args.iters, grad_iters=args.grad_iters,
        p_box=args.p_box, p_center_click=args.p_center_click, mask_drop=args.mask_drop, focal_weight=args.focal_weight, focal_alpha=args.focal_alpha, focal_gamma=args.focal_gamma, min_object_area=args.min_object_area, lr=args.lr, backbone_lr_mult=args.backbone_lr_mult, weight_decay=args.weight_decay,
        warmup_steps=args.warmup, freeze_image_encoder=args.freeze_image_encoder,
        freeze_prompt_encoder=args.freeze_prompt_encoder, freeze_backbone_blocks=args.freeze_backbone_blocks, val_every=args.val_every, val_images=args.val_images,
        ckpt_every_s=args.ckpt_every_s, seed=args.seed, threads=args.threads, amp=args.amp,
        progress=not args.no_progress,
    )
    if not cfg.model and not cfg.init and not (cfg.resume and os.path.exists(os.path.join(cfg.out, "last.pt"))):
        cfg.model = _model_config("tiny")  # (a resumed run takes its saved model config in train())
    try:
        result = train(cfg)
    except TrainSetupError as e:
        from ..cli import UsageError

        raise UsageError(str(e)) from None
    print(json.dumps(result))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train or fine-tune a model (SAM recipe)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", required=True, help="data set path[:weight] (COCO JSON/folder, SA-1B folder, images+masks folder); repeat to mix")
    p.add_argument("--model", default=None, help="a registry name (tiny, vit_b, vit_l, vit_h, vit_t), a config JSON file or a JSON string (default: tiny, or the --init file's config)")
    p.add_argument("--init", default=None, help="weights to start from (.safetensors with config, or .pt state dict)")
    p.add_argument("--no-imagenet", action="store_true", help="efficientnet encoder: do not start from ImageNet weights")
    p.add_argument("--out", default="runs/train", help="run folder (log.jsonl, last.pt, best.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.add_argument("--export", default=None, help="also write the best model to this .safetensors")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--time-budget-min", type=float, default=0.0, help="stop after this much training time (LR schedule follows)")
    p.add_argument("--objects", type=int, default=8, help="objects per image per step (share one embedding)")
    p.add_argument("--images-per-step", type=int, default=1)
    p.add_argument("--batch-images", action="store_true",
                   help="the step's images in one encoder batch and all their objects in one decoder batch (for GPUs; "
                        "default: one image after the other, gradients accumulated)")
    p.add_argument("--iters", type=int, default=11, help="decoder passes per object (paper: 11)")
    p.add_argument("--grad-iters", type=int, default=2, help="passes that get a loss")
    p.add_argument("--p-box", type=float, default=0.5)
    p.add_argument("--p-center-click", type=float, default=0.0, help="fraction of objects clicked like the evaluation's simulated user (object centre, then the deepest error point) instead of uniformly (paper)")
    p.add_argument("--mask-drop", type=float, default=0.0, help="probability that a later pass gets no previous-logits mask prompt")
    p.add_argument("--focal-weight", type=float, default=20.0, help="mask loss = w x focal + 1 x dice (paper: 20)")
    p.add_argument("--focal-alpha", type=float, default=0.25)
    p.add_argument("--focal-gamma", type=float, default=2.0, help="focusing exponent; 0 (with --focal-alpha 0.5 --focal-weight 2) is plain cross-entropy")
    p.add_argument("--min-object-area", type=int, default=100, help="skip objects smaller than this many pixels in the model frame")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--backbone-lr-mult", type=float, default=0.25)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--freeze-image-encoder", action="store_true")
    p.add_argument("--freeze-prompt-encoder", action="store_true")
    p.add_argument("--freeze-backbone-blocks", type=int, default=0, help="efficientnet: freeze the stem and the first N of 16 blocks")
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--val-images", type=int, default=60)
    p.add_argument("--ckpt-every-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="segany")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
