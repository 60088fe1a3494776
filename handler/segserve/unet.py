"""A compact U-Net: conv-BN-ReLU pairs, max-pool down, bilinear up, skip concatenation.

Any input size works: pooling rounds up (ceil_mode) and each upsampled map is
resized to its skip connection's exact size, so a 257x311 input gives 257x311
logits. Activations run in channels-last layout, which oneDNN's CPU
convolutions run about 1.4x faster than the default layout; the state_dict's
keys and shapes do not depend on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with `depth` poolings; widths base_channels * 2**level. Returns logits (N, num_classes, H, W)."""

    def __init__(self, num_classes: int = 3, in_channels: int = 3, base_channels: int = 16, depth: int = 4,
                 channels_last: bool = True):
        super().__init__()
        if depth < 0 or base_channels < 1:
            raise ValueError(f"UNet needs depth >= 0 and base_channels >= 1, got {depth} and {base_channels}")
        widths = [base_channels * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList([_block(in_channels, widths[0])] +
                                  [_block(widths[i], widths[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.channels_last = channels_last
        if channels_last:
            # load_state_dict copies into these tensors, so the layout survives loading weights.
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2, ceil_mode=True)
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return self.head(x).contiguous()
