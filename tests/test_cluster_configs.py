"""cluster/: every launcher YAML passes Ray's own validation (ray-schema.json plus Ray's checks), every
node runs the one raypipe image with the credentials its role needs, the KubeRay manifests pass the
CRD schema of the KubeRay version cluster/README.md names and fit the nodes it names, and all of
them fit the training run they are for. tests/test_cluster_aws.py runs cluster/aws.yaml's
``ray up`` against moto."""

from __future__ import annotations

import ast
import copy
import json
import math
import os
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import ROOT
from ray.autoscaler._private.util import prepare_config, validate_config

from raypipe.config import load_config

CLUSTER = ROOT / "cluster"
CRDS = ROOT / "tests" / "data" / "kuberay-crds"
LAUNCHER_YAMLS = ["aws.yaml", "gcp.yaml", "local.yaml"]
CLOUD_YAMLS = ["aws.yaml", "gcp.yaml"]
KUBERAY_YAMLS = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]
IMAGE = "registry.example.com/raypipe:0.1.0"  # the placeholder cluster/README.md says to replace
MIN_DRIVER = 580  # torch 2.14.1's CUDA 13.0 build
DLAMI_PARAMETER = (
    "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04"
    "/latest/ami-id"
)
DLVM_FAMILY = (
    "projects/deeplearning-platform-release/global/images/family/common-cu129-ubuntu-2404-nvidia-580"
)


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _readme() -> str:
    return (CLUSTER / "README.md").read_text()


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


