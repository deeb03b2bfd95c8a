"""The cloud and KubeRay files parse, name what they must, and agree with the pinned stack."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import ray
import yaml

from tl_ray.cli.serve import serve_config
from tl_ray.config import parse_config
from tl_ray.search.space import parse_space
from tl_ray.serve.api import ServeArgs

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)-py311(-gpu|-cu\d+)?$")
TL_RAY_IMAGE = re.compile(r"^[\w./-]+/tl-ray:[\w.]+-ray(?P<version>\d+\.\d+\.\d+)-py311-gpu$")


def documents(path: Path) -> dict[str, dict]:
    """The YAML documents of a manifest file, keyed by kind."""
    docs = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    return {doc["kind"]: doc for doc in docs}


def images(node) -> list[str]:
    """Every `image:` value anywhere in a parsed YAML tree."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                found.append(value)
            else:
                found += images(value)
    elif isinstance(node, list):
        for item in node:
            found += images(item)
    return found


def cluster_spec(kind: str, doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[kind]


@pytest.mark.parametrize(
    "name, kind",
    [("raycluster.yaml", "RayCluster"), ("rayjob-search.yaml", "RayJob"), ("rayservice.yaml", "RayService")],
)
def test_kuberay_manifest(name, kind):
    doc = documents(KUBERAY / name)[kind]
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    spec = cluster_spec(kind, doc)
    assert spec is not None, f"{name}: no Ray cluster spec"
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}, f"{name}: token auth must be on"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265, 10001}
    groups = spec["workerGroupSpecs"]
    assert groups and all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in groups)
    for group in groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits.get("nvidia.com/gpu") == "1", f"{name}: workers are GPU nodes"
    found = images(doc)
    assert found, f"{name}: no image"
    for image in found:
        match = TL_RAY_IMAGE.match(image) or RAY_IMAGE.match(image)
        assert match and match["version"] == ray.__version__, f"{name}: image {image} is not Ray {ray.__version__}"
    for pod in [spec["headGroupSpec"]] + groups:  # every pod sees the shared volume
        mounts = pod["template"]["spec"]["containers"][0]["volumeMounts"]
        assert any(m["mountPath"] == "/mnt/tl-ray" for m in mounts)


def test_rayjob_runs_a_valid_search():
    docs = documents(KUBERAY / "rayjob-search.yaml")
    job, files = docs["RayJob"]["spec"], docs["ConfigMap"]["data"]
    assert job["entrypoint"].split()[:4] == ["python", "-m", "tl_ray", "tune"]
    assert job["shutdownAfterJobFinishes"] is True
    yaml.safe_load(job["runtimeEnvYAML"])
    cfg = parse_config(yaml.safe_load(files["run.yaml"]))
    assert cfg.output.startswith("/mnt/tl-ray/") and cfg.data.path.startswith("/mnt/tl-ray/")
    assert cfg.train.use_gpu
    parse_space(yaml.safe_load(files["space.yaml"]))
    mount = next(
        m["mountPath"]
        for m in job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        if m["name"] == "search"
    )
    assert f"{mount}/run.yaml" in job["entrypoint"] and f"{mount}/space.yaml" in job["entrypoint"]


def test_rayservice_serve_config_is_what_export_config_writes():
    from ray.serve.schema import ServeDeploySchema

    service = documents(KUBERAY / "rayservice.yaml")["RayService"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    deployment = app["deployments"][0]
    args = ServeArgs.model_validate({**app["args"], **deployment["user_config"]})
    exported = serve_config(
        args.model_copy(update={
            "min_replicas": deployment["autoscaling_config"]["min_replicas"],
            "max_replicas": deployment["autoscaling_config"]["max_replicas"],
            "num_cpus": deployment["ray_actor_options"]["num_cpus"],
            "num_gpus": deployment["ray_actor_options"]["num_gpus"],
        }),
        name=app["name"], route_prefix=app["route_prefix"], host="0.0.0.0", port=8000,
    )  # fmt: skip
    assert config == exported
    mounts = [
        m["mountPath"]
        for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        for m in g["template"]["spec"]["containers"][0]["volumeMounts"]
    ]
    assert Path(args.model).is_relative_to("/mnt/tl-ray") and "/mnt/tl-ray" in mounts
    assert args.token_file and str(Path(args.token_file).parent) in mounts


def test_cloud_launcher_config():
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text(encoding="utf-8"))
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):  # fmt: skip
        assert key in config, key
    match = RAY_IMAGE.match(config["docker"]["image"])
    assert match and match["version"] == ray.__version__
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert workers and all(n["min_workers"] < n["max_workers"] for n in workers), "an autoscaling worker group"
    assert all(n["node_config"]["InstanceType"].startswith(("g", "p")) for n in workers), "GPU instances"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in starts if "ray start" in cmd)
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert any("constraints.txt" in cmd for cmd in config["setup_commands"])


