"""A checkpoint folder behind Ray Serve: FastAPI ingress, dynamic batching, autoscaling.

The deployment is a thin adapter around the plain `Predictor`. Texts of concurrent requests
are batched (`@serve.batch`, batch size counted in texts); `user_config` names the model
folder, so changing it (`serve deploy` with an edited config) swaps the model through
`reconfigure` while requests keep flowing: each request is answered by the model that was
current when it arrived.

A swap never restarts a replica. In Ray Serve 2.60 an exception from `reconfigure` fails the
replica: the controller stops it and starts another, which loads the same bad config, until
the retries run out (DEPLOY_FAILED) with the old model gone. So a swap whose folder does not
load keeps serving the old model; the error is logged (logger "ray.serve") and `GET /v1/model`
shows it as `last_swap_error` until a swap succeeds. Serve counts the bad config as applied,
so a replica started later (autoscaling, a crash) fails to start on it: deploy a good folder.
Only a load with no model to keep serving (at replica start) raises.

Serve calls `check_health` every `HEALTH_CHECK_PERIOD_S` (cheap; failing it makes Serve replace
the replica). A stopping replica finishes its requests in flight, batches included, for up to
`GRACEFUL_SHUTDOWN_TIMEOUT_S`. A Serve config's `deployments:` section can override both.

A replica computes where Ray placed it: with GPUs reserved (`num_gpus`, so Ray sets
`CUDA_VISIBLE_DEVICES` to them) device "auto" is "cuda", else "cpu"; and it sizes torch's
threads from the CPUs Ray assigned it, so `ray_actor_options` in a Serve config is honoured.

Example:
    >>> from ray import serve                                             # doctest: +SKIP
    >>> serve.run(build_app(ServeArgs(model="runs/demo/model")), name="tl-ray")  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

from fastapi import Request
from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from tl_ray.client import TOKEN_ENV
from tl_ray.errors import ConfigError
from tl_ray.serve.api import (
    SERVED_DIR,
    Health,
    ModelDescription,
    ModelInfo,
    ModelSlot,
    PredictResponse,
    RequestError,
    ServeArgs,
    SwapError,
    describe,
    one_line,
    token_digest,
)
from tl_ray.serve.inputs import failed, refuse, request_items
from tl_ray.serve.openapi import SERVED, ContractAPI, error_responses

__all__ = [
    "DEPLOYMENT",
    "TOKEN_ENV",
    "ModelSlot",
    "Placement",
    "ServeArgs",
    "TLRayModel",
    "TLRayServer",
    "assigned_resources",
    "build_app",
    "check_usable",
    "predict_by_length",
    "replica_placement",
    "token_digest",
]

DEPLOYMENT = "TLRayModel"
HEALTH_CHECK_PERIOD_S = 10.0
HEALTH_CHECK_TIMEOUT_S = 30.0  # generous: a replica computing on 2 busy cores answers late
GRACEFUL_SHUTDOWN_TIMEOUT_S = 60.0  # a full queue of CPU batches drains within this
GRACEFUL_SHUTDOWN_WAIT_LOOP_S = 1.0  # how often a stopping replica re-counts requests in flight
logger = logging.getLogger("ray.serve")


class _Loaded(NamedTuple):
    predictor: Any  # tl_ray.serve.predictor.Predictor
    info: ModelInfo


class Placement(NamedTuple):
    """Where a replica computes: its device choice, torch threads, and the GPUs Ray gave it."""

    device: str  # "cpu", "cuda", "cuda:N" (what Predictor gets)
    threads: int
    gpus: float
    gpu_ids: list[Any]
    runtime: str = "torch"  # what computes: torch, onnx, onnx-int8


def assigned_resources() -> dict[str, float] | None:
    """What Ray reserved for this process ({"CPU": 2.0, "GPU": 1.0}), or None outside a Ray worker."""
    import ray

    try:
        return dict(ray.get_runtime_context().get_assigned_resources())
    except Exception:  # a driver or no Ray at all: Ray asserts or raises its own error type
        return None


def replica_placement(
    args: ServeArgs, assigned: Mapping[str, float] | None, gpu_ids: Sequence[Any]
) -> Placement:
    """The replica's device and torch threads from what Ray assigned it (args when Ray is silent).

    Threads: the CPUs Ray assigned (`ray_actor_options.num_cpus`, even when edited in a Serve
    config), else `args.num_cpus`; at least 1. Device "auto": "cuda" when Ray gave the replica
    GPUs, else "cpu" (a replica never takes a GPU it did not reserve); others stay as asked.

    >>> replica_placement(ServeArgs(), {"CPU": 2.0, "GPU": 1.0}, [0])
    Placement(device='cuda', threads=2, gpus=1.0, gpu_ids=[0], runtime='torch')
    >>> replica_placement(ServeArgs(num_cpus=0.25), None, [])
    Placement(device='cpu', threads=1, gpus=0.0, gpu_ids=[], runtime='torch')
    """
    cpus = assigned["CPU"] if assigned and "CPU" in assigned else args.num_cpus
    gpus = float(assigned.get("GPU", 0.0)) if assigned is not None else args.num_gpus
    if gpu_ids and not gpus:
        gpus = float(len(gpu_ids))
    device = args.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    return Placement(device, max(1, int(cpus)), gpus, list(gpu_ids), args.runtime)


def _load(slot: ModelSlot, placement: Placement | None = None) -> _Loaded:
    """The predictor for `slot` on the replica's device; a GPU it cannot use fails loudly."""
    from tl_ray.serve.predictor import Predictor

    device = placement.device if placement is not None else "auto"
    path = Path(slot.model).resolve()
    try:
        predictor = Predictor(slot.model, device=device, runtime=placement.runtime if placement else "torch")
    except ConfigError as error:
        if placement is None or not placement.gpus:
            raise
        raise ConfigError(
            f"this replica reserves num_gpus={placement.gpus:g} (Ray GPU ids {placement.gpu_ids}) "
            f"but cannot compute there: {error}"
        ) from None
    manifest, backbone = predictor.manifest, predictor.manifest.get("backbone", {})
    info = ModelInfo(
        path=str(path),
        backbone=str(backbone.get("name_or_path", backbone.get("architecture", manifest.get("base_path", "")))),
        kind=str(backbone.get("kind", "")),
        depth=backbone.get("unfreeze_depth"),
        mode=backbone.get("mode"),
        epoch=manifest.get("epoch"),
        labels=list(predictor.labels.labels),
        metrics=manifest.get("metrics", {}),
        trial=slot.trial,
        device=predictor.device,
        runtime=predictor.runtime,
        version=path.name if path.parent.name == SERVED_DIR else None,
    )
    return _Loaded(predictor, info)


