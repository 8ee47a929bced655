"""cluster/aws.yaml against a moto EC2/IAM/S3 server, as far as Ray's AWS provider goes before SSH.

``ray up`` runs for real (Ray's own ``create_or_update_cluster``: bootstrap, security group, key
pair, subnets, head instance) with only its SSH node updater replaced by a recorder. Then the
head's autoscaler (v2, the one ``ray up`` starts) launches one node of each worker type through
Ray's ``NodeProviderAdapter`` from the bootstrap config ``ray up`` wrote for the head, with the
head's IAM policy enforced by moto; the workers' policy is enforced on EC2 and S3 calls.

What moto cannot show (EC2 resolving ``resolve:ssm:`` image ids, ``iam:PassRole`` checks, instance
metadata credentials, SSH and Docker on the nodes) is listed in cluster/README.md.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

boto3 = pytest.importorskip("boto3")
from botocore.exceptions import ClientError  # noqa: E402

pytestmark = pytest.mark.slow

CLUSTER = ROOT / "cluster"
IAM_DIR = CLUSTER / "aws-iam"
BUCKET = "my-bucket"  # the bucket the policies in cluster/aws-iam name
OTHER_BUCKET = "someone-elses-bucket"


def _clear_ray_aws_caches() -> None:
    """Ray caches boto3 resources and node providers per process; each phase here needs its own
    credentials."""
    from ray.autoscaler._private.aws.utils import client_cache, resource_cache
    from ray.autoscaler._private.providers import _clear_provider_cache

    resource_cache.cache_clear()
    client_cache.cache_clear()
    _clear_provider_cache()


def _use_credentials(monkeypatch, key_id: str, secret: str) -> None:
    """Credentials for Ray's boto3 calls from now on (boto3's default session keeps the ones it
    resolved first, so it is dropped too)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    _clear_ray_aws_caches()