def _cluster_spec(name: str) -> dict:
    doc = _load(name)
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _entrypoint_config(*extra: str):
    """The training config the RayJob's entrypoint resolves to (file + overrides + ``extra``)."""
    argv = shlex.split(_rayjob()["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"], argv
    assert argv[2] == "--config"
    config_file = argv[3]
    assert (ROOT / config_file).is_file(), f"entrypoint names {config_file}, which does not exist"
    return load_config(ROOT / config_file, argv[4:] + list(extra))


def _precheck_at_zero(cfg, head: dict, node_env: dict, monkeypatch):
    """raypipe's resource pre-check as the job's driver runs it on the cluster at zero workers:
    Ray reports the head alone, the node's environment carries what ``RAYPIPE_MAX_*`` it sets.
    Returns (layout, capacity); raises ResourceError as the job would."""
    import ray

    from raypipe.training import trainer

    monkeypatch.setattr(ray, "cluster_resources", lambda: {k: float(v) for k, v in head.items()})
    for key in trainer.MAX_ENV.values():
        monkeypatch.delenv(key, raising=False)
        if key in node_env:
            monkeypatch.setenv(key, node_env[key])
    capacity, known = trainer.cluster_capacity()
    assert known, "the nodes do not tell raypipe how far the cluster grows"
    return trainer.resolve_layout(cfg, capacity, known), capacity


def _launcher_max(config: dict) -> dict[str, int]:
    """The most of each resource a launcher cluster can grow to: the head plus every worker type
    at its max_workers."""
    total: dict[str, int] = {}
    for name, node_type in config["available_node_types"].items():
        count = 1 if name == config["head_node_type"] else node_type["max_workers"]
        for key, value in node_type["resources"].items():
            total[key] = total.get(key, 0) + count * value
    return total


def _docker_env(config: dict) -> dict[str, str]:
    env = {}
    for option in config["docker"]["run_options"]:
        flag, _, assignment = option.partition(" ")
        if flag == "-e":
            key, _, value = assignment.partition("=")
            env[key] = value
    return env


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
    bad = _load("gcp.yaml")
    bad["available_node_types"]["gpu_worker"]["docker"]["run_options"] = ["--gpus all"]  # not per type
    with pytest.raises(jsonschema.ValidationError):
        _validated(bad)


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_cloud_yaml_has_cpu_and_gpu_worker_types_that_fit_the_run(name, monkeypatch):
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
    assert cpu["min_workers"] == 0 and gpu["min_workers"] == 0  # scale from zero
    assert config["max_workers"] >= cpu["max_workers"] + gpu["max_workers"]
    # with only the head up, the run passes raypipe's pre-check against the RAYPIPE_MAX_* the
    # nodes carry, on GPUs; one GPU more than the cluster can grow to does not
    layout, capacity = _precheck_at_zero(cfg, head["resources"], _docker_env(config), monkeypatch)
    assert layout.use_gpu and capacity == {"CPU": _launcher_max(config)["CPU"], "GPU": 4}
    from raypipe.training.trainer import ResourceError, resolve_layout

    with pytest.raises(ResourceError, match="GPUs"):
        resolve_layout(_entrypoint_config(f"train.num_workers={int(capacity['GPU']) + 1}"),
                       capacity, True)
    # the data workers fit the CPU nodes (one per node at least, all of them at max_workers), so
    # they need not take the GPU nodes' CPUs
    assert cfg.pipeline.workers != "auto", "size the data workers for the CPU nodes"
    assert layout.data_workers == cfg.pipeline.workers
    assert cpu["resources"]["CPU"] >= cfg.pipeline.cpus_per_worker
    assert cpu["max_workers"] * cpu["resources"]["CPU"] >= (
        layout.data_workers * cfg.pipeline.cpus_per_worker)


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
    if config["provider"]["type"] == "aws":
        # Ray's AWS provider adds intra-cluster traffic and SSH itself; a rule repeated here
        # would make AWS refuse the whole request (InvalidPermission.Duplicate)
        from ray.autoscaler._private.aws.config import _create_default_inbound_rules

        defaults = _create_default_inbound_rules({"sg-0"})
        assert [(r.get("FromPort"), r.get("ToPort")) for r in defaults] == [(-1, -1), (22, 22)]
        extra = config["provider"]["security_group"].get("IpPermissions", [])
        assert not [r for r in extra if r in defaults or r.get("FromPort") == 22], extra
        assert not extra, "open nothing beyond SSH and the cluster's own traffic"


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_every_node_runs_the_raypipe_image_and_installs_nothing(name):
    config = _load(name)
    docker = config["docker"]
    assert docker["image"] == IMAGE
    assert not {"head_image", "worker_image"} & set(docker), "one image for every node"
    for node_type in config["available_node_types"].values():
        assert "worker_image" not in node_type.get("docker", {})
    commands = " ".join(config["setup_commands"] + config["head_setup_commands"]
                        + config["worker_setup_commands"] + config["initialization_commands"])
    assert "pip install" not in commands and "~/raypipe" not in config["file_mounts"]
    dockerfile = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.0-py311-gpu$", dockerfile, re.M)
    # the autoscaler on a launcher head imports the cloud's SDK inside this container
    assert "boto3" in dockerfile and "google-api-python-client" in dockerfile
    assert "download.pytorch.org/whl/cu130" in dockerfile
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.14.1"' in pyproject, "the driver minimum below is for torch 2.14.1 (cu130)"


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_nodes_tell_raypipe_the_most_the_cluster_can_grow_to(name):
    config = _load(name)
    most = _launcher_max(config)
    env = _docker_env(config)
    assert env["RAYPIPE_MAX_CPUS"] == str(most["CPU"])
    assert env["RAYPIPE_MAX_GPUS"] == str(most.get("GPU", 0))


def test_host_images_have_a_driver_new_enough_for_torch():
    aws = _load("aws.yaml")
    for node_type in aws["available_node_types"].values():
        assert node_type["node_config"]["ImageId"] == DLAMI_PARAMETER
    gcp = _load("gcp.yaml")
    for node_type in gcp["available_node_types"].values():
        (disk,) = node_type["node_config"]["disks"]
        assert disk["initializeParams"]["sourceImage"] == DLVM_FAMILY
    driver = int(re.search(r"nvidia-(\d+)$", DLVM_FAMILY).group(1))
    assert driver >= MIN_DRIVER
    readme = _readme()
    for text in ("base-oss-nvidia-driver-gpu-ubuntu-24.04", "common-cu129-ubuntu-2404-nvidia-580",
                 "nvidia-smi", f">= {MIN_DRIVER}"):
        assert text in readme, f"cluster/README.md does not name '{text}'"


def _fake_host(tmp_path: Path, driver: str | None, gpu: bool) -> tuple[Path, dict]:
    """A PCI device folder (one NVIDIA device when ``gpu``) and a PATH whose ``nvidia-smi`` reports
    ``driver``."""
    devices = tmp_path / "pci"
    (devices / "0000:00:01.0").mkdir(parents=True)
    (devices / "0000:00:01.0" / "vendor").write_text("0x8086\n")
    if gpu:
        (devices / "0000:00:1e.0").mkdir()
        (devices / "0000:00:1e.0" / "vendor").write_text("0x10de\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho {driver}\n" if driver else "#!/bin/sh\necho called >&2\n")
    smi.chmod(0o755)
    return devices, {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize("name", CLOUD_YAMLS)
@pytest.mark.parametrize("driver, gpu, ok", [("575.64.05", True, False), ("580.95.05", True, True),
                                             ("595.91.07", True, True), (None, False, True)])
def test_gpu_nodes_refuse_an_old_driver_before_starting_the_container(name, driver, gpu, ok,
                                                                      tmp_path):
    """The host-side initialization command, run by bash as Ray runs it on each node."""
    (command,) = _load(name)["initialization_commands"]
    devices, env = _fake_host(tmp_path, driver, gpu)
    assert "/sys/bus/pci/devices" in command
    done = subprocess.run(["bash", "-c", command.replace("/sys/bus/pci/devices", str(devices))],
                          env=env, capture_output=True, text=True, timeout=30)
    assert (done.returncode == 0) == ok, done.stderr
    if not ok:
        assert f"needs >= {MIN_DRIVER}" in done.stderr and driver in done.stderr
    if not gpu:
        assert "called" not in done.stderr, "a CPU node must not wait for a driver"


class _FakeHost:
    """Stands in for Ray's SSH command runner on a freshly booted host of the chosen image: answers
    the probes Ray's DockerCommandRunner makes (Docker and the NVIDIA runtime installed, no
    container yet) and records every command."""

    def __init__(self, gpu: bool, cluster_name: str):
        self.gpu, self.cluster_name, self.ssh_user = gpu, cluster_name, "ubuntu"
        self.commands: list[str] = []

    def run(self, cmd, with_output=False, **kwargs):
        self.commands.append(cmd)
        if cmd == "nvidia-smi" and not self.gpu:
            raise RuntimeError("NVIDIA-SMI has failed: no NVIDIA GPU")
        answers = {
            "command -v docker": b"/usr/bin/docker",
            ".State.Running": b"Error: No such object: raypipe",
            ".Config.Env": b'["PATH=/usr/bin", "HOME=/home/ray"]',
            ".Runtimes": b"map[nvidia:{nvidia-container-runtime [] <nil>} runc:{runc [] <nil>}]",
            "/proc/meminfo": b"MemAvailable: 60000000 kB",
            "printenv HOME": b"/home/ray",
        }
        return next((v for k, v in answers.items() if k in cmd), b"")

    def run_rsync_up(self, source, target, options=None):
        self.commands.append(f"rsync {source} {target}")


def _docker_commands(config: dict, node_type: str) -> list[str]:
    """What Ray's DockerCommandRunner runs on a new node of ``node_type`` (the docker config the
    autoscaler v2 merges for the type, as ray_installer.py does)."""
    from ray.autoscaler._private.command_runner import DockerCommandRunner
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    merged = AutoscalingConfig(copy.deepcopy(config), skip_content_hash=True)
    runner = DockerCommandRunner(
        merged.get_docker_config(node_type), log_prefix="", node_id="node-0", provider=None,
        auth_config=config["auth"], cluster_name=config["cluster_name"], process_runner=None,
        use_internal_ip=True,
    )
    host = _FakeHost("GPU" in config["available_node_types"][node_type]["resources"],
                     config["cluster_name"])
    runner.ssh_command_runner = host
    runner.run_init(as_head=node_type == config["head_node_type"],
                    file_mounts=config["file_mounts"], sync_run_yet=True)
    return host.commands


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_docker_run_on_each_node_type(name):
    config = _load(name)
    most = _launcher_max(config)
    for node_type, spec in config["available_node_types"].items():
        commands = _docker_commands(config, node_type)
        assert f"docker pull {IMAGE}" in commands
        (run,) = [c for c in commands if c.startswith("docker run")]
        argv = shlex.split(run)
        assert argv[-2:] == [IMAGE, "bash"] and "--net=host" in argv
        assert f"RAYPIPE_MAX_CPUS={most['CPU']}" in argv and f"RAYPIPE_MAX_GPUS={most['GPU']}" in argv
        # the token file, copied to the host by the file mounts, appears in the container's home
        assert any(a.endswith(":/home/ray/.ray/auth_token") for a in argv), argv
        has_gpu = "GPU" in spec["resources"]
        assert ("--gpus" in argv) == has_gpu, (node_type, run)
        assert ("--runtime=nvidia" in argv) == has_gpu, (node_type, run)


def test_aws_instance_profiles_per_node_type():
    config = _load("aws.yaml")
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["node_config"]["IamInstanceProfile"] == {
        "Name": "raypipe-head"}
    for name, node_type in types.items():
        if name != config["head_node_type"]:
            assert node_type["node_config"]["IamInstanceProfile"] == {"Name": "raypipe-worker"}


def _json_blocks(text: str) -> list:
    return [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, re.S)]


def _actions(policy: dict) -> dict[str, list[str]]:
    """action -> the resources it is allowed on."""
    allowed: dict[str, list[str]] = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [
            statement["Resource"]]
        for action in actions:
            allowed.setdefault(action, []).extend(resources)
    return allowed


def test_aws_policies_head_launches_workers_workers_only_use_the_bucket():
    iam = CLUSTER / "aws-iam"
    head = json.loads((iam / "head-policy.json").read_text())
    worker = json.loads((iam / "worker-policy.json").read_text())
    trust = json.loads((iam / "ec2-trust-policy.json").read_text())
    # the README shows the very policies the commands in it use
    blocks = _json_blocks(_readme())
    assert head in blocks and worker in blocks
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}

    head_allowed, worker_allowed = _actions(head), _actions(worker)
    # what Ray's AWS node provider calls on the head (cache_stopped_nodes: false)
    for action in ("ec2:RunInstances", "ec2:CreateTags", "ec2:DescribeInstances",
                   "ec2:TerminateInstances"):
        assert action in head_allowed, action
    assert _load("aws.yaml")["provider"]["cache_stopped_nodes"] is False
    assert head_allowed["iam:PassRole"] == ["arn:aws:iam::ACCOUNT_ID:role/raypipe-worker"]
    assert "ssm:GetParameters" in head_allowed  # EC2 resolves resolve:ssm: image ids as the caller
    # workers: the bucket and nothing else
    assert all(a.startswith("s3:") for a in worker_allowed), worker_allowed
    bucket = {"arn:aws:s3:::my-bucket", "arn:aws:s3:::my-bucket/*"}
    for allowed in (head_allowed, worker_allowed):
        for action in ("s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
            assert set(allowed[action]) <= bucket, (action, allowed[action])
        assert allowed["s3:ListBucket"] == ["arn:aws:s3:::my-bucket"]
        assert allowed["s3:GetObject"] == ["arn:aws:s3:::my-bucket/*"]


def _ray_gcp_constant(name: str):
    """A module-level constant of Ray's GCP bootstrap code, read from its source: importing it
    needs the Google API client, which only ``ray up`` on GCP needs."""
    import ray.autoscaler

    source = Path(ray.autoscaler.__file__).parent / "_private" / "gcp" / "config.py"
    values: dict = {}
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and [type(t) for t in node.targets] == [ast.Name]:
            try:  # constants built from literals and earlier constants, e.g. RAY + "-sa-" + VERSION
                values[node.targets[0].id] = eval(  # noqa: S307
                    compile(ast.Expression(node.value), str(source), "eval"), {}, dict(values))
            except Exception:
                continue
    return values[name]


def test_gcp_every_node_type_has_a_service_account_with_storage_scope():
    config = _load("gcp.yaml")
    project = config["provider"]["project_id"]
    storage_scopes = {"https://www.googleapis.com/auth/cloud-platform",
                      "https://www.googleapis.com/auth/devstorage.read_write",
                      "https://www.googleapis.com/auth/devstorage.full_control"}
    emails = {}
    for name, node_type in config["available_node_types"].items():
        (account,) = node_type["node_config"]["serviceAccounts"]
        assert account["email"].endswith(f"@{project}.iam.gserviceaccount.com")
        assert storage_scopes & set(account["scopes"]), (name, account["scopes"])
        emails[name] = account["email"]
    # the head launches workers: Ray's autoscaler account, the one `ray up` grants compute to
    head = config["head_node_type"]
    assert emails[head].startswith(f"{_ray_gcp_constant('DEFAULT_SERVICE_ACCOUNT_ID')}@")
    assert "roles/compute.admin" in _ray_gcp_constant("DEFAULT_SERVICE_ACCOUNT_ROLES")
    assert config["available_node_types"][head]["node_config"]["serviceAccounts"][0]["scopes"] == [
        "https://www.googleapis.com/auth/cloud-platform"]
    workers = {e for n, e in emails.items() if n != head}
    assert workers == {f"raypipe-worker@{project}.iam.gserviceaccount.com"}
    assert "raypipe-worker@" in _readme()


def test_local_yaml_is_a_small_fake_multinode_cluster():
    config = _load("local.yaml")
    assert config["provider"]["type"] == "fake_multinode"
    types = config["available_node_types"]
    head = types["ray.head.default"]
    assert head["max_workers"] == 0
    assert head["resources"]["CPU"] == 0, "the head takes no work: every run scales up from zero"
    worker = types["cpu_worker"]
    assert worker["min_workers"] == 0 and worker["resources"]["CPU"] == 1
    assert config["idle_timeout_minutes"] <= 1
    # the `ray start` shown in its comments and in the README: head CPUs and the cluster's maximum
    most = _launcher_max(config)
    text = (CLUSTER / "local.yaml").read_text()
    for shown in (text, _readme()):
        assert f"RAYPIPE_MAX_CPUS={most['CPU']} ray start --head --num-cpus={head['resources']['CPU']}" in (
            re.sub(r"\\\n#?\s*", " ", shown)), "the local `ray start` line is out of date"
    assert "RAYPIPE_AUTOSCALING_CONFIG" not in text + _readme()


def _train_commands(text: str) -> list[list[str]]:
    """The arguments of every ``python jobs/train.py ...`` command in ``text`` (a README or YAML
    comments: comment marks dropped, continued lines joined)."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [shlex.split(line.split("python jobs/train.py", 1)[1])
            for line in joined.splitlines() if "python jobs/train.py" in line]


def _train_config(args: list[str]):
    if args[:1] == ["--config"]:
        return load_config(ROOT / args[1], args[2:])
    return load_config(None, args)


def test_readme_commands_use_keys_that_exist(monkeypatch):
    """Every training command cluster/README.md and local.yaml show resolves (unknown keys such
    as pipeline.train.max_actors fail), and the local one passes the pre-check on local.yaml's
    cluster at zero workers."""
    readme = _train_commands(_readme())
    local = _train_commands((CLUSTER / "local.yaml").read_text())
    assert len(readme) == 2 and local == readme[:1], (readme, local)
    for args in readme:
        _train_config(args)  # raises ConfigError on a key or value that does not exist
    config = _load("local.yaml")
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    env = {"RAYPIPE_MAX_CPUS": str(_launcher_max(config)["CPU"])}
    layout, _ = _precheck_at_zero(_train_config(local[0]), head, env, monkeypatch)
    assert layout.train_cpus + _train_config(local[0]).pipeline.cpus_per_worker == 2
    from raypipe.config import ConfigError

    with pytest.raises(ConfigError, match="max_actors"):
        _train_config(local[0] + ["pipeline.train.max_actors=8"])


# ---------------------------------------------------------------- KubeRay manifests


def _containers(spec: dict) -> dict[str, dict]:
    """group name ("head" for the head) -> its pod template spec."""
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return pods


def _group_resources(group: dict) -> tuple[dict, dict]:
    containers = group["template"]["spec"]["containers"]
    assert len(containers) == 1
    res = containers[0]["resources"]
    return res["requests"], res["limits"]


def _cpus(value: str | int) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _gib(value: str) -> float:
    units = {"Gi": 1.0, "Mi": 1 / 1024, "G": 1e9 / 2**30, "M": 1e6 / 2**30}
    for unit, factor in units.items():
        if value.endswith(unit):
            return float(value[: -len(unit)]) * factor
    return float(value) / 2**30


def _strict(schema):
    """``kubectl apply`` refuses fields a CRD does not declare (field validation Strict): close
    every object schema that lists its properties, as the API server treats it."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    return schema


def _crd_validator(kind: str) -> jsonschema.protocols.Validator:
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    schemas = {p.name: _strict(json.loads(p.read_text())) for p in CRDS.glob("*.schema.json")}
    registry = Registry().with_resources(
        (name, Resource.from_contents(s, default_specification=DRAFT202012))
        for name, s in schemas.items())
    schema = schemas["raycluster-v1.schema.json" if kind == "RayCluster" else "rayjob-v1.schema.json"]
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _kuberay_version() -> str:
    """The KubeRay release the stored CRD schemas come from (their README notes it)."""
    return re.search(r"tag `(v[\d.]+)`", (CRDS / "README.md").read_text()).group(1)


@pytest.mark.parametrize("name", KUBERAY_YAMLS)
def test_kuberay_manifest_passes_the_crd_schema(name):
    doc = _load(name)
    validator = _crd_validator(doc["kind"])
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])
    # the README and the manifests name the KubeRay version whose schema this is
    version = _kuberay_version()
    assert f"KubeRay {version}" in _readme()
    assert f"KubeRay {version}" in (CLUSTER / name).read_text()