HA_PROXY_ENV = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED")


def haproxy_on(environ: Mapping[str, str]) -> bool:
    """Whether this process's Ray runs Serve's high-throughput mode (HAProxy, direct ingress)."""
    return environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"


def check_ingress(args: ServeArgs, has_token: bool, environ: Mapping[str, str]) -> None:
    """A replica refuses to start when its ingress is not what its args promise.

    `ingress: haproxy` needs a Ray started with RAY_SERVE_ENABLE_HA_PROXY=1 (the replica
    inherits its node's environment). With HAProxy on, Serve binds every replica's HTTP port
    on all interfaces, so a replica without a bearer token is refused unless `insecure`.

    >>> check_ingress(ServeArgs(ingress="haproxy"), True, {})
    Traceback (most recent call last):
    ...
    tl_ray.errors.ConfigError: ingress haproxy: this node's Ray was started without RAY_SERVE_ENABLE_HA_PROXY=1 ...
    """
    if args.ingress == "haproxy" and not haproxy_on(environ):
        raise ConfigError(
            "ingress haproxy: this node's Ray was started without RAY_SERVE_ENABLE_HA_PROXY=1 "
            "(set it and RAY_SERVE_THROUGHPUT_OPTIMIZED=1 before `ray start` on every node)"
        )
    if haproxy_on(environ) and not has_token and not args.insecure:
        raise ConfigError(
            "HAProxy mode binds replica ports on all interfaces: configure a bearer token "
            "(token_sha256 or token_file), or set insecure: true to serve without one"
        )


