"""segserve's own metrics: recorded by the handler called in-process (unit), passed to TorchServe's metrics API
(unit, the real ts.metrics cache) and served on the metrics port next to TorchServe's own (integration, scraped)."""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from support import MODEL, encode_image, random_image
from support.handlers import stand_in_handler
from torch import nn
from ts.metrics.metric_type_enum import MetricTypes

from segserve.metrics import ERRORS, IMAGES, PIXELS, STAGE_SECONDS, Metrics, torchserve_sink
from segserve.tools.inprocess import RecordedMetrics, Request, handle


def test_pipeline_records_stages_images_pixels_and_errors(tmp_path):
    served = stand_in_handler(tmp_path)
    metrics = served.context.metrics
    batch = [Request({"body": encode_image(random_image(40, 30))}),
             Request({"body": b"not an image"}, {"body": {"content-type": "application/octet-stream"}}),
             Request({"body": encode_image(random_image(7, 5))}),
             Request({"body": encode_image(random_image(9, 9)), "format": "gif"})]
    replies = handle(served, batch)
    assert [r.status for r in replies] == [200, 400, 200, 400]

    def count(name, **labels):
        return len(metrics.named(name, **labels))

    def total(name, **labels):
        return sum(m.value for m in metrics.named(name, **labels))

    assert count(STAGE_SECONDS, stage="decode") == 4  # also timed when decoding fails
    assert count(STAGE_SECONDS, stage="preprocess") == 2
    assert count(STAGE_SECONDS, stage="forward") == 1  # one pass for the batch
    assert count(STAGE_SECONDS, stage="encode") == 2
    assert all(m.value >= 0 and m.metric_type == MetricTypes.HISTOGRAM for m in metrics.named(STAGE_SECONDS))
    assert total(IMAGES) == 2 and total(PIXELS) == 40 * 30 + 7 * 5
    assert total(ERRORS, type="invalid_image", status="400") == 1
    assert total(ERRORS, type="invalid_option", status="400") == 1
    # Per-request series carry the request's slot in the batch (TorchServe maps it to the request id).
    assert {m.index for m in metrics.named(ERRORS)} == {1, 3}


def test_the_instances_of_a_v1_request_are_counted_under_its_own_slot(tmp_path):
    import base64

    served = stand_in_handler(tmp_path)
    metrics = served.context.metrics
    image = base64.b64encode(encode_image(random_image(12, 10))).decode()
    json_body = {"body": {"content-type": "application/json"}}
    replies = handle(served, [Request({"body": {"instances": [{"b64": image}] * 3}}, json_body),
                              Request({"body": encode_image(random_image(7, 5))}),
                              Request({"body": {"instances": [{"b64": image}, {"b64": "broken"}]}}, json_body)])
    assert [r.status for r in replies] == [200, 200, 400]
    assert Counter(m.index for m in metrics.named(IMAGES)) == {0: 3, 1: 1, 2: 1}
    assert {m.index for m in metrics.named(ERRORS)} == {2}
    # A v1 body refused whole, before any instance is a slot of its own, is counted under its request too.
    replies = handle(served, [Request({"body": encode_image(random_image(7, 5))}),
                              Request({"body": {"instances": []}}, json_body)])
    assert [r.status for r in replies] == [200, 400]
    refused = metrics.named(ERRORS)[1:]
    assert [(m.index, m.dimensions["type"]) for m in refused] == [(1, "bad_request")], refused


def test_the_instances_of_a_v1_request_go_through_forward_passes_of_bounded_size(tmp_path):
    import base64

    served = stand_in_handler(tmp_path)
    metrics = served.context.metrics
    image = base64.b64encode(encode_image(random_image(12, 10))).decode()
    (reply,) = handle(served, [Request({"body": {"instances": [{"b64": image}] * 9}},
                                       {"body": {"content-type": "application/json"}})])
    assert reply.status == 200
    per_pass = served.segmenter.config.tiling.batch  # 4: alone in its batch, a v1 request gets tiling.batch a pass
    assert len(metrics.named(STAGE_SECONDS, stage="forward")) == -(-9 // per_pass)


def test_a_broken_sink_never_fails_a_request(tmp_path, caplog):
    class Broken(RecordedMetrics):
        def add_metric(self, *args, **kwargs):
            raise RuntimeError("metrics backend down")

    served = stand_in_handler(tmp_path, metrics=Broken())
    with caplog.at_level(logging.ERROR):
        replies = handle(served, [Request({"body": encode_image(random_image(8, 8))})] * 2)
    assert [r.status for r in replies] == [200, 200]
    assert sum("recording" in r.getMessage() for r in caplog.records) == 1  # said once, not per call


def test_torchserve_sink_emits_metric_lines_the_frontend_parses(caplog):
    """Through TorchServe's own backend metrics cache: the `[METRICS]` log line its frontend reads."""
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    ts_config = __import__("ts").__path__[0] + "/configs/metrics.yaml"
    cache = MetricsCacheYamlImpl(config_file_path=ts_config)
    cache.initialize_cache()
    cache.model_name = "segmenter"
    cache.set_request_ids({0: "req-a", 1: "req-b"})
    metrics = Metrics(torchserve_sink(cache))
    with caplog.at_level(logging.INFO):
        with metrics.time("decode", 1):
            pass
        metrics.failed("invalid_image", 400, 1)
        metrics.answered(4, 3, 0)
        metrics.failed("empty_body", 400, 0)  # the same series again: the dimension list is not reused
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]segserve")]
    assert re.match(r"\[METRICS\]segserve_stage_seconds\.Seconds:[0-9.e-]+\|#stage:decode,ModelName:segmenter,"
                    r"Level:Model\|#type:HISTOGRAM\|#hostname:[^,]+,\d+,req-b$", lines[0]), lines[0]
    assert re.match(r"\[METRICS\]segserve_errors_total\.Count:1\|#type:invalid_image,status:400,"
                    r"ModelName:segmenter,Level:Model\|#type:COUNTER\|.*,req-b$", lines[1]), lines[1]
    assert lines[2].startswith("[METRICS]segserve_images_total.Count:1|#ModelName:segmenter,Level:Model|")
    assert lines[3].startswith("[METRICS]segserve_pixels_total.Count:12|")
    assert "|#type:empty_body,status:400,ModelName:segmenter,Level:Model|" in lines[4]