def test_crd_schema_check_is_not_a_no_op():
    doc = _load("kuberay/raycluster.yaml")
    validator = _crd_validator("RayCluster")
    for path, value in [
        (["spec", "workerGroupSpecs", 1, "template", "spec", "serviceAcountName"], "raypipe"),
        (["spec", "workerGroupSpecs", 1, "maxReplicas"], "four"),
        (["spec", "authOptions", "mode"], "password"),
        (["spec", "headGroupSpec", "template", "spec", "containers", 0, "resources", "limits",
          "cpu"], "two"),
    ]:
        bad = copy.deepcopy(doc)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert list(validator.iter_errors(bad)), f"{path} = {value!r} passed the schema"
    job = _rayjob()
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplica"] = 0  # through the $ref
    assert list(_crd_validator("RayJob").iter_errors(job))


@pytest.mark.parametrize("name", KUBERAY_YAMLS)
def test_kuberay_manifest_required_fields(name):
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == ("RayCluster" if "raycluster" in name else "RayJob")
    assert doc["metadata"]["name"]
    spec = _cluster_spec(name)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token"}  # KubeRay generates the token Secret
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
    assert groups["gpu"]["minReplicas"] == 0 and groups["gpu"]["replicas"] == 0  # from zero
    for pod in _containers(spec).values():
        assert [c["image"] for c in pod["containers"]] == [IMAGE]


