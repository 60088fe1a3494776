"""Vendor the parts of KServe's CRD schemas that deploy/kserve/*.yaml use, for offline validation.

The full InferenceService CRD is ~2 MB; this keeps, for every field the manifests set, its
schema (types, patterns, enums, required lists), and drops descriptions and unused fields.
A field the manifests set that the CRD does not declare is an error here (Kubernetes would prune it).

    python deploy/kserve/schema/vendor.py <kserve checkout> <commit>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
MANIFESTS = HERE.parent
CRDS = {  # kind -> (CRD file in kserve's repo, version)
    "InferenceService": ("config/crd/full/serving.kserve.io_inferenceservices.yaml", "v1beta1"),
    "ServingRuntime": ("config/crd/full/serving.kserve.io_servingruntimes.yaml", "v1alpha1"),
}
DROP = {"description"}


def trim(schema: dict, examples: list, path: str) -> dict:
    out = {k: v for k, v in schema.items() if k not in DROP and k not in ("properties", "items")}
    dicts = [e for e in examples if isinstance(e, dict)]
    if "properties" in schema and dicts:
        keys = sorted({k for d in dicts for k in d})
        unknown = [k for k in keys if k not in schema["properties"]]
        if unknown and not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            raise SystemExit(f"{path}: {', '.join(unknown)} not in the CRD schema")
        out["properties"] = {k: trim(schema["properties"][k], [d[k] for d in dicts if k in d], f"{path}.{k}")
                             for k in keys if k in schema["properties"]}
    if "items" in schema:
        items = [i for e in examples if isinstance(e, list) for i in e]
        out["items"] = trim(schema["items"], items, f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = trim(schema["additionalProperties"], [], f"{path}.*")
    return out


def main(checkout: str, commit: str) -> None:
    docs = [yaml.safe_load(p.read_text()) for p in sorted(MANIFESTS.glob("*.yaml"))]
    for kind, (crd_path, version) in CRDS.items():
        crd = yaml.safe_load((Path(checkout) / crd_path).read_text())
        (spec,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
        schema = spec["schema"]["openAPIV3Schema"]
        trimmed = trim(schema, [d for d in docs if d["kind"] == kind], kind)
        trimmed["x-source"] = f"github.com/kserve/kserve@{commit} {crd_path} ({version}), trimmed by vendor.py"
        (HERE / f"{kind.lower()}-{version}.json").write_text(json.dumps(trimmed, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
