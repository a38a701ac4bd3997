"""A small CNN, a ResNet-18 for small images, and a plain training loop, used by the demo, the
tests and the benchmarks."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["SmallCNN", "digits_cnn", "fashion_cnn", "BasicBlock", "ResNet", "resnet18",
           "train_classifier", "accuracy"]


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


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: two 3x3 convs with BatchNorm, plus the identity or ``downsample``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # One in-place ReLU used twice, as in torchvision: a hook on "layerX.Y.relu" fires twice.
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A torchvision-style ResNet of :class:`BasicBlock` stages, with a stem for small images.

    Module names are torchvision's: ``conv1, bn1, relu, maxpool, layer1 ... layer4, avgpool, fc``,
    inside a stage ``layer2.0.conv1``, ``layer2.0.bn2``, ``layer2.0.downsample`` and so on. Unlike
    torchvision the stem is a 3x3 conv with stride 1 and ``maxpool`` is an ``nn.Identity`` (kept so
    the names match), so a 28x28 input reaches ``layer4`` as 4x4 instead of 1x1.

    Parameters
    ----------
    layers : sequence of 4 int
        Blocks per stage; ``(2, 2, 2, 2)`` is ResNet-18.
    in_channels, n_classes : int
        Input channels and number of logits.
    width : int, default=64
        Channels of the stem and ``layer1``; the later stages have 2, 4 and 8 times as many.
    """

    def __init__(self, layers=(2, 2, 2, 2), in_channels: int = 1, n_classes: int = 10, width: int = 64):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, n_classes)
        # torchvision's initialisation, so training behaves like the model users know.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        mods = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        mods += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(in_channels: int = 1, n_classes: int = 10, width: int = 64) -> ResNet:
    """ResNet-18 for small images such as 28x28 Fashion-MNIST (untrained).

    Layers a user would explain: ``"layer1"`` (``width`` channels, full resolution),
    ``"layer2"`` (2x ``width``, 1/2), ``"layer3"`` (4x, 1/4), ``"layer4"`` (8x, 1/8),
    ``"avgpool"`` (the pooled ``8 * width`` features) and ``"fc"`` (logits). Any name of
    ``model.named_modules()`` works, e.g. ``"layer3.1"`` or ``"layer4.0.bn2"``; avoid the ReLUs
    inside blocks (``"layer1.0.relu"``), which run twice per forward pass.

    Parameters
    ----------
    in_channels, n_classes : int
        Input channels and number of logits.
    width : int, default=64
        64 gives ResNet-18's channel counts (64, 128, 256, 512; 11.2M parameters); 8 or 16 give
        a narrow copy with the same layers, for fast tests.

    Examples
    --------
    >>> import torch
    >>> from actclust.models import resnet18
    >>> resnet18(width=8).eval()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    return ResNet((2, 2, 2, 2), in_channels=in_channels, n_classes=n_classes, width=width)


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
