"""The same job on a Ray cluster: a pool of model-holding actors, images streamed through them.

Why actors driven directly rather than ``ray.data.map_batches``: the unit of work is one image
whose pixels never need to reach the driver (workers read the image from shared storage and write
the outputs to the shared OUTDIR themselves), so there is no data to shuffle through Ray's object
store, and what the driver needs back per image is a small record. Driving actors ourselves gives
(1) one record per image as soon as it is done, so the single manifest writer (the driver) and
the progress bar/ETA stay exact; (2) explicit fault handling: actors are created with
``max_restarts`` / ``max_task_retries``, so when a worker process dies, Ray restarts it (loading the
model again) and re-runs its unfinished images; outputs are written atomically and are a pure
function of the image, so a re-run image overwrites its files with the same bytes, and the driver
still receives exactly one record per image (nothing lost, nothing duplicated); (3) no Ray Data
executor, which on small machines costs more than the work. Each actor loads the model once and
keeps at most ``queue_depth`` images queued so it is never idle waiting for the driver.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

from .annotate import Annotator, EngineOptions
from .inputs import Item


class _Worker:
    """Ray actor body: one model, many images."""

    def __init__(self, opts: EngineOptions, fault: Optional[Dict[str, str]] = None) -> None:
        self.fault = fault or {}
        self.annotator = Annotator(opts)
        self.pid = os.getpid()

    def process(self, item: Item, outdir: str) -> Dict[str, Any]:
        # Fault injection for tests: the first time this image is seen (marked by a file on
        # shared storage), the worker process dies hard, as on a node failure or OOM kill.
        if self.fault.get("crash_on") == item.rel:
            marker = self.fault["marker"]
            if not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
                os._exit(1)
        rec = self.annotator.process(item, outdir)
        return rec

    def ping(self) -> int:
        return self.pid


def _ensure_ray(address: Optional[str], log: Callable[[str], None]):
    try:
        import ray
    except ImportError:
        raise RuntimeError("--ray needs Ray: pip install 'segany[ray]'") from None
    if not ray.is_initialized():
        if address in (None, "", "local"):
            log("starting a local Ray instance")
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    return ray


def run_on_ray(
    todo: List[Item],
    outdir: str,
    opts: EngineOptions,
    *,
    address: Optional[str] = None,
    workers: Optional[int] = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    max_restarts: int = 3,
    max_task_retries: int = 3,
    queue_depth: int = 2,
    fault: Optional[Dict[str, str]] = None,
    log: Callable[[str], None] = print,
) -> Iterator[Dict[str, Any]]:
    """Yield one record per image of ``todo`` (in completion order)."""
    ray = _ensure_ray(address, log)
    res = ray.cluster_resources()
    if workers is None:
        if gpus_per_worker > 0:
            workers = int(res.get("GPU", 0) // gpus_per_worker)
        else:
            workers = int(res.get("CPU", 1) // max(cpus_per_worker, 1e-9))
        workers = max(1, min(workers, len(todo)))
    need_cpu, need_gpu = workers * cpus_per_worker, workers * gpus_per_worker
    if need_cpu > res.get("CPU", 0) + 1e-9 or need_gpu > res.get("GPU", 0) + 1e-9:
        raise RuntimeError(
            f"{workers} workers x ({cpus_per_worker} CPU, {gpus_per_worker} GPU) need {need_cpu:g} CPUs and "
            f"{need_gpu:g} GPUs; the cluster has {res.get('CPU', 0):g} CPUs and {res.get('GPU', 0):g} GPUs"
        )
    wopts = opts
    if gpus_per_worker > 0 and opts.device == "cpu":
        wopts = EngineOptions(**{**opts.__dict__, "device": "cuda"})
    if wopts.threads <= 0:
        wopts = EngineOptions(**{**wopts.__dict__, "threads": max(1, int(cpus_per_worker))})
    Actor = ray.remote(_Worker).options(
        num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
        max_restarts=max_restarts, max_task_retries=max_task_retries,
    )
    actors = [Actor.remote(wopts, fault) for _ in range(workers)]
    log(f"ray: {workers} workers x ({cpus_per_worker:g} CPU, {gpus_per_worker:g} GPU) on {address or 'a local Ray'}")
    try:  # every worker has loaded the model (a bad checkpoint path on a node shows here, once)
        ray.get([a.ping.remote() for a in actors])
    except ray.exceptions.RayError as e:
        for a in actors:
            ray.kill(a)
        cause = getattr(e, "cause", None) or e
        raise RuntimeError(f"a Ray worker could not start: {type(cause).__name__}: {str(cause).strip().splitlines()[-1]}") from None
    outdir = os.path.abspath(outdir)
    queue = list(reversed(todo))
    pending: Dict[Any, tuple] = {}  # ObjectRef -> (actor index, item)
    load = [0] * len(actors)
    alive = [True] * len(actors)

    def submit(i: int) -> None:
        while queue and load[i] < queue_depth and alive[i]:
            it = queue.pop()
            pending[actors[i].process.remote(it, outdir)] = (i, it)
            load[i] += 1

    for i in range(len(actors)):
        submit(i)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            i, it = pending.pop(ref)
            load[i] -= 1
            try:
                rec = ray.get(ref)
            except _ACTOR_ERRORS(ray) as e:
                # Ray gave up on this image after max_task_retries restarts: record it and carry on
                # with the other workers.
                rec = {"image": it.rel, "output": it.json_rel, "source": it.source, "status": "failed",
                       "masks": 0, "seconds": None, "reason": f"worker died {max_task_retries + 1} times on it: {type(e).__name__}"}
                alive[i] = _is_alive(ray, actors[i])
                if not any(alive):
                    raise RuntimeError("every Ray worker has died; see the Ray logs") from e
            yield rec
            for j in range(len(actors)):
                submit(j)
            if queue and not pending:  # every actor with work died
                raise RuntimeError("no live Ray workers left")
    finally:
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass


def _ACTOR_ERRORS(ray) -> tuple:
    ex = ray.exceptions
    return tuple(getattr(ex, n) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError") if hasattr(ex, n))


def _is_alive(ray, actor, timeout: float = 30.0) -> bool:
    try:
        ray.get(actor.ping.remote(), timeout=timeout)
        return True
    except Exception:  # noqa: BLE001
        return False
