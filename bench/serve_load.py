"""Load test of the web service: concurrent clients posting an image to /api/predict on loopback.

    python bench/serve_load.py [--checkpoint CKPT] [--image FILE] [--clients 8] [--requests 50]
                               [--device cpu|cuda|auto] [--max-concurrent 1] [--json OUT.json] [--quick]

Starts ``chexformer.serve.serve`` in a subprocess on 127.0.0.1 on a free port (only loopback
traffic), waits for ``/api/health``, sends a few warm-up requests, then ``--clients`` threads each
post the image ``--requests`` times (multipart upload, one HTTP connection per client). Reports
errors (anything but HTTP 200 with ``error`` null; must be 0), latency p50/p95/p99/max and the
throughput, and whether every response gave the same probability.

Without ``--checkpoint`` it writes a tiny synthetic one (64 px, random weights, a guard fitted
on synthetic radiographs) to a temporary folder: its numbers measure the service overhead, not a
real model. Without ``--image`` it reads the first radiograph under ``../shared/data/kermany224``
in place, or else writes a synthetic PNG to the temporary folder. The report goes to stdout,
progress to the log on stderr; the exit status is 1 when any request failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench.serve_load")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "kermany224"


def tiny_checkpoint(folder: Path) -> Path:
    """A 64 px random-weight checkpoint with validation predictions, a data summary and a guard."""
    import torch

    from chexformer import Config
    from chexformer.checkpoint import CheckpointMeta
    from chexformer.guard import fit_guard
    from chexformer.inference import Predictor
    from chexformer.model import build_model
    from chexformer.synthetic import synthetic_image

    torch.manual_seed(0)
    cfg = Config(img_size=64, d_model=32, num_heads=4, ffn_dim=64, num_layers=1, precision="32")
    model = build_model(cfg, num_classes=2).eval()
    rng = np.random.default_rng(0)
    meta = CheckpointMeta(config=cfg, class_names=["NORMAL", "PNEUMONIA"], threshold=0.5, epoch=0, extra={
        "val_predictions": {"logits": rng.normal(size=40).round(3).tolist(), "labels": [i % 2 for i in range(40)]},
        "data": {"source": "synthetic radiographs (bench/serve_load.py)"},
    })
    pred = Predictor(model, meta, device="cpu", precision="32")
    images = [pred.load_array(synthetic_image(rng, 96, opacity=bool(i % 2))[0]) for i in range(60)]
    meta.extra["guard"] = fit_guard(pred, images[:40], images[40:], n_components=8)
    path = folder / "tiny.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "chexformer": meta.to_dict()}, path)
    return path


def default_image(folder: Path) -> tuple[bytes, str]:
    """The first real radiograph found (read in place), else a synthetic PNG."""
    for pattern in ("train/PNEUMONIA/*", "train/NORMAL/*", "*/*/*"):
        found = sorted(DEFAULT_DATA.glob(pattern))
        if found:
            return found[0].read_bytes(), found[0].name
    from PIL import Image

    from chexformer.synthetic import synthetic_image

    path = folder / "synthetic.png"
    Image.fromarray(synthetic_image(np.random.default_rng(1), 224, opacity=True)[0]).save(path)
    return path.read_bytes(), path.name


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, port: int, device: str, max_concurrent: int,
                 timeout: float = 180) -> subprocess.Popen:
    """``serve()`` in a child process; returns once ``/api/health`` answers."""
    import httpx

    code = ("import logging, sys; logging.basicConfig(level=logging.WARNING, stream=sys.stderr); "
            "from chexformer.serve import serve; "
            f"serve({str(checkpoint)!r}, host='127.0.0.1', port={port}, device={device!r}, "
            f"max_concurrent={max_concurrent}, log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.terminate()
    raise RuntimeError(f"the server did not answer /api/health within {timeout:.0f} s")


def run_clients(url: str, content: bytes, filename: str, clients: int, requests: int) -> dict[str, Any]:
    """``clients`` threads x ``requests`` sequential posts each; latencies in ms, errors listed."""
    import httpx

    latencies: list[float] = []
    probabilities: set[float] = set()
    errors: list[str] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(clients)

    def client(k: int) -> None:
        with httpx.Client(timeout=120) as http:
            start_gate.wait()
            for _ in range(requests):
                t0 = time.perf_counter()
                try:
                    r = http.post(url, files={"file": (filename, content)})
                    body = r.json()
                    ok = r.status_code == 200 and body.get("error") is None
                    why = f"HTTP {r.status_code}: {body.get('error')}"
                except (httpx.HTTPError, ValueError) as exc:
                    ok, why, body = False, f"{type(exc).__name__}: {exc}", {}
                ms = 1000 * (time.perf_counter() - t0)
                with lock:
                    latencies.append(ms)
                    if ok:
                        probabilities.add(round(float(body["probability"]), 6))
                    else:
                        errors.append(why)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
    return {
        "requests": len(latencies), "errors": len(errors), "error_examples": sorted(set(errors))[:5],
        "p50_ms": float(q[0]), "p95_ms": float(q[1]), "p99_ms": float(q[2]),
        "max_ms": max(latencies, default=float("nan")), "mean_ms": statistics.fmean(latencies) if latencies else None,
        "throughput_rps": len(latencies) / wall, "wall_s": wall, "distinct_probabilities": len(probabilities),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="chexformer checkpoint (default: a tiny synthetic one)")
    p.add_argument("--image", type=Path, help="image file to post (default: a real radiograph, else synthetic)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=50, help="requests per client")
    p.add_argument("--device", default="cpu", help="server device: cpu, cuda or auto (default cpu)")
    p.add_argument("--max-concurrent", type=int, default=1, help="inferences the server runs at once")
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    p.add_argument("--quick", action="store_true", help="2 clients x 5 requests: a smoke test")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args = parse_args(argv)
    if args.quick:
        args.clients, args.requests = 2, 5
    with tempfile.TemporaryDirectory(prefix="chexformer-load-") as tmp:
        folder = Path(tmp)
        checkpoint = args.checkpoint or tiny_checkpoint(folder)
        if args.image:
            content, filename = args.image.read_bytes(), args.image.name
        else:
            content, filename = default_image(folder)
        port = free_port()
        log.info("starting the server on 127.0.0.1:%d with %s", port, checkpoint)
        server = start_server(checkpoint, port, args.device, args.max_concurrent)
        try:
            url = f"http://127.0.0.1:{port}/api/predict"
            warm = run_clients(url, content, filename, 1, 3)
            if warm["errors"]:
                log.error("warm-up failed: %s", warm["error_examples"])
            log.info("load: %d clients x %d requests", args.clients, args.requests)
            result = run_clients(url, content, filename, args.clients, args.requests)
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
    result.update({
        "checkpoint": str(args.checkpoint) if args.checkpoint else "tiny synthetic (64 px, random weights)",
        "image": filename, "image_bytes": len(content), "clients": args.clients,
        "requests_per_client": args.requests, "device": args.device, "max_concurrent": args.max_concurrent,
        "warmup_errors": warm["errors"], "cpu_count": os.cpu_count(), "python": platform.python_version(),
    })
    print(f"serve load: {result['clients']} clients x {result['requests_per_client']} requests, "
          f"{result['checkpoint']}, image {filename} ({len(content)} bytes), device {args.device}, "
          f"max_concurrent {args.max_concurrent}")
    print(f"errors {result['errors']} / {result['requests']}   p50 {result['p50_ms']:.1f} ms   "
          f"p95 {result['p95_ms']:.1f} ms   p99 {result['p99_ms']:.1f} ms   max {result['max_ms']:.1f} ms   "
          f"{result['throughput_rps']:.1f} req/s   distinct probabilities {result['distinct_probabilities']}")
    for example in result["error_examples"]:
        print(f"  error: {example}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if result["errors"] or result["warmup_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