# -- integration: scrape the metrics port ------------------------------------------------------------
SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)", re.M)


def scrape(server) -> list[tuple[str, dict[str, str], float]]:
    """The Prometheus text exposition on the metrics port, as (name, labels, value) samples."""
    response = requests.get(f"{server.metrics_url}/metrics", timeout=30)
    assert response.status_code == 200
    samples = []
    for match in SAMPLE.finditer(response.text):
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
        samples.append((match["name"], labels, float(match["value"])))
    return samples


def value(samples, name: str, **labels) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


@pytest.mark.integration
def test_metrics_port_serves_our_series_with_the_counts_sent(server):
    good = [encode_image(random_image(w, h, seed=w)) for w, h in [(64, 48), (33, 17), (100, 100), (5, 7)]]
    bad = [b"not an image", b"", b"GIF89a-truncated"]
    headers = {**server.headers(), "Content-Type": "application/octet-stream"}
    url = f"{server.inference_url}/predictions/{MODEL}"
    before = scrape(server)
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda body: requests.post(url, data=body, headers=headers, timeout=120).status_code,
                                 good + bad))
    assert statuses == [200] * len(good) + [400] * len(bad)
    expected_errors = Counter({"invalid_image": 2, "empty_body": 1})
    sent = len(good) + len(bad)

    def d(name, **labels):  # TorchServe labels backend series ModelName (and Level, Hostname)
        return value(after, name, ModelName=MODEL, **labels) - value(before, name, ModelName=MODEL, **labels)

    # The frontend reads the worker's metric lines asynchronously: wait (bounded) for the last of them.
    for _ in range(60):
        after = scrape(server)
        if d("segserve_stage_seconds_count", stage="decode") >= sent and d("segserve_errors_total") >= len(bad):
            break
        time.sleep(0.5)
    assert "ts_inference_requests_total" in {n for n, _, _ in after}  # TorchServe's own series are still there
    assert d("segserve_images_total") == len(good)
    assert d("segserve_pixels_total") == 64 * 48 + 33 * 17 + 100 * 100 + 5 * 7
    for kind, count in expected_errors.items():
        assert d("segserve_errors_total", type=kind, status="400") == count, kind
    assert d("segserve_stage_seconds_count", stage="decode") == sent
    assert d("segserve_stage_seconds_count", stage="preprocess") == len(good)
    assert d("segserve_stage_seconds_count", stage="encode") == len(good)
    assert 1 <= d("segserve_stage_seconds_count", stage="forward") <= len(good)
    for stage in ("decode", "preprocess", "forward", "encode"):
        seconds = d("segserve_stage_seconds_sum", stage=stage)
        assert 0 < seconds < 120, (stage, seconds)  # plausible: positive, and no stage near the timeout
    # A histogram: cumulative buckets up to +Inf, which holds every observation.
    assert d("segserve_stage_seconds_bucket", stage="decode", le="+Inf") == sent


class FailsOnImages(nn.Module):
    """Runs the warm-up's zeros; any real image fails the forward pass (as out of memory would)."""

    def forward(self, x):
        if bool((x != 0).any()):
            raise RuntimeError("out of memory")
        return x.clone()


def test_a_failing_forward_pass_is_counted_for_each_request_of_the_batch(tmp_path, caplog):
    served = stand_in_handler(tmp_path, FailsOnImages())
    metrics = served.context.metrics
    ids = ["req-a", "req-b", "req-c"]
    with caplog.at_level(logging.ERROR), pytest.raises(Exception, match="out of memory"):
        handle(served, [Request({"body": encode_image(random_image(8, 8))}, id=i) for i in ids])  # TorchServe: 503
    assert sum(m.value for m in metrics.named(ERRORS, type="prediction_failed", status="503")) == 3
    assert {m.index for m in metrics.named(ERRORS)} == {0, 1, 2}
    assert len(metrics.named(STAGE_SECONDS, stage="forward")) == 1
    assert any("forward pass failed for requests req-a, req-b, req-c" in r.getMessage() for r in caplog.records)