def _kuberay_secret_name(cluster_name: str) -> str:
    """utils.CheckName in KubeRay v1.7.0, which reconcileAuthSecret names the Secret with."""
    name = cluster_name[-50:] if len(cluster_name) > 50 else cluster_name
    if name[0].isdigit() or not name[0].isalnum():
        name = "r" + name[1:]
    return name


def test_token_secret_is_looked_up_under_the_name_kuberay_gives_it():
    name = _load("kuberay/raycluster.yaml")["metadata"]["name"]
    secret = _kuberay_secret_name(name)
    command = f"kubectl get secret {secret} -o jsonpath='{{.data.auth_token}}' | base64 -d"
    for text in (_readme(), (CLUSTER / "kuberay" / "raycluster.yaml").read_text()):
        assert command in text
        found = re.findall(r"kubectl get secret (\S+)", text)
        assert found and set(found) <= {secret, "$(kubectl"}, found
    assert "raypipe-auth" not in _readme()


@pytest.mark.parametrize("name", KUBERAY_YAMLS)
def test_kuberay_pods_get_credentials_from_the_service_account_or_a_secret(name):
    spec = _cluster_spec(name)
    for group, pod in _containers(spec).items():
        assert pod["serviceAccountName"] == "raypipe", group
        for container in pod["containers"]:
            assert container["envFrom"] == [{"secretRef": {"name": "raypipe-s3", "optional": True}}]
            for var in container.get("env", []):
                secret_like = re.search(r"SECRET|ACCESS_KEY|TOKEN|PASSWORD", var["name"])
                assert not secret_like or "valueFrom" in var, f"{group}: literal {var['name']}"
    doc = _load(name)
    if doc["kind"] == "RayJob":
        runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        assert "env_vars" not in runtime_env, "credentials never go into a job's runtime env"


