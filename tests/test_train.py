"""Training: the recipe's pieces, export round trip, and a tiny end-to-end run that must learn."""
import json
import os

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from segany.modeling.build import build_sam
from segany.modeling.efficientnet import EfficientNetEncoder
from segany.train import augment as A
from segany.train.export import load_safetensors, read_safetensors, save_safetensors
from segany.train.loop import TrainConfig, lr_at, train
from segany.train.objective import center_points, dice_loss, focal_loss, next_clicks, noisy_boxes, sam_loss

TINY = {
    "image_size": 64,
    "prompt_embed_dim": 32,
    "encoder": {"type": "efficientnet", "stride": 8, "neck_depth": 1},
    "decoder": {"depth": 1, "mlp_dim": 64, "num_heads": 2, "iou_head_hidden_dim": 32},
    "mask_in_chans": 8,
}


def make_shapes_set(root, n=240, size=64, seed=0):
    """COCO-RLE set of ``n`` noisy images, each with 1-3 coloured ellipses/rectangles."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, anns = [], []
    for i in range(n):
        img = (rng.integers(0, 40, (size, size, 3)) + rng.integers(0, 200, 3)).astype(np.uint8)
        occupied = np.zeros((size, size), bool)
        for _ in range(rng.integers(1, 4)):
            m = np.zeros((size, size), np.uint8)
            cx, cy = rng.integers(16, size - 16, 2)
            ax, ay = rng.integers(7, 16, 2)
            if rng.random() < 0.5:
                cv2.ellipse(m, (int(cx), int(cy)), (int(ax), int(ay)), float(rng.uniform(0, 180)), 0, 360, 1, -1)
            else:
                cv2.rectangle(m, (int(cx - ax), int(cy - ay)), (int(cx + ax), int(cy + ay)), 1, -1)
            m = m.astype(bool) & ~occupied
            if m.sum() < 60:
                continue
            occupied |= m
            img[m] = rng.integers(0, 256, 3)
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
        name = f"shape_{i:04d}.png"
        cv2.imwrite(os.path.join(root, "images", name), img[..., ::-1])
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
    with open(os.path.join(root, "annotations.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "shape"}]}, f)


def test_encoder_shapes_and_frozen_batchnorm():
    enc = EfficientNetEncoder(img_size=128, out_chans=48)
    assert enc.taps == [4, 10, 15]
    enc.train()
    assert all(not m.training for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = enc._bn0.running_mean.clone()
    y = enc(torch.randn(2, 3, 128, 128))
    assert y.shape == (2, 48, 16, 16)
    assert torch.equal(before, enc._bn0.running_mean)


def test_encoder_stride_16_fuses_all_scales():
    """The bundled model's stride-16 neck: (B, C, S/16, S/16), and the stride-8 features reach it
    (through the 2x2 stride-2 lateral conv), so a change confined to one 8x8 patch shows up."""
    enc = EfficientNetEncoder(img_size=128, out_chans=48, stride=16).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        y = enc(x)
        enc.lateral[0].weight.zero_()
        y_no_fine = enc(x)
    assert y.shape == (1, 48, 8, 8)
    assert not torch.allclose(y, y_no_fine)
    with pytest.raises(ValueError, match="stride"):
        EfficientNetEncoder(img_size=128, out_chans=48, stride=4)
    sam = build_sam({**TINY, "image_size": 128, "encoder": {"type": "efficientnet", "stride": 16, "neck_depth": 1}})
    assert sam.prompt_encoder.image_embedding_size == (8, 8)


@pytest.mark.parametrize("onednn", [True, False])
def test_inference_folds_batchnorm_into_the_convolutions_and_follows_changes(onednn, monkeypatch):
    """Without autograd the backbone runs each convolution with its BatchNorm folded in (the
    bundled model's encoder ~2x faster; ReLU6 inside oneDNN's convolution where it has one, else
    in place): the same function as the modules, also after the statistics change in place (the
    folded weights are rebuilt), and not where hooks watch."""
    from segany.modeling import common

    if onednn and not common.fused_conv_available():
        pytest.skip("this PyTorch has no oneDNN fused convolution")
    monkeypatch.setattr(common, "_fused_conv", onednn)
    from core_helpers import randomize_batchnorm_

    enc = randomize_batchnorm_(EfficientNetEncoder(img_size=128, out_chans=48, stride=16)).eval()
    x = torch.randn(1, 3, 128, 128)

    def modules_output():  # with autograd on, the module path runs
        with torch.enable_grad():
            return enc(x).detach()

    with torch.no_grad():
        folded = enc(x)
        assert enc._folded._value is not None  # the fast path ran and kept its weights
        torch.testing.assert_close(folded, modules_output(), rtol=1e-4, atol=1e-5)
        enc._blocks[3]._bn1.running_var.mul_(3.0)  # a statistic changed in place
        changed = enc(x)
        assert not torch.allclose(changed, folded, atol=1e-4)
        torch.testing.assert_close(changed, modules_output(), rtol=1e-4, atol=1e-5)
        seen = []
        handle = enc._blocks[5].register_forward_hook(lambda m, i, o: seen.append(o.shape))
        hooked = enc(x)
        handle.remove()
    assert len(seen) == 1  # a hook on a block still sees it run
    torch.testing.assert_close(hooked, changed, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_drop", [0.0, 1.0])
def test_mask_drop_withholds_previous_logits(mask_drop):
    from segany.train.loop import object_step

    model = build_sam(TINY).train()
    seen = []
    forward = model.prompt_encoder.forward

    def recording(points, boxes, masks):
        seen.append(masks is not None)
        return forward(points, boxes, masks)

    model.prompt_encoder.forward = recording
    cfg = TrainConfig(model=TINY, iters=4, grad_iters=2, mask_drop=mask_drop)
    gt = torch.zeros(2, 32, 32)  # the decoder's low resolution for TINY
    gt[:, 5:20, 10:25] = 1
    emb = model.image_encoder(model.preprocess(torch.rand(3, 64, 64) * 255)[None])
    loss, _ = object_step(model, emb, gt, torch.ones(1, 32, 32), cfg, np.random.default_rng(0), torch.Generator().manual_seed(0))
    loss.backward()
    assert len(seen) == 4 and seen[0] is False  # the first pass never has a mask prompt
    assert seen[1:] == ([False] * 3 if mask_drop == 1.0 else [True] * 3)


@pytest.mark.parametrize("prompt", ["points+mask", "box"])
def test_passes_without_a_loss_decode_like_the_modules(prompt):
    """The passes that only pick the next click take the inference fast path: the same logits
    and IoU as the modules' single-mask output (the token the next click is taken from)."""
    from segany.train.loop import decode

    model = build_sam({**TINY, "decoder": {**TINY["decoder"], "depth": 2}}).train()
    g = torch.Generator().manual_seed(3)
    emb = model.image_encoder(model.preprocess(torch.rand(3, 64, 64, generator=g) * 255)[None])
    pe = model.prompt_encoder.get_dense_pe()
    if prompt == "box":
        kw = dict(points=None, boxes=torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0, 0.0, 63.0, 30.0]]), masks=None)
    else:
        pts = torch.rand(2, 3, 2, generator=g) * 64
        kw = dict(points=(pts, torch.tensor([[1, 0, 1], [1, 1, -1]])), boxes=None, masks=torch.randn(2, 1, 32, 32, generator=g))
    sparse, dense = model.prompt_encoder(**kw)
    want_logits, want_iou = model.mask_decoder.predict_masks(emb, pe, sparse, dense)
    logits, iou = decode(model, emb, pe, sparse, dense, with_grad=False)
    assert logits.shape == (2, 1, 32, 32) and iou.shape == (2, 1) and not logits.requires_grad
    torch.testing.assert_close(logits, want_logits[:, :1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(iou, want_iou[:, :1], rtol=1e-4, atol=1e-5)
    full, full_iou = decode(model, emb, pe, sparse, dense, with_grad=True)
    assert full.shape == (2, 4, 32, 32) and full.requires_grad


def test_imagenet_keys_match_backbone():
    """Every backbone tensor has the key and shape of the efficientnet-pytorch Lite0 layout."""
    enc = EfficientNetEncoder(img_size=64, out_chans=16)
    keys = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert keys["_blocks.0._depthwise_conv.weight"] == (32, 1, 3, 3)
    assert "_blocks.0._expand_conv.weight" not in keys
    assert keys["_blocks.3._depthwise_conv.weight"] == (144, 1, 5, 5)
    assert keys["_blocks.15._project_conv.weight"] == (320, 1152, 1, 1)
    assert sum(k.startswith("_blocks.") and k.endswith("_project_conv.weight") for k in keys) == 16


def test_losses_and_best_of_multimask():
    gt = torch.zeros(1, 1, 8, 8)
    gt[..., 2:6, 2:6] = 1
    valid = torch.ones(1, 1, 8, 8)
    good = (gt * 20 - 10).expand(1, 1, 8, 8)
    bad = -good
    logits = torch.cat([bad, good, bad], 1)
    assert focal_loss(good, gt, valid).item() < 1e-4 < focal_loss(bad, gt, valid).item()
    assert dice_loss(good, gt, valid).item() < 0.05 and dice_loss(bad, gt, valid).item() > 0.9
    loss, best, actual = sam_loss(logits, torch.tensor([[0.0, 1.0, 0.0]]), gt, valid)
    assert best.tolist() == [1] and torch.allclose(actual, torch.tensor([[0.0, 1.0, 0.0]]))
    assert loss.item() < 0.05
    # ignored pixels do not count
    valid2 = valid.clone()
    valid2[..., 2:6, 2:6] = 0
    all_bg = torch.full((1, 1, 8, 8), -10.0)  # wrong only on the (now ignored) object
    assert focal_loss(all_bg, gt, valid2).item() < 1e-4 < focal_loss(all_bg, gt, valid).item()


def test_corrective_clicks_and_noisy_boxes():
    g = torch.Generator().manual_seed(0)
    gt = torch.zeros(2, 16, 16)
    gt[:, 4:12, 4:12] = 1
    pred = torch.zeros(2, 16, 16, dtype=torch.bool)
    pred[1] = True  # object 1: everything predicted -> only false positives outside
    pred[1, 4:12, 4:12] = True
    xy, lab = next_clicks(pred, gt, torch.ones(1, 16, 16), g)
    assert lab.tolist() == [1, 0]
    x, y = xy[0].long().tolist()
    assert gt[0, y, x] == 1
    x, y = xy[1].long().tolist()
    assert gt[1, y, x] == 0
    boxes = noisy_boxes(gt, 4.0, g, std=0.1, max_px=20)
    assert boxes.shape == (2, 4)
    assert (boxes - torch.tensor([16.0, 16.0, 48.0, 48.0])).abs().max() <= 20


def test_center_clicks_follow_the_evaluation_clicker():
    """Objects marked ``center`` are clicked like segany eval's simulated user: first at the
    object's deepest point, then at the deepest point of the larger error region."""
    from segany.evaluate.metrics import next_click

    g = torch.Generator().manual_seed(0)
    gt = torch.zeros(2, 32, 32)
    gt[:, 4:28, 4:20] = 1
    xy, found = center_points(gt > 0.5)
    assert found.all() and xy[0].tolist() == xy[1].tolist()
    x, y = xy[0].long().tolist()
    assert 10 <= x <= 13 and 10 <= y <= 21  # the middle of the 16-wide, 24-tall box
    pred = torch.zeros(2, 32, 32, dtype=torch.bool)
    pred[:, 4:28, 4:12] = True  # right half of the object missed, and a false blob outside
    pred[:, 26:30, 24:30] = True
    xy, lab = next_clicks(pred, gt, torch.ones(1, 32, 32), g, center=torch.tensor([True, False]))
    want = next_click(pred[0].numpy(), gt[0].numpy() > 0.5)
    assert (int(xy[0, 0]), int(xy[0, 1]), bool(lab[0])) == (want.x, want.y, want.positive) and want.positive
    x, y = xy[1].long().tolist()  # uniform: anywhere in the error region, labelled by it
    assert bool(lab[1]) == bool(gt[1, y, x]) and bool(gt[1, y, x]) != bool(pred[1, y, x])


def test_augment_keeps_masks_aligned():
    rng = np.random.default_rng(0)
    img = np.zeros((40, 60, 3), np.uint8)
    m = np.zeros((40, 60), bool)
    m[10:30, 20:40] = True
    img[m] = 255
    for _ in range(5):
        image, masks, ignore = A.augment(A.as_arrays(img, [m], None), 64, rng, A.as_arrays(img, [m], None))
        assert image.shape[:2] == masks.shape[1:] == ignore.shape and max(image.shape[:2]) <= 64
        for mk in masks:  # object pixels stay bright, background dark
            assert image[mk].mean() > 100
        assert image[~masks.any(0)].mean() < 100 if (~masks.any(0)).any() else True


def test_lr_schedule_warmup_and_steps():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, decay_at=(0.5, 0.9))
    assert lr_at(0, 0.0, cfg) == 0.1
    assert lr_at(20, 0.2, cfg) == 1.0
    assert abs(lr_at(20, 0.6, cfg) - 0.1) < 1e-9
    assert abs(lr_at(20, 0.95, cfg) - 0.01) < 1e-9


def test_safetensors_roundtrip(tmp_path):
    model = build_sam(TINY)
    path = str(tmp_path / "m.safetensors")
    save_safetensors(model, path)
    config, state, meta = read_safetensors(path)
    assert config == TINY and all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    back = load_safetensors(path)
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        a = model.image_encoder(model.preprocess(x[0])[None])
        b = back.image_encoder(back.preprocess(x[0])[None])
    assert torch.allclose(a, b, atol=5e-2)


def test_tiny_training_run_learns(tmp_path):
    """A few hundred steps on generated shapes: validation IoU must rise well above the start."""
    torch.set_num_threads(1)
    data = str(tmp_path / "shapes")
    make_shapes_set(data)
    out = str(tmp_path / "run")
    cfg = TrainConfig(
        data=[data], out=out, model=TINY, imagenet_backbone=False, steps=400, objects_per_image=3,
        iters=3, grad_iters=2, focal_weight=2.0, focal_alpha=0.5, focal_gamma=0.0, lr=1e-3, backbone_lr_mult=1.0,
        warmup_steps=20, val_every=1000, val_images=24, val_objects=3, ckpt_every_s=1e9, progress=False, seed=0,
    )
    result = train(cfg)
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    vals = [r["val"] for r in log if "val" in r]
    start, end = vals[0], vals[-1]
    assert result["step"] == 400 and end["step"] == 400 and end["objects"] >= 30
    assert end["box_miou"] > max(2 * start["box_miou"], start["box_miou"] + 0.1), (start, end)
    assert end["miou@3"] > max(2 * start["miou@3"], start["miou@3"] + 0.1), (start, end)
    # resume continues from last.pt
    assert os.path.exists(os.path.join(out, "last.pt")) and os.path.exists(os.path.join(out, "best.safetensors"))
    cfg2 = TrainConfig(**{**cfg.__dict__, "steps": 405, "resume": True})
    assert train(cfg2)["step"] == 405
    # the exported best model restores with its config
    assert load_safetensors(os.path.join(out, "best.safetensors")).config == TINY


def test_train_subcommand_registers_and_parses():
    import argparse

    from segany.train import cli

    parser = argparse.ArgumentParser(prog="segany")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--data", "a", "--data", "b:0.5", "--freeze-image-encoder",
                              "--freeze-prompt-encoder", "--steps", "7", "--resume"])
    assert args.func is cli.run and args.data == ["a", "b:0.5"] and args.steps == 7
    assert args.freeze_image_encoder and args.freeze_prompt_encoder and args.resume
    assert args.iters == 11 and args.focal_weight == 20.0  # the paper's defaults


