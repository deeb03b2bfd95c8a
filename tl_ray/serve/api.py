"""The HTTP contract of the serving endpoint: request/response models and request checks.

Plain pydantic, no Ray: the Serve deployment (`tl_ray.serve.app`) and the client share it.

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

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, ValidationInfo, field_validator

__all__ = [
    "Limits",
    "ModelInfo",
    "PredictRequest",
    "PredictResponse",
    "Prediction",
    "RequestError",
    "parse_predict_body",
]


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
    max_body_bytes: int = Field(default=1_000_000, ge=64, description="Largest request body (413 above).")


class PredictRequest(BaseModel):
    """`POST /v1/predict` body: `{"texts": ["...", ...]}` (limits come from the server)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"texts": ["a gripping, funny film"]}]})

    texts: list[StrictStr] = Field(min_length=1, description="Texts to classify, in order.")

    @field_validator("texts")
    @classmethod
    def _within_limits(cls, texts: list[str], info: ValidationInfo) -> list[str]:
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


class PredictResponse(BaseModel):
    """`POST /v1/predict` answer: one prediction per text, in order, and the model used."""

    predictions: list[Prediction]
    model: dict[str, Any]


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "body"
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def parse_predict_body(body: bytes, limits: Limits) -> PredictRequest:
    """Validate a raw request body; RequestError(413 | 400 | 422) says what is wrong."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"request body has {len(body)} bytes; the limit is {limits.max_body_bytes}")
    if not body.strip():
        raise RequestError(400, 'empty request body; send JSON like {"texts": ["..."]}')
    try:
        return PredictRequest.model_validate_json(body, context={"limits": limits})
    except ValidationError as error:
        if any(item["type"] == "json_invalid" for item in error.errors()):
            detail = error.errors(include_url=False)[0]["ctx"].get("error", "invalid JSON")
            raise RequestError(400, f'malformed JSON body ({detail}); send {{"texts": ["..."]}}') from None
        raise RequestError(422, _describe(error)) from None
