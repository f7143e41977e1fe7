"""Benchmark and load test of ``segany serve`` over HTTP on loopback (127.0.0.1 only).

    .venv/bin/python benchmarks/bench_server.py                         # click latency, default model
    .venv/bin/python benchmarks/bench_server.py --clients 20 --load-clicks 200   # + load test

Starts the real command (``segany serve DATASET --port P``) in a subprocess on a temporary
folder of photo-sized synthetic images, waits for the embeddings (excluded from the click
latency, as in the page: the embedding is computed once when an image is opened), then:

* latency: ``--clicks`` single clicks (one foreground point, 3 candidates, masks as COCO RLE at the
  original size), sent one after the other from one client; wall-clock round trip per request,
  median / p95 / max. Also refinement clicks (2 points + the previous mask as ``mask_input_id``).
* load: ``--clients`` threads, each with its own HTTP connection, ``--load-clicks`` clicks each,
  spread over all images; counts responses by status, and samples the server's resident memory
  (VmRSS) during the run.

Prints a markdown summary; ``--out FILE`` also writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "segany" / "weights" / "tiny.safetensors"
# The bundled model's architecture (from its safetensors metadata), used with random weights when
# the bundled file is not there: click latency depends on the architecture, not on the weights.
TINY_ARCH = {"image_size": 512, "prompt_embed_dim": 128, "encoder": {"type": "efficientnet", "stride": 8, "neck_depth": 1},
             "decoder": {"depth": 2, "mlp_dim": 1024, "num_heads": 8, "iou_head_hidden_dim": 256}}


def photo(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    a = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    for _ in range(6):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(h // 10, h // 3)
        a[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 255, 3)
    a += rng.normal(0, 6, a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def rss_kb(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--size", default="1500x1000", help="image size WxH (default 1500x1000)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--photos", default=None, help="use the first --images photos of this folder instead of synthetic ones")
    ap.add_argument("--clicks", type=int, default=100)
    ap.add_argument("--clients", type=int, default=0, help="load test: concurrent clients (0: skip)")
    ap.add_argument("--load-clicks", type=int, default=200, help="load test: clicks per client")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import httpx
    from segany.server import wait_until_serving

    w, h = (int(v) for v in args.size.lower().split("x"))
    ckpt = args.checkpoint
    model_desc = args.model
    if ckpt is None and args.model == "tiny":
        from segany.checkpoints import VARIANTS

        if "tiny" not in VARIANTS and BUNDLED.is_file():  # bundled weights present, name not registered yet
            ckpt, model_desc = str(BUNDLED), f"tiny ({BUNDLED.relative_to(ROOT)})"
    tmp = Path(tempfile.mkdtemp(prefix="segany_bench_"))
    if ckpt is None and args.model == "tiny" and not BUNDLED.is_file():
        import torch
        from safetensors.torch import save_file

        from segany.modeling.build import build_sam

        torch.manual_seed(0)
        sam = build_sam(TINY_ARCH)
        ckpt = str(tmp.parent / (tmp.name + "_tiny_random.safetensors"))
        save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, ckpt, metadata={"config": json.dumps(TINY_ARCH)})
        model_desc = "tiny architecture, random weights (bundled weights absent)"
    ids = []
    if args.photos:
        import shutil

        from segany.io import list_images

        for src in list_images(args.photos)[: args.images]:
            shutil.copy(src, tmp / src.name)
            ids.append(src.name)
        w, h = Image.open(tmp / ids[0]).size  # clicks are drawn inside the smallest image
        for iid in ids:
            w, h = min(w, Image.open(tmp / iid).size[0]), min(h, Image.open(tmp / iid).size[1])
    else:
        for i in range(args.images):
            Image.fromarray(photo(w, h, i)).save(tmp / f"img{i}.jpg", quality=90)
            ids.append(f"img{i}.jpg")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "import sys; from segany.cli import main; sys.exit(main(sys.argv[1:]))",
           "serve", str(tmp), "--host", "127.0.0.1", "--port", str(port), "--model", args.model, "--cache-size", str(max(8, args.images))]
    if ckpt:
        cmd += ["--checkpoint", ckpt]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    result = {"model": model_desc, "image_size": [w, h] if not args.photos else f"photos from {args.photos}", "images": len(ids)}
    try:
        try:
            wait_until_serving(url, proc, timeout=120, poll=0.2)
        except RuntimeError as e:
            raise SystemExit(str(e)) from None
        cl = httpx.Client(base_url=url, timeout=120)
        t_emb = []
        for iid in ids:
            t1 = time.perf_counter()
            st = cl.post(f"/api/embed/{iid}").json()
            while st["state"] != "ready":
                if st["state"] == "error":
                    raise SystemExit(st)
                time.sleep(0.01)
                st = cl.get(f"/api/status/{iid}").json()
            t_emb.append(time.perf_counter() - t1)
        result["embed_s"] = round(statistics.median(t_emb), 3)
        result["rss_after_embed_mb"] = round(rss_kb(proc.pid) / 1024, 1)
        rng = np.random.default_rng(0)

        def click():
            return [float(rng.uniform(0, w)), float(rng.uniform(0, h))]

        cl.post(f"/api/predict/{ids[0]}", json={"points": [click()], "labels": [1]})  # warm-up
        lat, server_ms, refine, parts = [], [], [], []
        cpu0 = cpu_s(proc.pid)
        for k in range(args.clicks):
            iid = ids[k % len(ids)]
            p = click()
            t1 = time.perf_counter()
            r = cl.post(f"/api/predict/{iid}", json={"points": [p], "labels": [1]})
            lat.append((time.perf_counter() - t1) * 1000)
            assert r.status_code == 200, r.text
            server_ms.append(r.json()["elapsed_ms"])
            parts.append(r.json()["timing"])
            tok = r.json()["masks"][r.json()["best"]]["logits_id"]
            t1 = time.perf_counter()
            r2 = cl.post(f"/api/predict/{iid}", json={"points": [p, click()], "labels": [1, 0], "mask_input_id": tok, "multimask": False})
            refine.append((time.perf_counter() - t1) * 1000)
            assert r2.status_code == 200, r2.text
        result["cpu_ms_per_request"] = round((cpu_s(proc.pid) - cpu0) * 1000 / (2 * args.clicks), 1)
        result["click_server_parts_ms_median"] = {k: round(statistics.median(t[k] for t in parts), 1) for k in parts[0]}
        try:
            result["loadavg"] = open("/proc/loadavg").read().split()[:3]
        except OSError:
            pass
        result["cpus"] = os.cpu_count()
        result["click_ms"] = {"median": round(statistics.median(lat), 1), "p95": round(pct(lat, 95), 1), "max": round(max(lat), 1), "n": len(lat)}
        result["click_server_ms_median"] = round(statistics.median(server_ms), 1)
        result["refine_click_ms"] = {"median": round(statistics.median(refine), 1), "p95": round(pct(refine, 95), 1)}

        if args.clients:
            codes: Counter = Counter()
            lat_load = []
            lock = threading.Lock()
            rss = [rss_kb(proc.pid)]
            done = threading.Event()

            def sampler():
                while not done.is_set():
                    rss.append(rss_kb(proc.pid))
                    time.sleep(0.25)

            def client(k):
                r_ = np.random.default_rng(k + 1)
                with httpx.Client(base_url=url, timeout=120) as c:
                    for j in range(args.load_clicks):
                        iid = ids[(k + j) % len(ids)]
                        pts = [[float(r_.uniform(0, w)), float(r_.uniform(0, h))]]
                        t1 = time.perf_counter()
                        try:
                            code = c.post(f"/api/predict/{iid}", json={"points": pts, "labels": [1]}).status_code
                        except httpx.TransportError as e:
                            code = f"transport:{type(e).__name__}"
                        with lock:
                            codes[code] += 1
                            lat_load.append((time.perf_counter() - t1) * 1000)

            samp = threading.Thread(target=sampler)
            samp.start()
            t1 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t1
            done.set()
            samp.join()
            result["load"] = {
                "clients": args.clients, "clicks_each": args.load_clicks, "requests": sum(codes.values()),
                "status": {str(k): v for k, v in codes.items()},
                "errors_5xx": sum(v for k, v in codes.items() if isinstance(k, int) and k >= 500),
                "wall_s": round(wall, 1), "throughput_rps": round(sum(codes.values()) / wall, 1),
                "latency_ms": {"median": round(statistics.median(lat_load), 1), "p95": round(pct(lat_load, 95), 1), "max": round(max(lat_load), 1)},
                "rss_mb": {"before": round(rss[0] / 1024, 1), "peak": round(max(rss) / 1024, 1), "after": round(rss_kb(proc.pid) / 1024, 1)},
            }
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"\n### segany serve over HTTP (127.0.0.1), model {result['model']}, images: {result['image_size']}")
    print(f"- embedding (once per image, excluded below): {result['embed_s']} s; server RSS {result['rss_after_embed_mb']} MB")
    c = result["click_ms"]
    print(f"- one click -> 3 masks as COCO RLE: median {c['median']} ms, p95 {c['p95']} ms, max {c['max']} ms over {c['n']} clicks (server-side {result['click_server_ms_median']} ms)")
    print(f"  server parts (median): {result['click_server_parts_ms_median']}; server CPU time per request (clicks and refinements): "
          f"{result['cpu_ms_per_request']} ms; machine: {result['cpus']} CPUs, load average {' '.join(result.get('loadavg', []))}")
    r = result["refine_click_ms"]
    print(f"- refinement click (2 points + previous mask): median {r['median']} ms, p95 {r['p95']} ms")
    if "load" in result:
        L = result["load"]
        print(f"- load: {L['clients']} clients x {L['clicks_each']} clicks = {L['requests']} requests in {L['wall_s']} s "
              f"({L['throughput_rps']} req/s); status {L['status']}; 5xx: {L['errors_5xx']}; latency median {L['latency_ms']['median']} ms, "
              f"p95 {L['latency_ms']['p95']} ms; server RSS {L['rss_mb']['before']} -> peak {L['rss_mb']['peak']} -> {L['rss_mb']['after']} MB")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