def test_freezing_leaves_encoders_untouched(tmp_path):
    from segany.train.loop import param_groups

    model = build_sam(TINY)
    cfg = TrainConfig(freeze_image_encoder=True, freeze_prompt_encoder=True)
    groups = param_groups(model, cfg)
    trainable = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in trainable for p in model.image_encoder.parameters())
    assert not any(id(p) in trainable for p in model.prompt_encoder.parameters())
    assert all(id(p) in trainable for p in model.mask_decoder.parameters())
    cfg = TrainConfig(freeze_backbone_blocks=11)
    model = build_sam(TINY)
    trainable = {id(p) for g in param_groups(model, cfg) for p in g["params"]}
    assert id(model.image_encoder._blocks[10]._project_conv.weight) not in trainable
    assert id(model.image_encoder._blocks[11]._project_conv.weight) in trainable
    assert id(model.image_encoder.lateral[0].weight) in trainable


def test_train_model_option_takes_registry_names_and_rejects_unknown_ones():
    from segany.cli import UsageError
    from segany.train.cli import _model_config

    assert _model_config("vit_b")["encoder"]["embed_dim"] == 768
    assert _model_config("tiny")["encoder"]["type"] == "efficientnet"
    with pytest.raises(UsageError, match="neither a known model"):
        _model_config("vit_q")


