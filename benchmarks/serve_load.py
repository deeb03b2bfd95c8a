"""Serving throughput: the tl-ray endpoint (dynamic batching) vs a naive one-call-per-request one.

Both serve the same checkpoint folder (bundled MiniLM with a fresh 2-class head; no training
needed for a speed figure) from ONE Serve instance on loopback, each as a single replica with
the same CPUs and torch threads (autoscaling off, so only batching differs; default 1 CPU
each: on a shared 2-core machine, 2 intra-op threads per call thrash):

- batched: `tl_ray.serve.app.build_app` (FastAPI ingress, @serve.batch over texts).
- naive:   a FastAPI deployment whose sync handler calls `Predictor.predict([text])` per
           request (FastAPI runs it in its thread pool, as a plain endpoint would).

A closed-loop asyncio client keeps `--concurrency` requests of one sentence each in flight
for `--seconds` after `--warmup` seconds; the endpoints are measured one after the other.
Sentences come from ../shared/data/mr (Pang & Lee) when present, else synthetic ones.

Each ingress (`--ingress proxy haproxy`: Serve's Python proxy, and its high-throughput mode
with HAProxy and direct ingress, each in its own Ray) serves each runtime (`--runtimes torch
onnx`); the naive endpoint runs behind the default proxy only.

Usage (from the repository root):
    .venv/bin/python benchmarks/serve_load.py                  # 32 clients, 20 s per endpoint
    .venv/bin/python benchmarks/serve_load.py --concurrency 16 --seconds 10 --ingress proxy

Then, in the same run and on the replica's CPUs (a Ray task with `--num-cpus`, as many torch
threads), the model's own ceiling: offline `Predictor` texts/s at batch sizes 1, 4, 8, 16, 32
with no HTTP, padded to each batch's longest text and in length-bucketed sub-batches (as the
endpoint computes); the best of them is `limit_texts_per_s`.

Progress goes to stderr; stdout gets exactly one JSON line:
    {"benchmark": "serve_load", "endpoints": {"proxy-torch": {"rps", "p50_ms", "p99_ms", ...},
     "haproxy-onnx": {...}, ...}, "naive": {...}, "offline": {"torch": {"1": {"padded",
     "bucketed"}, ...}, ...}, "limit_texts_per_s" (the best runtime's best batch size),
     "served_texts_per_s" (the best endpoint), "of_limit": served / limit, ...}
"""

# No `from __future__ import annotations` here: the naive deployment below is defined in
# __main__, so Ray pickles it by value, and FastAPI must see real annotation objects.
import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MR_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mr" / "rt-polarity.pos"


def log(message: str) -> None:
    print(f"[serve_load] {message}", file=sys.stderr, flush=True)


def sentences(n: int = 500) -> list[str]:
    if MR_FILE.is_file():
        lines = MR_FILE.read_text(encoding="latin-1").splitlines()
        return [line.strip() for line in lines[:n] if line.strip()]
    words = "the film plot actors story good great dull boring moving brilliant weak".split()
    rng = random.Random(0)
    return [" ".join(rng.choices(words, k=rng.randint(8, 24))) for _ in range(n)]


def build_checkpoint(folder: Path) -> Path:
    """MiniLM + a new 2-class head, written as a tl-ray checkpoint folder."""
    import torch

    from tl_ray.backbones.registry import get_backbone
    from tl_ray.config import HFTextConfig
    from tl_ray.data import LabelMap
    from tl_ray.train.checkpoint import write_model_folder

    torch.manual_seed(0)
    backbone = get_backbone(HFTextConfig(name_or_path="minilm", unfreeze_depth=0))
    folder.mkdir(parents=True, exist_ok=True)
    write_model_folder(folder, backbone, backbone.build(2), LabelMap(("neg", "pos")), metrics={}, epoch=0,
                       extra={"max_length": 64})  # fmt: skip
    return folder


