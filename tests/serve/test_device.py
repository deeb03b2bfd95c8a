"""Where serving computes (issue 13, item 2): the Predictor's device choice, a Serve replica's
device and torch threads from what Ray assigned it, and exported configs that keep num_cpus.

There is no GPU here: CUDA is simulated where a choice depends on it (monkeypatched
availability, the "meta" device), and a real Serve replica deployed from an edited exported
config reports the device and threads it computes with.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import cli_lines, free_port

from tl_ray.cli.app import main
from tl_ray.errors import ConfigError

TEXTS = ["a good, moving film", "dull and tedious"]
APP = "dev"


def _model_folder(folder: Path, tiny_bert: str) -> Path:
    """A checkpoint folder without training: the tiny BERT and a fresh, seeded head."""
    import torch

    from tl_ray.backbones.registry import get_backbone
    from tl_ray.config import HFTextConfig
    from tl_ray.data import LabelMap
    from tl_ray.train.checkpoint import write_model_folder

    torch.manual_seed(3)
    backbone = get_backbone(HFTextConfig(name_or_path=tiny_bert, unfreeze_depth=1))
    folder.mkdir(parents=True)
    write_model_folder(folder, backbone, backbone.build(2), LabelMap(("neg", "pos")),
                       metrics={}, epoch=1, extra={"max_length": 32})  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_bert) -> Path:
    return _model_folder(tmp_path_factory.mktemp("device") / "model", tiny_bert)


# -- the Predictor's device choice -------------------------------------------------------------
def test_resolve_device_picks_cuda_only_when_there_is_one():
    from tl_ray.serve.predictor import resolve_device

    assert resolve_device("auto", 0) == "cpu"
    assert resolve_device("cpu", 2) == "cpu"
    assert resolve_device("auto", 1) == "cuda:0"
    assert resolve_device("cuda", 2) == "cuda:0"
    assert resolve_device("cuda:1", 2) == "cuda:1"
    for device, visible, message in [("cuda", 0, "torch sees no CUDA GPU"),
                                     ("cuda:2", 2, "torch sees 2 CUDA GPU(s)"),
                                     ("gpu", 1, "device must be auto, cpu, cuda or cuda:N, got 'gpu'")]:  # fmt: skip
        with pytest.raises(ConfigError, match=r"^.*$") as caught:
            resolve_device(device, visible)
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_cuda_devices_follows_torch(monkeypatch):
    import torch

    from tl_ray.serve.predictor import cuda_devices, resolve_device

    assert cuda_devices() == 0  # this machine: the CPU build of torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", cuda_devices()) == "cuda:0"


def test_predictor_computes_on_cpu_here_and_refuses_cuda(model):
    from tl_ray.serve.predictor import Predictor

    auto, cpu = Predictor(model), Predictor(model, device="cpu")
    assert (auto.device, cpu.device) == ("cpu", "cpu")
    assert auto.predict(TEXTS) == cpu.predict(TEXTS)
    with pytest.raises(ConfigError, match="device 'cuda': torch sees no CUDA GPU"):
        Predictor(model, device="cuda")
    with pytest.raises(ConfigError, match="device must be"):
        Predictor(model, device="gpu:0")


def test_predictor_moves_the_model_to_its_device(model, monkeypatch):
    import torch

    import tl_ray.serve.predictor as predictor_module

    monkeypatch.setattr(predictor_module, "resolve_device", lambda *args, **kwargs: "meta")
    predictor = predictor_module.Predictor(model, device="cuda")
    assert predictor.device == "meta"
    assert {p.device for p in predictor.model.parameters()} == {torch.device("meta")}


def test_backbone_scores_moves_inputs_to_the_model_device():
    """Preprocessed CPU tensors reach the forward pass on the parameters' device."""
    import torch

    from tl_ray.backbones.base import Backbone

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2, device="meta"))
            self.seen: dict[str, torch.device] = {}

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            self.seen = {"input_ids": input_ids.device, "attention_mask": attention_mask.device}
            return torch.zeros(len(input_ids), 2)  # a real tensor: scores copies it to NumPy

    stubs = {name: lambda *args, **kwargs: None for name in Backbone.__abstractmethods__}
    backbone = type("ProbeBackbone", (Backbone,), stubs)(cfg=None)
    probe = Probe()
    inputs = {"input_ids": torch.ones(3, 4, dtype=torch.long), "attention_mask": torch.ones(3, 4)}
    assert backbone.scores(probe, inputs).shape == (3, 2)
    assert probe.seen == {"input_ids": torch.device("meta"), "attention_mask": torch.device("meta")}