_DDP_WORKER = r"""
import json, sys, torch
import segany.train.loop as L
from tests.test_train import TINY
import hashlib
import segany.datasets as D
models, samples = [], []
build = L.build_model
L.build_model = lambda cfg, **kw: models.append(build(cfg, **kw)) or models[-1]  # keep the rank's model to compare
draw = D.Mixture.sample
def sample(self, rng):  # note which images the rank draws
    s = draw(self, rng)
    samples.append(hashlib.sha1(L.A.as_arrays(*s)[0].tobytes()).hexdigest()[:12])
    return s
D.Mixture.sample = sample
torch.set_num_threads(1)
cfg = L.TrainConfig(**json.loads(sys.argv[1]))
result = L.train(cfg)
rank = int(__import__("os").environ["RANK"])
torch.save({"step": result["step"], "state": models[-1].state_dict(), "samples": samples}, sys.argv[2] + f".rank{rank}")
"""


def _run_ddp(tmp_path, cfg: dict, tag: str, world: int = 2):
    """``train(cfg)`` on ``world`` CPU processes (gloo), as torchrun would start them; returns
    each rank's final step and state dict."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / tag)
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, "-c", _DDP_WORKER, json.dumps(cfg), out], env=env, cwd=root,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        logs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(world)]


def test_ddp_ranks_stay_in_step_and_stop_together(tmp_path):
    """Two CPU processes (gloo), as ``torchrun --nproc_per_node 2 -m segany train`` starts them:
    the ranks start from the same weights, average their gradients and so end with identical
    weights; with a time budget they stop at the same step (a rank that stopped alone would leave
    the other waiting in its all-reduce forever); a resumed run goes on from the saved step with
    each rank drawing its own samples."""
    data = str(tmp_path / "shapes")
    make_shapes_set(data, n=40)
    base = dict(data=[data], out=str(tmp_path / "run"), model=TINY, imagenet_backbone=False, objects_per_image=2,
                iters=2, grad_iters=1, lr=1e-3, warmup_steps=2, val_every=1000, val_images=4, val_objects=1,
                ckpt_every_s=1e9, progress=False, seed=0)
    ranks = _run_ddp(tmp_path, dict(base, steps=6), "fixed")
    assert [r["step"] for r in ranks] == [6, 6]
    assert ranks[0]["samples"] != ranks[1]["samples"]
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k
    start = build_sam(TINY).state_dict()  # seed 0's initial weights: training moved them
    assert any(not torch.equal(v, start[k]) for k, v in ranks[0]["state"].items())

    # by wall time only: the LR schedule and the stop follow the clock, which differs between ranks
    ranks = _run_ddp(tmp_path, dict(base, out=str(tmp_path / "budget"), steps=100000, time_budget_min=0.1), "budget")
    assert ranks[0]["step"] == ranks[1]["step"] > 0
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k

    ranks = _run_ddp(tmp_path, dict(base, steps=9, resume=True), "resumed")
    assert [r["step"] for r in ranks] == [9, 9]
    assert ranks[0]["samples"][:4] != ranks[1]["samples"][:4]
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k


@pytest.mark.parametrize("with_grad", [True, False])
def test_decode_with_an_embedding_per_object_equals_decoding_per_image(with_grad):
    """``--batch-images`` decodes the objects of several images in one batch, each with its own
    image's embedding: the same logits and IoU as decoding each image's objects on their own."""
    from segany.train.loop import decode

    torch.manual_seed(0)
    model = build_sam(TINY).eval()
    pe = model.prompt_encoder.get_dense_pe()
    emb = torch.randn(2, pe.shape[1], *pe.shape[2:])
    owner = torch.tensor([0, 1, 1])
    pts = torch.rand(3, 2, 2) * model.img_size
    sparse, dense = model.prompt_encoder(points=(pts, torch.ones(3, 2, dtype=torch.long)), boxes=None,
                                         masks=torch.randn(3, 1, *model.prompt_encoder.mask_input_size))
    with torch.set_grad_enabled(with_grad):
        joint = decode(model, emb[owner], pe, sparse, dense, with_grad=with_grad)
        alone = [decode(model, emb[i : i + 1], pe, sparse[owner == i], dense[owner == i], with_grad=with_grad) for i in (0, 1)]
    for part, a in zip(joint, zip(*alone)):
        torch.testing.assert_close(part, torch.cat(a), rtol=1e-5, atol=1e-5)


def test_batched_images_step_runs_and_learns_like_accumulation(tmp_path):
    """``batch_images``: a step's images through the encoder together and their objects through
    one interaction batch. The same budget of steps and images raises validation IoU well above
    its start, and about as much as accumulating the images' gradients one after the other
    (measured: box mIoU 0.05 -> 0.24 batched, 0.21 accumulated)."""
    torch.set_num_threads(1)
    data = str(tmp_path / "shapes")
    make_shapes_set(data, n=120)
    ends = {}
    for batched in (True, False):
        out = str(tmp_path / f"run{batched}")
        cfg = TrainConfig(
            data=[data], out=out, model=TINY, imagenet_backbone=False, steps=160, images_per_step=4, batch_images=batched,
            objects_per_image=3, iters=3, grad_iters=2, focal_weight=2.0, focal_alpha=0.5, focal_gamma=0.0, lr=2e-3,
            backbone_lr_mult=1.0, warmup_steps=10, val_every=1000, val_images=24, val_objects=3, ckpt_every_s=1e9,
            progress=False, seed=0,
        )
        assert train(cfg)["step"] == 160
        vals = [json.loads(line)["val"] for line in open(os.path.join(out, "log.jsonl")) if "val" in line]
        start, ends[batched] = vals[0], vals[-1]
    assert ends[True]["box_miou"] > max(2 * start["box_miou"], start["box_miou"] + 0.1), (start, ends)
    assert ends[True]["box_miou"] > ends[False]["box_miou"] - 0.05, (start, ends)


@pytest.mark.parametrize("field,value,named", [
    ("lr", float("nan"), "lr"), ("lr", 0.0, "lr"), ("iters", 0, "iters"), ("mask_drop", 2.0, "mask_drop"),
    ("steps", 2.5, "steps"), ("grad_clip", float("inf"), "grad_clip"), ("data", [], "no data"),
])
def test_bad_training_options_are_refused_before_anything_runs(tmp_path, field, value, named):
    from segany.train.loop import TrainSetupError

    out = tmp_path / "run"
    cfg = TrainConfig(**{"data": ["unused"], "out": str(out), "model": TINY, field: value})
    with pytest.raises(TrainSetupError, match=named):
        train(cfg)
    assert not out.exists()  # nothing was written for a run that cannot work


def test_data_specs_with_weights_and_bad_paths(tmp_path):
    from segany.train.loop import TrainSetupError, parse_data

    data = str(tmp_path / "shapes")
    make_shapes_set(data, n=20)
    train_sets, val_sets, weights = parse_data([data, data + ":2.5"])
    assert weights[1] == 2.5 and weights[0] == float(len(train_sets[0])) and len(val_sets) == 2
    with pytest.raises(TrainSetupError, match="no such data set"):
        parse_data([str(tmp_path / "missing")])
    with pytest.raises(TrainSetupError, match="not a weight"):
        parse_data([data + ":heavy"])
    with pytest.raises(TrainSetupError, match="positive"):
        parse_data([data + ":0"])
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(TrainSetupError, match="cannot read data set"):
        parse_data([str(tmp_path / "junk.json")])


def test_train_cli_reports_bad_options_with_usage_exit_code(tmp_path, capsys):
    from segany.cli import main

    data = str(tmp_path / "shapes")
    make_shapes_set(data, n=10)
    rc = main(["train", "--data", data, "--lr", "nan", "--steps", "3", "--out", str(tmp_path / "run")])
    assert rc == 2 and "segany train: error: lr must be a positive number" in capsys.readouterr().err
    rc = main(["train", "--data", str(tmp_path / "nowhere"), "--steps", "3", "--out", str(tmp_path / "run")])
    assert rc == 2 and "no such data set" in capsys.readouterr().err


def test_resume_takes_the_saved_model_and_refuses_a_bad_state_file(tmp_path, capsys):
    from segany.cli import main
    from segany.train.loop import TrainSetupError

    data = str(tmp_path / "shapes")
    make_shapes_set(data, n=10)
    out = tmp_path / "run"
    base = dict(data=[data], out=str(out), model=TINY, steps=2, val_every=1000, val_images=0, progress=False,
                imagenet_backbone=False)
    assert train(TrainConfig(**base))["step"] == 2
    # the CLI without --model continues the saved model (not the bundled default), and a resumed
    # run needs no ImageNet weights (the saved state replaces them)
    rc = main(["train", "--data", data, "--steps", "3", "--val-images", "0", "--out", str(out), "--resume", "--no-progress"])
    assert rc == 0
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 3 and state["config"]["model"] == TINY
    capsys.readouterr()
    # a state file that is not one: named, before anything trains, with the CLI's usage exit code
    (out / "last.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(TrainSetupError, match=r"last\.pt: cannot read the training state"):
        train(TrainConfig(**{**base, "steps": 4, "resume": True}))
    torch.save({"model": {}, "step": 1}, out / "last.pt")
    with pytest.raises(TrainSetupError, match=r"not a segany training state \(missing opt, elapsed"):
        train(TrainConfig(**{**base, "steps": 4, "resume": True}))
    rc = main(["train", "--data", data, "--steps", "4", "--out", str(out), "--resume", "--no-progress"])
    assert rc == 2 and "not a segany training state" in capsys.readouterr().err
