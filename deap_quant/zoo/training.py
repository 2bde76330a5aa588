"""Deterministic, CPU-friendly training of the zoo's small models."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["train_classifier", "train_supervised", "accuracy"]


def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on an ``(inputs, targets)`` pair."""
    inputs, targets = data
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            outputs = model(inputs[start:start + batch_size])
            correct += int((outputs.argmax(dim=1) == targets[start:start + batch_size]).sum())
    return correct / max(len(inputs), 1)


def train_classifier(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], *, epochs: int = 40,
                     lr: float = 3e-3, batch_size: int = 64, weight_decay: float = 1e-4, seed: int = 0) -> nn.Module:
    """Cross-entropy training with :func:`train_supervised`."""
    return train_supervised(model, train, F.cross_entropy, epochs=epochs, lr=lr, batch_size=batch_size,
                            weight_decay=weight_decay, seed=seed)


def train_supervised(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                     loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, epochs: int, lr: float,
                     batch_size: int = 64, weight_decay: float = 0.0, seed: int = 0) -> nn.Module:
    """Adam with a cosine schedule on ``loss(model(inputs), targets)``, seeded and single-threaded, so
    training is repeatable.

    (Multi-threaded CPU convolution backward passes reduce in a varying order; one thread does not.)
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        inputs, targets = train
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps = epochs * ((len(inputs) + batch_size - 1) // batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(inputs), generator=generator)
            for start in range(0, len(inputs), batch_size):
                batch = order[start:start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss(model(inputs[batch]), targets[batch]).backward()
                optimizer.step()
                schedule.step()
        return model.eval()
    finally:
        torch.set_num_threads(threads)
