"""The Serve endpoint for real, on loopback, with a tiny model: app `tlr` is deployed from the
config `tl-ray serve --export-config` writes (the `serve deploy` path), app `cli` by
`tl-ray serve --detach` with a bearer token.

Order matters and is kept: correctness and bad input on one replica, then batching,
autoscaling up and down, a killed replica, a model swap under load, swaps to folders that do
not load (the replica keeps its model), the health check, metrics.

Tests that need a settled deployment wait on Serve's own view (`get_serve_details`: app
RUNNING, deployment HEALTHY with the config just deployed, its replicas all RUNNING) and on
the replica's own `/v1/model`, never on sleeps.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tl_ray.cli.app import main
from tl_ray.cli.serve import versioned_model
from tl_ray.client import Client
from helpers import cli_lines as _cli, free_port

TEXTS = ["a good, moving film", "dull and tedious", "the plot is weak but the actors are great"]
APP, CLI_APP, TOKEN = "tlr", "cli", "test-token-123"
# Small limits and fast autoscaling, so every behaviour shows within seconds.
TLR_OPTIONS = [
    "--num-cpus", "0.25", "--min-replicas", "1", "--max-replicas", "2",
    "--target-ongoing-requests", "2", "--upscale-delay-s", "0.5", "--downscale-delay-s", "2",
    "--max-batch-size", "8", "--batch-wait-ms", "50",
    "--max-texts", "4", "--max-text-chars", "100", "--max-body-bytes", "2048",
]  # fmt: skip



def _model_folder(folder: Path, tiny_bert: str, seed: int) -> Path:
    """A checkpoint folder without training: the tiny BERT and a fresh, seeded head."""
    import torch

    from tl_ray.backbones.registry import get_backbone
    from tl_ray.config import HFTextConfig
    from tl_ray.data import LabelMap
    from tl_ray.train.checkpoint import write_model_folder

    torch.manual_seed(seed)
    backbone = get_backbone(HFTextConfig(name_or_path=tiny_bert, unfreeze_depth=1))
    folder.mkdir(parents=True)
    labels = LabelMap(("neg", "pos"))
    metrics = {"val_accuracy": 0.75}
    write_model_folder(folder, backbone, backbone.build(2), labels, metrics=metrics, epoch=1,
                       extra={"max_length": 32})  # fmt: skip
    return folder


def _replicas() -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments["TLRayModel"]
    return status.replica_states.get("RUNNING", 0)


def _replica_names() -> set[str]:
    import ray

    names = {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)}
    return {name for name in names if name.startswith(f"SERVE_REPLICA::{APP}#")}


def _wait(condition, timeout: float, what: str, every: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def _serve_client():
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(os.environ["RAY_API_SERVER_ADDRESS"])


def _deploy_config(config: dict) -> None:
    """What `serve deploy FILE` does: PUT the config to the dashboard's Serve REST API."""
    _serve_client().deploy_applications(config)


def _deployment() -> dict:
    """Serve's details of app `tlr`'s deployment (status, deployment_config, replicas)."""
    return _serve_client().get_serve_details()["applications"][APP]["deployments"]["TLRayModel"]


def _replicas_alive(deployment: dict) -> bool:
    """Serve's replicas are all RUNNING and are exactly the live replica actors. Serve notices a
    killed actor only at its next health check, listing it RUNNING until then."""
    replicas = deployment.get("replicas", [])
    names = {replica.get("actor_name") for replica in replicas}
    return all(replica["state"] == "RUNNING" for replica in replicas) and names == _replica_names()


def _settled(model: str, replicas: int = 1) -> bool:
    """Serve applied the config serving `model` on `replicas` replicas, and nothing moves:
    app RUNNING, deployment HEALTHY, exactly that many replicas, all RUNNING and alive (none
    starting, updating, stopping or dead but not yet noticed)."""
    details = _serve_client().get_serve_details()["applications"].get(APP) or {}
    deployment = details.get("deployments", {}).get("TLRayModel", {})
    config = deployment.get("deployment_config", {})
    return (
        details.get("status") == "RUNNING"
        and deployment.get("status") == "HEALTHY"
        and (config.get("user_config") or {}).get("model") == model
        and config.get("autoscaling_config", {}).get("max_replicas") == replicas
        and len(deployment["replicas"]) == replicas
        and _replicas_alive(deployment)
    )


def _replica_ids() -> dict[str, str]:
    return {r["replica_id"]: r.get("actor_id") for r in _deployment()["replicas"]}  # none yet: starting


