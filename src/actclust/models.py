"""A small CNN, a ResNet-18 for small images, torchvision's ResNet-50 for 224x224 images, and a
plain training loop, used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .exceptions import ParameterError

__all__ = ["SmallCNN", "digits_cnn", "fashion_cnn", "BasicBlock", "Bottleneck", "ResNet", "resnet18",
           "resnet50", "train_classifier", "accuracy"]


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


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck block (v1.5: the stride on the 3x3 conv): 1x1, 3x3 and 1x1
    convs with BatchNorm, ``planes * 4`` channels out, plus the identity or ``downsample``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)  # used three times, as in torchvision
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A torchvision-style ResNet of :class:`BasicBlock` or :class:`Bottleneck` stages.

    Module names are torchvision's: ``conv1, bn1, relu, maxpool, layer1 ... layer4, avgpool, fc``,
    inside a stage ``layer2.0.conv1``, ``layer2.0.bn2``, ``layer2.0.downsample`` and so on. With
    ``stem="small"`` (the default) the stem is a 3x3 conv with stride 1 and ``maxpool`` is an
    ``nn.Identity`` (kept so the names match), so a 28x28 input reaches ``layer4`` as 4x4 instead
    of 1x1; ``stem="imagenet"`` is torchvision's (7x7 conv with stride 2, then a 3x3 max-pool with
    stride 2), for 224x224 inputs.

    Parameters
    ----------
    layers : sequence of 4 int
        Blocks per stage; ``(2, 2, 2, 2)`` with :class:`BasicBlock` is ResNet-18, ``(3, 4, 6, 3)``
        with :class:`Bottleneck` ResNet-50.
    in_channels, n_classes : int
        Input channels and number of logits.
    width : int, default=64
        Channels of the stem and of ``layer1``'s blocks before expansion; the later stages have 2,
        4 and 8 times as many, and each stage outputs ``block.expansion`` times its width.
    block : BasicBlock or Bottleneck, default=BasicBlock
    stem : {"small", "imagenet"}, default="small"
    """

    def __init__(self, layers=(2, 2, 2, 2), in_channels: int = 1, n_classes: int = 10, width: int = 64,
                 block=BasicBlock, stem: str = "small"):
        super().__init__()
        if stem not in ("small", "imagenet"):
            raise ParameterError(f"The 'stem' parameter of ResNet must be 'small' or 'imagenet'. Got {stem!r} instead.")
        self.inplanes = width
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width * block.expansion, n_classes)
        # torchvision's initialisation, so training behaves like the model users know.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        out = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out))
        mods = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        mods += [block(out, planes) for _ in range(1, blocks)]
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


def resnet50(in_channels: int = 3, n_classes: int = 1000, width: int = 64) -> ResNet:
    """torchvision's ResNet-50 for 224x224 images such as ImageNet's (untrained, torchvision's
    initialisation; no pretrained weights).

    The stem is torchvision's (7x7 conv with stride 2, 3x3 max-pool with stride 2), then
    :class:`Bottleneck` stages of 3, 4, 6 and 3 blocks. For a 224x224 input ``"layer1"`` outputs
    ``4 * width`` channels at 56x56, ``"layer2"`` ``8 * width`` at 28x28, ``"layer3"``
    ``16 * width`` at 14x14, ``"layer4"`` ``32 * width`` at 7x7; ``"avgpool"`` the pooled
    ``32 * width`` features and ``"fc"`` the logits. Module names, hence state-dict keys, are
    torchvision's.

    Parameters
    ----------
    in_channels, n_classes : int
        Input channels and number of logits.
    width : int, default=64
        64 gives ResNet-50's channel counts (256, 512, 1024, 2048 out of the stages; 25.6M
        parameters with 1,000 classes); 8 gives a narrow copy with the same layers, for fast tests.

    Examples
    --------
    >>> import torch
    >>> from actclust.models import resnet50
    >>> resnet50(n_classes=10, width=8).eval()(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 10])
    """
    return ResNet((3, 4, 6, 3), in_channels=in_channels, n_classes=n_classes, width=width, block=Bottleneck,
                  stem="imagenet")


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
