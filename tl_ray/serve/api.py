"""The serving contract, plain pydantic (no Ray): request/response models, request checks,
and `ServeArgs`, the typed arguments of the Serve application (`tl_ray.serve.app`).

Example:
    >>> limits = Limits(max_texts=2, max_text_chars=20)
    >>> parse_predict_body(b'{"texts": ["a fine film"]}', limits).texts
    ['a fine film']
    >>> try:
    ...     parse_predict_body(b'{"texts": []}', limits)
    ... except RequestError as error:
    ...     print(error.status, error.message)
    422 texts: List should have at least 1 item after validation, not 0
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tl_ray.errors import TLRayError

__all__ = [
    "DEVICES",
    "ErrorBody",
    "Health",
    "Limits",
    "ModelDescription",
    "ModelInfo",
    "ModelSlot",
    "ReplicaStats",
    "SERVED_DIR",
    "ServeArgs",
    "PredictRequest",
    "PredictResponse",
    "Prediction",
    "RequestError",
    "SwapError",
    "check_device",
    "check_model_path",
    "describe",
    "one_line",
    "parse_predict_body",
    "token_digest",
]


DEVICES = "auto, cpu, cuda or cuda:N"
# `tl-ray serve` copies a model folder to `<its parent>/.served/<content hash>/` and serves that.
SERVED_DIR = ".served"
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_model_path(model: Any) -> str:
    """`model` if it can name a model folder (a non-empty path, no `..` part); else ValueError.

    The folder itself is checked where it is loaded (`tl_ray.serve.predictor.check_model_folder`).

    >>> check_model_path("runs/demo/model")
    'runs/demo/model'
    >>> check_model_path("runs/demo/../../etc")
    Traceback (most recent call last):
    ValueError: the model path 'runs/demo/../../etc' has a '..' part; name the model folder itself
    """
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"the model path must name a tl-ray model folder, got {model!r}")
    if "\0" in model:
        raise ValueError(f"the model path {model!r} has a NUL byte")
    if ".." in re.split(r"[\\/]", model):
        raise ValueError(f"the model path {model!r} has a '..' part; name the model folder itself")
    return model


def check_device(device: Any) -> str:
    """`device` if it names a device choice (auto, cpu, cuda, cuda:N); else ValueError.

    >>> check_device("cuda:1")
    'cuda:1'
    >>> check_device("gpu")
    Traceback (most recent call last):
    ValueError: device must be auto, cpu, cuda or cuda:N, got 'gpu'
    """
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ValueError(f"device must be {DEVICES}, got {device!r}")
    return device


def one_line(error: BaseException, limit: int = 300) -> str:
    """The first non-empty line of `error` (with its type when that is not a tl-ray error).

    >>> one_line(ValueError("bad header\\n  at offset 8"))
    'ValueError: bad header'
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else "no message"
    if not isinstance(error, TLRayError):
        text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message saying what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Limits(BaseModel):
    """What one request may hold; long texts are rejected or cut to `max_text_chars`."""

    model_config = ConfigDict(extra="forbid")

    max_texts: int = Field(default=64, ge=1, description="Most texts in one request.")
    max_text_chars: int = Field(default=2000, ge=1, description="Most characters in one text.")
    long_texts: Literal["reject", "truncate"] = "reject"
    max_body_bytes: int = Field(default=1_000_000, ge=64, description="Largest body (413 above).")


