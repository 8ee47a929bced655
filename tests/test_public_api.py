"""raypipe stands on Ray's public API and changes nothing by being imported."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "raypipe"
ENV_WRITES = {"update", "setdefault", "pop", "popitem", "clear", "__setitem__", "__delitem__"}


def _ray_private(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "ray" and any(p == "_private" or p.endswith("_internal") for p in parts[1:])


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and \
        isinstance(node.value, ast.Name) and node.value.id == "os"


def findings(source: str, where: str) -> list[str]:
    """Uses of Ray's internals, assignments to Ray's module attributes and writes to the
    process environment in ``source``."""
    tree = ast.parse(source)
    ray_names: set[str] = set()  # local names bound to ray modules
    out = []
    for node in ast.walk(tree):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _ray_private(alias.name):
                    out.append(f"{line}: imports {alias.name}")
                if alias.name.split(".")[0] == "ray":
                    ray_names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module:
            if _ray_private(node.module) or any(_ray_private(f"{node.module}.{a.name}") for a in node.names):
                out.append(f"{line}: imports from {node.module}")
            if node.module.split(".")[0] == "ray":
                ray_names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Attribute) and node.attr in ("_private",) or \
                isinstance(node, ast.Attribute) and node.attr.endswith("_internal"):
            out.append(f"{line}: uses .{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if _is_environ(node.func.value) and node.func.attr in ENV_WRITES:
                out.append(f"{line}: os.environ.{node.func.attr}")
            if isinstance(node.func.value, ast.Name) and node.func.value.id == "os" and \
                    node.func.attr in ("putenv", "unsetenv"):
                out.append(f"{line}: os.{node.func.attr}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                if isinstance(t, ast.Subscript) and _is_environ(t.value):
                    out.append(f"{where}:{node.lineno}: writes os.environ[...]")
                base = t
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(t, ast.Attribute) and isinstance(base, ast.Name) and base.id in ray_names:
                    out.append(f"{where}:{node.lineno}: assigns to {ast.unparse(t)} of a Ray module")
    return out


def test_the_scan_finds_what_it_looks_for() -> None:
    bad = '''
import os
import ray._private.state
from ray.data._internal.execution import streaming_executor
from ray.train.v2 import _internal
import ray.data as rd
os.environ["X"] = "1"
os.environ.update(Y="2")
rd.DataContext = None
streaming_executor.process_completed_tasks = print
x = ray._private.worker
'''
    found = findings(bad, "bad.py")
    for what in ("imports ray._private.state", "imports from ray.data._internal.execution",
                 "imports from ray.train.v2", "writes os.environ", "os.environ.update",
                 "assigns to rd.DataContext", "assigns to streaming_executor.process_completed_tasks",
                 "uses ._private"):
        assert any(what in f for f in found), (what, found)
    assert findings("import os\nx = os.environ.get('A')\nimport ray\nray.init()\n", "ok.py") == []


def test_raypipe_uses_only_rays_public_api_and_never_writes_the_environment() -> None:
    found = [f for path in sorted(PACKAGE.rglob("*.py"))
             for f in findings(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, "\n".join(found)


IMPORT_EVERYTHING = r'''
import importlib, json, os, pkgutil, sys, threading
# what raypipe's dependencies do to the environment on import (scikit-learn's KMP_*, Ray Tune's
# RAY_CLIENT_MODE, torchvision's TORCHINDUCTOR_CACHE_DIR) is theirs: imported first
import ray, ray.data, ray.train, ray.train.torch, ray.tune, sklearn, torchvision, skimage
before_env = dict(os.environ)
ctx = ray.data.DataContext.get_current()
before_ctx = repr(sorted((k, repr(v)) for k, v in vars(ctx).items()))
before_threads = {t.name for t in threading.enumerate()}
cwd = set(os.listdir("."))
import raypipe
names = [m.name for m in pkgutil.walk_packages(raypipe.__path__, "raypipe.")]
for name in names:
    importlib.import_module(name)
after_ctx = repr(sorted((k, repr(v)) for k, v in vars(ray.data.DataContext.get_current()).items()))
print(json.dumps({
    "modules": len(names),
    "env_changed": sorted(k for k in set(before_env) | set(os.environ)
                          if before_env.get(k) != os.environ.get(k)),
    "ray_initialized": ray.is_initialized(),
    "context_changed": before_ctx != after_ctx,
    "new_threads": sorted({t.name for t in threading.enumerate()} - before_threads),
    "new_files": sorted(set(os.listdir(".")) - cwd),
}))
'''


def test_importing_every_module_changes_nothing(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["modules"] > 30
    assert result == {**result, "env_changed": [], "ray_initialized": False, "context_changed": False,
                      "new_threads": [], "new_files": []}


def test_the_ray_requirement_is_a_lower_bound() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    ray_line = next(line for line in text.splitlines() if line.strip().startswith('"ray['))
    assert ">=2.60" in ray_line and "<" not in ray_line.split(">=")[1], ray_line
