"""cluster/: every launcher YAML passes Ray's own validation (ray-schema.json plus Ray's checks), the
KubeRay manifests carry what KubeRay needs, and all of them fit the training run they are for."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import ROOT
from ray.autoscaler._private.util import prepare_config, validate_config

from raypipe.config import load_config

CLUSTER = ROOT / "cluster"
LAUNCHER_YAMLS = ["aws.yaml", "gcp.yaml", "local.yaml"]
CLOUD_YAMLS = ["aws.yaml", "gcp.yaml"]


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _validated(config: dict) -> dict:
    """What ``ray up`` does before touching a cloud: fill defaults, then validate. The fake
    multi-node provider ships no defaults file in the wheel, so its YAML is complete and is
    validated as written (as the autoscaler monitor does)."""
    if config["provider"]["type"] != "fake_multinode":
        config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def _rayjob() -> dict:
    return _load("kuberay/rayjob.yaml")


def _entrypoint_config():
    """The training config the RayJob's entrypoint resolves to (file + overrides)."""
    argv = shlex.split(_rayjob()["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"], argv
    assert argv[2] == "--config"
    config_file = argv[3]
    assert (ROOT / config_file).is_file(), f"entrypoint names {config_file}, which does not exist"
    return load_config(ROOT / config_file, argv[4:])


# ---------------------------------------------------------------- cluster launcher YAMLs


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_validates_against_ray_schema(name):
    config = _validated(_load(name))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert workers, "no worker node type"
    for node_type in workers.values():
        assert 0 <= node_type.get("min_workers", 0) <= node_type["max_workers"]
    assert 0 < config["idle_timeout_minutes"] <= 10


def test_validation_is_not_a_no_op():
    """The same validation rejects what is wrong, so the passing test above means something."""
    bad = _load("aws.yaml")
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5  # must be an integer
    with pytest.raises(jsonschema.ValidationError):
        _validated(bad)
    bad = _load("local.yaml")
    bad["available_node_types"]["cpu_worker"]["max_wokers"] = 2  # typo: unknown key
    with pytest.raises(jsonschema.ValidationError):
        _validated(bad)
    bad = _load("gcp.yaml")
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        _validated(bad)


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_cloud_yaml_has_cpu_and_gpu_worker_types_that_fit_the_run(name):
    config = _load(name)
    cfg = _entrypoint_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "keep training and preprocessing off the head"
    cpu = types["cpu_worker"]
    gpu = types["gpu_worker"]
    assert "GPU" not in cpu["resources"] and gpu["resources"]["GPU"] >= 1
    # a trainer worker fits one GPU node, and the GPU nodes can hold them all
    assert gpu["resources"]["GPU"] >= cfg.train.gpus_per_worker
    assert gpu["resources"]["CPU"] >= cfg.train.cpus_per_worker
    per_node = int(gpu["resources"]["GPU"] // cfg.train.gpus_per_worker)
    assert gpu["max_workers"] * per_node >= cfg.train.num_workers
    # the CPU nodes can hold the largest preprocessing actor pool
    assert cpu["resources"]["CPU"] >= cfg.pipeline.train.cpus_per_actor
    assert cpu["max_workers"] * cpu["resources"]["CPU"] >= (
        cfg.pipeline.train.max_actors * cfg.pipeline.train.cpus_per_actor
    )
    assert cpu["min_workers"] == 0 and gpu["min_workers"] == 0  # scale from zero
    assert config["max_workers"] >= cpu["max_workers"] + gpu["max_workers"]


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_cloud_yaml_token_auth_and_closed_ports(name):
    config = _load(name)
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    for command in ray_starts:
        assert "RAY_AUTH_MODE=token" in command
    # the token reaches every node; the dashboard listens on loopback (SSH tunnel only)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    head_start = next(c for c in config["head_start_ray_commands"] if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    # the project is installed on every node
    assert config["file_mounts"]["~/raypipe"] == "."
    assert any("pip install" in c and "~/raypipe" in c for c in config["setup_commands"])
    if config["provider"]["type"] == "aws":
        rules = config["provider"]["security_group"]["IpPermissions"]
        assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)], "open SSH only"


