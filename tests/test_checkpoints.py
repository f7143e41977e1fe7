"""Checkpoint loading: the official key/shape sets, strictness, and refusing unsafe or broken files."""
from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import pytest
import torch

from core_helpers import TINY_VIT, config_safetensors, random_checkpoint
from reference import load_reference
from segany.checkpoints import (
    CheckpointError,
    build_sam_shapes,
    infer_variant,
    load_model,
    load_state_dict_strict,
    read_state_dict,
    sam_model_registry,
)
from segany.modeling.build import build_sam, randomize_


def reference_shapes(name):
    """Key -> shape of the reference model's state dict, built on the meta device (no memory),
    i.e. exactly what the official checkpoint file holds."""
    sa, ms = load_reference()
    registry = (ms if name == "vit_t" else sa).sam_model_registry
    if name == "vit_t":  # small; and MobileSAM calls .item() while building, which meta tensors refuse
        model = registry[name]()
    else:
        with torch.device("meta"):
            model = registry[name]()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["vit_h", "vit_l", "vit_b", "vit_t"])
def test_key_and_shape_set_equals_official(name):
    ours, ref = build_sam_shapes(name), reference_shapes(name)
    assert set(ours) == set(ref), f"missing {sorted(set(ref) - set(ours))[:5]}, extra {sorted(set(ours) - set(ref))[:5]}"
    assert {k: s for k, s in ours.items() if ref[k] != s} == {}


@pytest.mark.parametrize("name", ["vit_b", "vit_t"])
def test_reference_state_dict_loads_strictly_with_equal_values(name, tmp_path):
    sa, ms = load_reference()
    ref = randomize_((ms if name == "vit_t" else sa).sam_model_registry[name](), seed=11)
    path = tmp_path / f"{name}.pth"
    torch.save(ref.state_dict(), path)
    assert infer_variant(read_state_dict(path)) == name
    ours = load_model(str(path))  # variant recognised from the file
    assert ours.model_name == name
    ref_sd = ref.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in ours.state_dict().items())


def tiny_state(seed=0):
    return randomize_(build_sam(TINY_VIT), seed=seed).state_dict()


def test_missing_unexpected_and_wrong_shape_keys_are_named():
    sd = tiny_state()
    key = next(iter(sd))
    missing = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(CheckpointError, match=r"1 missing keys .*" + key.replace(".", r"\.")):
        load_state_dict_strict(build_sam(TINY_VIT), missing)
    with pytest.raises(CheckpointError, match=r"1 unexpected keys .*extra\.weight"):
        load_state_dict_strict(build_sam(TINY_VIT), {**sd, "extra.weight": torch.zeros(1)})
    k = "mask_decoder.iou_token.weight"
    with pytest.raises(CheckpointError, match=r"1 shape mismatches .*iou_token.*file \(1, 7\) vs model \(1, 32\)"):
        load_state_dict_strict(build_sam(TINY_VIT), {**sd, k: torch.zeros(1, 7)})


def test_official_variant_rejects_other_variant(tmp_path):
    path = tmp_path / "t.pth"
    torch.save(tiny_state(), path)
    with pytest.raises(CheckpointError, match="does not match this model variant"):
        sam_model_registry["vit_b"](checkpoint=str(path))
    with pytest.raises(CheckpointError, match="matches none of the known variants"):
        load_model(str(path))


def test_truncated_file(tmp_path):
    path = random_checkpoint(TINY_VIT, tmp_path / "w.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"w\.pth: cannot be read .*truncated"):
        read_state_dict(path)


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth: cannot be read"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_state_dict(tmp_path / "absent.pth")


class _Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('code ran')",))


@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_pickle_with_code_is_refused_without_running_it(tmp_path, fmt):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    obj = {"weight": torch.zeros(2), "payload": _Payload(marker)}
    if fmt == "torch_zip":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    # The test is only meaningful if unpickling without protection would run the payload.
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control.txt")))
    assert (tmp_path / "control.txt").exists()
    with pytest.raises(CheckpointError, match="pickled code"):
        read_state_dict(path)
    assert not marker.exists(), "loading the checkpoint executed code"


def test_non_tensor_content_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        read_state_dict(path)


def test_safetensors_and_wrapped_state_dicts(tmp_path):
    from safetensors.torch import save_file

    sd = tiny_state(seed=2)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"model": sd, "epoch": 3}, tmp_path / "train.pth")  # training checkpoints wrap it
    for path in (tmp_path / "w.safetensors", tmp_path / "train.pth"):
        loaded = load_state_dict_strict(build_sam(TINY_VIT), read_state_dict(path))
        assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        read_state_dict(tmp_path / "bad.safetensors")


def test_safetensors_with_config_builds_its_own_model(tmp_path):
    path = config_safetensors(TINY_VIT, tmp_path / "m.safetensors", seed=4)
    sam = load_model(str(path))
    assert sam.image_encoder.img_size == 128 and sam.model_name == "custom"
    expected = randomize_(build_sam(TINY_VIT), seed=4).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in sam.state_dict().items())
