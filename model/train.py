"""Train the default segmenter on generated microscopy scenes: `make train`.

    python model/train.py [--out model/segmenter.safetensors] [--steps N] [--seed S]

Deterministic: the same seed, steps and thread count give the same weights
byte for byte on the same kind of CPU (threads are fixed at 2, so every machine
splits the work alike). Architecture, classes, input size and normalization come
from model/model-config.yaml, and every training crop goes through the serving
code's own `array_to_model_input`. Training scenes use seeds from 1,000,000;
evaluation (model/evaluate.py) uses seeds from 0, so the two never meet.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(MODEL_DIR.parent / "handler"))
THREADS = 2
# Fixed thread teams before torch loads: with dynamic adjustment, a busy machine gets fewer
# threads, other reduction splits and so other float rounding (seen: other weights under load).
for _name, _value in (("OMP_NUM_THREADS", str(THREADS)), ("MKL_NUM_THREADS", str(THREADS)),
                      ("OMP_DYNAMIC", "FALSE"), ("MKL_DYNAMIC", "FALSE")):
    os.environ[_name] = _value

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tqdm import tqdm  # noqa: E402

from segserve.config import ServingConfig  # noqa: E402
from segserve.models import build_model  # noqa: E402
from segserve.synthetic import generate_scene  # noqa: E402
from segserve.transforms import array_to_model_input  # noqa: E402

TRAIN_SEED_START = 1_000_000  # evaluation uses seeds from 0: the two never meet


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean per-class soft Dice over the batch: keeps the small nucleus class from being neglected."""
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    intersection = (probs * onehot).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1 - ((2 * intersection + 1) / (total + 1)).mean()


def make_batch(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator, batch: int, crop: int,
               config: ServingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops with random 90-degree turns and flips, normalized exactly as the server does."""
    count, height, width = masks.shape
    xs, ys = [], []
    for _ in range(batch):
        i = int(rng.integers(count))
        top, left = int(rng.integers(height - crop + 1)), int(rng.integers(width - crop + 1))
        turns, flip = int(rng.integers(4)), bool(rng.integers(2))
        image = np.rot90(images[i, top:top + crop, left:left + crop], turns)
        mask = np.rot90(masks[i, top:top + crop, left:left + crop], turns)
        if flip:
            image, mask = image[:, ::-1], mask[:, ::-1]
        xs.append(array_to_model_input(image, config.mean, config.std))
        ys.append(torch.from_numpy(np.ascontiguousarray(mask)).long())
    return torch.stack(xs), torch.stack(ys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=MODEL_DIR / "model-config.yaml")
    parser.add_argument("--out", type=Path, default=MODEL_DIR / "segmenter.safetensors")
    parser.add_argument("--steps", type=int, default=1100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128, help="training crop size (px) from each scene")
    parser.add_argument("--scenes", type=int, default=1000, help="number of generated training scenes")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    config = ServingConfig.from_yaml(args.config)
    height, width = config.input_size
    if not 0 < args.crop <= min(height, width):
        parser.error(f"--crop {args.crop} must be between 1 and the input size {config.input_size}")

    first_seed = TRAIN_SEED_START + args.seed * 100_000
    images = np.empty((args.scenes, height, width, 3), np.uint8)
    masks = np.empty((args.scenes, height, width), np.uint8)
    for i in tqdm(range(args.scenes), desc="generating scenes", unit="scene"):
        images[i], masks[i] = generate_scene(first_seed + i, (height, width))
    generated = time.perf_counter()

    model = build_model(config.arch, config.num_classes, **config.arch_params)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps,
                                                   pct_start=0.15)
    rng = np.random.default_rng(args.seed)
    bar = tqdm(range(args.steps), desc="training", unit="step")
    average = None
    for step in bar:
        x, y = make_batch(images, masks, rng, args.batch, args.crop, config)
        logits = model(x)
        loss = F.cross_entropy(logits, y) + soft_dice_loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        value = loss.item()
        average = value if average is None else 0.95 * average + 0.05 * value
        if step % 10 == 0 or step == args.steps - 1:
            bar.set_postfix(step=step + 1, loss=f"{average:.4f}")

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata={"arch": config.arch, "classes": ",".join(config.class_names),
                                              "steps": str(args.steps), "seed": str(args.seed)})
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    finished = time.perf_counter()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, "
          f"{sum(v.numel() for v in state.values() if v.is_floating_point()):,} numbers)")
    print(f"wall time {finished - started:.0f} s ({generated - started:.0f} s generating {args.scenes} scenes, "
          f"{finished - generated:.0f} s for {args.steps} steps of {args.batch}x{args.crop}x{args.crop})")
    print(f"sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
