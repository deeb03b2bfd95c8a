"""Security checks, without Ray running: what `tl-ray submit` would upload (never a file
outside the working dir, symlinks included), a non-loopback `tl-ray serve` without a token is
refused, and job-server failures are classified by the HTTP status the client carries, not by
what the error text happens to contain (issue 18). Token files: tests/drills/test_cluster_drill.py."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tl_ray.cli.app import main
from tl_ray.errors import ConfigError
from tl_ray.jobs import DEFAULT_EXCLUDES, JobError, JobsClient, JobServerError, SubmitOptions, runtime_env

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- not for the cluster"


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the working dir holding a secret."""
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "id_ed25519").write_bytes(SECRET)
    return folder


@pytest.fixture
def workdir(tmp_path) -> Path:
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "run.yaml").write_text("data: {path: data.csv}\n", encoding="utf-8")
    (folder / "conf").mkdir()
    (folder / "conf" / "space.yaml").write_text("params: {}\n", encoding="utf-8")
    return folder


def _ray_package(root: Path, tmp_path: Path) -> dict[str, bytes]:
    """What Ray's own packaging puts in the working_dir zip for `root` (no size check, no
    symlink check: Ray's behaviour on its own)."""
    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / "package.zip"
    target.unlink(missing_ok=True)
    create_package(str(root), target, include_gitignore=True, excludes=list(DEFAULT_EXCLUDES))
    with zipfile.ZipFile(target) as package:
        return {name: package.read(name) for name in package.namelist() if not name.endswith("/")}


@pytest.mark.parametrize("link", ["file", "folder", "nested", "loop"])
def test_submit_refuses_a_symlink_that_leads_out_of_the_working_dir(workdir, outside, tmp_path, link):
    where = {"file": workdir / "key", "folder": workdir / "ssh", "nested": workdir / "conf" / "ssh",
             "loop": workdir / "conf" / "up"}[link]  # fmt: skip
    target = {"file": outside / "id_ed25519", "loop": workdir}.get(link, outside)
    where.symlink_to(target)
    if link != "loop":  # left alone, Ray would ship the secret the link points to
        assert SECRET in _ray_package(workdir, tmp_path).values()
    with pytest.raises(ConfigError) as refused:
        runtime_env(SubmitOptions(working_dir=str(workdir)))
    assert f"{where} is a symlink to {target.resolve()}" in str(refused.value)
    assert ".rayignore" in str(refused.value)


def test_links_inside_the_working_dir_or_excluded_ones_are_shipped_as_usual(workdir, outside, tmp_path):
    (workdir / "same.yaml").symlink_to(workdir / "run.yaml")  # stays inside: its content is the folder's
    (workdir / "conf-link").symlink_to(workdir / "conf")
    (workdir / "dangling").symlink_to(workdir / "missing")  # Ray packs nothing for it
    (workdir / ".venv" / "bin").mkdir(parents=True)  # excluded by default, and its links lead out
    (workdir / ".venv" / "bin" / "python").symlink_to(outside / "id_ed25519")
    (workdir / "secrets").symlink_to(outside)
    (workdir / ".rayignore").write_text("secrets\n", encoding="utf-8")  # listed: never walked
    env = runtime_env(SubmitOptions(working_dir=str(workdir)))
    assert env["working_dir"] == str(workdir.resolve()) and ".venv" in env["excludes"]
    shipped = _ray_package(workdir, tmp_path)
    assert SECRET not in shipped.values()
    assert {"run.yaml", "same.yaml", "conf/space.yaml", "conf-link/space.yaml"} <= set(shipped)
    assert not [name for name in shipped if name.startswith((".venv", "secrets"))]


