"""Reading predict requests (`tl_ray.serve.inputs`) without Ray: multipart uploads through
Starlette's form parser with the server's limits, base64 images, and refusals that are one
4xx line. The route is the real `request_items` in a FastAPI app of its own, served by
Starlette's TestClient; over real Serve: test_openapi.py and tests/train/test_keras_training.py.
"""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from image_helpers import digits, png_bytes

from tl_ray.serve.api import Limits, RequestError
from tl_ray.serve.inputs import MAX_IMAGE_PIXELS, refuse, request_items

LIMITS = Limits(max_texts=4, max_text_chars=20, max_body_bytes=4096)
PNGS = [png_bytes(pixels) for pixels, _ in digits((0, 1), 2)]


def _client(kind: str, limits: Limits = LIMITS) -> TestClient:
    """A FastAPI app whose /v1/predict reads its request like a replica, for a model of `kind`
    that reads 8x8 images; it answers what it read."""
    app = FastAPI()
    app.add_exception_handler(RequestError, refuse)  # type: ignore[arg-type]
    model = SimpleNamespace(input_kind=kind, backbone=SimpleNamespace(cfg=SimpleNamespace(image_size=8)))

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict:
        items = await request_items(request, limits, model)
        return {"items": [item if isinstance(item, str) else item.tolist() for item in items]}

    return TestClient(app, raise_server_exceptions=False)


def _files(*pngs: bytes, field: str = "image") -> list:
    return [(field, (f"{i}.png", data, "image/png")) for i, data in enumerate(pngs)]


def _refused(answer, status: int, message: str) -> None:
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert message in detail and "\n" not in detail, detail


def test_uploaded_files_are_read_in_order_like_base64_images():
    from tl_ray.images import decode_image

    client = _client("image")
    uploaded = client.post("/v1/predict", files=_files(*PNGS[:3]), data={"note": "a field, ignored"})
    assert uploaded.status_code == 200, uploaded.text
    expected = [decode_image(data, 8).tolist() for data in PNGS[:3]]
    assert uploaded.json()["items"] == expected
    sent = {"images": [base64.b64encode(data).decode() for data in PNGS[:3]]}
    assert client.post("/v1/predict", json=sent).json()["items"] == expected
    other_names = client.post("/v1/predict", files=_files(PNGS[0], field="photo"))
    assert other_names.json()["items"] == expected[:1]


@pytest.mark.parametrize(
    "sent, status, message",
    [
        ({"files": _files(*PNGS, PNGS[0])}, 422, "more than 4 images in one request; the limit is 4"),
        ({"files": _files(PNGS[0]), "data": {f"f{i}": "x" for i in range(5)}}, 422,
         "more than 4 form fields"),
        ({"data": {"note": "no file"}, "files": {}}, 422, "no files in the multipart body"),
        ({"files": _files(b"\x89PNG not really")}, 422, "images[0]: cannot decode image"),
        ({"files": _files(PNGS[0], b"x" * 5000)}, 413, "the limit is 4096"),
    ],
)  # fmt: skip
def test_uploads_over_the_limits_or_without_images_are_refused(sent, status, message):
    if not sent.get("files"):  # a form without files: send it as multipart all the same
        sent = {"content": b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--b--\r\n',
                "headers": {"content-type": "multipart/form-data; boundary=b"}}  # fmt: skip
    _refused(_client("image").post("/v1/predict", **sent), status, message)


@pytest.mark.parametrize(
    "body, content_type, message",
    [
        (b"--b\r\nbroken", "multipart/form-data", "malformed multipart body (Missing boundary"),
        (b'--b\r\nContent-Disposition: form-data; filename="a.png"\r\n\r\nx\r\n--b--\r\n',
         "multipart/form-data; boundary=b", "malformed multipart body"),  # no field name
        (b"--b\r\nno headers end", "Multipart/Form-Data; boundary=b",
         "malformed multipart body (Invalid multipart data)"),  # read as multipart: any case
    ],
)  # fmt: skip
def test_malformed_multipart_is_a_400_in_one_line(body, content_type, message):
    answer = _client("image").post("/v1/predict", content=body, headers={"content-type": content_type})
    _refused(answer, 400, message)


def test_an_upload_to_a_text_model_and_texts_to_an_image_model_are_422():
    _refused(_client("text").post("/v1/predict", files=_files(PNGS[0])), 422,
             "this model classifies texts")  # fmt: skip
    _refused(_client("image").post("/v1/predict", json={"texts": ["a"]}), 422,
             "this model classifies images")  # fmt: skip
    assert _client("text").post("/v1/predict", json={"texts": ["a"]}).json() == {"items": ["a"]}


def test_an_image_declaring_too_many_pixels_is_refused_before_it_is_decoded():
    from PIL import Image

    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")  # a few KB on the wire
    assert len(buffer.getvalue()) < 100_000
    answer = _client("image", Limits()).post("/v1/predict", files=_files(buffer.getvalue()))
    _refused(answer, 422, f"images[0] is {side}x{side} pixels; the limit is {MAX_IMAGE_PIXELS}")


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    parts=st.lists(st.tuples(st.sampled_from(["image", "x", ""]), st.binary(max_size=300),
                             st.booleans()), max_size=6),
    noise=st.binary(max_size=64),
    cut=st.integers(min_value=0, max_value=2000),
)  # fmt: skip
def test_any_multipart_body_gets_a_4xx_or_a_200(parts, noise, cut):
    """Uploads built from arbitrary parts, then cut or given trailing noise: never a 5xx."""
    chunks = []
    for name, data, is_file in parts:
        filename = '; filename="f.png"' if is_file else ""
        chunks.append(f'--bnd\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n\r\n'
                      .encode() + (PNGS[0] if data == b"" else data) + b"\r\n")  # fmt: skip
    body = (b"".join(chunks) + b"--bnd--\r\n" + noise)[: cut or None]
    answer = _client("image").post("/v1/predict", content=body,
                                   headers={"content-type": "multipart/form-data; boundary=bnd"})
    assert answer.status_code in (200, 400, 413, 422), answer.text
    if answer.status_code != 200:
        assert "\n" not in answer.json()["detail"]
    else:
        assert np.asarray(answer.json()["items"]).shape[1:] == (8, 8, 3)


def test_an_internal_error_is_a_500_with_the_error_body_and_the_replica_app_uses_it():
    """tl-ray's own 500 carries `{"detail": one line}`, which `Client` does not retry; Serve's
    proxy answers a replica that died mid-request with a bare 500, which it does."""
    from tl_ray.client import _retryable
    from tl_ray.serve.app import api
    from tl_ray.serve.inputs import failed

    assert api.exception_handlers[Exception] is failed  # the replica's app
    app = FastAPI()
    app.add_exception_handler(Exception, failed)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("the model broke\nat layer 3")

    answer = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert answer.status_code == 500 and answer.json() == {"detail": "internal error: RuntimeError: the model broke"}
    assert not _retryable(answer)
    bare = type(answer)(500, text="Internal Server Error")
    assert _retryable(bare)
