"""``jobs/benchmark.py preprocess`` runs at a tiny size and writes well-formed JSON (no timing asserts)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_job


@pytest.mark.slow
def test_preprocess_benchmark_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_job("benchmark.py", "preprocess", "--synthetic", "--n", "3", "--size", "32", "--repeats", "1",
                   "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ratio" in proc.stdout and "torchvision" in proc.stdout
    result = json.loads(out.read_text())
    assert result["images"] == 3 and result["size"] == 32 and result["source"].startswith("synthetic")
    for key in ("train_chain_ms", "torchvision_ms", "naive_skimage_chain_ms", "ratio"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert math.isclose(result["ratio"], result["train_chain_ms"] / result["torchvision_ms"], rel_tol=1e-9)
    ops = [row["op"] for row in result["table"]]
    for expected in ("resize (stretch)", "gray", "threshold otsu", "opening disk(3) binary",
                     "normalise percentile", "warp affine (one resample)", "noise"):
        assert expected in ops
    assert all(row["ms_per_image"] >= 0 for row in result["table"])
