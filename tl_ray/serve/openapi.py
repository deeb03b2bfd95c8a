"""The OpenAPI contract a replica publishes: what it serves, as it serves it (no Ray).

`GET /openapi.json` describes the model the replica holds now: a text model's
`POST /v1/predict` takes `{"texts": [...]}` only, an image model's `{"images": [base64, ...]}`
or a multipart upload only, with the replica's limits (`maxItems`, `maxLength` when long
texts are rejected) and an example the endpoint accepts. Every status a route answers is
documented with the body it really has (`ErrorBody` for 4xx, 500 and 503), and the bearer token
scheme (and 401) only where the replica has a token.

Example:
    >>> served = Served(kind="text", limits=Limits(max_texts=4))
    >>> body = request_body(served)["content"]["application/json"]["schema"]
    >>> body["required"], body["properties"]["texts"]["maxItems"]
    (['texts'], 4)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI

from tl_ray.serve.api import ErrorBody, Limits

__all__ = [
    "BASE64",
    "EXAMPLE_PNG",
    "ContractAPI",
    "SERVED",
    "Served",
    "contract",
    "error_responses",
    "request_body",
]

# An 8x8 grey gradient PNG: a real image any image model reads (it is resized to its input).
EXAMPLE_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAAAAADhZOFXAAAAF0lEQVR42mNkYIEARgUog4UUBuMDKAMAR1gCmC"
               "Oa8dUAAAAASUVORK5CYII=")  # fmt: skip
EXAMPLE_TEXT = "a gripping, funny film"
# Standard base64 (padded), optionally as a data URL: what `decode_base64_images` decodes.
BASE64 = r"^(data:[^,]*,)?([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
SECURED_ROUTES = (("/v1/predict", "post"), ("/v1/model", "get"))

_WHY = {
    400: "Malformed body: empty, not JSON, or a broken multipart upload.",
    401: "Missing or wrong bearer token (`Authorization: Bearer TOKEN`).",
    413: "Request body over the server's byte limit.",
    422: "Well-formed, but not a request this model takes (wrong field, kind, count, length "
    "or an image that does not decode).",
    500: "The replica failed on this request (a bug; `detail` says what). A 500 without this "
    "body is Serve's proxy: the replica died mid-request, and the request is safe to repeat.",
    503: "No model loaded yet (set user_config.model).",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for `statuses`, each with the `ErrorBody` it really has.

    >>> sorted(error_responses(401, 503))
    [401, 503]
    """
    return {status: {"model": ErrorBody, "description": _WHY[status]} for status in statuses}


@dataclass
class Served:
    """What a replica serves now: the model's input kind ("text", "image", None: no model),
    its limits, and whether it asks for a bearer token."""

    kind: str | None = None
    limits: Limits = field(default_factory=Limits)
    secured: bool = False


# This process's replica (Serve runs one replica a process); TLRayServer keeps it current.
SERVED = Served()


def _items(limits: Limits, item: dict[str, Any], what: str) -> dict[str, Any]:
    return {"type": "array", "items": item, "minItems": 1, "maxItems": limits.max_texts,
            "description": f"{what}, in order (at most {limits.max_texts})."}  # fmt: skip


def _text_request(limits: Limits) -> dict[str, Any]:
    text: dict[str, Any] = {"type": "string"}
    if limits.long_texts == "reject":
        text["maxLength"] = limits.max_text_chars
    else:
        text["description"] = f"Cut to {limits.max_text_chars} characters."
    return {
        "title": "TextPredictRequest",
        "type": "object",
        "properties": {"texts": _items(limits, text, "Texts to classify")},
        "required": ["texts"],
        "additionalProperties": False,
        "examples": [{"texts": [EXAMPLE_TEXT[: limits.max_text_chars]]}],
    }


def _image_request(limits: Limits) -> dict[str, Any]:
    image = {"type": "string", "pattern": BASE64, "contentEncoding": "base64",
             "description": "A base64-encoded PNG or JPEG file (or a data: URL of one)."}  # fmt: skip
    schema: dict[str, Any] = {
        "title": "ImagePredictRequest",
        "type": "object",
        "properties": {"images": _items(limits, image, "Images to classify")},
        "required": ["images"],
        "additionalProperties": False,
    }
    if len(EXAMPLE_PNG) + 16 <= limits.max_body_bytes:
        schema["examples"] = [{"images": [EXAMPLE_PNG]}]
    return schema


def _upload(limits: Limits) -> dict[str, Any]:
    file = {"type": "string", "format": "binary", "description": "A PNG or JPEG file."}
    return {
        "title": "ImageUpload",
        "type": "object",
        "properties": {"image": _items(limits, file, "Image files (any field name), e.g. "
                                       "`curl -F image=@cat.png`")},  # fmt: skip
        "required": ["image"],
    }


def request_body(served: Served) -> dict[str, Any]:
    """The `requestBody` of `POST /v1/predict` for what `served` serves."""
    limits = served.limits
    if served.kind == "text":
        content = {"application/json": {"schema": _text_request(limits)}}
    elif served.kind == "image":
        content = {"application/json": {"schema": _image_request(limits)},
                   "multipart/form-data": {"schema": _upload(limits)}}  # fmt: skip
    else:  # no model yet: every request is answered 503 until one is loaded
        either = [_text_request(limits), _image_request(limits)]
        for schema in either:
            schema.pop("examples", None)
        content = {"application/json": {"schema": {"anyOf": either}}}
    return {"required": True, "content": content,
            "description": f"At most {limits.max_body_bytes} bytes (else 413)."}  # fmt: skip


def contract(base: dict[str, Any], served: Served) -> dict[str, Any]:
    """FastAPI's generated schema `base` (left unchanged), made the contract of `served`."""
    schema = copy.deepcopy(base)
    paths = schema.get("paths", {})
    if "/v1/predict" in paths:
        paths["/v1/predict"]["post"]["requestBody"] = request_body(served)
        too_large = paths["/v1/predict"]["post"]["responses"].get("413")
        if too_large is not None:
            too_large["description"] = f"Request body over {served.limits.max_body_bytes} bytes."
    for path, method in SECURED_ROUTES:
        operation = paths.get(path, {}).get(method)
        if operation is None:
            continue
        if served.secured:
            operation["security"] = [{"bearer": []}]
        else:
            operation["responses"].pop("401", None)
    if served.secured:
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["bearer"] = {"type": "http", "scheme": "bearer"}
    return schema


class ContractAPI(FastAPI):
    """A FastAPI app whose `/openapi.json` is `contract(generated schema, SERVED)`, built
    anew on each call (a swap may change the model's kind)."""

    def openapi(self) -> dict[str, Any]:
        return contract(super().openapi(), SERVED)