def _pinned_config(served: dict, model: str) -> dict:
    """The served config on exactly one replica (no autoscaling), serving `model`."""
    config = copy.deepcopy(served["config"])
    deployment = config["applications"][0]["deployments"][0]
    deployment["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    deployment["user_config"]["model"] = model
    return config


def _deploy_and_settle(config: dict, what: str) -> None:
    _deploy_config(config)
    model = config["applications"][0]["deployments"][0]["user_config"]["model"]
    _wait(lambda: _settled(model), 120, what)


def _described(url: str) -> dict:
    answer = httpx.get(f"{url}/v1/model", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _post(url: str, texts: list[str]) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", json={"texts": texts}, timeout=30)


class Load:
    """`concurrency` threads posting one text each, back to back, until the block ends."""

    def __init__(self, url: str, concurrency: int) -> None:
        self.url, self.stop = url, threading.Event()
        self.results: list[tuple[int, str, float]] = []  # (status, model path or error, sent)
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(concurrency)]

    def _run(self, i: int) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    answer = http.post(f"{self.url}/v1/predict", json={"texts": [TEXTS[i % 3]]})
                    ok = answer.status_code == 200
                    detail = answer.json()["model"]["path"] if ok else answer.text
                    self.results.append((answer.status_code, detail, sent))
                except httpx.HTTPError as error:
                    self.results.append((0, repr(error), sent))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def failures(self) -> list[tuple[int, str, float]]:
        return [result for result in self.results if result[0] != 200]


class ClientLoad(Load):
    """`concurrency` threads calling `Client.predict` (its retries on) back to back."""

    def _run(self, i: int) -> None:
        with Client(self.url, retries=8, backoff=0.25, timeout=60) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    client.predict([TEXTS[i % 3]])
                    self.results.append((200, "", sent))
                except Exception as error:  # noqa: BLE001  ClientError, or anything else: a failed call
                    self.results.append((getattr(error, "status", -1), repr(error), sent))


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_bert) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    (root / "experiment").mkdir()
    model_a = _model_folder(root / "model-a", tiny_bert, seed=1)
    best = {"trial": 7, "epoch": 1, "metric": "val_accuracy", "value": 0.75,
            "params": {"train.lr": 1e-4}, "metrics": {"val_accuracy": 0.75},
            "checkpoint": None, "model": str(model_a)}  # fmt: skip
    (root / "experiment" / "best.json").write_text(json.dumps(best), encoding="utf-8")
    (root / "token").write_text(TOKEN + "\n", encoding="utf-8")
    model_b = _model_folder(root / "model-b", tiny_bert, seed=2)
    return {"experiment": root / "experiment", "a": model_a, "b": model_b,
            "token": root / "token", "config": root / "serve.yaml"}  # fmt: skip


