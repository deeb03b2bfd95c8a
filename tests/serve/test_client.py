"""The HTTP client and `tl-ray query` against a tiny local HTTP server (no Ray): retries on
503 and on the proxy's bare 500, no retry on 4xx or tl-ray's own 500, bearer token, timeouts,
refused connections."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tl_ray.cli.app import main
from tl_ray.client import Client, ClientError, predict

PREDICTION = {"label": "pos", "score": 0.9, "probabilities": {"neg": 0.1, "pos": 0.9}}


class FakeEndpoint(ThreadingHTTPServer):
    """Answers `script` statuses in turn (then 200s) and records each request's headers. A
    status is answered with tl-ray's `{"detail": ...}` body; "500-bare" is Serve's proxy's 500
    (plain text, as when the replica died mid-request)."""

    def __init__(self, script: list[int], delay_s: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script, self.delay_s, self.seen = list(script), delay_s, []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeEndpoint

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _answer(self, body: dict | None = None) -> None:
        server = self.server
        server.seen.append((self.command, self.path, self.headers.get("Authorization")))
        time.sleep(server.delay_s)
        status = server.script.pop(0) if server.script else 200
        kind = "application/json"
        if status == "500-bare":
            status, kind, data = 500, "text/plain; charset=utf-8", b"Internal Server Error"
        else:
            data = json.dumps(body or {"status": "ok"} if status == 200 else {"detail": f"scripted {status}"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        if status == 503:
            self.send_header("Retry-After", "0")
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client that timed out
            self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        texts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["texts"]
        self._answer({"predictions": [PREDICTION] * len(texts), "model": {"path": "/m"}})

    def do_GET(self) -> None:  # noqa: N802
        self._answer({"backbone": "minilm"} if self.path == "/v1/model" else None)


@pytest.fixture
def endpoint(request):
    server = FakeEndpoint(*getattr(request, "param", ([],)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("endpoint", [([503, 503],)], indirect=True)
def test_client_retries_503_then_succeeds(endpoint):
    with Client(f"{endpoint.url}/v1/predict", retries=3, backoff=0.01) as client:
        assert client.predict(["a", "b"]) == [PREDICTION, PREDICTION]
    assert [path for _, path, _ in endpoint.seen] == ["/v1/predict"] * 3


@pytest.mark.parametrize("endpoint", [([503, 503, 503],)], indirect=True)
def test_client_gives_up_after_its_retries(endpoint):
    with pytest.raises(ClientError, match="503: scripted 503") as error:
        predict(endpoint.url, ["a"], retries=2, backoff=0.01)
    assert error.value.status == 503 and len(endpoint.seen) == 3


@pytest.mark.parametrize("endpoint", [(["500-bare", 502, 504, "500-bare"],)], indirect=True)
def test_client_retries_the_proxys_bare_500_and_gateway_errors(endpoint):
    with Client(endpoint.url, retries=4, backoff=0.01) as client:
        assert client.predict(["a"]) == [PREDICTION]
    assert len(endpoint.seen) == 5


@pytest.mark.parametrize("endpoint", [([500],)], indirect=True)
def test_client_does_not_retry_tl_rays_own_500(endpoint):
    """A 500 with tl-ray's error body is the replica failing on this input: not repeated."""
    with pytest.raises(ClientError, match="500: scripted 500") as error:
        predict(endpoint.url, ["a"], retries=3, backoff=0.01)
    assert error.value.status == 500 and len(endpoint.seen) == 1


@pytest.mark.parametrize("endpoint", [([422],)], indirect=True)
def test_client_does_not_retry_a_4xx(endpoint):
    with pytest.raises(ClientError, match="422: scripted 422"):
        predict(endpoint.url, ["a"], retries=3, backoff=0.01)
    assert len(endpoint.seen) == 1


def test_client_sends_the_token_from_env_or_file(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TL_RAY_SERVE_TOKEN", "from-env")
    with Client(endpoint.url) as client:
        assert client.model() == {"backbone": "minilm"} and client.healthy()
    (tmp_path / "token").write_text("from-file\n", encoding="utf-8")
    predict(endpoint.url, ["a"], token_file=tmp_path / "token")
    sent = [auth for _, _, auth in endpoint.seen]
    assert sent == ["Bearer from-env", "Bearer from-env", "Bearer from-file"]


@pytest.mark.parametrize("endpoint", [([], 1.0)], indirect=True)
def test_client_times_out(endpoint):
    with pytest.raises(ClientError, match="timed out"):
        predict(endpoint.url, ["a"], timeout=0.2)


def test_client_retries_a_refused_connection_then_reports_it():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ClientError, match="cannot connect"):
        predict(f"http://127.0.0.1:{port}", ["a"], retries=2, backoff=0.05)
    assert time.monotonic() - started >= 0.15  # 0.05 + 0.1 of backoff


@pytest.mark.parametrize("endpoint", [([503],)], indirect=True)
def test_query_command_prints_one_json_line_per_text(endpoint, monkeypatch):
    monkeypatch.delenv("TL_RAY_SERVE_TOKEN", raising=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["query", endpoint.url, "great film", "dull film", "--retries", "1"]) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines == [{"text": "great film", **PREDICTION}, {"text": "dull film", **PREDICTION}]


def test_query_command_errors_are_one_line(endpoint, capsys):
    assert main(["query", endpoint.url]) == 2
    assert capsys.readouterr().err.startswith("error: nothing to query")
    endpoint.script[:] = [401]
    assert main(["query", endpoint.url, "x", "--retries", "0"]) == 2
    assert "401: scripted 401" in capsys.readouterr().err


@pytest.mark.parametrize("endpoint", [([503, 404],)], indirect=True)
def test_wait_ready_polls_until_healthy(endpoint):
    with Client(endpoint.url) as client:
        client.wait_ready(5, poll_s=0.01)
    assert [path for _, path, _ in endpoint.seen] == ["/healthz"] * 3


def test_wait_ready_gives_up_with_the_last_answer():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(ClientError, match=r"not ready after 0.3 s \(last: ConnectError\)"):
            client.wait_ready(0.3, poll_s=0.05)


@pytest.mark.parametrize("endpoint", [([401],)], indirect=True)
def test_wait_ready_stops_at_once_on_a_wrong_token(endpoint):
    with Client(endpoint.url) as client, pytest.raises(ClientError, match="401"):
        client.wait_ready(30, poll_s=5)


@pytest.mark.parametrize("endpoint", [([503],)], indirect=True)
def test_query_waits_for_the_endpoint(endpoint, monkeypatch):
    monkeypatch.delenv("TL_RAY_SERVE_TOKEN", raising=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["query", endpoint.url, "fine", "--wait", "10"]) == 0
    assert json.loads(out.getvalue())["label"] == "pos"