def check_usable(current: _Loaded | None) -> None:
    """Raise RuntimeError when the replica cannot serve its model: the predictor lost it, or
    its GPU is gone. Cheap (no forward pass). No model passes: without a user_config the
    replica answers 503 until a swap names one (a failed first load never gets here)."""
    if current is None:
        return
    predictor = current.predictor
    if getattr(predictor, "model", None) is None:
        raise RuntimeError(f"the predictor of {current.info.path} has no model")
    if predictor.device.startswith("cuda") and predictor.backbone.framework == "torch":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"the model computes on {predictor.device}, which torch no longer sees")


def predict_by_length(predictor: Any, texts: list[str], size: int) -> list[dict[str, Any]]:
    """`predictor.predict(texts)`, run on length-sorted chunks of `size` to cut padding.

    >>> predict_by_length(predictor, ["a long text here", "short"], size=8)  # doctest: +SKIP
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: list[dict[str, Any]] = [{} for _ in texts]
    for start in range(0, len(order), size):
        chosen = order[start : start + size]
        for i, answer in zip(chosen, predictor.predict([texts[i] for i in chosen])):
            answers[i] = answer
    return answers


def _texts_in(items: list[tuple[_Loaded, list[str]]]) -> int:
    return sum(len(texts) for _, texts in items)


def _digests(args: ServeArgs) -> list[str]:
    """Accepted token digests: from the args, the replica's env var, and the token file."""
    digests = [args.token_sha256] if args.token_sha256 else []
    if os.environ.get(TOKEN_ENV, "").strip():
        digests.append(token_digest(os.environ[TOKEN_ENV]))
    if args.token_file:
        digests.append(token_digest(Path(args.token_file).read_text(encoding="utf-8")))
    return digests


api = ContractAPI(
    title="tl-ray",
    description="Text or image classification with a tl-ray checkpoint. Images: base64 PNG/JPEG "
    "in JSON (`{\"images\": [...]}`) or a multipart upload. Send `Authorization: Bearer TOKEN` "
    "when the server has a token. This schema describes the model this replica serves now.",
)
api.add_exception_handler(RequestError, refuse)  # type: ignore[arg-type]
api.add_exception_handler(Exception, failed)


def _slot(user_config: Any) -> ModelSlot:
    """The user_config as a ModelSlot; ConfigError in one line when it is not one."""
    try:
        return ModelSlot.model_validate(user_config)
    except ValidationError as error:
        raise ConfigError(describe(error, whole="user_config")) from None


