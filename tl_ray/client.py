"""A small HTTP client for a tl-ray endpoint: timeouts, retries, optional bearer token.

Example:
    >>> with Client("http://127.0.0.1:8000") as client:               # doctest: +SKIP
    ...     client.predict(["a gripping, funny film"])[0]["label"]
    'pos'
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx

from tl_ray.errors import TLRayError

__all__ = ["Client", "ClientError", "TOKEN_ENV", "predict"]

TOKEN_ENV = "TL_RAY_SERVE_TOKEN"  # same variable the server reads
# 503: no replica free (or none loaded yet); 502/504: a gateway in front gave up on the
# replica. A 500 without tl-ray's error body is Serve's proxy answering for a replica that
# died mid-request (tl-ray's own 500s carry `{"detail": ...}`): retried too, see _retryable.
RETRY_STATUSES = frozenset({502, 503, 504})
# A refused connection (endpoint restarting), or one dropped before the answer came (the
# replica or proxy serving it was killed): the request never completed, and every endpoint
# of tl-ray's API is safe to repeat (predict is a pure function of its input).
RETRY_ERRORS = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class ClientError(TLRayError):
    """The endpoint refused or failed a request; `status` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    for suffix in ("/v1/predict", "/v1/model", "/healthz"):
        url = url.removesuffix(suffix)
    return url


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    return str(detail)[:500]


def _retryable(response: httpx.Response) -> bool:
    """A status worth repeating the request for (every tl-ray endpoint is safe to repeat)."""
    if response.status_code in RETRY_STATUSES:
        return True
    if response.status_code != 500:
        return False
    try:
        body = response.json()
    except ValueError:
        return True  # not tl-ray's answer: the proxy's, for a replica that died
    return not (isinstance(body, dict) and isinstance(body.get("detail"), str))


class Client:
    """Calls `POST /v1/predict`, `GET /v1/model` and `GET /healthz` of one endpoint.

    `token` defaults to $TL_RAY_SERVE_TOKEN or the content of `token_file`. A 502/503/504 (no
    replica free, replica restarting), a bare 500 (the proxy's, for a replica that died
    mid-request), a refused connection and one dropped before the answer (RETRY_ERRORS) are
    retried `retries` times with exponential backoff (honouring Retry-After); other errors
    raise ClientError at once (httpx's own errors never escape).

    >>> Client("http://127.0.0.1:8000/v1/predict").url                  # doctest: +SKIP
    'http://127.0.0.1:8000'
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_file: str | Path | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = _base_url(url)
        if token is None and token_file is not None:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        token = token if token is not None else os.environ.get(TOKEN_ENV, "").strip() or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries, self.backoff = retries, backoff
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _wait(self, attempt: int, response: httpx.Response | None) -> None:
        delay = self.backoff * 2**attempt
        retry_after = response.headers.get("retry-after", "") if response is not None else ""
        if retry_after.replace(".", "", 1).isdigit():
            delay = min(float(retry_after), 30.0)
        time.sleep(delay)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request (retrying as the class says); the decoded JSON answer."""
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TimeoutException:
                raise ClientError(f"{method} {self.url}{path} timed out") from None
            except RETRY_ERRORS as error:
                if last:
                    what = "cannot connect to" if isinstance(error, httpx.ConnectError) else "connection lost to"
                    raise ClientError(f"{what} {self.url}: {error}") from None
                self._wait(attempt, None)
                continue
            except httpx.HTTPError as error:  # anything else httpx raises: still one ClientError
                raise ClientError(f"{method} {self.url}{path} failed: {type(error).__name__}: {error}") from None
            if _retryable(response) and not last:
                self._wait(attempt, response)
                continue
            if response.status_code >= 400:
                status = response.status_code
                raise ClientError(f"{method} {path} -> {status}: {_detail(response)}", status)
            return response.json()
        raise AssertionError("unreachable")

    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        """One `{"label", "score", "probabilities"}` per text, in order."""
        return self.request("POST", "/v1/predict", json={"texts": list(texts)})["predictions"]

    def model(self) -> dict[str, Any]:
        """The served model: backbone, depth, metrics, trial, labels (and replica stats)."""
        return self.request("GET", "/v1/model")

    def healthy(self) -> bool:
        """True when the endpoint answers /healthz with 200."""
        try:
            self.request("GET", "/healthz")
        except ClientError:
            return False
        return True

    def wait_ready(self, timeout_s: float, poll_s: float = 1.0) -> None:
        """Block until /healthz answers 200 (e.g. while `tl-ray serve` starts up).

        Raises ClientError when `timeout_s` passes first, or at once on a 401/403 (a wrong
        token does not fix itself by waiting).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                response = self._http.get("/healthz")
                if response.status_code == 200:
                    return
                if response.status_code in (401, 403):
                    raise ClientError(f"GET /healthz -> {response.status_code}: {_detail(response)}",
                                      response.status_code)
                seen = f"{response.status_code}"
            except (httpx.ConnectError, httpx.TimeoutException, httpx.RemoteProtocolError) as error:
                seen = type(error).__name__
            if time.monotonic() + poll_s > deadline:
                raise ClientError(f"{self.url} not ready after {timeout_s:g} s (last: {seen})")
            time.sleep(poll_s)


def predict(url: str, texts: list[str], **options: Any) -> list[dict[str, Any]]:
    """One-shot `Client(url, **options).predict(texts)`.

    >>> predict("http://127.0.0.1:8000", ["dull and far too long"])[0]["label"]  # doctest: +SKIP
    'neg'
    """
    with Client(url, **options) as client:
        return client.predict(texts)
