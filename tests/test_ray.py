"""segany annotate --ray: same outputs as the single-process run, and a worker that dies mid-run is
restarted by Ray and its image redone, with nothing lost or duplicated. A local Ray with 2 CPUs."""
import os

import pytest

ray = pytest.importorskip("ray")

from segany.cli import main as segany_main  # noqa: E402
from segany.engine import run_job  # noqa: E402

from test_engine import AMG_ARGS, make_images, manifest_view, opts, output_files, save_model  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("rayjob")
    model = save_model(root / "model.safetensors")
    make_images(root / "in", 6)
    (root / "in" / "bad.jpg").write_bytes(b"not an image")
    ref = root / "single"
    s = run_job([str(root / "in")], str(ref), opts(model, overlay=True), progress=False)
    assert (s["ok"], s["failed"]) == (6, 1)
    return root, model, ref


def test_ray_cli_two_workers_equals_single_process(local_ray, job, tmp_path):
    root, model, ref = job
    out = tmp_path / "ray"
    rc = segany_main(["annotate", str(root / "in"), "-o", str(out), "--checkpoint", model, *AMG_ARGS, "--overlay",
                      "--threads", "1", "--ray", "--workers", "2", "--cpus-per-worker", "1", "--no-progress"])
    assert rc == 0
    assert output_files(out) == output_files(ref)
    assert manifest_view(out) == manifest_view(ref)


def test_ray_worker_killed_mid_run_is_restarted_and_retried(local_ray, job, tmp_path):
    root, model, ref = job
    out = tmp_path / "ray"
    marker = tmp_path / "crashed"
    s = run_job([str(root / "in")], str(out), opts(model, overlay=True), progress=False, use_ray=True, workers=2,
                ray_options={"fault": {"crash_on": "sub/img003.png", "marker": str(marker)}})
    assert marker.is_file(), "the fault was not injected"
    assert int(marker.read_text()) != os.getpid()  # a worker process died, not the driver
    assert (s["ok"], s["failed"]) == (6, 1)
    assert output_files(out) == output_files(ref)
    assert manifest_view(out) == manifest_view(ref)  # one line per image: nothing lost or duplicated