def test_predict_cli_takes_a_device(model, capsys):
    (line,) = cli_lines("predict", str(model), "--text", TEXTS[0], "--device", "cpu")
    assert line["label"] in {"neg", "pos"}
    assert main(["predict", str(model), "--text", TEXTS[0], "--device", "cuda"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: device 'cuda': torch sees no CUDA GPU") and "\n" not in error


# -- a Serve replica: device and torch threads from what Ray assigned it -----------------------
def test_replica_placement_follows_the_gpus_and_cpus_ray_assigned():
    from tl_ray.serve.app import replica_placement
    from tl_ray.serve.api import ServeArgs

    with_gpu = replica_placement(ServeArgs(), {"CPU": 1.0, "GPU": 1.0}, [0])
    assert (with_gpu.device, with_gpu.gpu_ids) == ("cuda", [0])
    assert replica_placement(ServeArgs(), {"CPU": 1.0}, []).device == "cpu"
    assert replica_placement(ServeArgs(num_gpus=1), None, []).device == "cuda"  # Ray silent: args
    assert replica_placement(ServeArgs(num_gpus=1), {"CPU": 1.0}, []).device == "cpu"  # edited to 0
    assert replica_placement(ServeArgs(), {"CPU": 1.0}, ["0"]).device == "cuda"  # ids alone suffice
    assert replica_placement(ServeArgs(device="cpu"), {"GPU": 1.0}, [0]).device == "cpu"
    # threads: the CPUs Ray assigned, else args.num_cpus; at least one
    assert replica_placement(ServeArgs(num_cpus=1), {"CPU": 2.0}, []).threads == 2
    assert replica_placement(ServeArgs(num_cpus=3), None, []).threads == 3
    assert replica_placement(ServeArgs(num_cpus=0.25), {"CPU": 0.25}, []).threads == 1
    assert replica_placement(ServeArgs(num_cpus=2), {}, []).threads == 2  # num_cpus 0: no CPU key


def test_replica_with_a_gpu_but_no_cuda_fails_loudly(model):
    from tl_ray.serve.api import ModelSlot, ServeArgs
    from tl_ray.serve.app import _load, replica_placement

    placement = replica_placement(ServeArgs(num_gpus=1), {"CPU": 1.0, "GPU": 1.0}, [0])
    with pytest.raises(ConfigError) as caught:
        _load(ModelSlot(model=str(model)), placement)
    message = str(caught.value)
    assert "reserves num_gpus=1 (Ray GPU ids [0])" in message and "sees no CUDA GPU" in message
    assert "\n" not in message
    loaded = _load(ModelSlot(model=str(model)), replica_placement(ServeArgs(), {"CPU": 1.0}, []))
    assert loaded.info.device == "cpu"


def test_serve_args_refuse_an_unknown_device(model, tmp_path):
    from pydantic import ValidationError

    from tl_ray.serve.api import ServeArgs

    assert ServeArgs().device == "auto" and ServeArgs(device="cuda:1").device == "cuda:1"
    with pytest.raises(ValidationError, match="device must be auto, cpu, cuda or cuda:N"):
        ServeArgs(device="gpu")
    assert main(["serve", str(model), "--device", "gpu", "--export-config", str(tmp_path / "x.yaml")]) == 2


def test_exported_config_keeps_cpus_and_gpus_in_args_and_actor_options(model, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    target = tmp_path / "serve.yaml"
    cli_lines("serve", str(model), "--export-config", str(target), "--num-cpus", "3", "--num-gpus", "1",
         "--device", "cuda")  # fmt: skip
    config = yaml.safe_load(target.read_text(encoding="utf-8"))
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert (app["args"]["num_cpus"], app["args"]["num_gpus"], app["args"]["device"]) == (3, 1, "cuda")
    assert app["deployments"][0]["ray_actor_options"] == {"num_cpus": 3, "num_gpus": 1}


# -- a real replica deployed from an edited exported config ------------------------------------
@pytest.fixture(scope="module")
def served_from_config(ray_session, model, tmp_path_factory):
    """App `dev` from `--export-config` with ray_actor_options.num_cpus edited to 2."""
    from ray import serve
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    target = tmp_path_factory.mktemp("config") / "serve.yaml"
    cli_lines("serve", str(model), "--export-config", str(target), "--name", APP, "--port", str(port),
         "--num-cpus", "0.5", "--max-replicas", "1")  # fmt: skip
    config = yaml.safe_load(target.read_text(encoding="utf-8"))
    config["applications"][0]["deployments"][0]["ray_actor_options"]["num_cpus"] = 2
    ServeSubmissionClient(os.environ["RAY_API_SERVER_ADDRESS"]).deploy_applications(config)
    deadline = time.monotonic() + 120
    while serve.status().applications.get(APP) is None or serve.status().applications[APP].status != "RUNNING":
        assert time.monotonic() < deadline, f"app {APP} not RUNNING: {serve.status().applications.get(APP)}"
        time.sleep(0.5)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def test_config_deployed_replica_reports_cpu_and_the_threads_ray_gave_it(served_from_config):
    described = httpx.get(f"{served_from_config}/v1/model", timeout=30).json()
    assert described["device"] == "cpu"
    assert described["stats"]["threads"] == 2  # ray_actor_options.num_cpus, not args.num_cpus 0.5
    answer = httpx.post(f"{served_from_config}/v1/predict", json={"texts": TEXTS}, timeout=30)
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 2
