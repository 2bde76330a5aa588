"""Label-free augmentation: more calibration inputs for the teacher fitness, from the ones we have.

The teacher fitness needs inputs, not labels: the float model's outputs are the targets. So a
calibration split drawn from the training data can be enlarged with shifted copies of its
images, and a search scored on it has far more samples to fit than the validation split has,
which is what keeps it from overfitting. Torch only.
"""

from __future__ import annotations

import torch

__all__ = ["shifted_copies"]


def shifted_copies(images: torch.Tensor, copies: int, max_shift: int = 1, seed: int = 0) -> torch.Tensor:
    """``copies`` translated versions of each image in ``images`` (``[N, C, H, W]``), zero-filled.

    Each copy moves every image by its own random ``(dy, dx)`` with ``|dy|, |dx| <= max_shift``
    (never ``(0, 0)``), drawn with ``seed``. Returns ``[copies * N, C, H, W]``, copy by copy.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"shifted_copies needs images of shape [N, C, H, W], got {shape}")
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
        raise ValueError(f"copies={copies!r} is not valid; use an integer >= 0")
    height, width = images.shape[-2:]
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or not 1 <= max_shift < min(height, width):
        raise ValueError(f"max_shift={max_shift!r} is not valid; use an integer from 1 to {min(height, width) - 1}")
    generator = torch.Generator().manual_seed(seed)
    offsets = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)
               if (dy, dx) != (0, 0)]
    padded = torch.nn.functional.pad(images, (max_shift, max_shift, max_shift, max_shift))
    out = images.new_empty((copies * len(images), *images.shape[1:]))
    for copy in range(copies):
        choice = torch.randint(len(offsets), (len(images),), generator=generator)
        for position, (dy, dx) in enumerate(offsets):
            members = (choice == position).nonzero().flatten()
            if len(members):
                window = padded[members, :, max_shift - dy:max_shift - dy + height, max_shift - dx:max_shift - dx + width]
                out[copy * len(images) + members] = window
    return out