def test_dockerfile_and_constraints_pin_the_same_ray():
    base = re.search(r"^FROM rayproject/ray:(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert base and RAY_IMAGE.match(f"rayproject/ray:{base[1]}")["version"] == ray.__version__
    pins = (CLUSTER.parent / "constraints.txt").read_text()
    assert f"\nray=={ray.__version__}\n" in pins


# -- which TensorFlow (and torch) each install gets: pyproject extras, constraints, GPU images --
ROOT = CLUSTER.parent
CPU_EXTRAS = ("text", "keras", "word-vectors", "minilm")  # every family, CPU TensorFlow


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def requirements(extras, project: dict | None = None) -> list:
    """The requirements that `tl-ray[extras]` adds, self-references (tl-ray[...]) expanded."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = project or pyproject()
    found = []
    for extra in extras:
        for line in project["optional-dependencies"][extra]:
            req = Requirement(line)
            if canonicalize_name(req.name) == "tl-ray":
                found += requirements(sorted(req.extras), project)
            else:
                found.append(req)
    return found


def names(reqs) -> set[str]:
    from packaging.utils import canonicalize_name

    return {canonicalize_name(r.name) for r in reqs}


def tensorflows(reqs) -> list:
    return [r for r in reqs if r.name.lower().replace("_", "-").startswith("tensorflow")]


def test_core_install_has_no_backbone_library():
    from packaging.requirements import Requirement

    core = names(Requirement(line) for line in pyproject()["dependencies"])
    assert {"ray", "torch", "optuna", "pyarrow"} <= core
    heavy = {"tensorflow", "tensorflow-cpu", "tf-keras", "keras", "gensim", "transformers", "peft"}
    assert not core & heavy, f"core dependencies hold {core & heavy}: a text-only install needs none"


def test_each_backbone_family_is_an_extra():
    assert {"transformers", "peft"} <= names(requirements(["text"]))
    assert "gensim" in names(requirements(["word-vectors"]))
    for extra, cuda in (("keras", False), ("keras-gpu", True)):
        reqs = requirements([extra])
        assert "tf-keras" in names(reqs), extra
        # tf-keras requires the `tensorflow` distribution, so the CPU flavour is `tensorflow`
        # without CUDA libraries: tensorflow-cpu beside it would unpack a second TensorFlow
        # wheel into the same folder.
        tf = tensorflows(reqs)
        assert [r.name for r in tf] == ["tensorflow"], f"{extra}: {[str(r) for r in tf]}"
        assert ("and-cuda" in tf[0].extras) is cuda, f"{extra}: {tf[0]}"


def test_dev_and_all_cover_every_cpu_extra():
    for extra in ("all", "dev"):
        reqs = requirements([extra])
        assert names(requirements(CPU_EXTRAS)) <= names(reqs), extra
        assert not any("and-cuda" in r.extras for r in tensorflows(reqs)), f"{extra} is CPU-only"
    assert {"pytest", "scikit-learn"} <= names(requirements(["dev"]))


def test_constraints_pin_the_cpu_stack_only():
    """`make` installs .[dev] with -c constraints.txt: every dev package pinned, nothing CUDA."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    assert pins["torch"].endswith("+cpu")
    assert not [n for n in pins if n.startswith("nvidia-") or n == "tensorflow-cpu"]
    unpinned = names(requirements(["dev"])) - set(pins)
    assert not unpinned, f"dev packages missing from constraints.txt: {sorted(unpinned)}"


def gpu_install_commands() -> dict[str, list[str]]:
    """The pip install commands of the GPU image (Dockerfile) and the GPU cluster (launcher)."""
    dockerfile = (CLUSTER / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    runs = [line for line in dockerfile.splitlines() if line.startswith("RUN ")]
    launcher = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text(encoding="utf-8"))
    found = {"Dockerfile": [], "aws-gpu.yaml": []}
    for source, commands in (("Dockerfile", runs), ("aws-gpu.yaml", launcher["setup_commands"])):
        for command in commands:
            found[source] += [part for part in re.split(r"&&|;", command) if "pip install" in part]
    return found


def test_gpu_images_install_gpu_tensorflow_and_cuda_torch():
    dockerfile = (CLUSTER / "Dockerfile").read_text(encoding="utf-8")
    launcher = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text(encoding="utf-8"))
    bases = {
        "Dockerfile": re.search(r"^FROM (\S+)", dockerfile, re.M)[1],
        "aws-gpu.yaml": launcher["docker"]["image"],
    }
    for source, commands in gpu_install_commands().items():
        cuda = re.search(r"-(cu\d+)$", bases[source])
        assert cuda, f"{source}: pin the base image's CUDA (-cuXXX), not {bases[source]}"
        assert not any("tensorflow-cpu" in c for c in commands), f"{source} installs tensorflow-cpu"
        tl_ray = [c for c in commands if re.search(r"tl-ray\[", c)]
        assert len(tl_ray) == 1, f"{source}: one install of tl-ray, got {tl_ray}"
        extras = re.search(r"tl-ray\[([^\]]+)\]", tl_ray[0])[1].split(",")
        assert "keras-gpu" in extras, f"{source}: {extras}"
        tf = tensorflows(requirements(extras))  # `tensorflow` only, and with its CUDA libraries
        assert {r.name for r in tf} == {"tensorflow"}, f"{source}: {[str(r) for r in tf]}"
        assert any("and-cuda" in r.extras for r in tf), f"{source}: {[str(r) for r in tf]}"
        assert {"text", "word-vectors"} <= set(extras), f"{source}: every backbone family on the GPU image"
        assert "constraints" in tl_ray[0], f"{source}: tl-ray installs with the pinned versions"
        # torch: PyTorch's wheel index for the base image's CUDA, before tl-ray
        torch = [c for c in commands if "download.pytorch.org/whl/" in c]
        assert torch and commands.index(torch[0]) < commands.index(tl_ray[0]), source
        assert f"download.pytorch.org/whl/{cuda[1]}" in torch[0], f"{source}: torch for {cuda[1]}"
