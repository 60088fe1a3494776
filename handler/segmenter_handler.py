"""TorchServe glue for segserve: maps TorchServe's request list and context onto `segserve.pipeline`.

All the work (plan, decode, model, masks, encoders, errors) lives in the plain `segserve` package
shipped intact inside the archive; this file only passes one `pipeline.Batch` from preprocess to
inference to postprocess and sets each request's status, content type and headers on the context.
"""

from __future__ import annotations

import dataclasses
import logging

from ts.torch_handler.base_handler import BaseHandler

from segserve import families
from segserve.config import ServingConfig
from segserve.metrics import Metrics, torchserve_sink
from segserve.pipeline import Segmenter, log_batch, pick_device

logger = logging.getLogger(__name__)


class SegmenterHandler(BaseHandler):
    def initialize(self, context):
        properties = context.system_properties
        self.device = pick_device(properties.get("gpu_id"))
        section = (context.model_yaml_config or {}).get("handler")
        if section is None:
            raise RuntimeError("model-config.yaml has no `handler:` section; rebuild the archive with build_mar.sh")
        config = ServingConfig.from_dict(section)
        self.segmenter = Segmenter.from_model_dir(properties["model_dir"], config=config, device=self.device,
                                                  batch_size=int(properties.get("batch_size") or 1))
        if context.metrics is not None:  # served on the metrics port (segserve.metrics)
            self.segmenter.metrics = Metrics(torchserve_sink(context.metrics))
        logger.info("segserve: %s %s (%s, %s head, %d classes) ready on %s", config.name, config.version,
                    config.arch, config.head, config.num_classes, self.device)
        self.initialized = True

    def preprocess(self, data):
        slots = range(len(data))
        return self.segmenter.prepare(data, [self.context.get_all_request_header(i) or {} for i in slots],
                                      [self.context.get_request_id(i) for i in slots])

    def inference(self, data):
        return self.segmenter.infer(data)

    def postprocess(self, data):
        responses = self.segmenter.answer(data)
        log_batch(responses)
        for index, response in enumerate(responses):
            self.context.set_response_status(response.status, response.phrase, index)
            self.context.set_response_content_type(index, response.content_type)
            for name, value in response.headers.items():
                self.context.set_response_header(index, name, value)
        return [response.body for response in responses]

    def describe_handle(self):
        config = self.segmenter.config
        return {
            "model": config.name,
            "version": config.version,
            **families.describe(config),  # family, arch and what the family adds (e.g. arch_params)
            "head": config.head,
            # The defaults a request's options override; unset ones left out (TorchServe drops JSON nulls anyway).
            "postprocess": {k: v for k, v in dataclasses.asdict(config.postprocess).items() if v is not None},
            "input_size": list(config.spatial_size),  # a 3-D model: its window [D, H, W]
            "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in config.classes],
        }