def naive_app(model: str, num_cpus: float):
    """The baseline: one model call per request, no batching."""
    from fastapi import FastAPI
    from ray import serve

    from tl_ray.serve.api import PredictRequest

    api = FastAPI()

    @serve.deployment(num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": num_cpus})
    @serve.ingress(api)
    class Naive:
        def __init__(self, folder: str) -> None:
            import torch

            from tl_ray.serve.predictor import Predictor

            torch.set_num_threads(max(1, int(num_cpus)))
            self.predictor = Predictor(folder)

        @api.post("/v1/predict")
        def predict(self, body: PredictRequest) -> dict:
            return {"predictions": self.predictor.predict(body.texts)}

    return Naive.bind(model)


async def drive(url: str, texts: list[str], concurrency: int, warmup: float, seconds: float) -> dict[str, Any]:
    """Closed-loop load: `concurrency` clients, one text per request."""
    import httpx

    latencies: list[float] = []
    errors = 0
    start = time.monotonic()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        n = i
        while (now := time.monotonic()) < stop_at:
            try:
                answer = await http.post(url, json={"texts": [texts[n % len(texts)]]})
                ok = answer.status_code == 200
            except httpx.HTTPError:
                ok = False
            if now >= measure_from and ok:
                latencies.append(time.monotonic() - now)
            elif now >= measure_from:
                errors += 1
            n += concurrency

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(concurrency)))
    latencies.sort()
    quantile = lambda q: round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)  # noqa: E731
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": round(len(latencies) / seconds, 1),
        "p50_ms": quantile(0.50),
        "p99_ms": quantile(0.99),
        "mean_ms": round(1000 * statistics.fmean(latencies), 1),
    }


def batch_stats(url: str) -> dict[str, Any]:
    """Texts per model batch seen by the batched replica."""
    import httpx

    sizes = httpx.get(url, timeout=30).json()["stats"]["batch_texts"]
    count = sum(sizes.values())
    mean = sum(int(size) * n for size, n in sizes.items()) / max(count, 1)
    return {"count": count, "mean_texts": round(mean, 1), "max_texts": max(map(int, sizes), default=0)}


def offline_ceiling(
    model: str, texts: list[str], threads: int, sub_batch: int, seconds: float, runtime: str = "torch"
) -> dict[str, Any]:
    """The model's own texts/s with no HTTP, on `threads` torch threads (the replica's CPUs):
    per batch size, plain `Predictor.predict` (padded to the batch's longest text) and
    length-bucketed sub-batches of `sub_batch` as the endpoint runs them."""
    import torch

    from tl_ray.serve.app import predict_by_length
    from tl_ray.serve.predictor import Predictor

    torch.set_num_threads(threads)
    predictor = Predictor(model, device="cpu", runtime=runtime)
    predictor.predict(texts[:8])  # warm up

    def rate(call, size: int) -> float:
        done, n, started = 0, 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            batch = [texts[(n + i) % len(texts)] for i in range(size)]
            call(batch)
            done, n = done + size, n + size
        return round(done / (time.perf_counter() - started), 1)

    per_size = {}
    for size in (1, 4, 8, 16, 32):
        per_size[str(size)] = {
            "padded": rate(predictor.predict, size),
            "bucketed": rate(lambda batch: predict_by_length(predictor, batch, sub_batch), size),
        }
    best = max(max(v.values()) for v in per_size.values())
    return {"texts_per_s": per_size, "limit_texts_per_s": best, "threads": threads}



def serve_round(model: str, texts: list[str], options, *, ingress: str, naive: bool) -> dict[str, Any]:
    """One Ray + Serve instance with `ingress`: each runtime's batched app (and the naive one),
    driven one after the other. HAProxy mode is read from the environment of the process that
    starts Ray, so each ingress gets its own Ray."""
    import ray
    from ray import serve

    from tl_ray.net import free_port
    from tl_ray.serve.app import HA_PROXY_ENV, ServeArgs, build_app
    from tl_ray.train.driver import ensure_ray

    for name in HA_PROXY_ENV:
        os.environ.pop(name, None)
    if ingress == "haproxy":
        os.environ.update({name: "1" for name in HA_PROXY_ENV})
    ensure_ray(num_cpus=int(2 * options.num_cpus))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results: dict[str, Any] = {}
    apps = [(f"{ingress}-{runtime}", runtime) for runtime in options.runtimes]
    for name, runtime in apps:
        args = ServeArgs(model=model, min_replicas=1, max_replicas=1, num_cpus=options.num_cpus,
                         max_batch_size=options.max_batch_size, batch_wait_ms=options.batch_wait_ms,
                         max_ongoing_requests=max(4 * options.max_batch_size, options.concurrency),
                         runtime=runtime, ingress=ingress, insecure=True)  # loopback only  # fmt: skip
        serve.run(build_app(args), name=name, route_prefix=f"/{name}")
        results[name] = drive_app(port, name, texts, options)
        results[name]["batches"] = batch_stats(f"http://127.0.0.1:{port}/{name}/v1/model")
        serve.delete(name)
    if naive:
        serve.run(naive_app(model, options.num_cpus), name="naive", route_prefix="/naive")
        results["naive"] = drive_app(port, "naive", texts, options)
    serve.shutdown()
    ray.shutdown()
    return results


