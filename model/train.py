"""Train the default segmenter on generated microscopy scenes: `make train`.

Deterministic: the same seed, steps and thread count give the same weights
byte for byte (threads are fixed at 2 so every machine computes alike).
Architecture, classes, input size and normalization come from
model/model-config.yaml, and inputs are normalized by the serving code itself.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(MODEL_DIR.parent / "src"))
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
from segserve.families import build_model  # noqa: E402
from segserve.tools.synthetic import generate_scene  # noqa: E402

TRAIN_SEED_START = 1_000_000  # evaluation uses seeds from 0: the two never meet


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean per-class soft Dice over the batch: keeps the small nucleus class from being ignored."""
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    intersection = (probs * onehot).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1 - ((2 * intersection + 1) / (total + 1)).mean()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=MODEL_DIR / "model-config.yaml")
    parser.add_argument("--out", type=Path, default=MODEL_DIR / "segmenter.safetensors")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128, help="training crop size (px) from each scene")
    parser.add_argument("--scenes", type=int, default=800, help="number of generated training scenes")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    config = ServingConfig.from_yaml(args.config)
    height, width = config.input_size
    if args.crop > min(height, width):
        parser.error(f"--crop {args.crop} is larger than the input size {config.input_size}")

    scenes = [generate_scene(TRAIN_SEED_START + args.seed * 100_000 + i, (height, width))
              for i in tqdm(range(args.scenes), desc="generating scenes", unit="scene")]
    images = torch.from_numpy(np.stack([image for image, _ in scenes])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([mask for _, mask in scenes])).long()
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)

    model = build_model(config.arch, config.num_classes, **config.arch_params)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps,
                                                   pct_start=0.15)
    rng = torch.Generator().manual_seed(args.seed)
    crop = args.crop
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        index = torch.randint(0, len(scenes), (args.batch,), generator=rng)
        top = torch.randint(0, height - crop + 1, (args.batch,), generator=rng)
        left = torch.randint(0, width - crop + 1, (args.batch,), generator=rng)
        x = torch.stack([images[i, :, t:t + crop, s:s + crop] for i, t, s in zip(index, top, left, strict=True)])
        y = torch.stack([masks[i, t:t + crop, s:s + crop] for i, t, s in zip(index, top, left, strict=True)])
        turns = int(torch.randint(0, 4, (1,), generator=rng))
        x, y = torch.rot90(x, turns, (2, 3)), torch.rot90(y, turns, (1, 2))
        if int(torch.randint(0, 2, (1,), generator=rng)):
            x, y = x.flip(3), y.flip(2)
        # Same normalization as segserve.transforms at serving time.
        x = (x.float().div(255.0) - mean) / std
        logits = model(x)
        loss = F.cross_entropy(logits, y) + soft_dice_loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata={"arch": config.arch, "classes": ",".join(config.class_names)})
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - started:.0f} s")
    print(f"sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
