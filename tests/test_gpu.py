"""The CUDA path gives the CPU path's masks. Skipped where there is no GPU (as in CI)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from support import REPO, encode_image

from segserve.pipeline import Segmenter, pick_device
from segserve.tools.inprocess import Request, handle, load_handler
from segserve.tools.synthetic import generate_scene

pytestmark = pytest.mark.gpu


def test_pick_device_falls_back_to_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(0) == torch.device("cpu")
    assert pick_device(None) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_masks_agree_with_cpu(config):
    assert pick_device(0) == torch.device("cuda:0")
    images = [Image.fromarray(generate_scene(seed, (300, 411))[0]) for seed in range(4)]
    cpu = Segmenter.from_model_dir(REPO / "model", config=config).predict(images)
    gpu = Segmenter.from_model_dir(REPO / "model", config=config, device="cuda:0").predict(images)
    for a, b in zip(cpu, gpu, strict=True):
        assert (a == b).mean() >= 0.995
        assert a.shape == b.shape
    assert np.mean([(a == b).mean() for a, b in zip(cpu, gpu, strict=True)]) >= 0.995


def test_precision_is_float32_on_cpu_and_half_on_cuda(config):
    segmenter = Segmenter.from_model_dir(REPO / "model", config=config, warm_up=False)
    assert segmenter._autocast().__class__.__name__ == "nullcontext"
    assert segmenter.forward(torch.zeros(1, 3, 64, 64)).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_half_precision_masks_agree_with_float32(config):
    import dataclasses

    images = [Image.fromarray(generate_scene(seed, (300, 411))[0]) for seed in range(4)]
    fp32 = Segmenter.from_model_dir(REPO / "model", config=dataclasses.replace(config, precision="fp32"),
                                    device="cuda:0").predict(images)
    fp16 = Segmenter.from_model_dir(REPO / "model", config=config, device="cuda:0")
    assert fp16.forward(torch.zeros(1, 3, 64, 64)).dtype == torch.float16
    for a, b in zip(fp32, fp16.predict(images), strict=True):
        assert (a == b).mean() >= 0.995


@pytest.fixture(scope="module")
def gpu_handler():
    """segmenter_handler.py on model/ as TorchServe starts it on GPU 0."""
    return load_handler(REPO / "model", gpu_id=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tiled_masks_and_probs_agree_with_cpu(handler, gpu_handler):
    image = Image.fromarray(generate_scene(9, (700, 900))[0])
    (a,), (b,) = (served.segmenter.predict([image], tile="on") for served in (handler, gpu_handler))
    assert a.shape == b.shape == (700, 900) and (a == b).mean() >= 0.995
    request = Request({"body": encode_image(image), "format": b"probs", "classes": b"1,2", "tile": b"on"})
    expected, probs = (np.load(io.BytesIO(handle(served, [request])[0].body)) for served in (handler, gpu_handler))
    assert probs.shape == (2, 700, 900) and np.abs(probs.astype(np.float32) - expected).max() < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_batch_decode_gives_the_cpu_masks(handler, gpu_handler, monkeypatch):
    def jpeg(seed, size, orientation=1):
        buffer, exif = io.BytesIO(), Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(generate_scene(seed, size)[0]).save(buffer, format="JPEG", quality=92, exif=exif)
        return buffer.getvalue()

    bodies = [jpeg(1, (384, 512)), jpeg(2, (768, 1024)), jpeg(3, (300, 411), orientation=6)]
    requests = [Request({"body": body}, {"Accept": "image/png"}) for body in bodies]
    cpu = handle(handler, requests)
    assert gpu_handler.segmenter.device == torch.device("cuda:0")
    assert gpu_handler.segmenter.planner.batch_decode  # decoder: auto on a GPU
    monkeypatch.setattr("segserve.decode.ImageFile.decode",
                        lambda *a, **k: pytest.fail("nvJPEG batch fell back to Pillow"))
    for a, b in zip(cpu, handle(gpu_handler, requests), strict=True):
        assert a.status == b.status == 200
        mask_a, mask_b = (np.asarray(Image.open(io.BytesIO(r.body))) for r in (a, b))
        assert mask_a.shape == mask_b.shape and (mask_a == mask_b).mean() >= 0.995


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pick_device_makes_the_workers_gpu_current():
    last = torch.cuda.device_count() - 1
    assert pick_device(last) == torch.device(f"cuda:{last}")
    assert torch.cuda.current_device() == last  # nvJPEG, cuDNN and bare .cuda() calls land on it
    pick_device(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_truncated_jpeg_in_a_gpu_batch_fails_alone(handler, gpu_handler):
    """As on the CPU: the truncated JPEG gets Pillow's 400, its batch neighbours nvJPEG's masks."""
    buffer = io.BytesIO()
    Image.fromarray(generate_scene(11, (384, 512))[0]).save(buffer, format="JPEG", quality=92)
    good = buffer.getvalue()
    requests = [Request({"body": body}, {"Accept": "image/png"}) for body in (good, good[: len(good) // 2], good)]
    cpu, gpu = handle(handler, requests), handle(gpu_handler, requests)
    assert [r.status for r in gpu] == [r.status for r in cpu] == [200, 400, 200]
    assert gpu[1].body == cpu[1].body
