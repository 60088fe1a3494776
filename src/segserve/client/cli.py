"""`segserve`: segment images with a running segserve server, or check its health.

    segserve predict cells/*.png --format png --out masks/
    segserve health

Exit codes: 0 all done / healthy, 1 some image failed / not healthy, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .api import OPTION_ERRORS, SegservClient, SegservError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}


class UsageError(Exception):
    """The command line names something that cannot work; exit 2 with the message."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="inference API (default: $SEGSERVE_URL or http://127.0.0.1:8080)")
    parser.add_argument("--model", default="segmenter", help="model name (default: segmenter)")
    parser.add_argument("--version", default=None, help="model version (default: the server's default)")
    parser.add_argument("--token", default=None, help="inference key (default: $SEGSERVE_TOKEN, else the key file)")
    parser.add_argument("--key-file", default=None,
                        help="TorchServe key_file.json (default: $SEGSERVE_KEY_FILE, ./run/key_file.json, "
                             "./key_file.json)")
    parser.add_argument("--retries", type=int, default=4,
                        help="retries on 503/507, \"Worker died.\" and connection errors (4)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per request (120)")


def _inputs(paths: list[str]) -> list[Path]:
    """The files named, and the images inside the folders named (sorted); a missing path is a usage error."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"no such file or folder: {path}")
    return found


def _output_names(images: list[Path]) -> list[str]:
    """`<stem>` per input; inputs sharing a stem (a/x.png, b/x.jpg) get -2, -3, ... so none overwrites another."""
    seen: dict[str, int] = {}
    names = []
    for path in images:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        names.append(path.stem if seen[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}")
    return names


def _client(args: argparse.Namespace, **extra) -> SegservClient:
    return SegservClient(args.url, model=args.model, version=args.version, token=args.token,
                         key_file=args.key_file, retries=args.retries, timeout=args.timeout, **extra)


def predict(args: argparse.Namespace) -> int:
    images = _inputs(args.images)
    client = _client(args)
    results = client.predict_many(images, workers=args.workers, progress=not args.no_progress,
                                  format=args.format, classes=args.classes, min_area=args.min_area,
                                  tile=args.tile, threshold=args.threshold, smooth=args.smooth,
                                  smooth_method=args.smooth_method, fill_holes=args.fill_holes or None)
    refused = next((r for r in results if isinstance(r, SegservError) and r.type in OPTION_ERRORS), None)
    if refused is not None:  # an option the server refuses: a usage error, whichever image it came back for
        raise UsageError(refused.message)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = []
    for path, name, result in zip(images, _output_names(images), results, strict=True):
        if isinstance(result, SegservError):
            failures.append(f"  {path}: {result}")
        else:
            result.save(out / f"{name}{result.extension}")
    ok = len(images) - len(failures)
    print(f"{ok} of {len(images)} segmented into {out}/" + (f"; {len(failures)} failed:" if failures else ""))
    if failures:
        print("\n".join(failures), file=sys.stderr)
    return 1 if failures else 0


def health(args: argparse.Namespace) -> int:
    report = _client(args, management_url=args.management_url).health()
    print(json.dumps(report, indent=2))
    if not report["healthy"]:
        reason = report.get("error") or report.get("workers_error") or "no READY worker"
        print(f"segserve health: not healthy: {reason}", file=sys.stderr)
    return 0 if report["healthy"] else 1


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="segserve", description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="Exit codes: 0 success, 1 an image failed / not healthy, 2 usage error.")
    commands = root.add_subparsers(dest="command", required=True)

    p = commands.add_parser("predict", help="segment images; one output file per image")
    p.add_argument("images", nargs="+", help="image files or folders (their images, sorted)")
    # The server validates --format, --classes and --tile and names the choices when refusing one
    # (an exit 2, before the other images are sent): the client keeps no copy of its lists.
    p.add_argument("--format", default="png",
                   help="what to write per image (png); a format the server lacks is refused with its list")
    p.add_argument("--classes", default=None, help="comma-separated class names or ids to return")
    p.add_argument("--min-area", type=int, default=None, help="drop regions smaller than this many pixels")
    p.add_argument("--threshold", type=float, default=None,
                   help="probability cut: sigmoid heads' class cut (0.5); softmax: less sure pixels become background")
    p.add_argument("--smooth", type=int, default=None, help="smoothing radius in pixels (0 = off)")
    p.add_argument("--smooth-method", default=None, help="median (default), open or close")
    p.add_argument("--fill-holes", action="store_true", help="fill background enclosed by one class")
    p.add_argument("--tile", default=None,
                   help="sliding windows at the image's own scale (default: the server's, auto); "
                        "a mode the server lacks is refused with its list")
    p.add_argument("--out", default="masks", help="output folder (default: ./masks)")
    p.add_argument("--workers", type=_positive, default=4, help="requests in flight (4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _connection_args(p)
    p.set_defaults(run=predict)

    h = commands.add_parser("health", help="is the server up and the model's workers ready?")
    h.add_argument("--management-url", default=None,
                   help="management API, to list workers (default: $SEGSERVE_MANAGEMENT_URL; :8081 for :8080)")
    _connection_args(h)
    h.set_defaults(run=health)
    return root


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and usage errors (2); return that as the status
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.run(args)
    except (UsageError, FileNotFoundError, ValueError) as exc:
        print(f"segserve {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
