#!/usr/bin/env python3
"""Write the image's pinned requirements from pyproject.toml into a folder, in two files:

    torch.txt   torch and torchvision (installed first, from the build's TORCH_INDEX_URL: CPU or CUDA wheels)
    server.txt  the base dependencies and the `server` extra, less those two

so the image's dependency layers are keyed on the pins alone: editing pyproject.toml's tool settings
leaves them cached. Standard library only (it runs on the base image's Python).

    python3 requirements.py pyproject.toml OUT_DIR [EXTRAS]     (EXTRAS: e.g. smp,hf,monai)
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

TORCH = {"torch", "torchvision"}


def name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def main(pyproject: str, out: str, extras: str = "") -> int:
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    optional = project["optional-dependencies"]
    chosen = [extra.strip() for extra in extras.split(",") if extra.strip()]
    unknown = [extra for extra in chosen if extra not in optional]
    if unknown:
        print(f"requirements.py: no extra {', '.join(unknown)}; pyproject has: {', '.join(optional)}", file=sys.stderr)
        return 1
    extra_pins = [pin for extra in chosen for pin in optional[extra]]
    pins = list(dict.fromkeys([*project["dependencies"], *optional["server"], *extra_pins]))
    loose = [p for p in pins if "==" not in p]
    if loose:
        print(f"requirements.py: not pinned with ==: {', '.join(loose)}", file=sys.stderr)
        return 1
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "torch.txt").write_text("".join(f"{p}\n" for p in pins if name(p) in TORCH))
    (folder / "server.txt").write_text("".join(f"{p}\n" for p in pins if name(p) not in TORCH))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
