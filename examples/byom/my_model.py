"""A model of your own, as an example of `--model-factory`: no registry entry knows it.

    unet-export onnx small_unet.pth --model-factory examples/byom/my_model.py:build

`build(**kwargs)` returns the nn.Module; the checkpoint fills its weights (strict). `--model-arg
KEY=VALUE` passes keyword arguments to it (here: classes, width)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallUNet(nn.Module):
    """Two poolings and bilinear up-sampling back to the skips: H and W must divide by 4."""

    def __init__(self, classes: int = 2, width: int = 16):
        super().__init__()
        self.enc1, self.enc2, self.mid = block(3, width), block(width, 2 * width), block(2 * width, 4 * width)
        self.dec2, self.dec1 = block(6 * width, 2 * width), block(3 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(m, scale_factor=2.0, mode="bilinear"), e2], dim=1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="bilinear"), e1], dim=1))
        return self.head(d1)


def build(classes: int = 2, width: int = 16) -> SmallUNet:
    return SmallUNet(classes, width)