@pytest.fixture
def moto_aws(tmp_path, monkeypatch):
    """A moto server on 127.0.0.1 (free port) that every boto3 client in this process talks to;
    HOME is a temp dir (Ray writes the SSH key and the token there). Yields the region."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    (tmp_path / "home" / ".ray").mkdir(parents=True)
    (tmp_path / "home" / ".ray" / "auth_token").write_text("t" * 64)
    _use_credentials(monkeypatch, "AKIAADMINTESTING0000", "admin-secret")
    region = yaml.safe_load((CLUSTER / "aws.yaml").read_text())["provider"]["region"]
    try:
        yield region
    finally:
        _clear_ray_aws_caches()
        import requests

        requests.post(f"http://{host}:{port}/moto-api/reset", timeout=10)
        server.stop()


def _policy(name: str, account: str) -> str:
    return (IAM_DIR / name).read_text().replace("ACCOUNT_ID", account)


def _iam_user_with_policy(iam, name: str, policy: str) -> tuple[str, str]:
    """An IAM user holding ``policy``: stands in for the instance role (moto enforces policies on
    access keys, not on instance metadata credentials)."""
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName=name, PolicyDocument=policy)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def _denied(call) -> bool:
    try:
        call()
    except ClientError as exc:
        return exc.response["Error"]["Code"] in ("AccessDenied", "UnauthorizedOperation")
    return False


def _ray_up(monkeypatch) -> list[dict]:
    """``ray up cluster/aws.yaml`` from the repository root, SSH replaced by a recorder; returns the
    recorded node-updater arguments, with the bootstrap config read while it still exists."""
    from ray.autoscaler._private import commands

    recorded: list[dict] = []

    class RecordingUpdater:
        def __init__(self, **kwargs):
            mounts = kwargs["file_mounts"]
            kwargs["bootstrap_config"] = json.loads(
                Path(mounts["~/ray_bootstrap_config.yaml"]).read_text()
            )
            recorded.append(kwargs)
            self.exitcode = 0

        def start(self):
            pass

        def join(self):
            pass

    monkeypatch.setattr(commands, "NodeUpdaterThread", RecordingUpdater)
    monkeypatch.chdir(ROOT)
    commands.create_or_update_cluster(
        "cluster/aws.yaml", override_min_workers=None, override_max_workers=None,
        no_restart=False, restart_only=False, yes=True, no_config_cache=True,
        redirect_command_output=False, use_login_shells=True,
    )
    return recorded


def _instances(ec2, node_type: str) -> list[dict]:
    found = ec2.describe_instances(Filters=[
        {"Name": "tag:ray-user-node-type", "Values": [node_type]},
        {"Name": "instance-state-name", "Values": ["pending", "running"]},
    ])
    return [i for r in found["Reservations"] for i in r["Instances"]]


def test_ray_up_and_worker_launch_against_moto(moto_aws, monkeypatch, tmp_path):
    region = moto_aws
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    types = config["available_node_types"]
    iam = boto3.client("iam", region_name=region)
    ec2 = boto3.client("ec2", region_name=region)
    s3 = boto3.client("s3", region_name=region)
    account = boto3.client("sts", region_name=region).get_caller_identity()["Account"]

    # the roles and instance profiles cluster/README.md creates (moto checks the policy syntax)
    trust = (IAM_DIR / "ec2-trust-policy.json").read_text()
    for name in ("raypipe-head", "raypipe-worker"):
        policy = _policy(f"{name.split('-')[1]}-policy.json", account)
        iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust)
        iam.put_role_policy(RoleName=name, PolicyName=name, PolicyDocument=policy)
        iam.create_instance_profile(InstanceProfileName=name)
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    for bucket in (BUCKET, OTHER_BUCKET):
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})

    # ---- ray up: bootstrap + head node
    recorded = _ray_up(monkeypatch)
    assert len(recorded) == 1 and recorded[0]["is_head_node"] is True
    head_run = recorded[0]

    groups = ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [config["provider"]["security_group"]["GroupName"]]}]
    )["SecurityGroups"]
    assert len(groups) == 1, groups
    sg = groups[0]
    rules = sg["IpPermissions"]
    ssh = [r for r in rules if r.get("FromPort") == 22]
    assert len(ssh) == 1 and ssh[0]["IpRanges"] == [{"CidrIp": "0.0.0.0/0"}], rules
    internal = [r for r in rules if r["IpProtocol"] == "-1"]
    assert len(internal) == 1
    assert internal[0]["UserIdGroupPairs"][0]["GroupId"] == sg["GroupId"]
    assert len(rules) == 2, f"only SSH and intra-cluster traffic may come in: {rules}"

    (head,) = _instances(ec2, "head")
    head_cfg = types["head"]["node_config"]
    assert head["IamInstanceProfile"]["Arn"].endswith(
        f":instance-profile/{head_cfg['IamInstanceProfile']['Name']}")
    assert head["InstanceType"] == head_cfg["InstanceType"]
    assert head["ImageId"] == head_cfg["ImageId"]  # handed to EC2 as written (resolve:ssm:...)
    assert [g["GroupId"] for g in head["SecurityGroups"]] == [sg["GroupId"]]

    # what the head's SSH updater would have run: the container, token auth, no pip install
    assert head_run["docker_config"]["image"] == config["docker"]["image"]
    assert "~/.ray/auth_token" in head_run["file_mounts"]
    assert head_run["initialization_commands"] == config["initialization_commands"]
    assert not any("pip install" in c for c in head_run["setup_commands"])
    start = " ".join(head_run["ray_start_commands"])
    assert "RAY_AUTH_MODE=token" in start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    assert "RAY_enable_autoscaler_v2=1" in start  # ray up starts autoscaler v2

    # ---- the head's autoscaler launches workers, with only the head's policy
    bootstrap = head_run["bootstrap_config"]
    for name in ("cpu_worker", "gpu_worker"):
        node_config = bootstrap["available_node_types"][name]["node_config"]
        assert node_config["SecurityGroupIds"] == [sg["GroupId"]]
        assert node_config["IamInstanceProfile"] == {"Name": "raypipe-worker"}
    head_keys = _iam_user_with_policy(iam, "as-raypipe-head", _policy("head-policy.json", account))
    worker_keys = _iam_user_with_policy(iam, "as-raypipe-worker",
                                        _policy("worker-policy.json", account))
    # the head's home as ray up leaves it: the bootstrap config and the SSH key for the workers
    bootstrap_file = Path(os.path.expanduser("~/ray_bootstrap_config.yaml"))
    bootstrap_file.write_text(json.dumps(bootstrap))
    key = Path(os.path.expanduser(bootstrap["auth"]["ssh_private_key"]))
    key.write_bytes(Path(head_run["file_mounts"]["~/ray_bootstrap_key.pem"]).read_bytes())

    from moto import settings as moto_settings
    from moto.core.authorization import ActionAuthenticatorMixin

    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # enforce IAM from now
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    _use_credentials(monkeypatch, *head_keys)

    from ray.autoscaler._private.providers import _get_node_provider
    from ray.autoscaler.v2.instance_manager.config import FileConfigReader
    from ray.autoscaler.v2.instance_manager.node_provider import NodeProviderAdapter
    from ray.core.generated.instance_manager_pb2 import NodeKind

    reader = FileConfigReader(str(bootstrap_file), skip_content_hash=True)
    provider = _get_node_provider(bootstrap["provider"], bootstrap["cluster_name"], use_cache=False)
    adapter = NodeProviderAdapter(provider, reader)
    adapter.launch({"cpu_worker": 1, "gpu_worker": 1}, request_id="raypipe-test")
    deadline, workers = time.time() + 30, {}
    while time.time() < deadline:
        errors = adapter.poll_errors()
        assert not errors, [repr(e.__cause__) for e in errors]
        workers = {i: c for i, c in adapter.get_non_terminated().items()
                   if c.node_kind == NodeKind.WORKER}
        if len(workers) == 2:
            break
        time.sleep(0.5)
    assert sorted(c.node_type for c in workers.values()) == ["cpu_worker", "gpu_worker"]

    _use_credentials(monkeypatch, "AKIAADMINTESTING0000", "admin-secret")
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
    for name in ("cpu_worker", "gpu_worker"):
        (inst,) = _instances(ec2, name)
        cfg = types[name]["node_config"]
        assert inst["IamInstanceProfile"]["Arn"].endswith(
            f":instance-profile/{cfg['IamInstanceProfile']['Name']}")
        assert inst["IamInstanceProfile"]["Arn"] != head["IamInstanceProfile"]["Arn"]
        assert inst["InstanceType"] == cfg["InstanceType"]
        assert inst["ImageId"] == cfg["ImageId"]
        assert [g["GroupId"] for g in inst["SecurityGroups"]] == [sg["GroupId"]]

    # scale-down: the head may terminate what it launched
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    _use_credentials(monkeypatch, *head_keys)
    provider = _get_node_provider(bootstrap["provider"], bootstrap["cluster_name"], use_cache=False)
    adapter = NodeProviderAdapter(provider, reader)
    adapter.terminate(list(workers), request_id="raypipe-test-down")
    deadline = time.time() + 30
    while adapter.get_non_terminated().keys() & workers.keys():
        assert time.time() < deadline, "workers were not terminated"
        assert not adapter.poll_errors()
        time.sleep(0.5)

    # ---- the head and the workers reach the bucket's objects, and only that bucket's; the
    # workers cannot touch EC2. (moto checks S3 calls by operation name, e.g. s3:ListObjectsV2,
    # where AWS asks for s3:ListBucket, so listing is left to a real account.)
    for key_id, secret in (head_keys, worker_keys):
        client = boto3.client("s3", region_name=region, aws_access_key_id=key_id,
                              aws_secret_access_key=secret)
        client.put_object(Bucket=BUCKET, Key="runs/r/summary.json", Body=b"{}")
        assert client.get_object(Bucket=BUCKET, Key="runs/r/summary.json")["Body"].read() == b"{}"
        client.delete_object(Bucket=BUCKET, Key="runs/r/summary.json")
        assert _denied(lambda c=client: c.put_object(Bucket=OTHER_BUCKET, Key="x", Body=b"x"))
        assert _denied(lambda c=client: c.get_object(Bucket=OTHER_BUCKET, Key="x"))
    worker_ec2 = boto3.client("ec2", region_name=region, aws_access_key_id=worker_keys[0],
                              aws_secret_access_key=worker_keys[1])
    assert _denied(worker_ec2.describe_instances)
    assert _denied(lambda: worker_ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1))