@pytest.mark.parametrize("name", KUBERAY_YAMLS)
def test_kuberay_pods_tell_raypipe_the_most_the_cluster_can_grow_to(name):
    spec = _cluster_spec(name)
    most_cpus = _cpus(spec["headGroupSpec"]["rayStartParams"]["num-cpus"])
    most_gpus = 0
    for g in spec["workerGroupSpecs"]:
        _, limits = _group_resources(g)
        most_cpus += g["maxReplicas"] * math.ceil(_cpus(limits["cpu"]))  # KubeRay rounds up
        most_gpus += g["maxReplicas"] * int(limits.get("nvidia.com/gpu", 0))
    for group, pod in _containers(spec).items():
        env = {v["name"]: v.get("value") for v in pod["containers"][0]["env"]}
        assert env["RAYPIPE_MAX_CPUS"] == str(int(most_cpus)), group
        assert env["RAYPIPE_MAX_GPUS"] == str(most_gpus), group


# (vCPUs, GiB, max pods) of the nodes the README and raycluster.yaml cut each pod for
NODES = {
    "head": [("m5.xlarge", 4, 16, 58), ("n2-standard-4", 4, 16, 110)],
    "cpu": [("m5.4xlarge", 16, 64, 234), ("n2-standard-16", 16, 64, 110)],
    "gpu": [("g5.4xlarge", 16, 64, 234), ("n1-standard-16", 16, 60, 110)],
}
DAEMONSETS = (0.5, 1.0)  # CPU, GiB left for the node's daemonsets (CNI, proxy, GPU plugin, logs)