@pytest.fixture(scope="module")
def served(ray_session, models):
    """Serve on a free port with apps `tlr` (exported config) and `cli` (token); shut after."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    experiment, config_file = str(models["experiment"]), str(models["config"])
    _cli("serve", experiment, "--export-config", config_file, "--name", APP, "--port", str(port),
         *TLR_OPTIONS)  # fmt: skip
    config = yaml.safe_load(models["config"].read_text(encoding="utf-8"))
    # Fast autoscaling metrics for the test (Serve's defaults are 10 s and 30 s).
    autoscaling = config["applications"][0]["deployments"][0]["autoscaling_config"]
    autoscaling.update(metrics_interval_s=0.5, look_back_period_s=2)
    _deploy_config(config)
    (info,) = _cli("serve", experiment, "--detach", "--name", CLI_APP, "--route-prefix", "/cli",
                   "--host", "127.0.0.1", "--port", str(port), "--token-file", str(models["token"]),
                   "--num-cpus", "0.25", "--max-replicas", "1", "--truncate",
                   "--max-text-chars", "10")  # fmt: skip
    _wait(lambda: serve.status().applications[APP].status == "RUNNING", 120, f"app {APP}")
    model = config["applications"][0]["deployments"][0]["user_config"]["model"]
    assert Path(model).parent == models["a"].parent / ".served"  # a versioned copy of model a
    try:
        yield {"url": f"http://127.0.0.1:{port}", "config": config, "cli": info, "model": model}
    finally:
        serve.shutdown()


def test_predictions_over_http_equal_the_predictor(served, models):
    from tl_ray.serve.predictor import Predictor

    with Client(served["url"]) as client:
        answer = client.request("POST", "/v1/predict", json={"texts": TEXTS})
        described = client.model()
        assert client.healthy()
    expected = Predictor(models["a"]).predict(TEXTS)
    for got, want in zip(answer["predictions"], expected, strict=True):
        assert got["label"] == want["label"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
    assert answer["model"] == {"path": served["model"], "backbone": described["backbone"], "trial": 7}
    assert described["version"] == Path(served["model"]).name and described["last_swap_error"] is None
    assert described["labels"] == ["neg", "pos"]
    assert (described["depth"], described["kind"]) == (1, "hf-text")
    assert described["metrics"] == {"val_accuracy": 0.75}
    assert described["trial"]["params"] == {"train.lr": 1e-4}
    paths = httpx.get(f"{served['url']}/openapi.json").json()["paths"]
    assert {"/v1/predict", "/healthz", "/v1/model"} <= paths.keys()
    assert httpx.get(f"{served['url']}/docs").status_code == 200


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"texts": []}, 422, "at least 1 item"),
        ({"texts": ["fine", 3]}, 422, "texts.1: Input should be a valid string"),
        ({"texts": "one text"}, 422, "valid array"),
        ({"text": ["a"]}, 422, "texts: Field required"),
        ({"texts": ["a"] * 5}, 422, "5 texts in one request; the limit is 4"),
        ({"texts": ["x" * 101]}, 422, "texts[0] has 101 characters; the limit is 100"),
        (b'{"texts": ["unclosed"', 400, "malformed JSON"),
        (b"", 400, "empty request body"),
        (b"x" * 5000, 413, "the limit is 2048"),
        (iter([b"x" * 1000] * 3), 413, "over the limit of 2048 bytes"),  # chunked, no length
    ],
)
def test_bad_request_gets_its_4xx_and_the_server_keeps_serving(served, body, status, message):
    sent = {"json": body} if isinstance(body, dict) else {"content": body}
    answer = httpx.post(f"{served['url']}/v1/predict", timeout=30, **sent)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["detail"]
    good = _post(served["url"], TEXTS[:1])
    assert good.status_code == 200, good.text


def test_token_protects_the_cli_deployed_app_and_query_prints_json(served, models):
    url, token_file = served["cli"]["url"], str(models["token"])
    assert url == f"{served['url']}/cli" and served["cli"]["trial"] == 7
    assert _post(url, ["hi"]).status_code == 401
    bad_token = {"Authorization": "Bearer x"}
    wrong = httpx.post(f"{url}/v1/predict", json={"texts": ["hi"]}, headers=bad_token)
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/v1/model").status_code == 401
    assert httpx.get(f"{url}/healthz").status_code == 200  # probes need no token
    long_text = "a very long text, cut to ten characters"  # this app truncates at 10
    lines = _cli("query", url, long_text, long_text[:10], "--token-file", token_file)
    assert [line["text"] for line in lines] == [long_text, long_text[:10]]
    assert set(lines[0]) == {"text", "label", "score", "probabilities"}
    assert lines[0]["probabilities"] == lines[1]["probabilities"]


def test_concurrent_requests_are_batched(served):
    with Load(served["url"], concurrency=8) as load:
        _wait(lambda: len(load.results) >= 40, 60, "40 answers")
    assert not load.failures()
    seen = [httpx.get(f"{served['url']}/v1/model").json()["stats"] for _ in range(4)]
    assert max(stats["max_batch_texts"] for stats in seen) > 1, seen
    assert max(stats["max_batch_requests"] for stats in seen) > 1, seen


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(served):
    _wait(lambda: _replicas() == 1, 60, "one replica before the load")
    with Load(served["url"], concurrency=12) as load:
        _wait(lambda: _replicas() >= 2, 90, "a second replica under load")
    assert not load.failures(), load.failures()[:3]
    _wait(lambda: _replicas() == 1, 60, "the return to one replica")


def test_sigkilled_replica_fails_no_client_call_and_is_replaced(served):
    """The drill: SIGKILL (no handler runs) the replica process serving a bounded load from
    raw requests and from `Client` (its retries on). Every Client call succeeds; the raw
    requests that failed show what a client without retries meets."""
    import signal

    serving = httpx.get(f"{served['url']}/v1/model").json()["stats"]["replica"]
    victim = f"SERVE_REPLICA::{APP}#TLRayModel#{serving}"
    assert victim in _replica_names()
    pid = next(r["pid"] for r in _deployment()["replicas"] if r["replica_id"] == serving)
    with Load(served["url"], concurrency=2) as raw, ClientLoad(served["url"], concurrency=2) as calls:
        _wait(lambda: len(raw.results) >= 8 and len(calls.results) >= 8, 60, "answers before the kill")
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        _wait(lambda: _replica_names() - {victim} and _replicas() >= 1, 90, "a new replica")
        _wait(lambda: sum(sent > killed and s == 200 for s, _, sent in calls.results) >= 8, 90,
              "client answers after the kill")
    statuses = sorted({status for status, _, _ in raw.failures()})
    print(json.dumps({"drill": "replica-sigkill", "raw_requests": len(raw.results),
                      "raw_failed": len(raw.failures()), "raw_failed_statuses": statuses,
                      "client_calls": len(calls.results), "client_failed": len(calls.failures())}))
    assert not calls.failures(), calls.failures()[:3]
    # Serve itself has dropped the victim (its health check found the actor dead), so the
    # next test starts from a state Serve agrees with.
    replaced = lambda: serving not in _replica_ids() and _replicas_alive(_deployment())  # noqa: E731
    _wait(replaced, 120, "Serve replacing the killed replica")
    # A loaded CI machine may need a while to route to the new replica: be patient once.
    with Client(served["url"], retries=5, timeout=120) as client:
        for _ in range(5):
            assert len(client.predict(TEXTS)) == len(TEXTS)


def test_model_swap_through_reconfigure_drops_no_request(served, models):
    """Swap a to b under load on one pinned replica: every request sent after the replica
    reports b is answered by b, none fails, and the replica is the same actor."""
    from tl_ray.serve.predictor import Predictor

    url, new = served["url"], str(versioned_model(models["b"]))
    _deploy_and_settle(_pinned_config(served, served["model"]), "one settled replica of model a")
    before, replica = _replica_ids(), _described(url)["stats"]["replica"]
    with Load(url, concurrency=4) as load:
        _wait(lambda: len(load.results) >= 8, 60, "answers before the swap")
        _deploy_and_settle(_pinned_config(served, new), "the swap to model b")
        _wait(lambda: _described(url)["path"] == new, 60, "the replica reporting model b")
        swapped, seen = time.monotonic(), len(load.results)
        _wait(lambda: len(load.results) >= seen + 12, 60, "answers after the swap")
    assert not load.failures(), load.failures()[:3]
    assert _replica_ids() == before and _described(url)["stats"]["replica"] == replica
    assert load.results[0][1] == served["model"]
    after = [model for _, model, sent in load.results if sent > swapped]
    assert after and set(after) == {new}, set(after)
    got = _post(url, TEXTS).json()["predictions"]
    want = Predictor(models["b"]).predict(TEXTS)
    for one, other in zip(got, want, strict=True):
        assert one["probabilities"] == pytest.approx(other["probabilities"], abs=1e-5)


def _unloadable(models: dict[str, Path], root: Path) -> list[Path]:
    """What does not load as a model: copies of model a with a corrupt manifest, with no
    weights at all, with pickled weights in place of safetensors; a file; a `..` path."""
    corrupt = Path(shutil.copytree(models["a"], root / "corrupt-manifest"))
    (corrupt / "manifest.json").write_text('{"format_version": 1, "backbone": ', encoding="utf-8")
    no_weights = Path(shutil.copytree(models["a"], root / "no-weights"))
    for weights in no_weights.glob("*.safetensors"):
        weights.unlink()
    pickled = Path(shutil.copytree(no_weights, root / "pickled-weights"))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # pickle.dumps(1)
    return [corrupt, no_weights, pickled, models["a"] / "manifest.json", root / ".." / root.name]


def test_swap_to_an_unloadable_folder_keeps_the_old_model_on_the_same_replica(
    served, models, tmp_path_factory
):
    from ray import serve

    url, good = served["url"], str(versioned_model(models["b"]))
    _deploy_and_settle(_pinned_config(served, good), "one settled replica of model b")
    before, replica = _replica_ids(), _described(url)["stats"]["replica"]
    expected = _post(url, TEXTS).json()["predictions"]
    with Load(url, concurrency=2) as load:
        for bad in _unloadable(models, tmp_path_factory.mktemp("unloadable")):
            _deploy_and_settle(_pinned_config(served, str(bad)), f"Serve applying {bad.name}")
            error = lambda: _described(url)["last_swap_error"] or {}  # noqa: E731
            _wait(lambda: error().get("model") == str(bad), 60, f"the replica refusing {bad.name}")
            described = _described(url)
            assert described["path"] == good, described
            message = described["last_swap_error"]["error"]
            print(f"swap to {bad.name} refused: {message}")
            assert message and "\n" not in message and described["last_swap_error"]["at"]
    assert not load.failures(), load.failures()[:3]
    assert {model for _, model, _ in load.results} == {good}
    got = _post(url, TEXTS).json()["predictions"]
    for one, other in zip(got, expected, strict=True):
        assert one["probabilities"] == pytest.approx(other["probabilities"], abs=1e-6)
    assert _replica_ids() == before and _described(url)["stats"]["replica"] == replica
    assert serve.status().applications[APP].deployments["TLRayModel"].status == "HEALTHY"

    _deploy_and_settle(_pinned_config(served, served["model"]), "the swap back to model a")
    _wait(lambda: _described(url)["path"] == served["model"], 60, "the replica serving model a")
    assert _described(url)["last_swap_error"] is None
    assert _replica_ids() == before


def test_check_health_passes_on_a_healthy_replica_with_the_deployment_options(served):
    import ray

    from tl_ray.serve import app

    deployment = _deployment()
    replicas = [r for r in deployment["replicas"] if r["state"] == "RUNNING"]
    assert replicas, deployment["replicas"]
    for replica in replicas:  # the replica actor's own check, which runs TLRayServer.check_health
        actor = ray.get_actor(replica["actor_name"], namespace="serve")
        assert ray.get(actor.check_health.remote(), timeout=60) is None
    config = deployment["deployment_config"]
    assert config["health_check_period_s"] == app.HEALTH_CHECK_PERIOD_S
    assert config["health_check_timeout_s"] == app.HEALTH_CHECK_TIMEOUT_S
    assert config["graceful_shutdown_timeout_s"] == app.GRACEFUL_SHUTDOWN_TIMEOUT_S


def test_a_first_load_that_fails_fails_the_replica_with_one_clear_line(served, models, tmp_path):
    """No model to keep serving: the replica fails to start, and Serve's status says why."""
    from ray import serve

    from tl_ray.serve.app import build_app

    bad = _unloadable(models, tmp_path)[0]
    args = {"model": str(bad), "num_cpus": 0.25, "max_replicas": 1}
    try:
        with pytest.raises(RuntimeError, match="Deploying application bad failed"):
            serve.run(build_app(args), name="bad", route_prefix="/bad", blocking=False)
        message = serve.status().applications["bad"].deployments["TLRayModel"].message
        assert f"ConfigError: model {bad} does not load: " in message and "not valid JSON" in message
    finally:
        serve.delete("bad")


