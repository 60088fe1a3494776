"""docs/architecture-*.png, generated from the code, and the worker boundary, enforced.

* The module map (docs/architecture-modules.png): the imports of handler/segmenter_handler.py and of every
  module under src/segserve/ (read with ast: absolute and relative `segserve` imports, those inside
  functions too), drawn in three zones: the worker (the handler and src/segserve/ less tools/ and
  client/: what the .mar ships, medical/ as medical/*.py boxes), tools (src/segserve/tools/) and client
  (src/segserve/client/).
* The boundary: no worker module imports segserve.tools or segserve.client, and the client imports no
  worker module and neither torch, torchvision nor TorchServe, not even through a tools module. A break
  is drawn in red and makes this script exit 1.
* The request flow (docs/architecture-flow.png): one small batch (a PNG, a form asking for the tiled
  path, a body that is no image) sent through the built archive's handler in this process, loaded and
  called as TorchServe's Python backend does, with a call tracer (sys.settrace) that keeps only the
  functions defined in the handler and in src/segserve/*.py. The picture is the trace: nothing here
  names today's functions, so it follows the code as it changes.

    python scripts/architecture.py [--out DIR] [--check] [--model-dir DIR]

--check only checks the boundary (no pictures, no model). `make figures` runs this.
"""

from __future__ import annotations

import argparse
import ast
import colorsys
import dis
import importlib
import importlib.metadata
import io
import json
import math
import sys
import tempfile
import textwrap
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        """Its path inside its zone's folder (medical/seg.py, ui/__init__.py): a subpackage reads as one."""
        if self.path == HANDLER:
            return self.path.name
        package = Path("src") / PACKAGE
        return self.path.relative_to(package if self.zone == WORKER else package / self.zone).as_posix()

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


# -- the module map -------------------------------------------------------------------------------
# The worker on the left; the zones that are not shipped stacked on the right of it, in this order.
SIDE_ZONES = (TOOLS, CLIENT)
ZONE_STYLE = {  # fill of the zone, fill of its boxes, edge colour, title
    WORKER: ("#eef4fb", "#d6e6f7", "#2f6db3",
             "worker: what the .mar ships (handler/ + src/segserve/ less tools/ and client/)"),
    TOOLS: ("#fdf3e7", "#fbe1c2", "#b86a12", "tools: src/segserve/tools/ (never shipped)"),
    CLIENT: ("#eef7ee", "#d3ecd3", "#2e7d32", "client: src/segserve/client/ (the base install)"),
}
BAD = "#d32f2f"
# Inches. CHAR_W fits 9 pt monospace; ROW_H is a layer's pitch; a layer too wide wraps onto sub-rows.
CHAR_W, BOX_H, ROW_H, SUB_ROW, GAP, DUMMY_W = 0.075, 0.34, 0.95, 0.55, 0.26, 0.08
MAX_ZONE_W = {WORKER: 9.0, TOOLS: 3.7, CLIENT: 3.7}
TITLE_H, PAD = 0.55, 0.3


@dataclass
class Edge:
    source: str
    target: str
    lazy: bool
    bad: bool
    chain: list[Any] = field(default_factory=list)  # source, the reserved slots between, target

    def crosses(self, zone: dict[Any, str]) -> bool:
        return zone[self.source] != zone[self.target]


def _levels(nodes: list[str], out: dict[str, list[str]]) -> dict[str, int]:
    """Import depth: 0 for a module importing none of the given ones, else 1 + its deepest import's."""
    level: dict[str, int] = {}
    active: set[str] = set()

    def depth(node: str) -> int:
        if node in level:
            return level[node]
        active.add(node)  # an import cycle is cut where it closes
        level[node] = 1 + max((depth(t) for t in out[node] if t not in active), default=-1)
        active.discard(node)
        return level[node]

    for node in nodes:
        depth(node)
    return level