class TLRayServer:
    """The replica: routes, batching and model swap. Serve deploys it as `TLRayModel`.

    A plain module-level class (decorated below, not with @), so Ray pickles it by reference
    and FastAPI resolves its annotations in this module.
    """

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = ServeArgs.model_validate(args)
        self._digests = _digests(self.args)
        check_ingress(self.args, bool(self._digests), os.environ)
        self._current: _Loaded | None = None
        self._swap_error: SwapError | None = None
        self._batch_texts: Counter[int] = Counter()
        self._batch_requests: Counter[int] = Counter()
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._predict_batch.set_max_batch_size(self.args.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(self.args.batch_wait_ms / 1000)
        SERVED.limits, SERVED.secured = self.args.limits, bool(self._digests)
        import ray
        import torch

        self._placement = replica_placement(self.args, assigned_resources(), ray.get_gpu_ids())
        torch.set_num_threads(self._placement.threads)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the folder in `user_config`, then swap it in; requests in flight keep the old.

        Serve calls this at start-up and on each change of user_config. A load that fails
        while a model is served keeps that model and records the error (`last_swap_error`);
        with no model to keep (start-up), it raises, and Serve reports the replica failed.
        """
        try:
            slot = _slot(user_config)
            loaded = await asyncio.to_thread(_load, slot, self._placement)
        except Exception as error:
            folder = str(user_config.get("model") if isinstance(user_config, dict) else user_config)
            if self._current is None:  # nothing to keep serving: Serve fails this replica
                raise ConfigError(f"model {folder} does not load: {one_line(error)}") from error
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self._swap_error = SwapError(model=folder, error=one_line(error), at=at)
            logger.error(f"model swap to {folder} failed, still serving {self._current.info.path}: "
                         f"{self._swap_error.error}", exc_info=True)  # fmt: skip
            return
        self._current, self._swap_error = loaded, None
        SERVED.kind = loaded.predictor.input_kind
        logger.info(f"serving {loaded.info.path}")

    def check_health(self) -> None:
        """Serve's periodic health check: raises only when this replica cannot serve."""
        check_usable(self._current)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_texts_in)
    async def _predict_batch(
        self, items: list[tuple[_Loaded, list[str]]]
    ) -> list[list[dict[str, Any]]]:
        self._batch_texts[_texts_in(items)] += 1
        self._batch_requests[len(items)] += 1
        answers: list[list[dict[str, Any]]] = [[] for _ in items]
        for loaded in {id(loaded): loaded for loaded, _ in items}.values():  # one call per model
            chosen = [i for i, (other, _) in enumerate(items) if other is loaded]
            texts = [text for i in chosen for text in items[i][1]]
            size = self.args.sub_batch_size
            answered = await asyncio.to_thread(predict_by_length, loaded.predictor, texts, size)
            predictions = iter(answered)
            for i in chosen:
                answers[i] = [next(predictions) for _ in items[i][1]]
        return answers

    def _authorize(self, request: Request) -> None:
        if not self._digests:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RequestError(401, "missing bearer token: send 'Authorization: Bearer TOKEN'")
        presented = token_digest(token)
        if not any(hmac.compare_digest(presented, digest) for digest in self._digests):
            raise RequestError(401, "invalid bearer token")

    def _loaded(self) -> _Loaded:
        if self._current is None:
            raise RequestError(503, "no model loaded: set user_config.model (ServeArgs.model)")
        return self._current

    @api.post("/v1/predict", response_model=PredictResponse,
              responses=error_responses(400, 401, 413, 422, 500, 503))  # fmt: skip
    async def predict(self, request: Request) -> dict[str, Any]:
        """Classify `texts` (or `images`): label, score and class probabilities each, in order."""
        self._authorize(request)
        loaded, size = self._loaded(), self.args.max_batch_size
        items = await request_items(request, self.args.limits, loaded.predictor)
        chunks = [items[start : start + size] for start in range(0, len(items), size)]
        answers = await asyncio.gather(*(self._predict_batch((loaded, chunk)) for chunk in chunks))
        info = loaded.info
        trial = (info.trial or {}).get("trial")
        model = {"path": info.path, "backbone": info.backbone, "trial": trial}
        return {"predictions": [p for answer in answers for p in answer], "model": model}

    @api.get("/healthz", response_model=Health, responses=error_responses(500, 503))
    async def healthz(self) -> dict[str, str]:
        """Liveness: 200 once a model is loaded (no token needed)."""
        self._loaded()
        return {"status": "ok"}

    @api.get("/v1/model", response_model=ModelDescription, responses=error_responses(401, 500, 503))
    async def model(self, request: Request) -> dict[str, Any]:
        """The model (backbone, depth, metrics, trial, labels, device, version), this replica's
        batch sizes and torch threads, and the last model swap it refused (`last_swap_error`)."""
        import torch

        self._authorize(request)
        stats = {
            "replica": self._replica,
            "threads": torch.get_num_threads(),
            "batches": sum(self._batch_texts.values()),
            "max_batch_texts": max(self._batch_texts, default=0),
            "max_batch_requests": max(self._batch_requests, default=0),
            "batch_texts": {str(k): v for k, v in sorted(self._batch_texts.items())},
        }
        error = self._swap_error.model_dump() if self._swap_error is not None else None
        return {**self._loaded().info.model_dump(), "stats": stats, "last_swap_error": error}


TLRayModel = serve.deployment(
    name=DEPLOYMENT,
    health_check_period_s=HEALTH_CHECK_PERIOD_S,
    health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
    graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S,
    graceful_shutdown_wait_loop_s=GRACEFUL_SHUTDOWN_WAIT_LOOP_S,
)(serve.ingress(api)(TLRayServer))


def build_app(args: ServeArgs | dict[str, Any]) -> Application:
    """The Serve application for `args` (also the `import_path` of exported Serve configs).

    >>> app = build_app({"model": "runs/demo/model", "max_replicas": 4})  # doctest: +SKIP
    """
    args = ServeArgs.model_validate(args)
    return TLRayModel.options(**args.deployment_options()).bind(args.model_dump(mode="json"))
