"""`segserve`: segment images with a running segserve server, list its models, check its health, try it in a page.

    segserve predict scans/ --format png --out masks/     # folders recursively; one file per image
    segserve predict scans/ --coco scans.json             # and one COCO dataset file (--cvat DIR: CVAT's masks)
    segserve models
    segserve health
    segserve ui                                           # a page to drop an image on (http://127.0.0.1:8090)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from . import __version__
from .api import OPTION_ERRORS, Prediction, SegservClient
from .errors import FormatError, KeyFileError, SegservError
from .exports import CocoDataset, CvatExport

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".dcm", ".nii", ".nii.gz"}
# The file an answer is saved as, by format, to know before sending whether an image is done already. Every
# format not named here answers JSON; a format the server lacks is refused by the server, which names its list.
SAVED_AS = {"png": ".png", "overlay": ".jpg", "probs": ".npy", "dicom-seg": ".dcm", "dicom-seg-fractional": ".dcm",
            "nifti": ".nii.gz", "slices": ".zip"}
AREAS_CSV = "areas.csv"
AREAS_COLUMNS = ["image", "output", "class_id", "class", "pixels"]
EXIT_CODES = """\
exit codes:
  0    done: every image segmented (or already there), the server is healthy, the models listed
  1    some image failed (each is named on stderr), the server is not healthy, or it could not be asked
  2    usage error: a path, an option or a key file that cannot work (also an option the server refuses)
  130  interrupted (Ctrl-C): what was written stays; run the same command again to continue"""


class UsageError(Exception):
    """The command line names something that cannot work; exit 2 with the message."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _DeprecatedVersion(argparse.Action):
    """`--version` after a command was the model version before `segserve --version` printed the program's."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"segserve: `{option_string} {values}` after a command is deprecated: use --model-version {values} "
              "(`segserve --version` prints the program's version)", file=sys.stderr)
        namespace.model_version = values


def _connection_args(parser: argparse.ArgumentParser, management: bool = False) -> None:
    parser.add_argument("--url", default=None, help="inference API (default: $SEGSERVE_URL or http://127.0.0.1:8080)")
    parser.add_argument("--model", default="segmenter", help="model name (default: segmenter)")
    parser.add_argument("--model-version", default=None, help="model version (default: the server's default)")
    parser.add_argument("--version", action=_DeprecatedVersion, dest="model_version", help=argparse.SUPPRESS)
    parser.add_argument("--token", default=None, help="inference key (default: $SEGSERVE_TOKEN, else the key file)")
    parser.add_argument("--key-file", default=None,
                        help="TorchServe key_file.json (default: $SEGSERVE_KEY_FILE, ./run/key_file.json, "
                             "./key_file.json)")
    parser.add_argument("--retries", type=int, default=4,
                        help="retries on 503/507, \"Worker died.\" and connection errors (4)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per request (120)")
    if management:
        parser.add_argument("--management-url", default=None,
                            help="management API (default: $SEGSERVE_MANAGEMENT_URL; :8081 beside :8080)")
        parser.add_argument("--management-token", default=None,
                            help="management key (default: $SEGSERVE_MANAGEMENT_TOKEN, else the key file)")


def _client(args: argparse.Namespace, **extra) -> SegservClient:
    return SegservClient(args.url, model=args.model, version=args.model_version, token=args.token,
                         key_file=args.key_file, retries=args.retries, timeout=args.timeout,
                         management_url=getattr(args, "management_url", None),
                         management_token=getattr(args, "management_token", None), **extra)


# -- predict ----------------------------------------------------------------------------------------------
def plan_images(names: list[str], out: Path, saved_as: str) -> list[tuple[Path, Path, str]]:
    """(image, output without suffix handling, the image's path relative to its folder: a dataset's file name)
    per image found: folders are searched recursively and their structure kept under `out`. Paths are relative
    to the one folder named, else to the deepest folder that holds everything named; inputs that would share an
    output (x.png and x.jpg) get -2, -3, ... in sorted order. Anything under `out` itself is not an input (a
    re-run over `.` must not segment its own masks)."""
    resolved_out = out.resolve()
    found: list[tuple[Path, Path]] = []  # (image, the folder it is relative to)
    for name in names:
        path = Path(name)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and _image_suffix(p) in IMAGE_SUFFIXES
                            and not p.resolve().is_relative_to(resolved_out))
            if not inside:
                raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
            found += [(p, path) for p in inside]
        elif path.is_file():
            found.append((path, path.parent))
        else:
            raise UsageError(f"no such file or folder: {path}")
    roots = sorted({root.resolve() for _, root in found})
    base = roots[0] if len(roots) == 1 else Path(os.path.commonpath(roots))
    seen: dict[Path, int] = {}
    plan, images = [], set()
    for image, _ in found:
        if image.resolve() in images:  # named twice (a file and its folder): segmented once
            continue
        images.add(image.resolve())
        relative = image.resolve().relative_to(base)
        relative = relative.with_name(relative.name[: len(relative.name) - len(_image_suffix(relative))])
        seen[relative] = seen.get(relative, 0) + 1
        if seen[relative] > 1:
            relative = relative.with_name(f"{relative.name}-{seen[relative]}")
        plan.append((image, out / relative.with_name(relative.name + saved_as),
                     image.resolve().relative_to(base).as_posix()))
    return plan


def _image_suffix(path: Path) -> str:
    """The suffix that says what a file is: .nii.gz as a whole, else the last one (lower case)."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


