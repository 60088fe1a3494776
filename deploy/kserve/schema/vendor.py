"""Vendor the parts of KServe's CRD schemas and Kubernetes' core schemas that deploy/kserve/*.yaml use,
for offline validation.

The full InferenceService CRD is ~2 MB; this keeps, for every field the manifests set, its
schema (types, patterns, enums, required lists), and drops descriptions and unused fields.
A field the manifests set that the CRD does not declare is an error here (Kubernetes would prune it).
Core kinds (the NetworkPolicy) come from Kubernetes' OpenAPI as JSON schemas, strict (no unknown field):
a `vX.Y.Z-local-strict` folder of github.com/yannh/kubernetes-json-schema, also shipped in the
kubernetes-validate wheel (kubernetes_validate/kubernetes-json-schema/); their $refs are inlined.

    python deploy/kserve/schema/vendor.py <kserve checkout> <commit> [<k8s json-schema folder> <its name>]
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
CORE = {  # kind -> schema file in a kubernetes-json-schema folder
    "NetworkPolicy": "networkpolicy-networking-v1.json",
}
DROP = {"description", "$id", "x-kubernetes-group-version-kind"}


def no_refs(schema: dict) -> dict:
    return schema


def resolver(definitions: dict):
    """Inline `/api/_definitions.json#/$defs/<name>` references (the folder's _definitions.json)."""
    def resolve(schema: dict) -> dict:
        while "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[1]
            schema = {**definitions[name], **{k: v for k, v in schema.items() if k != "$ref"}}
        return schema
    return resolve


def trim(schema: dict, examples: list, path: str, resolve=no_refs) -> dict:
    schema = resolve(schema)
    out = {k: v for k, v in schema.items() if k not in DROP and k not in ("properties", "items")}
    dicts = [e for e in examples if isinstance(e, dict)]
    if "properties" in schema and dicts:
        keys = sorted({k for d in dicts for k in d})
        unknown = [k for k in keys if k not in schema["properties"]]
        if unknown and not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            raise SystemExit(f"{path}: {', '.join(unknown)} not in the CRD schema")
        out["properties"] = {k: trim(schema["properties"][k], [d[k] for d in dicts if k in d], f"{path}.{k}",
                                     resolve)
                             for k in keys if k in schema["properties"]}
    if "items" in schema:
        items = [i for e in examples if isinstance(e, list) for i in e]
        out["items"] = trim(schema["items"], items, f"{path}[]", resolve)
    if isinstance(schema.get("additionalProperties"), dict):
        values = [v for e in examples if isinstance(e, dict) for v in e.values()]
        out["additionalProperties"] = trim(schema["additionalProperties"], values, f"{path}.*", resolve)
    for key in ("anyOf", "oneOf"):  # alternatives (e.g. IntOrString): each resolved, not trimmed
        if key in schema:
            out[key] = [resolve(alternative) for alternative in schema[key]]
    return out


def main(checkout: str, commit: str, k8s_schemas: str | None = None, k8s_name: str | None = None) -> None:
    docs = [yaml.safe_load(p.read_text()) for p in sorted(MANIFESTS.glob("*.yaml"))]
    for kind, (crd_path, version) in CRDS.items():
        crd = yaml.safe_load((Path(checkout) / crd_path).read_text())
        (spec,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
        schema = spec["schema"]["openAPIV3Schema"]
        trimmed = trim(schema, [d for d in docs if d["kind"] == kind], kind)
        trimmed["x-source"] = f"github.com/kserve/kserve@{commit} {crd_path} ({version}), trimmed by vendor.py"
        (HERE / f"{kind.lower()}-{version}.json").write_text(json.dumps(trimmed, indent=1, sort_keys=True) + "\n")
    if k8s_schemas:
        folder = Path(k8s_schemas)
        resolve = resolver(json.loads((folder / "_definitions.json").read_text())["$defs"])
        for kind, file in CORE.items():
            trimmed = trim(json.loads((folder / file).read_text()), [d for d in docs if d["kind"] == kind], kind,
                           resolve)
            trimmed["x-source"] = f"{k8s_name or folder.name} {file} (Kubernetes OpenAPI, strict), trimmed by vendor.py"
            (HERE / file).write_text(json.dumps(trimmed, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:5])