def test_submit_checks_before_it_reaches_the_cluster(workdir, outside, monkeypatch, capsys):
    """Both refusals are one line, before any connection (nothing listens on port 9)."""
    monkeypatch.chdir(workdir)
    address = ["--address", "http://127.0.0.1:9"]
    assert main(["submit", *address, "--", "train", "../home/id_ed25519"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ../home/id_ed25519 is outside --working-dir"), err
    (workdir / "key").symlink_to(outside / "id_ed25519")
    assert main(["submit", *address, "--", "train", "run.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --working-dir {workdir}: {workdir / 'key'} is a symlink"), err


@pytest.fixture
def fake_model(tmp_path) -> Path:
    """The shape of a model folder (tl-ray serve checks the host before loading anything)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format_version": 1, "backbone": {"kind": "hf-text"}}))
    (folder / "labels.json").write_text('["neg", "pos"]')
    return folder


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.org"])
def test_serve_on_a_non_loopback_host_without_a_token_is_refused(fake_model, host, monkeypatch, capsys):
    import tl_ray.train.driver

    def no_ray(*args, **kwargs):
        raise AssertionError("refused too late: Ray was started")

    monkeypatch.delenv("TL_RAY_SERVE_TOKEN", raising=False)
    monkeypatch.setattr(tl_ray.train.driver, "ensure_ray", no_ray)
    assert main(["serve", str(fake_model), "--host", host]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --host {host} without a token exposes the model to the network; "
                   "set $TL_RAY_SERVE_TOKEN or --token-file, or pass --insecure"]  # fmt: skip
    assert not (fake_model.parent / ".served").exists()


def test_serve_with_haproxy_ingress_without_a_token_is_refused(fake_model, monkeypatch, capsys):
    monkeypatch.delenv("TL_RAY_SERVE_TOKEN", raising=False)
    assert main(["serve", str(fake_model), "--ingress", "haproxy"]) == 2
    assert "binds every replica's port on all interfaces" in capsys.readouterr().err


def test_with_a_token_the_open_host_is_allowed_and_only_its_digest_is_written(fake_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TL_RAY_SERVE_TOKEN", "s3cret-token")
    target = tmp_path / "serve.yaml"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["serve", str(fake_model), "--export-config", str(target)]) == 0
    text = target.read_text(encoding="utf-8")
    assert "s3cret-token" not in text and "token_sha256" in text and "host: 0.0.0.0" in text


class _JobServer(ThreadingHTTPServer):
    """Answers like Ray's job server does: /api/version, and per-path scripted statuses."""

    def __init__(self, answers: dict[str, tuple[int, str]]) -> None:
        super().__init__(("127.0.0.1", 0), _JobHandler)
        self.answers, self.seen = answers, []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _JobHandler(BaseHTTPRequestHandler):
    server: _JobServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        import ray

        self.server.seen.append((self.path, self.headers.get("Authorization")))
        status, body = self.server.answers.get(self.path, (200, json.dumps({"ray_version": ray.__version__})))
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextlib.contextmanager
def job_server(answers: dict[str, tuple[int, str]]):
    server = _JobServer(answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def token_env(monkeypatch, tmp_path):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    return monkeypatch


def test_a_403_whose_text_says_401_is_a_rejected_token(token_env):
    token_env.setenv("RAY_AUTH_TOKEN", "not-that-clusters-token")
    with job_server({"/api/version": (403, "Forbidden: Invalid authentication token (ref 401-77)")}) as server:
        with pytest.raises(JobError, match="rejected the token from RAY_AUTH_TOKEN"):
            JobsClient(server.url)
    assert server.seen[0][1] == "Bearer not-that-clusters-token"


def test_a_401_is_a_missing_token_or_one_not_taken_as_credentials(token_env):
    with job_server({"/api/version": (401, "Unauthorized: Missing authentication token")}) as server:
        with pytest.raises(JobError, match="requires a token and none was found"):
            JobsClient(server.url)
        token_env.setenv("RAY_AUTH_TOKEN", "x")
        with pytest.raises(JobError, match=r"did not accept the token from RAY_AUTH_TOKEN as credentials \(HTTP 401\)"):
            JobsClient(server.url)


def test_job_errors_carry_the_status_not_the_text(token_env):
    answers = {"/api/jobs/raysubmit_404": (404, "Job raysubmit_404 does not exist"),
               "/api/jobs/raysubmit_401": (500, "internal error while reading job raysubmit_401: 401 bytes")}  # fmt: skip
    with job_server(answers) as server:
        client = JobsClient(server.url)
        with pytest.raises(JobError, match="no job 'raysubmit_404'"):
            client.status("raysubmit_404")
        with pytest.raises(JobError) as caught:
            client.status("raysubmit_401")
    assert str(caught.value).startswith(f"the job server at {server.url} answered HTTP 500: internal error")
    assert isinstance(caught.value.__context__, JobServerError) and caught.value.__context__.status == 500