def _pav(desired: list[float], separations: list[float]) -> list[float]:
    """Positions closest (least squares) to `desired` that keep their order, neighbours at least
    `separations` apart (pool adjacent violators)."""
    if not desired:
        return []
    offsets = [0.0]
    for gap in separations:
        offsets.append(offsets[-1] + gap)
    blocks: list[list[float]] = []  # [mean, count]
    for z in (d - o for d, o in zip(desired, offsets, strict=True)):
        blocks.append([z, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, count = blocks.pop()
            blocks[-1] = [(blocks[-1][0] * blocks[-1][1] + mean * count) / (blocks[-1][1] + count),
                          blocks[-1][1] + count]
    values = [mean for mean, count in blocks for _ in range(int(count))]
    return [v + o for v, o in zip(values, offsets, strict=True)]


@dataclass
class ModuleLayout:
    boxes: dict[str, tuple[float, float, float]]  # centre x, centre y, width
    points: dict[Any, tuple[float, float]]  # every node and reserved slot
    edges: list[Edge]
    zone: dict[Any, str]
    spans: dict[str, tuple[float, float, float, float]]  # zone: x0, x1, y0 (bottom), y1 (top)
    channel: float  # x of the gap between the worker and the zones on its right
    width: float
    bottom: float
    layer_low: dict[Any, float]  # per node: the centre y of its layer's lowest sub-row
    deps: dict[str, dict[str, bool]]  # per zone: distributions()


def layout_modules(modules: dict[str, Module], violations: list[Violation]) -> ModuleLayout:
    """Per zone, layers by import depth (importers above what they import), order by barycentre sweeps,
    long edges through reserved slots in the layers between (a small Sugiyama layout), so no edge runs
    through a box; imports between zones run along the gap between the worker and the zones beside it."""
    bad = {(v.source, v.target) for v in violations}
    edges = [Edge(m.name, i.target, i.lazy, (m.name, i.target) in bad)
             for m in modules.values() for i in m.internal(modules)]
    linked = {e.source for e in edges} | {e.target for e in edges}
    # An empty package __init__ that nothing imports says nothing: leave it out.
    nodes = [n for n, m in modules.items() if n in linked or m.path.name != "__init__.py"]
    zone: dict[Any, str] = {n: modules[n].zone for n in nodes}
    width: dict[Any, float] = {n: max(len(modules[n].label) * CHAR_W + 0.3, 1.0) for n in nodes}
    out: dict[str, list[str]] = defaultdict(list)
    for edge in edges:
        if not edge.crosses(zone):
            out[edge.source].append(edge.target)
    level: dict[Any, int] = {}
    for z in (WORKER, *SIDE_ZONES):
        level.update(_levels([n for n in nodes if zone[n] == z], out))
    neighbours: dict[Any, list[Any]] = defaultdict(list)
    for index, edge in enumerate(edges):
        edge.chain = [edge.source]
        if not edge.crosses(zone):
            for lvl in range(level[edge.source] - 1, level[edge.target], -1):
                dummy = ("slot", index, lvl)
                level[dummy], zone[dummy], width[dummy] = lvl, zone[edge.source], DUMMY_W
                edge.chain.append(dummy)
        edge.chain.append(edge.target)
        for a, b in zip(edge.chain, edge.chain[1:], strict=False):
            neighbours[a].append(b)
            neighbours[b].append(a)
    sources, targets = {e.source for e in edges}, {e.target for e in edges}
    layers: dict[tuple[str, int], list[Any]] = defaultdict(list)
    for node in sorted(level, key=str):
        layers[zone[node], level[node]].append(node)
    x: dict[Any, float] = {}
    for z in (WORKER, *SIDE_ZONES):
        _order_zone(z, layers, level, zone, neighbours)
        _place_zone(z, layers, zone, width, neighbours, x)
    # Rows: each layer from the top, wrapped onto sub-rows where wider than its zone may be.
    y: dict[Any, float] = {}
    spans: dict[str, tuple[float, float, float, float]] = {}
    layer_low: dict[Any, float] = {}
    deps = distributions(modules.values())
    zone_w = {}
    for z in (WORKER, *SIDE_ZONES):
        members = [n for n in x if zone[n] == z]
        if not members:
            continue
        lo = min(x[n] - width[n] / 2 for n in members)
        for n in members:
            x[n] -= lo
        tops = max(level[n] for n in members)
        row_y, last_y = -TITLE_H - BOX_H / 2, 0.0
        for lvl in range(tops, -1, -1):
            subs = _wrap(layers[z, lvl], width, x, MAX_ZONE_W[z], sources, targets)
            for sub in subs:
                for n in sub:
                    y[n] = row_y
                last_y = row_y
                row_y -= SUB_ROW
            for sub in subs:
                for n in sub:
                    layer_low[n] = last_y
            row_y -= ROW_H - SUB_ROW
        lo = min(x[n] - width[n] / 2 for n in members)  # (again: wrapped rows are packed afresh)
        for n in members:
            x[n] -= lo
        span = max(x[n] + width[n] / 2 for n in members)
        zone_w[z] = max(span + 2 * PAD, 2.9)
        spans[z] = (0.0, zone_w[z], last_y - BOX_H / 2 - 0.4 - _deps_height(deps.get(z, {}), zone_w[z]), 0.0)
    # The worker at the left, the other zones stacked on its right, one column width.
    channel_w = 0.35 + 0.1 * sum(e.crosses(zone) for e in edges)
    column_x = zone_w.get(WORKER, 0) + channel_w
    column_w = max((zone_w[z] for z in SIDE_ZONES if z in zone_w), default=0)
    cursor = 0.0
    for z in (WORKER, *SIDE_ZONES):
        if z not in spans:
            continue
        x0, x1, y0, y1 = spans[z]
        dx = 0.0 if z == WORKER else column_x
        w = x1 - x0 if z == WORKER else column_w
        shift = (w - (x1 - x0)) / 2 + PAD  # centre the boxes in the zone
        dy = 0.0 if z == WORKER else cursor
        for n in x:
            if zone[n] == z:
                x[n] += dx + shift
                y[n] += dy
                layer_low[n] += dy
        spans[z] = (dx, dx + w, y0 + dy, y1 + dy)
        if z != WORKER:
            cursor += y0 - y1 - 0.35
    points = {n: (x[n], y[n]) for n in x}
    boxes = {n: (x[n], y[n], width[n]) for n in nodes}
    total_w = max(s[1] for s in spans.values()) + 0.1
    return ModuleLayout(boxes, points, edges, zone, spans, zone_w.get(WORKER, 0) + channel_w / 2, total_w,
                        min(s[2] for s in spans.values()), layer_low, deps)


def _deps_height(deps: dict[str, bool], zone_w: float) -> float:
    return 0.2 + 0.15 * len(textwrap.wrap(_deps_text(deps), _deps_chars(zone_w)))


def _deps_chars(zone_w: float) -> int:
    return int((zone_w - 0.3) / 0.068)


def _deps_text(deps: dict[str, bool]) -> str:
    names = sorted(deps, key=str.lower)
    eager = [d for d in names if not deps[d]]
    lazy = [d for d in names if deps[d]]
    return "third-party: " + (", ".join(eager) or "none") + (f"; inside functions: {', '.join(lazy)}" if lazy else "")


def _order_zone(z: str, layers, level, zone, neighbours) -> None:
    """Crossing reduction: sort each layer by its neighbours' mean rank, sweeping down and up, then swap
    neighbours in a layer while that crosses fewer edges; keep the best order seen. A neighbour in another
    zone pulls towards that zone's side (the gap between the worker and the rest)."""
    toward = 1e3 if z == WORKER else -1e3
    top = max((lvl for (zz, lvl) in layers if zz == z), default=0)

    def rank(node: Any) -> float:
        return toward if zone[node] != z else layers[z, level[node]].index(node)

    def crossings(lvl: int) -> int:  # between layer lvl and the one under it
        position = {n: i for i, n in enumerate(layers[z, lvl - 1])}
        pairs = sorted((i, position[n]) for i, a in enumerate(layers[z, lvl]) for n in neighbours[a]
                       if n in position)
        return sum(1 for k, (a1, b1) in enumerate(pairs) for a2, b2 in pairs[k + 1:] if a2 > a1 and b2 < b1)

    def total() -> int:
        return sum(crossings(lvl) for lvl in range(1, top + 1))

    best, best_order = total(), {key: list(layer) for key, layer in layers.items() if key[0] == z}
    for sweep in range(16):
        down = sweep % 2 == 0
        for lvl in range(top, -1, -1) if down else range(top + 1):
            layer = layers[z, lvl]
            keys = {}
            for i, node in enumerate(layer):
                near = [rank(n) for n in neighbours[node]
                        if zone[n] != z or level[n] == (lvl + 1 if down else lvl - 1)]
                keys[node] = sum(near) / len(near) if near else i
            layer.sort(key=lambda n, keys=keys: keys[n])
        improved = True
        while improved:
            improved = False
            for lvl in range(top + 1):
                layer = layers[z, lvl]
                for i in range(len(layer) - 1):
                    before = (crossings(lvl) if lvl > 0 else 0) + (crossings(lvl + 1) if lvl < top else 0)
                    layer[i], layer[i + 1] = layer[i + 1], layer[i]
                    after = (crossings(lvl) if lvl > 0 else 0) + (crossings(lvl + 1) if lvl < top else 0)
                    if after < before:
                        improved = True
                    else:
                        layer[i], layer[i + 1] = layer[i + 1], layer[i]
        if (count := total()) < best:
            best, best_order = count, {key: list(layer) for key, layer in layers.items() if key[0] == z}
    for key, layer in best_order.items():
        layers[key][:] = layer


def _place_zone(z: str, layers, zone, width, neighbours, x) -> None:
    """x in the zone: packed, then each box pulled towards its neighbours in the zone, order kept."""
    def separations(layer: list[Any]) -> list[float]:
        return [(width[a] + width[b]) / 2 + (0.1 if isinstance(a, tuple) and isinstance(b, tuple) else GAP)
                for a, b in zip(layer, layer[1:], strict=False)]

    mine = [(key, layer) for key, layer in layers.items() if key[0] == z and layer]
    for _, layer in mine:
        for node, pos in zip(layer, _pav([0.0] * len(layer), separations(layer)), strict=True):
            x[node] = pos
    for _ in range(40):
        for _, layer in mine:
            desired = []
            for node in layer:
                near = [x[n] for n in neighbours[node] if zone[n] == z]
                desired.append(sum(near) / len(near) if near else x[node])
            for node, pos in zip(layer, _pav(desired, separations(layer)), strict=True):
                x[node] = pos


def _wrap(layer: list[Any], width, x, limit: float, sources: set, targets: set) -> list[list[Any]]:
    """A layer wider than `limit` onto several sub-rows, so that no arrow runs through a box: modules
    only imported go on the first sub-rows (arrows come from above), those that import (arrows leave
    downwards, or towards another zone) on the last, the rest between."""
    if not layer:
        return []
    if max(x[n] + width[n] / 2 for n in layer) - min(x[n] - width[n] / 2 for n in layer) <= limit:
        return [layer]

    def place(node: Any) -> int:
        return 2 if node in sources else 0 if node in targets else 1

    ordered = sorted(layer, key=place)  # (stable: the crossing-reduced order within each group)
    rows: list[list[Any]] = []
    row: list[Any] = []
    used = 0.0
    for node in reversed(ordered):  # filled from the last sub-row up
        if row and used + GAP + width[node] > limit:
            rows.append(row[::-1])
            row, used = [], 0.0
        used += (GAP if row else 0) + width[node]
        row.append(node)
    rows.append(row[::-1])
    rows.reverse()
    for row in rows:  # each sub-row packed, centred
        pos = (limit - sum(width[n] for n in row) - GAP * (len(row) - 1)) / 2
        for node in row:
            x[node] = pos + width[node] / 2
            pos += width[node] + GAP
    return rows


def _rounded(points: list[tuple[float, float]], radius: float = 0.12):
    """A polyline through points with its corners rounded."""
    from matplotlib.path import Path as MPath

    verts, codes = [points[0]], [MPath.MOVETO]
    for i in range(1, len(points) - 1):
        (ax_, ay), (bx, by), (cx, cy) = points[i - 1], points[i], points[i + 1]
        d1, d2 = math.dist((ax_, ay), (bx, by)), math.dist((bx, by), (cx, cy))
        r = min(radius, d1 / 2, d2 / 2)
        if r <= 0:
            continue
        p = (bx + (ax_ - bx) * r / d1, by + (ay - by) * r / d1)
        q = (bx + (cx - bx) * r / d2, by + (cy - by) * r / d2)
        verts += [p, (bx, by), q]
        codes += [MPath.LINETO, MPath.CURVE3, MPath.CURVE3]
    verts.append(points[-1])
    codes.append(MPath.LINETO)
    return MPath(verts, codes)


def draw_modules(modules: dict[str, Module], violations: list[Violation], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    from matplotlib.path import Path as MPath

    layout = layout_modules(modules, violations)
    boxes, zone, deps = layout.boxes, layout.zone, layout.deps
    legend = ("Arrow: imports (dashed: only inside a function). Rows: import depth within the zone, importers "
              "above what they import. Imports between zones run along the gap between them.")
    if violations:
        legend += (f" Red: {len(violations)} boundary break(s); `python scripts/architecture.py --check` names "
                   "them.")
    else:
        legend += " The boundary holds: no worker module imports tools or client; the client needs no worker."
    legend_lines = textwrap.wrap(legend, int(layout.width / 0.066))
    bottom = layout.bottom - 0.2 - 0.17 * len(legend_lines)
    fig = plt.figure(figsize=(layout.width, 0.1 - bottom))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.05, layout.width - 0.05)
    ax.set_ylim(bottom, 0.1)
    ax.axis("off")
    for z, (x0, x1, y0, y1) in layout.spans.items():
        fill, _, ink, title = ZONE_STYLE[z]
        ax.add_patch(FancyBboxPatch((x0, y0), x1 - x0, y1 - y0, boxstyle="round,pad=0,rounding_size=0.15",
                                    fc=fill, ec=ink, lw=1.2, zorder=0))
        ax.text(x0 + 0.15, y1 - 0.12, textwrap.fill(title, int((x1 - x0 - 0.3) / 0.088)), ha="left", va="top",
                fontsize=10, fontweight="bold", color=ink)
        ax.text(x0 + 0.15, y0 + 0.1, textwrap.fill(_deps_text(deps.get(z, {})), _deps_chars(x1 - x0)), ha="left",
                va="bottom", fontsize=8, color="#333333", linespacing=1.3)
    ax.text(0, layout.bottom - 0.12, "\n".join(legend_lines), ha="left", va="top", fontsize=8.5,
            color=BAD if violations else "#333333")
    # Ports: the edges leaving a box spread along its bottom, those arriving along its top, in the
    # order of where they go to / come from.
    def toward(edge: Edge, end: int) -> float:
        if edge.crosses(zone):
            return layout.channel
        return layout.points[edge.chain[end]][0]

    start, finish = {}, {}
    for attr, where, store in (("source", 1, start), ("target", -2, finish)):
        groups = defaultdict(list)
        for edge in layout.edges:
            groups[getattr(edge, attr)].append(edge)
        for node, group in groups.items():
            group.sort(key=lambda e, where=where: toward(e, where))
            cx, cy, w = boxes[node]
            for i, edge in enumerate(group):
                px = cx - w * 0.4 + (i + 1) / (len(group) + 1) * w * 0.8
                store[id(edge)] = (px, cy - BOX_H / 2 if attr == "source" else cy + BOX_H / 2)
    lanes = iter(range(1000))
    for edge in sorted(layout.edges, key=lambda e: (e.bad, e.crosses(zone))):
        s, t = start[id(edge)], finish[id(edge)]
        if edge.crosses(zone):  # down into the gap under the source, along the channel, over the target
            lane = next(lanes)
            cx = layout.channel + (lane - 0.5 * sum(e.crosses(zone) for e in layout.edges)) * 0.1
            below = layout.layer_low[edge.source] - ROW_H / 2 + 0.05 * lane
            above = t[1] + (ROW_H - BOX_H) / 2 - 0.05 * lane
            route = _rounded([s, (s[0], below), (cx, below), (cx, above), (t[0], above), t])
        else:  # a smooth curve through the reserved slots, leaving and arriving vertically
            points = [s, *[layout.points[n] for n in edge.chain[1:-1]], t]
            padded = [(s[0], s[1] + ROW_H), *points, (t[0], t[1] - ROW_H)]
            verts, codes = [points[0]], [MPath.MOVETO]
            for i in range(1, len(padded) - 2):  # Catmull-Rom, as cubic Bezier segments
                (x0, y0), (x1, y1), (x2, y2), (x3, y3) = padded[i - 1: i + 3]
                verts += [(x1 + (x2 - x0) / 6, y1 + (y2 - y0) / 6), (x2 - (x3 - x1) / 6, y2 - (y3 - y1) / 6), (x2, y2)]
                codes += [MPath.CURVE4] * 3
            route = MPath(verts, codes)
        colour = BAD if edge.bad else ZONE_STYLE[zone[edge.source]][2]
        ax.add_patch(FancyArrowPatch(path=route, arrowstyle="-|>,head_length=5,head_width=2.6", color=colour,
                                     lw=2.2 if edge.bad else 0.9, alpha=1 if edge.bad else 0.75,
                                     linestyle=(0, (4, 3)) if edge.lazy else "-", zorder=3 if edge.bad else 1,
                                     shrinkA=0, shrinkB=0))
    for node, (cx, cy, w) in boxes.items():
        _, fill, ink, _ = ZONE_STYLE[zone[node]]
        broken = any(v.source == node for v in violations)
        ax.add_patch(FancyBboxPatch((cx - w / 2, cy - BOX_H / 2), w, BOX_H, boxstyle="round,pad=0,rounding_size=0.06",
                                    fc=fill, ec=BAD if broken else ink, lw=2 if broken else 1, zorder=2))
        ax.text(cx, cy, modules[node].label, ha="center", va="center", fontsize=9, family="monospace", zorder=4)
    save_png(fig, path)
    plt.close(fig)


# -- the request flow: a traced batch ------------------------------------------------------------
GENERATOR_FLAGS = 0x20 | 0x80 | 0x200  # CO_GENERATOR | CO_COROUTINE | CO_ASYNC_GENERATOR
RETURNS = {dis.opmap[name] for name in ("RETURN_VALUE", "RETURN_CONST", "YIELD_VALUE") if name in dis.opmap}
MAX_DEPTH = 6  # calls nested deeper than this under a handler stage are left out


@dataclass
class Call:
    module: str  # the file defining the function: segmenter_handler.py, pipeline.py, ...
    name: str  # its qualified name
    depth: int  # 0: a handler stage (what TorchServe's BaseHandler.handle calls)
    parent: int | None
    raised: str | None = None  # the exception it ended with
    count: int = 1  # consecutive identical calls drawn as one
    children: list[int] = field(default_factory=list)


class Tracer:
    """While active (sys.settrace), records the calls of the functions whose file `label` names (it maps a
    code object's filename to a lane label, or None for code not drawn), in the order they begin, with
    their nesting (comprehensions and lambdas are see-through) and the exception each one ended with."""

    def __init__(self, label: Callable[[str], str | None], max_depth: int = MAX_DEPTH):
        self.label, self.max_depth = label, max_depth
        self.calls: list[Call] = []
        self.frames: dict[Any, int] = {}  # frame -> its call (generators stay: they resume)
        self.pending: dict[Any, str] = {}  # frame -> exception raised in it and not yet handled
        self.labels: dict[str, str | None] = {}

    def ours(self, code) -> str | None:
        if code.co_filename not in self.labels:
            self.labels[code.co_filename] = self.label(code.co_filename)
        return self.labels[code.co_filename]

    def __enter__(self) -> Tracer:
        self.previous = sys.gettrace()
        sys.settrace(self.on_call)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(self.previous)

    def on_call(self, frame, event, arg):
        code = frame.f_code
        module = self.ours(code)
        if module is None or code.co_name.startswith("<"):
            return None
        if frame in self.frames:  # a generator resumed: the same call going on
            frame.f_trace_lines = False
            return self.on_event
        depth, parent, between, back = 0, None, False, frame.f_back
        while back is not None:  # up to the nearest recorded call
            if back in self.frames:
                parent = self.frames[back]
                break
            between = between or (self.ours(back.f_code) is not None and not back.f_code.co_name.startswith("<"))
            back = back.f_back
        if parent is not None:
            if between:  # under a call too deep to record
                return None
            depth = self.calls[parent].depth + 1
        if depth > self.max_depth:
            return None
        self.calls.append(Call(module, code.co_qualname, depth, parent))
        if parent is not None:
            self.calls[parent].children.append(len(self.calls) - 1)
        self.frames[frame] = len(self.calls) - 1
        frame.f_trace_lines = False  # calls, returns and exceptions are enough
        return self.on_event

    def on_event(self, frame, event, arg):
        if event == "exception":
            self.pending[frame] = arg[0].__name__
        elif event == "return":
            error = self.pending.pop(frame, None)
            index = self.frames.get(frame)
            # Left by an exception, unless its last instruction returned (or yielded): then it was handled.
            if error and index is not None and frame.f_code.co_code[frame.f_lasti] not in RETURNS:
                self.calls[index].raised = error
            if index is not None and not frame.f_code.co_flags & GENERATOR_FLAGS:
                del self.frames[frame]
        return self.on_event


def collapse(calls: list[Call]) -> list[Call]:
    """The calls in the order they began, runs of identical consecutive sibling calls (same function,
    same callees, same outcome) merged into one with a count."""
    def key(index: int) -> tuple:
        call = calls[index]
        return call.module, call.name, call.raised, tuple((key(c), calls[c].count) for c in call.children)

    def within(index: int, module: str) -> bool:
        return all(calls[c].module == module and within(c, module) for c in calls[index].children)

    def merged(indices: list[int]) -> list[int]:
        kept: list[int] = []
        for index in indices:
            call = calls[index]
            # A call that stays inside its own module is one box: its helpers are that module's business.
            call.children = [] if within(index, call.module) else merged(call.children)
            if kept and key(kept[-1]) == key(index):
                calls[kept[-1]].count += call.count
            else:
                kept.append(index)
        return kept

    kept: list[int] = []

    def walk(indices: list[int]) -> None:
        for index in indices:
            kept.append(index)
            walk(calls[index].children)

    walk(merged([i for i, c in enumerate(calls) if c.parent is None]))
    # In the order the calls began: a context manager's exit work (a generator resumed) comes after the
    # block it guarded, not straight under its entry.
    kept.sort()
    row = {index: i for i, index in enumerate(kept)}
    order = [Call(calls[i].module, calls[i].name, calls[i].depth, row.get(calls[i].parent), calls[i].raised,
                  calls[i].count) for i in kept]
    for i, call in enumerate(order):
        if call.parent is not None:
            order[call.parent].children.append(i)
    return order


@dataclass
class FlowRun:
    calls: list[Call]  # collapsed, in time order
    requests: list[str]  # what each request of the batch was
    responses: list[str]  # what it got back

    @property
    def stages(self) -> list[str]:
        """The handler's stages in order: the top-level calls (those TorchServe's handle() makes)."""
        return [c.name.rsplit(".", 1)[-1] for c in self.calls if c.depth == 0]


def sample_batch(model_dir: Path) -> tuple[list, list[str]]:
    """A PNG; a form asking for the tiled path (tile=on, as images over tiling.auto_above_pixels take it
    on their own) with an image of a few windows; a body that is no image."""
    from PIL import Image

    from segserve.config import ServingConfig
    from segserve.tools.inprocess import Request
    from segserve.tools.synthetic import generate_scene

    config = ServingConfig.from_yaml(model_dir / "model-config.yaml")
    height, width = config.tile_size
    large = (int(height * 1.6), int(width * 2.4))  # 2 x 3 windows

    def png(seed: int, size: tuple[int, int]) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(generate_scene(seed, size)[0]).save(buffer, "PNG")
        return buffer.getvalue()

    def request(i: int, accept: str, **fields: tuple[str, bytes]):
        return Request({name: value for name, (_, value) in fields.items()},
                       {"Accept": accept, **{name: {"content-type": kind} for name, (kind, _) in fields.items()}},
                       f"request-{i}")

    batch = [request(0, "image/png", body=("image/png", png(1, (240, 320)))),
             request(1, "application/json", data=("image/png", png(2, large)), tile=("text/plain", b"on")),
             request(2, "image/png", body=("image/png", b"this is not an image"))]
    described = ["#0 a 320x240 PNG, Accept: image/png",
                 f"#1 a form: data = a {large[1]}x{large[0]} PNG, tile=on; Accept: application/json",
                 "#2 'this is not an image' sent as image/png"]
    return batch, described


def trace_flow(model_dir: Path, max_depth: int = MAX_DEPTH) -> FlowRun:
    """Load the archive (unzipped in model_dir), then trace one batch through its handler, called the way
    a TorchServe worker calls it (segserve.tools.inprocess)."""
    from segserve.tools.inprocess import handle, load_handler

    handler = load_handler(model_dir, handler_file=model_dir / "segmenter_handler.py")
    package = Path(sys.modules[PACKAGE].__file__).resolve().parent
    # The file of the handler's class (its module need not be in sys.modules): where its methods are.
    handler_file = next(Path(f.__code__.co_filename).resolve() for f in vars(type(handler)).values()
                        if hasattr(f, "__code__"))

    def label(filename: str) -> str | None:
        if filename.startswith("<"):
            return None
        path = Path(filename).resolve()
        return path.name if path == handler_file or path.parent == package else None

    batch, described = sample_batch(model_dir)
    with Tracer(label, max_depth) as tracer:
        replies = handle(handler, batch)
    responses = []
    for reply in replies:
        detail = ""
        if reply.status >= 400:
            try:
                doc = json.loads(reply.body)
                detail = f" (type: {doc['type']})" if isinstance(doc, dict) and "type" in doc else ""
            except ValueError:
                pass
        responses.append(f"{reply.status} {reply.content_type}{detail}")
    return FlowRun(collapse(tracer.calls), described, responses)


FLOW_ROW, FLOW_CHAR, FLOW_INDENT, FLOW_STAGE_GAP = 0.2, 0.0625, 0.11, 0.3  # inches; FLOW_CHAR: 7.5 pt monospace


def draw_flow(run: FlowRun, path: Path) -> None:
    """Lanes (one per file, in order of first call) with a box per call, top to bottom in call order,
    banded by handler stage. Each row holds one call, so a label may run over other lanes' lifelines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch, Rectangle

    calls = run.calls
    lanes = list(dict.fromkeys(c.module for c in calls))
    # Nesting inside a lane: how many of a call's callers up the chain are in the same lane, unbroken.
    nest = []
    for call in calls:
        level, parent = 0, call.parent
        while parent is not None and calls[parent].module == call.module:
            level, parent = level + 1, calls[parent].parent
        nest.append(level)
    lane_w = {lane: max(len(lane) * FLOW_CHAR + 0.2, 0.5 + FLOW_INDENT * max(
        (n for n, c in zip(nest, calls, strict=True) if c.module == lane), default=0)) for lane in lanes}
    left = 1.0  # the stage names' column
    lane_x, x = {}, left
    for lane in lanes:
        lane_x[lane] = x
        x += lane_w[lane]
    # Rows: calls in order; a gap before each stage.
    y, rows, stage_rows = 0.0, [], []
    for call in calls:
        if call.depth == 0:
            y -= FLOW_STAGE_GAP
            stage_rows.append(len(rows))
        rows.append(y)
        y -= FLOW_ROW
    bottom = y
    # Where each box goes: from the lane's left edge rightwards, unless its caller is in a lane to the
    # right (then it ends at its lane's right edge and the arrow comes in from the right); a call from
    # its own lane is aligned as its caller is, indented.
    labels, extent = [], []
    for call in calls:
        text = call.name + (f" \u00d7{call.count}" if call.count > 1 else "")
        if call.raised:
            text += f"  \u2192 raises {call.raised}"
        labels.append(text)
        width = len(text) * FLOW_CHAR + 0.12
        caller = calls[call.parent].module if call.parent is not None else None
        if caller == call.module:
            px0, px1, from_right = extent[call.parent]
            anchor = px1 - FLOW_INDENT if from_right else px0 + FLOW_INDENT
        else:
            from_right = caller is not None and lanes.index(caller) > lanes.index(call.module)
            anchor = lane_x[call.module] + (lane_w[call.module] - 0.06 if from_right else 0.06)
        extent.append((anchor - width, anchor, True) if from_right else (anchor, anchor + width, False))
    shift = max(0.0, left - 0.1 - min(x0 for x0, _, _ in extent))  # a label running left over the stages
    if shift:
        lane_x = {lane: lx + shift for lane, lx in lane_x.items()}
        extent = [(x0 + shift, x1 + shift, r) for x0, x1, r in extent]
        x += shift
    right = max(x, max(x1 for _, x1, _ in extent)) + 0.15
    header_h = 0.55 + 0.17 * (len(run.requests) + 1)
    total_h = -bottom + header_h + 0.75
    fig = plt.figure(figsize=(right, total_h))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, right)
    ax.set_ylim(bottom - 0.75, header_h)
    ax.axis("off")
    palette = [c for name in ("Set3", "Pastel1", "Pastel2") for c in plt.get_cmap(name).colors]
    fill = {lane: palette[i % len(palette)] for i, lane in enumerate(lanes)}
    ink = {}
    for lane, colour in fill.items():  # the same hue, darker
        hue, _, saturation = colorsys.rgb_to_hls(*colour)
        ink[lane] = colorsys.hls_to_rgb(hue, 0.35, min(1.0, saturation + 0.2))
    # Title and the batch.
    ax.text(0.15, header_h - 0.1, "One batch through the handler, traced: every call of a function defined in "
            "handler/segmenter_handler.py or src/segserve/*.py", ha="left", va="top", fontsize=10, fontweight="bold")
    for i, (request, response) in enumerate(zip(run.requests, run.responses, strict=True)):
        ax.text(0.15, header_h - 0.42 - 0.17 * i, f"{request}  \u2192  {response}", ha="left", va="top",
                fontsize=8, family="monospace", color="#b71c1c" if response.startswith(("4", "5")) else "#222222")
    lane_top = 0.0
    # Stage bands.
    ends = [*stage_rows[1:], len(calls)]
    for k, (first, end) in enumerate(zip(stage_rows, ends, strict=True)):
        top_y = rows[first] + FLOW_STAGE_GAP * 0.8
        low_y = rows[end - 1] - FLOW_ROW * 0.6
        ax.add_patch(Rectangle((0.05, low_y), right - 0.1, top_y - low_y, fc="#f3f3f3" if k % 2 == 0 else "#fafafa",
                               ec="#bbbbbb", lw=0.6, zorder=0))
        ax.text(0.5, (top_y + low_y) / 2, run.stages[k], rotation=90, ha="center", va="center", fontsize=11,
                fontweight="bold", color="#444444")
    # Lane headers and lifelines.
    for lane in lanes:
        cx = lane_x[lane] + lane_w[lane] / 2
        ax.add_patch(FancyBboxPatch((lane_x[lane] + 0.04, lane_top + 0.02), lane_w[lane] - 0.08, 0.24,
                                    boxstyle="round,pad=0,rounding_size=0.05", fc=fill[lane], ec=ink[lane], lw=1,
                                    zorder=2))
        ax.text(cx, lane_top + 0.14, lane, ha="center", va="center", fontsize=7.5, family="monospace",
                fontweight="bold", zorder=3)
        ax.plot([lane_x[lane] + 0.06, lane_x[lane] + 0.06], [lane_top, bottom], color=ink[lane], lw=0.6,
                alpha=0.5, linestyle=(0, (2, 3)), zorder=1)
    # Activation bars, arrows, boxes.
    last = list(range(len(calls)))
    for i in range(len(calls) - 1, -1, -1):
        if calls[i].parent is not None:
            last[calls[i].parent] = max(last[calls[i].parent], last[i])
    for i, call in enumerate(calls):
        x0, x1, from_right = extent[i]
        cy = rows[i]
        bar_x = x1 - 0.05 if from_right else x0 + 0.05
        if last[i] > i:
            ax.add_patch(Rectangle((bar_x - 0.025, rows[last[i]]), 0.05, cy - rows[last[i]], fc=ink[call.module],
                                   ec="none", alpha=0.35, zorder=2))
        if call.parent is not None:
            px0, px1, p_from_right = extent[call.parent]
            start = px1 - 0.05 if p_from_right else px0 + 0.05
            end = x1 if from_right else x0
            ax.annotate("", xy=(end, cy), xytext=(start, cy), zorder=3,
                        arrowprops={"arrowstyle": "-|>,head_length=0.35,head_width=0.18", "lw": 0.7,
                                    "color": "#c62828" if call.raised else "#555555", "shrinkA": 0, "shrinkB": 0})
        ax.add_patch(FancyBboxPatch((x0, cy - FLOW_ROW * 0.4), x1 - x0, FLOW_ROW * 0.8,
                                    boxstyle="round,pad=0,rounding_size=0.03", fc=fill[call.module],
                                    ec="#c62828" if call.raised else ink[call.module],
                                    lw=1.2 if call.raised else 0.7, zorder=4))
        ax.text(x0 + 0.06, cy, labels[i], ha="left", va="center", fontsize=7.5, family="monospace", zorder=5,
                color="#b71c1c" if call.raised else "#111111")
    legend = ("A box is one call, in call order from top to bottom, in the lane of the file defining the function; "
              "\u00d7N: N identical calls in a row; a call whose callees all stay in its own file is one box; "
              f"calls nested deeper than {MAX_DEPTH} under a stage are left out. Red: ended by an exception.")
    ax.text(0.15, bottom - 0.2, textwrap.fill(legend, int(right / 0.068)), ha="left", va="top", fontsize=8,
            color="#333333")
    save_png(fig, path)
    plt.close(fig)


def save_png(fig, path: Path, dpi: int = 110) -> None:
    """A small PNG: the figure's few colours as a palette image."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    image = Image.open(buffer).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)


def unzipped_archive(workdir: Path) -> Path:
    """The default model's archive, built from model/ as `make mar` builds it, unzipped in workdir."""
    from segserve.config import ServingConfig
    from segserve.tools.build import build

    config = REPO / "model" / "model-config.yaml"
    weights = REPO / "model" / ServingConfig.from_yaml(config).weights
    mar = build("segmenter", config, weights, workdir / "model-store")
    model_dir = workdir / "model"
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(model_dir)
    return model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where the pictures go (default: docs/)")
    parser.add_argument("--check", action="store_true", help="only check the boundary: no pictures, no model")
    parser.add_argument("--root", type=Path, default=REPO, help="the tree to read (default: this repository)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="an unzipped archive to trace (default: build the default model's into a temp dir)")
    args = parser.parse_args(argv)
    modules = discover(args.root)
    violations = check_boundary(modules)
    for violation in violations:
        print(f"boundary: {violation.message}", file=sys.stderr)
    if args.check:
        if not violations:
            print(f"boundary holds: {len(modules)} modules, no worker module imports tools or client, the client "
                  "needs no worker module and no torch")
        return 1 if violations else 0
    import logging

    modules_png, flow_png = args.out / "architecture-modules.png", args.out / "architecture-flow.png"
    draw_modules(modules, violations, modules_png)
    ts_logger = logging.getLogger("ts")
    level = ts_logger.level
    ts_logger.setLevel(logging.ERROR)  # TorchServe's notes on optional accelerators it did not find
    try:
        if args.model_dir is not None:
            run = trace_flow(args.model_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="segserve-architecture-") as tmp:
                run = trace_flow(unzipped_archive(Path(tmp)))
    finally:
        ts_logger.setLevel(level)
    draw_flow(run, flow_png)
    print(f"wrote {modules_png} and {flow_png} (stages: {', '.join(run.stages)}; {len(run.calls)} calls drawn)")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    sys.exit(main())