class AreasCsv:
    """<out>/areas.csv: per image and class its pixels (`output` relative to <out>), one row per class, flushed
    as each answer arrives. Rows of images skipped as done are kept from the last run; every other image's old
    rows are dropped. Nothing is written (no folder made) until the first row."""

    def __init__(self, path: Path, keep_images: set[str]):
        self.path, self.rows_written, self.file = path, 0, None
        self.kept = []
        if path.is_file():
            with path.open(newline="") as old:
                self.kept = [row for row in csv.DictReader(old) if row.get("image") in keep_images]

    def add(self, image: Path, output: Path, areas: dict[int, tuple[str | None, int]], names: dict[int, str]):
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(self.path.name + ".partial")
            with partial.open("w", newline="") as fresh:
                writer = csv.DictWriter(fresh, AREAS_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(self.kept)
            os.replace(partial, self.path)
            self.file = self.path.open("a", newline="")
            self.writer = csv.DictWriter(self.file, AREAS_COLUMNS)
        for class_id, (name, pixels) in sorted(areas.items()):
            self.writer.writerow({"image": str(image), "output": output.relative_to(self.path.parent).as_posix(),
                                  "class_id": class_id,
                                  "class": name or names.get(class_id, ""), "pixels": pixels})
        self.file.flush()
        self.rows_written += len(areas)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _write(path: Path, data: bytes) -> None:
    """All or nothing: an interrupted write leaves no truncated file that a re-run would skip as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _class_names(client: SegservClient) -> dict[int, str]:
    """Class names for the CSV from the model's description, when the management API answers (PNG masks hold
    ids only); else none, and the CSV's class column stays empty for png answers."""
    if not (client.management_url and client.management_token):
        return {}
    try:
        described = client._management("GET", f"/models/{client.model}", params={"customized": "true"})
        metadata = described[0].get("customizedMetadata") or {}
        metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
        return {int(c["id"]): str(c["name"]) for c in metadata.get("classes", [])}
    except (SegservError, ValueError, KeyError, TypeError, IndexError):
        return {}


def _export(args: argparse.Namespace) -> CocoDataset | CvatExport | None:
    """--coco / --cvat: the dataset to write, and the format it asks for (--format may only repeat it)."""
    export = CocoDataset(Path(args.coco)) if args.coco else CvatExport(Path(args.cvat)) if args.cvat else None
    if export is not None and args.format not in (None, export.format):
        flag = "--coco" if args.coco else "--cvat"
        raise UsageError(f"{flag} is built from format={export.format} answers: leave out --format {args.format}")
    return export


