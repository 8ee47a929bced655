"""Regenerate the schemas in this folder from KubeRay's CRDs (see README.md here):

    python tests/data/kuberay-crds/extract.py ray.io_rayclusters.yaml ray.io_rayjobs.yaml

Keeps the ``v1`` version's ``openAPIV3Schema`` without ``status`` (manifests do not set it) and
without ``description`` texts (they do not validate anything). The RayJob's ``rayClusterSpec`` is
the RayCluster's ``spec`` schema word for word (checked here) and is stored as a ``$ref`` to it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RAYCLUSTER_ID = "raycluster-v1.schema.json"
RAYJOB_ID = "rayjob-v1.schema.json"


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def v1_schema(crd_path: str) -> dict:
    crd = yaml.safe_load(Path(crd_path).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strip(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    return schema


def main(raycluster_crd: str, rayjob_crd: str) -> None:
    cluster = v1_schema(raycluster_crd)
    job = v1_schema(rayjob_crd)
    job_cluster_spec = job["properties"]["spec"]["properties"]["rayClusterSpec"]
    assert job_cluster_spec == cluster["properties"]["spec"], "rayClusterSpec differs from spec"
    job["properties"]["spec"]["properties"]["rayClusterSpec"] = {
        "$ref": f"{RAYCLUSTER_ID}#/properties/spec"
    }
    for name, schema in ((RAYCLUSTER_ID, cluster), (RAYJOB_ID, job)):
        schema = {"$id": name, **schema}
        (HERE / name).write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
