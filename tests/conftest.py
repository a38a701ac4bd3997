import numpy as np
import pytest
import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv -> in-place ReLU -> pool -> fc1 -> ReLU -> fc2 logits; weights fixed by the seed."""

    def __init__(self, n_classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(16, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, n_classes)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.flat(self.pool(self.relu(self.conv(x)))))))


LAYERS = ["conv", "fc1", "fc2"]


@pytest.fixture
def model():
    return TinyCNN().eval()


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 1, 6, 6)).astype(np.float32)
    y = rng.integers(0, 3, 120)
    return x, y


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def fitted(model, data):
    """A k-means explainer fitted on ``data`` with labels; 4 clusters per layer."""
    from actclust import ActivationClustering

    x, y = data
    return ActivationClustering(model, LAYERS, n_clusters=4, progress=False).fit(x, y)
