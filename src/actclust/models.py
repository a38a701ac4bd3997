"""A small CNN and a plain training loop, used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["SmallCNN", "digits_cnn", "fashion_cnn", "train_classifier", "accuracy"]


class SmallCNN(nn.Module):
    """Two conv blocks and two dense layers: ``conv1, conv2, fc1, fc2`` (logits).

    Parameters
    ----------
    in_channels, n_classes, image_size : int
        Input ``(N, in_channels, image_size, image_size)``; ``image_size`` divisible by 4.
    width : int
        Channels of ``conv1``; ``conv2`` has twice as many.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 10, image_size: int = 28,
                 width: int = 32, hidden: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(2 * width * (image_size // 4) ** 2, hidden)
        self.relu3 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(0.25)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.dropout(self.relu3(self.fc1(self.flatten(x))))
        return self.fc2(x)


def digits_cnn() -> SmallCNN:
    """The demo's CNN for scikit-learn's 8x8 digits (untrained)."""
    return SmallCNN(in_channels=1, n_classes=10, image_size=8, width=16, hidden=64)


def fashion_cnn() -> SmallCNN:
    """The benchmark's CNN for 28x28 Fashion-MNIST (untrained)."""
    return SmallCNN(in_channels=1, n_classes=10, image_size=28)


def train_classifier(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 10,
                     batch_size: int = 64, lr: float = 2e-3, seed: int = 0, progress: bool = True) -> nn.Module:
    """Train ``model`` with Adam and cross-entropy on arrays ``x``, ``y``; returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    model.train()
    for _ in tqdm(range(epochs), desc="training", disable=not progress, leave=False):
        for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
            opt.zero_grad()
            xb = xt[idx].float() / (255.0 if xt.dtype == torch.uint8 else 1.0)
            nn.functional.cross_entropy(model(xb), yt[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> float:
    """Share of ``x`` that ``model`` classifies as ``y``."""
    model.eval()
    xt = torch.as_tensor(x)
    pred = torch.cat([model(b.float() / (255.0 if b.dtype == torch.uint8 else 1.0)).argmax(1)
                      for b in xt.split(batch_size)])
    return float((pred.numpy() == np.asarray(y)).mean())
