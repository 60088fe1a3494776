"""Build a TorchServe model archive (.mar) that is known to work.

Before packaging, the weights are loaded strictly into the configured
architecture and one forward pass checks the output: a wrong key, shape or class
count fails here with a readable message instead of crash-looping a worker.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .config import ConfigError, ServingConfig
from .models import build_model, load_state_dict

PACKAGE_DIR = Path(__file__).resolve().parent
REPO = PACKAGE_DIR.parent.parent


class BuildError(RuntimeError):
    pass


def check_model(config: ServingConfig, weights: Path) -> None:
    """Strict load plus one forward pass; raise BuildError listing what does not fit."""
    model = build_model(config.arch, config.num_classes, **config.arch_params)
    try:
        state = load_state_dict(weights)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a build error, said plainly
        raise BuildError(f"cannot read weights {weights}: {str(exc).splitlines()[0][:300]}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        lines = [f"weights {weights} do not fit architecture {config.arch!r} "
                 f"with {config.num_classes} classes:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:10]) + (f", ... ({len(items) - 10} more)" if len(items) > 10 else "")
                lines.append(f"  {title} ({len(items)}): {shown}")
        raise BuildError("\n".join(lines))
    model.load_state_dict(state, strict=True)
    model.eval()
    height, width = config.input_size
    with torch.inference_mode():
        output = model(torch.zeros(1, 3, height, width))
    if isinstance(output, dict):
        output = output["out"]
    if output.dim() != 4 or output.shape[1] != config.num_classes:
        raise BuildError(f"the model outputs shape {tuple(output.shape)} but {config.num_classes} classes are "
                         f"configured: expected (N, {config.num_classes}, H, W)")


def build(name: str, config_path: Path, weights: Path, export_path: Path, version: str | None = None,
          handler: Path | None = None) -> Path:
    for label, path in (("model config", config_path), ("weights", weights)):
        if not path.is_file():
            raise BuildError(f"{label} not found: {path}" +
                             (" (run `make train` to create the default weights)" if label == "weights" else ""))
    handler = handler or REPO / "handler" / "segmenter_handler.py"
    if not handler.is_file():
        raise BuildError(f"handler not found: {handler}")
    config = ServingConfig.from_yaml(config_path)
    check_model(config, weights)
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="segserve-mar-") as tmp:
        stage = Path(tmp) / "extra"
        # --extra-files copies a folder's contents into the archive root, subfolders intact.
        shutil.copytree(PACKAGE_DIR, stage / "segserve", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy2(weights, stage / config.weights)
        (stage / "index_to_name.json").write_text(json.dumps({str(c.id): c.name for c in config.classes}))
        cmd = [
            str(Path(sys.executable).parent / "torch-model-archiver"),
            "--model-name", name,
            "--version", version or config.version,
            "--handler", str(handler),
            "--extra-files", str(stage),
            "--config-file", str(config_path),
            "--export-path", str(export_path),
            "--force",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"torch-model-archiver failed:\n{result.stdout}{result.stderr}")
    return export_path / f"{name}.mar"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build_mar.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="segmenter", help="model name (URL path and archive name)")
    parser.add_argument("--config", type=Path, default=REPO / "model" / "model-config.yaml")
    parser.add_argument("--weights", type=Path, default=None,
                        help="state_dict file (default: the one model-config.yaml names, under model/)")
    parser.add_argument("--version", default=None, help="archive version (default: model-config.yaml's)")
    parser.add_argument("--export-path", type=Path, default=REPO / "model-store")
    args = parser.parse_args(argv)
    try:
        weights = args.weights
        if weights is None:
            if not args.config.is_file():
                raise BuildError(f"model config not found: {args.config}")
            weights = args.config.parent / ServingConfig.from_yaml(args.config).weights
        mar = build(args.name, args.config, weights, args.export_path, args.version)
    except (BuildError, ConfigError, ValueError) as exc:
        print(f"build_mar.sh: error: {exc}", file=sys.stderr)
        return 2
    print(f"built {mar} ({mar.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