def predict(args: argparse.Namespace) -> int:
    export = _export(args)
    request_format = export.format if export else args.format or "png"
    # --cvat's folder holds the masks (SegmentationClass/) and the CSV; --coco's per-image answers go in --out.
    out = export.folder if isinstance(export, CvatExport) else Path(args.out)
    masks = export.masks if isinstance(export, CvatExport) else out
    plan = plan_images(args.images, masks, export.saved_as if export else SAVED_AS.get(request_format, ".json"))
    file_names = {image: name for image, _, name in plan}
    plan = [(image, output) for image, output, _ in plan]
    # Outputs there already are skipped (saved by an earlier run); each image answered joins them.
    saved = {image: output for image, output in plan if not args.overwrite and output.exists()}
    todo = [(image, output) for image, output in plan if image not in saved]
    skipped = len(saved)
    client = _client(args)
    areas = None if args.no_csv else AreasCsv(out / AREAS_CSV, {str(image) for image in saved})
    names = _class_names(client) if areas is not None else {}
    outputs = dict(todo)
    written, failures, no_areas = 0, [], None
    results: Iterator = client.predict_many(
        [image for image, _ in todo], workers=args.workers, progress=not args.no_progress,
        format=request_format, classes=args.classes, min_area=args.min_area, tile=args.tile,
        threshold=args.threshold, smooth=args.smooth, smooth_method=args.smooth_method,
        fill_holes=args.fill_holes or None, instance_mask=args.instance_mask or None, window=args.window,
        axis=args.axis)
    try:
        for result in results:
            if isinstance(result, SegservError):
                if result.type in OPTION_ERRORS:  # refused for every image: a usage error, nothing was written
                    raise UsageError(result.message)
                failures.append(f"  {result.source}: {result}")
                continue
            if export is not None:
                output = outputs[result.source]
                _write(output, export.output_bytes(result))
            else:
                output = _saved_path(outputs[result.source], result)
                _write(output, result.content)
            saved[result.source] = output
            written += 1
            if areas is not None:
                try:
                    areas.add(result.source, output, result.areas(), names)
                except FormatError as exc:
                    no_areas = exc.message
    except KeyboardInterrupt:
        results.close()
        print(f"\ninterrupted: {written} written into {out}/ ({skipped} were there already); run the same command "
              "again to continue: existing outputs are skipped", file=sys.stderr)
        return 130
    finally:
        if areas is not None:
            areas.close()
    done = f"{written} of {len(todo)} segmented into {out}/"
    if skipped:
        done += f" ({skipped} already there, skipped: --overwrite redoes them)"
    print(done + (f"; {len(failures)} failed:" if failures else ""))
    if export is not None:
        count = export.finish([(file_names[image], saved[image]) for image, _ in plan if image in saved])
        print(f"wrote {'COCO dataset ' + args.coco if args.coco else 'CVAT Segmentation mask 1.1 export ' + args.cvat}"
              f" ({count} images{', without the failed ones' if failures else ''})")
    if areas is not None and no_areas and not areas.rows_written:
        print(f"no {AREAS_CSV}: {no_areas}", file=sys.stderr)
    if failures:
        print("\n".join(failures), file=sys.stderr)
    return 1 if failures else 0


def _saved_path(planned: Path, result: Prediction) -> Path:
    """The planned name with the suffix of what came back (the server may answer another type than expected)."""
    if planned.name.endswith(result.extension):
        return planned
    return planned.with_name(planned.name[: len(planned.name) - len(_image_suffix(planned))] + result.extension)