class PredictRequest(BaseModel):
    """`POST /v1/predict` body: `{"texts": ["...", ...]}`, or for an image model
    `{"images": ["<base64 PNG/JPEG>", ...]}` (limits come from the server; `max_texts`
    counts images too). A replica publishes the request schema of the model it serves, with
    its limits and a working example (`tl_ray.serve.openapi`)."""

    model_config = ConfigDict(extra="forbid")

    texts: list[StrictStr] | None = Field(
        default=None, min_length=1, description="Texts to classify, in order."
    )
    images: list[StrictStr] | None = Field(
        default=None, min_length=1, description="Base64-encoded PNG/JPEG files, in order."
    )

    @model_validator(mode="before")
    @classmethod
    def _texts_or_images(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("texts") is None and raw.get("images") is None:
            raise ValueError('texts: Field required; send {"texts": [...]} '
                             '(or {"images": [base64, ...]} to an image model)')
        if isinstance(raw, dict) and "texts" in raw and "images" in raw:
            raise ValueError("send texts or images, not both")
        return raw

    @field_validator("images")
    @classmethod
    def _few_enough_images(cls, images: list[str] | None, info: ValidationInfo) -> list[str] | None:
        limits: Limits = (info.context or {}).get("limits") or Limits()
        if images is not None and len(images) > limits.max_texts:
            raise ValueError(f"{len(images)} images in one request; the limit is {limits.max_texts}")
        return images

    @field_validator("texts")
    @classmethod
    def _within_limits(cls, texts: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if texts is None:
            return texts
        limits: Limits = (info.context or {}).get("limits") or Limits()
        if len(texts) > limits.max_texts:
            raise ValueError(f"{len(texts)} texts in one request; the limit is {limits.max_texts}")
        too_long = [i for i, text in enumerate(texts) if len(text) > limits.max_text_chars]
        if too_long and limits.long_texts == "reject":
            first = too_long[0]
            raise ValueError(
                f"texts[{first}] has {len(texts[first])} characters; the limit is "
                f"{limits.max_text_chars} (the server can truncate instead: long_texts=truncate)"
            )
        return [text[: limits.max_text_chars] for text in texts]


class ErrorBody(BaseModel):
    """The body of every refused request (4xx, and 503 while no model is loaded)."""

    detail: str = Field(description="What is wrong, in one line.")


class Health(BaseModel):
    """`GET /healthz` answer once a model is loaded."""

    status: Literal["ok"]


class Prediction(BaseModel):
    """One text's label, its probability, and every class's probability."""

    label: str
    score: float
    probabilities: dict[str, float]


class ModelInfo(BaseModel):
    """Which model answered: folder, backbone, and the search trial it came from."""

    path: str
    backbone: str
    kind: str
    depth: int | None = None
    mode: str | None = None
    epoch: int | None = None
    labels: list[str]
    metrics: dict[str, Any] = Field(default_factory=dict)
    trial: dict[str, Any] | None = None
    device: str | None = Field(default=None, description="Where the model computes: cpu, cuda:0.")
    runtime: str | None = Field(default=None, description="What computes: torch, onnx or onnx-int8.")
    version: str | None = Field(
        default=None,
        description=f"Content hash of a versioned folder (`{SERVED_DIR}/<hash>`), else None.",
    )


class SwapError(BaseModel):
    """A model swap (`reconfigure`) the replica refused: it kept serving the model it had."""

    model: str = Field(description="The folder that failed to load (user_config.model).")
    error: str = Field(description="Why, in one line.")
    at: str = Field(description="When the swap failed (UTC, ISO 8601).")


class ReplicaStats(BaseModel):
    """What one replica observed: its id, torch threads and the batches it ran."""

    replica: str
    threads: int
    batches: int
    max_batch_texts: int
    max_batch_requests: int
    batch_texts: dict[str, int] = Field(description="Batch size in texts -> how many batches.")


class ModelDescription(ModelInfo):
    """`GET /v1/model` answer: the model this replica serves, its stats, and the last swap it
    refused (None once a later swap succeeded)."""

    stats: ReplicaStats
    last_swap_error: SwapError | None = Field(
        default=None, description="The last failed swap; the model above is still served."
    )


class PredictResponse(BaseModel):
    """`POST /v1/predict` answer: one prediction per text, in order, and the model used."""

    predictions: list[Prediction]
    model: dict[str, Any]


def describe(error: ValidationError, whole: str = "body") -> str:
    """A pydantic error in one line: `field: message; ...` (fields under `whole` unless "body")."""
    parts = []
    for item in error.errors(include_url=False):
        where = ".".join([whole] * (whole != "body") + [str(part) for part in item["loc"]]) or whole
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def parse_predict_body(body: bytes, limits: Limits) -> PredictRequest:
    """Validate a raw request body; RequestError(413 | 400 | 422) says what is wrong."""
    if len(body) > limits.max_body_bytes:
        limit = limits.max_body_bytes
        raise RequestError(413, f"request body has {len(body)} bytes; the limit is {limit}")
    if not body.strip():
        raise RequestError(400, 'empty request body; send JSON like {"texts": ["..."]}')
    try:
        return PredictRequest.model_validate_json(body, context={"limits": limits})
    except ValidationError as error:
        if any(item["type"] == "json_invalid" for item in error.errors()):
            detail = error.errors(include_url=False)[0]["ctx"].get("error", "invalid JSON")
            message = f'malformed JSON body ({detail}); send {{"texts": ["..."]}}'
            raise RequestError(400, message) from None
        raise RequestError(422, describe(error)) from None


class ModelSlot(BaseModel):
    """The deployment's `user_config`: which folder to serve and the trial it came from."""

    model_config = ConfigDict(extra="forbid")

    model: str
    trial: dict[str, Any] | None = None

    @field_validator("model")
    @classmethod
    def _model_path(cls, model: str) -> str:
        return check_model_path(model)


class ServeArgs(BaseModel):
    """Typed arguments of `build_app` (the `args:` of a Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="Checkpoint folder (user_config.model).")
    trial: dict[str, Any] | None = Field(default=None, description="best.json summary.")
    max_batch_size: int = Field(default=32, ge=1, description="Most texts in one batch.")
    batch_wait_ms: float = Field(default=10.0, ge=0, description="How long a batch may wait.")
    sub_batch_size: int = Field(default=8, ge=1, description="Texts per length-sorted model call.")
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float | None = Field(default=None, gt=0, description="Default: batch.")
    max_ongoing_requests: int | None = Field(default=None, ge=1, description="Default: 2 batches.")
    upscale_delay_s: float = Field(default=5.0, ge=0)
    downscale_delay_s: float = Field(default=60.0, ge=0)
    look_back_period_s: float = Field(default=30.0, gt=0, description="Load averaging window.")
    metrics_interval_s: float | None = Field(default=None, gt=0, description="Default: Serve's.")
    num_cpus: float = Field(default=1.0, ge=0, description="Per replica; torch threads if Ray is silent.")
    num_gpus: float = Field(default=0.0, ge=0, description="Per replica.")
    device: str = Field(default="auto", description=f"{DEVICES}; auto: cuda if the replica has a GPU.")
    runtime: str = Field(default="torch", description="torch, onnx or onnx-int8: what computes the "
                         "scores (onnx: exported once, cached beside the model folder).")  # fmt: skip
    ingress: Literal["proxy", "haproxy"] = Field(
        default="proxy",
        description="proxy: Serve's Python proxy; haproxy: Serve's high-throughput mode (HAProxy + "
        "direct ingress), which needs RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1 "
        "in the environment of every node's Ray and binds replica ports on all interfaces.",
    )
    insecure: bool = Field(default=False, description="Serve without a token where replica "
                           "ports are open on all interfaces (HAProxy mode).")  # fmt: skip
    limits: Limits = Field(default_factory=Limits)
    token_sha256: str | None = Field(default=None, pattern="^[0-9a-f]{64}$", description="SHA-256.")
    token_file: str | None = Field(default=None, description="Token file read by each replica.")

    @field_validator("model")
    @classmethod
    def _model_path(cls, model: str | None) -> str | None:
        return None if model is None else check_model_path(model)

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        return check_device(device)

    @field_validator("runtime")
    @classmethod
    def _known_runtime(cls, runtime: str) -> str:
        from tl_ray.export import check_runtime

        return check_runtime(runtime)

    @model_validator(mode="after")
    def _consistent(self) -> ServeArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        ongoing = self.max_ongoing_requests
        if ongoing is not None and ongoing < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({ongoing}) must be >= max_batch_size "
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
    '1ec1c26b50d5'
    """
    return hashlib.sha256(token.strip().encode("utf-8")).hexdigest()