def drive_app(port: int, name: str, texts: list[str], options) -> dict[str, Any]:
    log(f"driving {name}: {options.concurrency} clients, {options.warmup:.0f}+{options.seconds:.0f} s")
    url = f"http://127.0.0.1:{port}/{name}/v1/predict"
    result = asyncio.run(drive(url, texts, options.concurrency, options.warmup, options.seconds))
    log(f"{name}: {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="per replica (= torch threads)")
    parser.add_argument("--ceiling-seconds", type=float, default=4.0, help="per offline batch size")
    parser.add_argument("--ingress", nargs="+", default=["proxy", "haproxy"], choices=["proxy", "haproxy"])
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx", "onnx-int8"])
    options = parser.parse_args()

    import ray

    from tl_ray.export import cached_export
    from tl_ray.train.driver import ensure_ray

    texts = sentences()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_checkpoint(Path(tmp) / "minilm"))
        for runtime in options.runtimes:  # replicas then load the export instead of making it
            if runtime != "torch":
                cached_export(model, quantize=runtime == "onnx-int8")
        endpoints: dict[str, Any] = {}
        for ingress in options.ingress:
            endpoints.update(serve_round(model, texts, options, ingress=ingress, naive=ingress == "proxy"))
        ensure_ray(num_cpus=int(2 * options.num_cpus))
        ceilings = {}
        for runtime in options.runtimes:
            log(f"offline ceiling ({runtime}): Predictor on the replica's CPUs, batch sizes 1..32, no HTTP")
            task = ray.remote(offline_ceiling).options(num_cpus=options.num_cpus)
            ceilings[runtime] = ray.get(task.remote(model, texts, max(1, int(options.num_cpus)), 8,
                                                    options.ceiling_seconds, runtime))  # fmt: skip
            log(f"ceiling ({runtime}): {ceilings[runtime]}")
        ray.shutdown()
    naive = endpoints.pop("naive", None)
    limit = max(c["limit_texts_per_s"] for c in ceilings.values())  # the best runtime's ceiling
    best = max(endpoints, key=lambda name: endpoints[name]["rps"])
    batched = endpoints.get("proxy-torch")
    print(json.dumps({
        "benchmark": "serve_load",
        "model": "minilm",
        "concurrency": options.concurrency,
        "seconds": options.seconds,
        "num_cpus_per_replica": options.num_cpus,
        "max_batch_size": options.max_batch_size,
        "batch_wait_ms": options.batch_wait_ms,
        "endpoints": endpoints,
        "naive": naive,
        "speedup_batched_vs_naive": round(batched["rps"] / naive["rps"], 2) if batched and naive else None,
        "offline": {runtime: c["texts_per_s"] for runtime, c in ceilings.items()},
        "limit_by_runtime": {runtime: c["limit_texts_per_s"] for runtime, c in ceilings.items()},
        "of_limit_by_endpoint": {
            name: round(e["rps"] / ceilings[name.split("-", 1)[1]]["limit_texts_per_s"], 3)
            for name, e in endpoints.items()
        },
        "best_endpoint": best,
        "limit_texts_per_s": limit,
        "served_texts_per_s": endpoints[best]["rps"],  # one text per request
        "of_limit": round(endpoints[best]["rps"] / limit, 3),
        "goal": "of_limit >= 0.9; served >= 1.5 x 50.6",
        "load_avg_1m": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "cpu_count": os.cpu_count(),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
