"""Security: safe YAML, checkpoints that cannot execute code, manifest paths confined to the data
root, and secrets that never reach logs, written configs or summaries."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TAME, make_image_folder, run_job

from raypipe.config import ConfigError, load_config
from raypipe.data.sources import DataSourceError, discover

CODE = [p for d in ("raypipe", "jobs") for p in (ROOT / d).rglob("*.py")]
SECRET = "RAYPIPE-TEST-SECRET-7f3a9c"


def _calls(name: str):
    """(file, call node) for every call of ``name`` (e.g. 'torch.load') in the project code."""
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                yield path, node


# ---------------------------------------------------------------- code that deserialises


def test_yaml_is_only_read_with_the_safe_loader() -> None:
    for bad in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
        found = [f"{p.relative_to(ROOT)}:{n.lineno}" for p, n in _calls(bad)]
        assert not found, f"{bad} can construct arbitrary objects: {found}"
    assert any(True for _ in _calls("yaml.safe_load"))


def test_every_torch_load_is_weights_only() -> None:
    calls = list(_calls("torch.load"))
    assert calls, "expected checkpoint loading code"
    for path, node in calls:
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        assert kw.get("weights_only") == "True", f"{path.relative_to(ROOT)}:{node.lineno}"


def test_no_pickle_loading_in_project_code() -> None:
    for bad in ("pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads"):
        assert not list(_calls(bad)), bad


def test_weights_only_refuses_a_checkpoint_that_runs_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "model.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):  # noqa: PT011
        torch.load(path, map_location="cpu", weights_only=True)


def test_config_yaml_cannot_construct_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("data: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, [])


# ---------------------------------------------------------------- manifest paths


@pytest.mark.parametrize("path", ["../outside.png", "a/../../outside.png", "/etc/passwd",
                                  "C:/Windows/win.ini", "s3://other-bucket/x.png", "..\\x.png"])
def test_manifest_paths_cannot_escape_the_data_root(tmp_path: Path, path: str) -> None:
    root = make_image_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    (tmp_path / "outside.png").write_bytes((root / "a" / "000.png").read_bytes())
    rows = [f"{c}/{i:03d}.png,{c}" for c in "ab" for i in range(3)] + [f"{path},a"]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    cfg = load_config(None, [f"data.manifest={manifest}", f"data.root={root}"])
    with pytest.raises(DataSourceError, match=r"(absolute path|climbs out of the data root)"):
        discover(cfg.data)


# ---------------------------------------------------------------- secrets


def _secret_env() -> dict[str, str]:
    return {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": SECRET + "-ID",
            "AWS_SESSION_TOKEN": SECRET + "-SESSION"}


def _secrets() -> list[str]:
    out = [SECRET]
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file() and len(token.read_text().strip()) >= 8:
        out.append(token.read_text().strip())
    for var in ("RAY_AUTH_TOKEN",):
        if len(os.environ.get(var, "")) >= 8:
            out.append(os.environ[var])
    return out


def _assert_no_secret(texts: dict[str, str]) -> None:
    for where, text in texts.items():
        for secret in _secrets():
            assert secret not in text, f"a secret appears in {where}"


def test_secrets_not_echoed_by_storage_errors(monkeypatch, caplog) -> None:
    """Storage errors print the URI and the fix, never the credentials."""
    for k, v in _secret_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    cfg = load_config(None, ["data.root=s3://bucket/data"])
    with caplog.at_level("DEBUG"), pytest.raises(DataSourceError) as info:
        discover(cfg.data)
    _assert_no_secret({"error": str(info.value), "log": caplog.text})
    assert "s3://bucket/data" in str(info.value)


@pytest.mark.slow
def test_secrets_never_reach_logs_configs_or_summaries(ray_cluster, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", {"a": 8, "b": 8})
    proc = run_job("train.py", f"data.root={root}", f"run.storage_path={tmp_path / 'runs'}",
                   "run.name=secretive", "train.epochs=1", "train.batch_size=8",
                   *TAME, "preprocess.image_size=32",
                   "augment.enabled=false", "run.tensorboard=false",
                   env={**_secret_env(), "RAY_ADDRESS": ray_cluster})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "secretive"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file()
    texts = {"stdout": proc.stdout, "stderr": proc.stderr}
    for f in run_dir.rglob("*"):
        if f.is_file():
            texts[str(f.relative_to(run_dir))] = f.read_bytes().decode("latin-1")
    _assert_no_secret(texts)
