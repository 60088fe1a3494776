"""`segserve`: segment images with a running server, or check its health.

    segserve predict cells/*.png --format png --out masks/
    segserve health
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .client import SegservClient, SegservError
from .options import FORMATS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="inference API (default: $SEGSERVE_URL or http://127.0.0.1:8080)")
    parser.add_argument("--model", default="segmenter")
    parser.add_argument("--version", default=None, help="model version (default: the server's default)")
    parser.add_argument("--token", default=None, help="inference key (default: $SEGSERVE_TOKEN or the key file)")
    parser.add_argument("--key-file", default=None,
                        help="TorchServe key_file.json (default: $SEGSERVE_KEY_FILE, ./run/key_file.json)")
    parser.add_argument("--retries", type=int, default=4, help="retries on 503/507 and connection errors")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per request")


def _inputs(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(path)
    return found


def _client(args: argparse.Namespace, **extra) -> SegservClient:
    return SegservClient(args.url, model=args.model, version=args.version, token=args.token,
                         key_file=args.key_file, retries=args.retries, timeout=args.timeout, **extra)


def predict(args: argparse.Namespace) -> int:
    images = _inputs(args.images)
    if not images:
        print("segserve predict: no images found", file=sys.stderr)
        return 2
    client = _client(args)
    results = client.predict_many(images, workers=args.workers, progress=not args.no_progress,
                                  format=args.format, classes=args.classes, min_area=args.min_area)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path, result in zip(images, results, strict=True):
        if isinstance(result, SegservError):
            failed += 1
            print(f"FAILED {path}: {result}", file=sys.stderr)
        else:
            result.save(out / f"{path.stem}{result.extension}")
    print(f"{len(images) - failed} of {len(images)} segmented into {out}/" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def health(args: argparse.Namespace) -> int:
    client = _client(args, management_url=args.management_url)
    report = client.health()
    print(json.dumps(report, indent=2))
    return 0 if report["healthy"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segserve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("predict", help="segment images; one output file per image")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--format", default="png", choices=list(FORMATS))
    p.add_argument("--classes", default=None, help="comma-separated class names or ids to return")
    p.add_argument("--min-area", type=int, default=None, help="drop regions smaller than this (rle, polygons)")
    p.add_argument("--out", default="masks", help="output folder (default: ./masks)")
    p.add_argument("--workers", type=int, default=4, help="requests in flight")
    p.add_argument("--no-progress", action="store_true")
    _connection_args(p)
    p.set_defaults(run=predict)

    h = commands.add_parser("health", help="is the server up and the model's workers ready?")
    h.add_argument("--management-url", default=None, help="management API (default: inference port + 1)")
    _connection_args(h)
    h.set_defaults(run=health)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"segserve {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
