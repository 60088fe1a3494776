"""The worker boundary, enforced: read from the imports of handler/segmenter_handler.py and of every
module under src/segserve/ (ast: absolute and relative `segserve` imports, those inside functions too).

No worker module (the handler and src/segserve/*.py: what the .mar ships) imports segserve.tools or
segserve.client, and the client imports no worker module and neither torch, torchvision nor TorchServe,
not even through a tools module. A break makes this script exit 1, naming the file and line.

    python scripts/architecture.py [--check] [--root DIR]
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "segserve"
HANDLER = Path("handler") / "segmenter_handler.py"
# Zones: the subpackages of segserve that never run in a worker (tools.build's NOT_SHIPPED) and the rest.
WORKER, TOOLS, CLIENT = "worker", "tools", "client"
NOT_SHIPPED = (TOOLS, CLIENT)
# What the client must not need: the worker's heavy runtime.
CLIENT_FORBIDDEN = ("torch", "torchvision", "ts")


# -- the import graph -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    target: str  # a dotted module name: segserve.config, or a third-party top-level name: torch
    line: int
    lazy: bool  # inside a function


@dataclass
class Module:
    name: str  # dotted (segserve.pipeline, segserve.tools.build); the handler by its file stem
    path: Path  # relative to the repository root
    zone: str
    imports: list[Import] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.path.name

    def internal(self, modules: dict[str, Module]) -> list[Import]:
        return [i for i in self.imports if i.target in modules]

    def external(self) -> list[Import]:
        return [i for i in self.imports if i.target.split(".")[0] != PACKAGE]


def zone_of(name: str) -> str:
    parts = name.split(".")
    if parts[0] == PACKAGE and len(parts) > 1 and parts[1] in NOT_SHIPPED:
        return parts[1]
    return WORKER


def discover(root: Path = REPO) -> dict[str, Module]:
    """The handler and every module of src/segserve/, with their imports."""
    modules: dict[str, Module] = {}
    handler = root / HANDLER
    if handler.is_file():
        modules[handler.stem] = Module(handler.stem, HANDLER, WORKER)
    package = root / "src" / PACKAGE
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if "__pycache__" in parts:
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = Module(name, path.relative_to(root), zone_of(name))
    for module in modules.values():
        module.imports = parse_imports(root / module.path, module, set(modules))
    return modules


def parse_imports(path: Path, module: Module, known: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend(Import(_resolve(alias.name, known), child.lineno, inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _absolute(child, module.name, is_package)
                for alias in child.names:
                    # `from . import decode` imports the module segserve.decode; `from .config import X`
                    # imports segserve.config.
                    candidate = f"{base}.{alias.name}" if base else alias.name
                    target = candidate if candidate in known else _resolve(base, known)
                    found.append(Import(target, child.lineno, inner))
            visit(child, inner)

    visit(tree, False)
    unique: dict[str, Import] = {}
    for item in found:  # one edge per target: the first import, eager if any is
        seen = unique.get(item.target)
        if seen is None or (seen.lazy and not item.lazy):
            unique[item.target] = item
    return [i for i in unique.values() if i.target != module.name]


def _absolute(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = name.split(".") if is_package else name.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _resolve(name: str, known: set[str]) -> str:
    """The longest known module a dotted import names (segserve.tools.build.X -> segserve.tools.build),
    or its top-level name when it is not segserve's (torch.nn.functional -> torch)."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return parts[0]
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return name


# -- the boundary ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Violation:
    source: str
    target: str  # the module (or third-party name) imported directly by source
    message: str


def check_boundary(modules: dict[str, Module]) -> list[Violation]:
    """Worker modules never import tools or client; the client needs no worker module and no torch."""
    problems: list[Violation] = []
    for module in modules.values():
        for item in module.imports:
            where = f"{module.path.as_posix()}:{item.line}"
            target_zone = zone_of(item.target) if item.target.split(".")[0] == PACKAGE else None
            if module.zone == WORKER and target_zone in NOT_SHIPPED:
                problems.append(Violation(module.name, item.target,
                                          f"{where}: worker module {module.name} imports {item.target}: the "
                                          f"archive does not ship segserve/{target_zone}/"))
    # Through tools modules too: whatever the client imports must install and run without the worker. Every
    # import of segserve.client runs segserve/__init__.py first: it is held to the same rule.
    starts = [m for m in modules.values() if m.zone == CLIENT]
    starts += [modules[PACKAGE]] if PACKAGE in modules else []
    for module in starts:
        who = "client module" if module.zone == CLIENT else "segserve/__init__.py (run by every client import)"
        for first, chain in _client_reach(module, modules):
            target, path = chain[-1], " -> ".join(chain)
            where = f"{module.path.as_posix()}:{first.line}"
            if target.split(".")[0] == PACKAGE:
                problems.append(Violation(module.name, first.target, f"{where}: {who} imports worker module "
                                          f"{target} ({path}): the client must not need the worker"))
            else:
                problems.append(Violation(module.name, first.target, f"{where}: {who} imports {target} ({path}): "
                                          "the client's install has no torch or TorchServe"))
    return problems


def _client_reach(start: Module, modules: dict[str, Module]) -> Iterable[tuple[Import, list[str]]]:
    """Import chains from a client module, through tools modules (and the packages' __init__ they run),
    to a worker module or a forbidden package, with the start's import that begins each: one per target.
    The root package is checked on its own."""
    seen = {start.name, PACKAGE}
    queue: list[tuple[Import | None, list[str]]] = [(None, [start.name])]
    while queue:
        first, chain = queue.pop(0)
        for item in modules[chain[-1]].imports:
            parts = item.target.split(".")
            # Importing segserve.tools.server runs segserve/tools/__init__.py first.
            for target in [".".join(parts[:end]) for end in range(2, len(parts))] + [item.target]:
                if target in seen:
                    continue
                seen.add(target)
                if target in CLIENT_FORBIDDEN or (target in modules and modules[target].zone == WORKER):
                    yield first or item, [*chain, target]
                elif target in modules and modules[target].zone != CLIENT:  # (client modules: checked themselves)
                    queue.append((first or item, [*chain, target]))


def distributions(modules: Iterable[Module]) -> dict[str, dict[str, bool]]:
    """Per zone: the third-party distributions imported, and whether only inside functions (lazy)."""
    names = importlib.metadata.packages_distributions()
    stdlib = sys.stdlib_module_names
    zones: dict[str, dict[str, bool]] = defaultdict(dict)
    for module in modules:
        for item in module.external():
            top = item.target
            if top in stdlib or top == "__future__":
                continue
            dist = names.get(top, [top])[0]
            zones[module.zone][dist] = zones[module.zone].get(dist, True) and item.lazy
    return zones


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the boundary")
    parser.add_argument("--root", type=Path, default=REPO, help="the tree to read (default: this repository)")
    args = parser.parse_args(argv)
    modules = discover(args.root)
    violations = check_boundary(modules)
    for violation in violations:
        print(f"boundary: {violation.message}", file=sys.stderr)
    if not violations:
        print(f"boundary holds: {len(modules)} modules, no worker module imports tools or client, the client "
              "needs no worker module and no torch")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