# -- models, health, ui -----------------------------------------------------------------------------------
def models(args: argparse.Namespace) -> int:
    try:
        described = _client(args).models()
    except SegservError as exc:
        print(f"segserve models: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    print(f"{'model':<16} {'version':<8} {'workers':<8} {'batch':<6} {'head':<12} classes")
    for entry in described:
        meta = entry.get("customizedMetadata") if isinstance(entry.get("customizedMetadata"), dict) else {}
        workers = entry.get("workers", [])
        ready = sum(w.get("status") == "READY" for w in workers)
        classes = ",".join(str(c.get("name")) for c in meta.get("classes", [])) or "-"
        print(f"{entry.get('modelName', '?'):<16} {entry.get('modelVersion', '?'):<8} "
              f"{f'{ready}/{len(workers)}':<8} {entry.get('batchSize', '?')!s:<6} {meta.get('head', '-'):<12} "
              f"{classes}")
    return 0


def health(args: argparse.Namespace) -> int:
    report = _client(args).health()
    print(json.dumps(report, indent=2))
    if not report["healthy"]:
        reason = report.get("error") or report.get("workers_error") or "no READY worker"
        print(f"segserve health: not healthy: {reason}", file=sys.stderr)
    return 0 if report["healthy"] else 1


def ui(args: argparse.Namespace) -> int:
    from .ui import serve

    return serve(args)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="segserve", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES)
    root.add_argument("--version", action="version", version=f"segserve {__version__}",
                      help="print segserve's version and exit (the model version is --model-version)")
    commands = root.add_subparsers(dest="command", required=True)

    p = commands.add_parser("predict", help="segment images (folders recursively) into one file per image",
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES,
                            description="Segment images; each answer is written as it arrives, folders keep their "
                                        f"structure under --out, and <out>/{AREAS_CSV} gets the pixels per class "
                                        "per image. Outputs already there are skipped (--overwrite redoes them), "
                                        "so an interrupted run continues where it stopped.")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    # The server validates --format, --classes and --tile and names the choices when refusing one
    # (an exit 2, before the other images are sent): the client keeps no copy of its lists.
    p.add_argument("--format", default=None,
                   help="what to write per image (png); a format the server lacks is refused with its list")
    exports = p.add_mutually_exclusive_group()
    exports.add_argument("--coco", metavar="FILE", default=None,
                         help="also write one COCO dataset file (the per-image format=coco answers, in --out, "
                              "merged; file names relative to the folder named)")
    exports.add_argument("--cvat", metavar="DIR", default=None,
                         help="write a CVAT 'Segmentation mask 1.1' export into DIR: SegmentationClass/*.png, "
                              "labelmap.txt, ImageSets/Segmentation/default.txt (instead of --out)")
    p.add_argument("--classes", default=None, help="comma-separated class names or ids to return")
    p.add_argument("--min-area", type=int, default=None, help="drop regions smaller than this many pixels")
    p.add_argument("--threshold", type=float, default=None,
                   help="probability cut: sigmoid heads' class cut (0.5); softmax: less sure pixels become background")
    p.add_argument("--smooth", type=int, default=None, help="smoothing radius in pixels (0 = off)")
    p.add_argument("--smooth-method", default=None, help="median (default), open or close")
    p.add_argument("--fill-holes", action="store_true", help="fill background enclosed by one class")
    p.add_argument("--instance-mask", action="store_true", help="--format instances: add the uint16 id PNG")
    p.add_argument("--window", default=None,
                   help="DICOM/NIfTI: file, a preset's name or CENTER,WIDTH (docs/medical.md)")
    p.add_argument("--axis", type=int, choices=(0, 1, 2), default=None, help="NIfTI: the axis to slice along")
    p.add_argument("--tile", default=None,
                   help="sliding windows at the image's own scale (default: the server's, auto); "
                        "a mode the server lacks is refused with its list")
    p.add_argument("--out", default="masks", help="output folder (default: ./masks)")
    p.add_argument("--overwrite", action="store_true", help="segment again images whose output exists")
    p.add_argument("--no-csv", action="store_true", help=f"do not write <out>/{AREAS_CSV}")
    p.add_argument("--workers", type=_positive, default=4, help="requests in flight (4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _connection_args(p, management=True)
    p.set_defaults(run=predict)

    m = commands.add_parser("models", help="what the server serves: each model's description (management API)",
                            epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--json", action="store_true", help="print the full descriptions as JSON")
    _connection_args(m, management=True)
    m.set_defaults(run=models)

    h = commands.add_parser("health", help="is the server up and the model's workers ready?", epilog=EXIT_CODES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    _connection_args(h, management=True)
    h.set_defaults(run=health)

    u = commands.add_parser("ui", help="a page to try the model: drop an image, see the overlay and the areas",
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES,
                            description="Serve the try-it page on loopback. By default the page's requests go "
                                        "through this process, which adds the inference key from the key file "
                                        "(the key never reaches the browser). --direct: the page calls "
                                        "TorchServe itself, which needs TorchServe's cors_allowed_origin set to "
                                        "this page's origin and its token auth off (TorchServe refuses the "
                                        "browser's CORS preflight, which carries no token).")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback)")
    u.add_argument("--port", type=int, default=8090, help="port (default: 8090)")
    u.add_argument("--direct", action="store_true", help="the page calls TorchServe directly (see above)")
    u.add_argument("--open", action="store_true", help="open the page in a browser")
    _connection_args(u, management=True)
    u.set_defaults(run=ui)
    return root


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help/--version (0) and usage errors (2): return that status
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.run(args)
    except (UsageError, KeyFileError) as exc:
        print(f"segserve {args.command}: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