def _allocatable(vcpus: int, gib: float, max_pods: int) -> tuple[float, float]:
    """A node's allocatable CPU and memory: the kubelet and system reservations of GKE and EKS
    (the larger where they differ) and the 100 MiB eviction threshold."""
    cpu_tiers = [(1, 0.06), (1, 0.01), (2, 0.005), (math.inf, 0.0025)]
    mem_tiers = [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (math.inf, 0.02)]

    def tiered(amount, tiers):
        reserved = 0.0
        for size, rate in tiers:
            reserved += min(amount, size) * rate
            amount = max(amount - size, 0)
        return reserved

    gke_memory = tiered(gib, mem_tiers)
    eks_memory = (255 + 11 * max_pods) / 1024
    return vcpus - tiered(vcpus, cpu_tiers), gib - max(gke_memory, eks_memory) - 100 / 1024


def test_kuberay_pods_fit_the_nodes_the_readme_names():
    spec = _cluster_spec("kuberay/raycluster.yaml")
    auto = spec["autoscalerOptions"]["resources"]["requests"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    pods = {"head": (_cpus(head["cpu"]) + _cpus(auto["cpu"]),
                     _gib(head["memory"]) + _gib(auto["memory"]))}
    for g in spec["workerGroupSpecs"]:
        requests, _ = _group_resources(g)
        pods[g["groupName"]] = (_cpus(requests["cpu"]), _gib(requests["memory"]))
    texts = (_readme(), (CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    for group, nodes in NODES.items():
        cpu, mem = pods[group]
        for node, vcpus, gib, max_pods in nodes:
            assert all(node in t for t in texts), f"{node} is not named"
            alloc_cpu, alloc_mem = _allocatable(vcpus, gib, max_pods)
            assert cpu <= alloc_cpu - DAEMONSETS[0], (group, node, cpu, alloc_cpu)
            assert mem <= alloc_mem - DAEMONSETS[1], (group, node, mem, alloc_mem)
    # the arithmetic refuses what did not fit: 8 CPU / 32 GiB on an 8-vCPU, 32 GiB node
    alloc_cpu, alloc_mem = _allocatable(8, 32, 58)
    assert 8 > alloc_cpu - DAEMONSETS[0] and 32 > alloc_mem - DAEMONSETS[1]


def test_rayjob_uses_the_raycluster_spec_and_a_valid_entrypoint():
    job = _rayjob()
    assert job["spec"]["rayClusterSpec"] == _load("kuberay/raycluster.yaml")["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env == {"working_dir": "/home/ray/raypipe"}
    # the image installs the project where the runtime env points
    dockerfile = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    assert "/home/ray/raypipe" in dockerfile and "pip install" in dockerfile
    cfg = _entrypoint_config()  # raises ConfigError if a key or value is wrong
    assert cfg.train.use_gpu is True
    assert cfg.run.storage_path.startswith("s3://") and cfg.data.root.startswith("s3://")


def test_kuberay_resources_match_the_training_config(monkeypatch):
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
    # with the worker groups at zero, the run passes raypipe's pre-check against the pods'
    # RAYPIPE_MAX_*, on GPUs
    head_pod = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {v["name"]: v["value"] for v in head_pod["env"] if "value" in v}
    head = {"CPU": _cpus(spec["headGroupSpec"]["rayStartParams"]["num-cpus"])}
    layout, capacity = _precheck_at_zero(cfg, head, env, monkeypatch)
    assert layout.use_gpu and capacity["GPU"] >= cfg.train.num_workers * cfg.train.gpus_per_worker
    # the data workers fit the CPU group
    assert cfg.pipeline.workers != "auto", "size the data workers for the CPU group"
    assert _cpus(cpu_req["cpu"]) >= cfg.pipeline.cpus_per_worker
    assert groups["cpu"]["maxReplicas"] * _cpus(cpu_req["cpu"]) >= (
        layout.data_workers * cfg.pipeline.cpus_per_worker)


def test_cluster_readme_walks_through_the_steps():
    text = _readme()
    for step in ("docker build -f cluster/kuberay/Dockerfile", "docker push",
                 "ray up cluster/aws.yaml", "ray up cluster/gcp.yaml", "ray down cluster/aws.yaml",
                 "kubectl apply -f cluster/kuberay/", "kubectl delete -f cluster/kuberay/",
                 "ray job submit", "--working-dir .", "RAY_FAKE_CLUSTER=1", "ray start --head",
                 "summary.json", "RAY_AUTH_MODE=token", "RAYPIPE_MAX_CPUS", "RAYPIPE_MAX_GPUS",
                 "serviceAccountName", "eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"):
        assert step in text, f"cluster/README.md does not show '{step}'"
    # credentials come from node roles or a Secret, not from the driver through the runtime env
    assert not re.search(r"raypipe (hands|forwards|copies|passes)[^.]*runtime env", text, re.I)
    for test_name in re.findall(r"`(test_[a-z0-9_]+)`", text):
        found = subprocess.run(["grep", "-rlq", f"def {test_name}", str(ROOT / "tests")])
        assert found.returncode == 0, f"cluster/README.md cites {test_name}, which does not exist"
