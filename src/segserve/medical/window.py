"""VOI windowing: modality values (e.g. HU) -> the 8-bit grey levels the model was trained on.

DICOM's own functions (PS3.3 C.11.2.1.2: LINEAR, LINEAR_EXACT, SIGMOID) written to 0..255 here: pydicom's
apply_windowing answers in the stored bit depth's range, and the model's input is 8-bit.
"""

from __future__ import annotations

import numpy as np

from ..config import Window

LINEAR, LINEAR_EXACT, SIGMOID = "LINEAR", "LINEAR_EXACT", "SIGMOID"
FUNCTIONS = (LINEAR, LINEAR_EXACT, SIGMOID)


def apply_window(values: np.ndarray, window: Window, function: str = LINEAR) -> np.ndarray:
    """uint8 grey levels of `values` through `window` by the DICOM VOI LUT function named."""
    x = values.astype(np.float64, copy=False)
    center, width = window.center, window.width
    if function == SIGMOID:
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == LINEAR_EXACT:
        y = ((x - center) / width + 0.5) * 255.0
    elif width <= 1:  # LINEAR of width 1 is a threshold
        y = np.where(x > center - 0.5, 255.0, 0.0)
    else:
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def range_window(low: float, high: float) -> Window:
    """The window LINEAR_EXACT maps `low`..`high` onto 0..255 with (a flat image: everything 0)."""
    return Window((low + high) / 2, max(high - low, 1e-6))


def to_8bit(values: np.ndarray, bits: int) -> np.ndarray:
    """Colour samples of `bits` bits -> 0..255."""
    if values.dtype == np.uint8 and bits <= 8:
        return values
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / (2 ** bits - 1))), 0, 255).astype(np.uint8)
