"""The `litserve` contender of `make bench`: the same segserve pipeline served by LitServe instead of TorchServe.

LitServe is what users pick instead of TorchServe for Python models. This app runs the archive's own handler
(`segserve.tools.inprocess`, the code a TorchServe worker runs, on the archive's model and config) inside a
LitAPI, with LitServe's dynamic batching set to the archive's batchSize and maxBatchDelay and the same number of
workers, so the two servers differ only in what sits around the pipeline.

    python bench/litserve_app.py --model-dir DIR --port 8000 [--workers 1]

LitServe hands `decode_request` parsed JSON or a form, not a raw body, so clients send the image as a
multipart file ("image"); the answer is the PNG mask (Accept: image/png).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import litserve as ls  # noqa: E402
import torch  # noqa: E402
from fastapi import Response  # noqa: E402

from segserve.tools.inprocess import Request, handle, load_handler, read_model_yaml  # noqa: E402


class SegservAPI(ls.LitAPI):
    """LitServe's per-request / per-batch split over segserve's handler: decode_request reads the upload,
    predict runs one batch through `handler.handle`, encode_response returns its status and body."""

    def __init__(self, model_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.model_dir = model_dir

    def setup(self, device):
        # LitServe names the device ("cpu", "cuda:0"); a TorchServe worker gets the same as its gpu_id.
        gpu_id = int(device.split(":")[1]) if device.startswith("cuda") else None
        self.handler = load_handler(self.model_dir, gpu_id=gpu_id)

    def decode_request(self, request):
        upload = request["image"]
        return upload.file.read(), upload.content_type or "application/octet-stream"

    def batch(self, inputs):
        return inputs  # handler.handle takes the list of requests as it is

    def predict(self, inputs):
        requests = [Request(inputs={"body": body}, headers={"Accept": "image/png", "body": {"content-type": kind}})
                    for body, kind in inputs]
        return handle(self.handler, requests)

    def unbatch(self, outputs):
        return outputs

    def encode_response(self, reply) -> Response:
        return Response(content=reply.body, status_code=reply.status, media_type=reply.content_type)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="an unpacked segserve archive")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=None, help="default: the archive's minWorkers")
    args = parser.parse_args(argv)
    config = read_model_yaml(args.model_dir)
    api = SegservAPI(args.model_dir, max_batch_size=int(config.get("batchSize", 1)),
                     batch_timeout=int(config.get("maxBatchDelay", 0)) / 1000)
    workers = args.workers or int(config.get("minWorkers", 1))
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    server = ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=workers, timeout=300)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