def test_local_yaml_is_a_small_fake_multinode_cluster():
    config = _load("local.yaml")
    assert config["provider"]["type"] == "fake_multinode"
    types = config["available_node_types"]
    assert types["ray.head.default"]["max_workers"] == 0
    worker = types["cpu_worker"]
    assert worker["min_workers"] == 0 and worker["resources"]["CPU"] == 1
    assert config["idle_timeout_minutes"] <= 1


# ---------------------------------------------------------------- KubeRay manifests


def _group_resources(group: dict) -> tuple[dict, dict]:
    containers = group["template"]["spec"]["containers"]
    assert len(containers) == 1
    res = containers[0]["resources"]
    return res["requests"], res["limits"]


def _cpus(value: str | int) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_manifest_required_fields(name):
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == ("RayCluster" if "raycluster" in name else "RayJob")
    assert doc["metadata"]["name"]
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"].startswith("2.60")
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"  # nothing exposed outside
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert g["maxReplicas"] >= 1
        requests, limits = _group_resources(g)
        assert requests == limits, "requests must equal limits for the autoscaler's arithmetic"
    assert "nvidia.com/gpu" in _group_resources(groups["gpu"])[1]
    assert "nvidia.com/gpu" not in _group_resources(groups["cpu"])[1]


def test_rayjob_uses_the_raycluster_spec_and_a_valid_entrypoint():
    job = _rayjob()
    assert job["spec"]["rayClusterSpec"] == _load("kuberay/raycluster.yaml")["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/raypipe"
    # the image installs the project where the runtime env points
    dockerfile = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    assert "/home/ray/raypipe" in dockerfile and "pip install" in dockerfile
    assert "rayproject/ray:2.60" in dockerfile
    cfg = _entrypoint_config()  # raises ConfigError if a key or value is wrong
    assert cfg.train.use_gpu is True
    assert cfg.run.storage_path.startswith("s3://") and cfg.data.root.startswith("s3://")


def test_kuberay_resources_match_the_training_config():
    cfg = _entrypoint_config()
    spec = _rayjob()["spec"]["rayClusterSpec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu_req, _ = _group_resources(groups["gpu"])
    cpu_req, _ = _group_resources(groups["cpu"])
    gpus_per_pod = int(gpu_req["nvidia.com/gpu"])
    # one trainer worker per GPU pod fits (GPU and CPU), and enough GPU pods may exist
    assert gpus_per_pod >= cfg.train.gpus_per_worker
    assert _cpus(gpu_req["cpu"]) >= cfg.train.cpus_per_worker
    assert groups["gpu"]["maxReplicas"] * (gpus_per_pod // cfg.train.gpus_per_worker) >= (
        cfg.train.num_workers
    )
    # the preprocessing pool at its largest fits the CPU group
    assert _cpus(cpu_req["cpu"]) >= cfg.pipeline.train.cpus_per_actor
    assert groups["cpu"]["maxReplicas"] * _cpus(cpu_req["cpu"]) >= (
        cfg.pipeline.train.max_actors * cfg.pipeline.train.cpus_per_actor
    )


def test_cluster_readme_walks_through_the_steps():
    text = (CLUSTER / "README.md").read_text()
    for step in ("ray up cluster/aws.yaml", "kubectl apply -f cluster/kuberay/", "ray job submit",
                 "RAY_FAKE_CLUSTER=1", "ray start --head", "summary.json", "RAY_AUTH_MODE=token"):
        assert step in text, f"cluster/README.md does not show '{step}'"


def test_autoscaling_capacity_from_launcher_yaml(monkeypatch, tmp_path):
    """The trainer's pre-flight check counts what the autoscaler may add (v1: from its YAML)."""
    from raypipe.training import trainer

    path = tmp_path / "bootstrap.yaml"
    path.write_text(Path(CLUSTER / "aws.yaml").read_text())
    monkeypatch.setenv("RAYPIPE_AUTOSCALING_CONFIG", str(path))
    monkeypatch.setattr(trainer.ray._private.state.state, "get_max_resources_from_cluster_config",
                        lambda: None)
    most = trainer.autoscaling_max_resources()
    assert most == {"CPU": 0 + 4 * 8 + 4 * 8, "GPU": 4}
    monkeypatch.setenv("RAYPIPE_AUTOSCALING_CONFIG", str(tmp_path / "missing.yaml"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert trainer.autoscaling_max_resources() == {}
