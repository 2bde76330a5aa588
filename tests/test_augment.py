"""Label-free augmentation of the teacher's calibration inputs."""

from __future__ import annotations

import pytest
import torch

from deap_quant.compare import CompareSettings, _Context
from deap_quant.data import Splits
from deap_quant.data.augment import shifted_copies


def test_copies_are_one_step_translations_of_their_image():
    images = torch.zeros(5, 2, 6, 6)
    images[:, :, 2:4, 2:4] = torch.rand(5, 2, 2, 2, generator=torch.Generator().manual_seed(0)) + 0.5
    copies = shifted_copies(images, 3, max_shift=1, seed=4)
    assert copies.shape == (15, 2, 6, 6)
    for row, copy in enumerate(copies):
        original = images[row % 5]
        matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                   if torch.equal(torch.roll(original, (dy, dx), dims=(1, 2)), copy)]
        assert len(matches) == 1 and matches[0] != (0, 0)  # the content (away from the border) moved, intact
    assert torch.equal(copies, shifted_copies(images, 3, max_shift=1, seed=4))
    assert not torch.equal(copies, shifted_copies(images, 3, max_shift=1, seed=5))
    assert shifted_copies(images, 0).shape == (0, 2, 6, 6)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match=r"shape \[N, C, H, W\], got \(4, 3\)"):
        shifted_copies(torch.zeros(4, 3), 2)
    with pytest.raises(ValueError, match="copies=-1"):
        shifted_copies(torch.zeros(1, 1, 4, 4), -1)
    with pytest.raises(ValueError, match="max_shift=4 is not valid; use an integer from 1 to 3"):
        shifted_copies(torch.zeros(1, 1, 4, 4), 1, max_shift=4)
    with pytest.raises(ValueError, match="teacher_augment=-2"):
        CompareSettings(teacher_augment=-2)


def test_compare_enlarges_both_calibration_parts(tiny_model):
    inputs = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    targets = torch.zeros(40, dtype=torch.long)
    splits = Splits((inputs, targets), (inputs[:8], targets[:8]), (inputs[8:16], targets[8:16]), num_classes=4)
    plain = _Context(tiny_model, splits, CompareSettings(holdout=0.25)).teacher(0)
    augmented = _Context(tiny_model, splits, CompareSettings(holdout=0.25, teacher_augment=2)).teacher(0)
    assert [len(part) for part in plain] == [30, 30, 10, 10]
    assert [len(part) for part in augmented] == [90, 90, 30, 30]
    assert torch.equal(augmented[0][:30], plain[0]) and torch.equal(augmented[2][:10], plain[2])
    with torch.no_grad():
        assert torch.equal(augmented[1], tiny_model(augmented[0]))  # the teacher's outputs on the copies too