def test_prometheus_metrics_count_requests_by_route(served):
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    assert served["cli"]["metrics"] == url
    wanted = {"ray_serve_num_http_requests_total", "ray_serve_http_request_latency_ms_bucket"}

    def exported() -> bool:
        lines = httpx.get(url, timeout=10).text.splitlines()
        ours = [x for x in lines if f'application="{APP}"' in x and 'route="/v1/predict"' in x]
        return wanted <= {line.split("{", 1)[0] for line in ours}

    _wait(exported, 60, "request counts and latencies of /v1/predict in the metrics", every=2)


def test_export_config_is_valid_and_refuses_an_open_host(tmp_path, models, monkeypatch):
    monkeypatch.delenv("TL_RAY_SERVE_TOKEN", raising=False)
    target, model = tmp_path / "deploy" / "serve.yaml", str(models["a"])
    (line,) = _cli("serve", model, "--export-config", str(target), "--max-replicas", "4")
    versioned = line["model"]
    assert line == {"config": str(target), "model": versioned, "source": model}
    assert Path(versioned).parent == models["a"].parent / ".served"
    config = yaml.safe_load(target.read_text(encoding="utf-8"))
    assert config["http_options"]["host"] == "127.0.0.1"
    (app,) = config["applications"]
    assert app["import_path"] == "tl_ray.serve.app:build_app"
    (deployment,) = app["deployments"]
    assert deployment["autoscaling_config"]["max_replicas"] == 4
    assert deployment["max_ongoing_requests"] >= 32
    assert deployment["user_config"] == {"model": versioned, "trial": None}
    assert [p.name for p in target.parent.iterdir()] == ["serve.yaml"]  # no temp file left
    assert main(["serve", model, "--host", "0.0.0.0", "--export-config", str(target)]) == 2
    assert main(["serve", str(tmp_path), "--export-config", str(target)]) == 2
    assert main(["serve", model, "--min-replicas", "3", "--export-config", str(target)]) == 2
