"""A checkpoint folder behind Ray Serve: FastAPI ingress, dynamic batching, autoscaling.

The deployment is a thin adapter around the plain `Predictor`. Texts of concurrent requests
are batched (`@serve.batch`, batch size counted in texts); `user_config` names the model
folder, so changing it (`serve deploy` with an edited config) swaps the model through
`reconfigure` while requests keep flowing: each request is answered by the model that was
current when it arrived.

Example:
    >>> from ray import serve                                             # doctest: +SKIP
    >>> serve.run(build_app(ServeArgs(model="runs/demo/model")), name="tl-ray")  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application

from tl_ray.client import TOKEN_ENV
from tl_ray.serve.api import Limits, ModelInfo, PredictRequest, PredictResponse, RequestError, parse_predict_body

__all__ = ["DEPLOYMENT", "TOKEN_ENV", "ModelSlot", "ServeArgs", "TLRayModel", "TLRayServer", "build_app", "token_digest"]

DEPLOYMENT = "TLRayModel"


class ModelSlot(BaseModel):
    """The deployment's `user_config`: which folder to serve and the trial it came from."""

    model_config = ConfigDict(extra="forbid")

    model: str
    trial: dict[str, Any] | None = None


class ServeArgs(BaseModel):
    """Typed arguments of `build_app` (the `args:` of a Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="Checkpoint folder; becomes user_config.model.")
    trial: dict[str, Any] | None = Field(default=None, description="best.json summary, shown by /v1/model.")
    max_batch_size: int = Field(default=32, ge=1, description="Most texts in one model call.")
    batch_wait_ms: float = Field(default=10.0, ge=0, description="How long a batch waits to fill.")
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float | None = Field(default=None, gt=0, description="Default: max_batch_size.")
    max_ongoing_requests: int | None = Field(default=None, ge=1, description="Default: 2 x max_batch_size.")
    upscale_delay_s: float = Field(default=5.0, ge=0)
    downscale_delay_s: float = Field(default=60.0, ge=0)
    look_back_period_s: float = Field(default=30.0, gt=0, description="Window the load is averaged over.")
    metrics_interval_s: float | None = Field(default=None, gt=0, description="Default: Serve's (10 s).")
    num_cpus: float = Field(default=1.0, ge=0, description="Per replica; also torch's thread count.")
    num_gpus: float = Field(default=0.0, ge=0, description="Per replica.")
    limits: Limits = Field(default_factory=Limits)
    token_sha256: str | None = Field(default=None, pattern="^[0-9a-f]{64}$", description="Bearer token digest.")
    token_file: str | None = Field(default=None, description="Token file read by each replica.")

    @model_validator(mode="after")
    def _consistent(self) -> ServeArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches can never fill"
            )
        return self

    def deployment_options(self) -> dict[str, Any]:
        """Serve options of the deployment: autoscaling, concurrency, resources, user_config."""
        autoscaling: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests or float(self.max_batch_size),
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
        }
        if self.metrics_interval_s is not None:
            autoscaling["metrics_interval_s"] = self.metrics_interval_s
        options: dict[str, Any] = {
            "autoscaling_config": autoscaling,
            "max_ongoing_requests": self.max_ongoing_requests or 2 * self.max_batch_size,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        if self.model is not None:
            options["user_config"] = ModelSlot(model=self.model, trial=self.trial).model_dump()
        return options


def token_digest(token: str) -> str:
    """The SHA-256 hex digest the server compares bearer tokens against.

    >>> token_digest("s3cret")[:12]
    '4e738ca5563c'
    """
    return hashlib.sha256(token.strip().encode("utf-8")).hexdigest()


class _Loaded(NamedTuple):
    predictor: Any  # tl_ray.serve.predictor.Predictor
    info: ModelInfo


def _load(slot: ModelSlot) -> _Loaded:
    from tl_ray.serve.predictor import Predictor

    predictor = Predictor(slot.model)
    manifest, backbone = predictor.manifest, predictor.manifest.get("backbone", {})
    info = ModelInfo(
        path=str(Path(slot.model).resolve()),
        backbone=str(backbone.get("name_or_path", manifest.get("base_path", ""))),
        kind=str(backbone.get("kind", "")),
        depth=backbone.get("unfreeze_depth"),
        mode=backbone.get("mode"),
        epoch=manifest.get("epoch"),
        labels=list(predictor.labels.labels),
        metrics=manifest.get("metrics", {}),
        trial=slot.trial,
    )
    return _Loaded(predictor, info)


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


api = FastAPI(
    title="tl-ray",
    description="Text classification with a tl-ray checkpoint. Send `Authorization: Bearer TOKEN` "
    "when the server has a token.",
)
_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": PredictRequest.model_json_schema()}}}}


@api.exception_handler(RequestError)
async def _refuse(request: Request, error: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse({"detail": error.message}, status_code=error.status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body has {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes")
    return bytes(body)


class TLRayServer:
    """The replica: routes, batching and model swap. Serve deploys it as `TLRayModel`.

    A plain module-level class (decorated below, not with @), so Ray pickles it by reference
    and FastAPI resolves its annotations in this module.
    """

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = ServeArgs.model_validate(args)
        self._digests = _digests(self.args)
        self._current: _Loaded | None = None
        self._batch_texts: Counter[int] = Counter()
        self._batch_requests: Counter[int] = Counter()
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._predict_batch.set_max_batch_size(self.args.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(self.args.batch_wait_ms / 1000)
        if self.args.num_cpus >= 1:
            import torch

            torch.set_num_threads(int(self.args.num_cpus))

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the folder in `user_config` and swap it in; requests in flight finish on the old one."""
        slot = ModelSlot.model_validate(user_config)
        self._current = await asyncio.to_thread(_load, slot)  # Serve calls this only on a change

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_texts_in)
    async def _predict_batch(self, items: list[tuple[_Loaded, list[str]]]) -> list[list[dict[str, Any]]]:
        self._batch_texts[_texts_in(items)] += 1
        self._batch_requests[len(items)] += 1
        answers: list[list[dict[str, Any]]] = [[] for _ in items]
        for loaded in {id(loaded): loaded for loaded, _ in items}.values():  # one call per model
            chosen = [i for i, (other, _) in enumerate(items) if other is loaded]
            texts = [text for i in chosen for text in items[i][1]]
            predictions = iter(await asyncio.to_thread(loaded.predictor.predict, texts))
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

    @api.post("/v1/predict", response_model=PredictResponse, openapi_extra=_BODY)
    async def predict(self, request: Request) -> dict[str, Any]:
        """Classify `texts`: label, score and class probabilities per text, in order."""
        self._authorize(request)
        parsed = parse_predict_body(await _read_body(request, self.args.limits.max_body_bytes), self.args.limits)
        loaded, size = self._loaded(), self.args.max_batch_size
        chunks = [parsed.texts[start : start + size] for start in range(0, len(parsed.texts), size)]
        answers = await asyncio.gather(*(self._predict_batch((loaded, chunk)) for chunk in chunks))
        info = loaded.info
        model = {"path": info.path, "backbone": info.backbone, "trial": (info.trial or {}).get("trial")}
        return {"predictions": [p for answer in answers for p in answer], "model": model}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: 200 once a model is loaded (no token needed)."""
        self._loaded()
        return {"status": "ok"}

    @api.get("/v1/model")
    async def model(self, request: Request) -> dict[str, Any]:
        """The served model (backbone, depth, metrics, trial, labels) and this replica's batching."""
        self._authorize(request)
        stats = {
            "replica": self._replica,
            "batches": sum(self._batch_texts.values()),
            "max_batch_texts": max(self._batch_texts, default=0),
            "max_batch_requests": max(self._batch_requests, default=0),
            "batch_texts": {str(k): v for k, v in sorted(self._batch_texts.items())},
        }
        return {**self._loaded().info.model_dump(), "stats": stats}


TLRayModel = serve.deployment(name=DEPLOYMENT)(serve.ingress(api)(TLRayServer))


def build_app(args: ServeArgs | dict[str, Any]) -> Application:
    """The Serve application for `args` (also the `import_path` of exported Serve configs).

    >>> app = build_app({"model": "runs/demo/model", "max_replicas": 4})  # doctest: +SKIP
    """
    args = ServeArgs.model_validate(args)
    return TLRayModel.options(**args.deployment_options()).bind(args.model_dump(mode="json"))
