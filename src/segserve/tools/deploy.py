"""The storage layout KServe's TorchServe runtime expects.

KServe's TorchServe runtime starts
    torchserve --start --model-store=/mnt/models/model-store --ts-config=/mnt/models/config/config.properties
so the storage URI must hold `config/config.properties` and `model-store/*.mar`. The config is the
repository's config.properties with KServe's overrides (segserve.tools.torchserve_config.kserve, each with
its reason): the bind addresses, the /mnt/models store, token auth off, and a `model_snapshot` naming the
models (as KServe's docs show). A snapshot also sets each model's workers, batch size and batch delay, and
wins over the archive's model-config.yaml, so those are copied from the archive.

    python -m segserve.tools.deploy kserve-layout --out kserve [--config config.properties]
        [--mar model-store/segmenter.mar] [--workers 1]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from . import torchserve_config


def kserve_layout(out: Path, mars: list[Path], config: Path, workers: int | None = None) -> Path:
    """Write out/config/config.properties (from `config`, KServe's overrides applied) and
    out/model-store/*.mar; return the written config's path."""
    store, config_dir = out / "model-store", out / "config"
    if store.exists():
        shutil.rmtree(store)
    store.mkdir(parents=True)
    config_dir.mkdir(parents=True, exist_ok=True)
    models = {}
    for mar in mars:
        shutil.copy2(mar, store / mar.name)
        models[mar.stem] = store / mar.name
    return torchserve_config.kserve(config, models, workers).write(config_dir / "config.properties")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segserve.tools.deploy")
    sub = parser.add_subparsers(dest="command", required=True)
    layout = sub.add_parser("kserve-layout", help="write the storage layout KServe's TorchServe runtime expects")
    layout.add_argument("--out", type=Path, default=Path("kserve"))
    layout.add_argument("--config", type=Path, default=Path("config.properties"),
                        help="the TorchServe settings to start from (default: ./config.properties)")
    layout.add_argument("--mar", type=Path, action="append", help="archive(s) to serve (default: model-store/*.mar)")
    layout.add_argument("--workers", type=int, default=None, help="workers per model (default: the archive's)")
    args = parser.parse_args(argv)
    mars = args.mar or sorted(Path("model-store").glob("*.mar"))
    if not mars:
        print("no archive: run `make mar` first or pass --mar", file=sys.stderr)
        return 2
    if not args.config.is_file():
        print(f"no {args.config}: run from the project root or pass --config", file=sys.stderr)
        return 2
    config = kserve_layout(args.out, mars, args.config, args.workers)
    print(f"KServe layout in {args.out}/: {config.relative_to(args.out)} + "
          + ", ".join(f"model-store/{m.name}" for m in mars))
    print(f"upload it, e.g.: gsutil -m cp -r {args.out}/* gs://<bucket>/segserve/  (storageUri: gs://<bucket>/segserve)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
