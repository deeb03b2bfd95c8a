"""Reading a `POST /v1/predict` request: the body within its byte limit, JSON or a multipart
upload (Starlette's form parser, python-multipart underneath), and images decoded to pixels.
Every refusal is a `RequestError`: a 4xx status and one line; any other error is a 500 with the
same body (`failed`). No Ray here.

Example:
    >>> items = await request_items(request, Limits(), predictor)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import Message

from tl_ray.serve.api import (
    Limits,
    RequestError,
    one_line,
    parse_predict_body,
)

__all__ = [
    "MAX_IMAGE_PIXELS",
    "decode_base64_images",
    "decoded_images",
    "failed",
    "multipart_files",
    "read_body",
    "refuse",
    "request_items",
]

# Most pixels in one image (width x height) a replica decodes; larger ones are refused before
# their pixels are read (a small PNG can declare a huge image).
MAX_IMAGE_PIXELS = 4096 * 4096
_UPLOAD_HINT = "send files like -F image=@photo.png"


async def refuse(request: Request, error: RequestError) -> JSONResponse:
    """The answer to a refused request: its status, `{"detail": one line}` (`ErrorBody`)."""
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse({"detail": error.message}, status_code=error.status, headers=headers)


async def failed(request: Request, error: Exception) -> JSONResponse:
    """The answer to a request the replica failed on (a bug, not the request): 500 with
    `ErrorBody`. Serve's proxy answers a request whose replica died mid-way with a bare 500
    ("Internal Server Error", no JSON): the body tells the two apart, and `Client` retries
    only the bare one. Starlette re-raises `error` after this answer, so it is logged."""
    return JSONResponse({"detail": f"internal error: {one_line(error)}"}, status_code=500)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; RequestError(413) once it is (or declares to be) over `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body has {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes")
    return bytes(body)


def decode_base64_images(images: list[str]) -> list[bytes]:
    """The request's base64 strings -> file bytes; RequestError(422) names a bad one.

    >>> decode_base64_images(["aGk="])
    [b'hi']
    """
    decoded = []
    for i, text in enumerate(images):
        try:
            decoded.append(base64.b64decode(text.split(",", 1)[-1] if text.startswith("data:") else text,
                                            validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(422, f"images[{i}] is not valid base64") from None
    return decoded


def _multipart_refusal(message: str, limits: Limits) -> RequestError:
    if message.startswith("Too many files"):
        limit = limits.max_texts
        return RequestError(422, f"more than {limit} images in one request; the limit is {limit}")
    if message.startswith("Too many fields"):
        return RequestError(422, f"more than {limits.max_texts} form fields in one request; "
                            f"{_UPLOAD_HINT}")  # fmt: skip
    if message.startswith("Part exceeded"):
        return RequestError(413, f"a multipart field is over the limit of {limits.max_body_bytes} bytes")
    return RequestError(400, f"malformed multipart body ({message.rstrip('.')}); {_UPLOAD_HINT}")


async def multipart_files(request: Request, body: bytes, limits: Limits) -> list[bytes]:
    """The files of the `multipart/form-data` `body` of `request`, in order; other fields are
    ignored. At most `limits.max_texts` files and fields (422 above), parts within the body
    limit."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    sent = False

    async def replay() -> Message:  # the body, already read within its limit
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    parsed = Request(request.scope, receive=replay)
    try:
        form = await parsed.form(max_files=limits.max_texts, max_fields=limits.max_texts,
                                 max_part_size=limits.max_body_bytes)  # fmt: skip
    except HTTPException as error:  # how Starlette reports a MultiPartException inside an app
        raise _multipart_refusal(str(error.detail), limits) from None
    except MultiPartException as error:
        raise _multipart_refusal(error.message, limits) from None
    try:
        files = [item for _, item in form.multi_items() if isinstance(item, UploadFile)]
        if not files:
            raise RequestError(422, f"no files in the multipart body; {_UPLOAD_HINT}")
        return [await upload.read() for upload in files]
    finally:
        await form.close()


def _decode_one(data: bytes, size: int, name: str) -> Any:
    from PIL import Image

    from tl_ray.errors import DataError
    from tl_ray.images import decode_image

    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            width, height = header.size
    except Exception:  # not an image PIL knows: decode_image names the problem
        width = height = 0
    if width * height > MAX_IMAGE_PIXELS:
        raise RequestError(422, f"{name} is {width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS} "
                           "pixels")  # fmt: skip
    try:
        return decode_image(data, size, name=name)
    except DataError as error:
        raise RequestError(422, str(error)) from None
    except Exception as error:  # untrusted bytes: a decoder failing any other way is still a 422
        raise RequestError(422, f"{name}: cannot decode image ({one_line(error)}); expected PNG "
                           "or JPEG") from None  # fmt: skip


def decoded_images(files: list[bytes], size: int) -> list[Any]:
    """Image files -> (size, size, 3) pixels; RequestError(422) names one that does not decode."""
    return [_decode_one(data, size, f"images[{i}]") for i, data in enumerate(files)]


def _is_multipart(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"


async def request_items(request: Request, limits: Limits, predictor: Any) -> list[Any]:
    """The texts (or decoded images) of a request, checked against what the model reads."""
    body = await read_body(request, limits.max_body_bytes)
    if _is_multipart(request.headers.get("content-type", "")):
        files = await multipart_files(request, body, limits)
    else:
        parsed = parse_predict_body(body, limits)
        if parsed.texts is not None:
            if predictor.input_kind != "text":
                raise RequestError(422, 'this model classifies images; send {"images": '
                                   '[base64 PNG/JPEG, ...]} or a multipart upload')  # fmt: skip
            return parsed.texts
        files = decode_base64_images(parsed.images or [])
    if predictor.input_kind != "image":
        raise RequestError(422, 'this model classifies texts; send {"texts": ["...", ...]}')
    return await asyncio.to_thread(decoded_images, files, predictor.backbone.cfg.image_size)
