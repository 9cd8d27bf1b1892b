"""A hand-written nn.Module that no registry entry knows (issue 27: any nn.Module), for
--model-factory and the Python API: two poolings, so H and W must be multiples of 4."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyNet(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 2, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
        self.bottom = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(3 * width, classes, 1)

    def forward(self, x):
        skip = self.stem(x)
        deep = self.bottom(F.max_pool2d(self.down(F.max_pool2d(skip, 2)), 2))
        up = F.interpolate(deep, scale_factor=4.0, mode="nearest")  # sizes must divide by 4 for the concat
        return self.head(torch.cat([skip, up], dim=1))


def make(**kwargs) -> TinyNet:
    torch.manual_seed(0)  # the same random weights every call: tests save and load them
    return TinyNet(**kwargs)


def not_a_module():
    return {"weights": 1}


NOT_CALLABLE = 3
