"""Seed 001's plain U-Net: encoder1..4, middle, upconv4..1 (ConvTranspose 2x2), decoder4..1,
final; double convs are conv3x3 + ReLU twice, no BatchNorm. Skips are concatenated without
padding, so H and W must be multiples of 16."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet_export.models._checks import check_input


def double_conv(in_channels, out_channels):
    """conv3x3 => ReLU, twice (keys .0 and .2)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
    )


class PlainUNet(nn.Module):
    """Returns logits (N, n_classes, H, W); 1 input channel and 1 class as in the seed."""

    def __init__(self, n_channels=1, n_classes=1, width=64):
        super().__init__()
        self.n_channels, self.n_classes = n_channels, n_classes
        w = width
        self.encoder1 = double_conv(n_channels, w)
        self.encoder2 = double_conv(w, w * 2)
        self.encoder3 = double_conv(w * 2, w * 4)
        self.encoder4 = double_conv(w * 4, w * 8)
        self.middle = double_conv(w * 8, w * 16)
        self.upconv4 = nn.ConvTranspose2d(w * 16, w * 8, kernel_size=2, stride=2)
        self.decoder4 = double_conv(w * 16, w * 8)
        self.upconv3 = nn.ConvTranspose2d(w * 8, w * 4, kernel_size=2, stride=2)
        self.decoder3 = double_conv(w * 8, w * 4)
        self.upconv2 = nn.ConvTranspose2d(w * 4, w * 2, kernel_size=2, stride=2)
        self.decoder2 = double_conv(w * 4, w * 2)
        self.upconv1 = nn.ConvTranspose2d(w * 2, w, kernel_size=2, stride=2)
        self.decoder1 = double_conv(w * 2, w)
        self.final = nn.Conv2d(w, n_classes, kernel_size=1)

    def forward(self, x):
        if not torch.jit.is_scripting():
            check_input(x, self.n_channels, min_size=16, multiple=16)
        e1 = self.encoder1(x)
        e2 = self.encoder2(F.max_pool2d(e1, 2))
        e3 = self.encoder3(F.max_pool2d(e2, 2))
        e4 = self.encoder4(F.max_pool2d(e3, 2))
        middle = self.middle(F.max_pool2d(e4, 2))
        d4 = self.decoder4(torch.cat((e4, self.upconv4(middle)), dim=1))
        d3 = self.decoder3(torch.cat((e3, self.upconv3(d4)), dim=1))
        d2 = self.decoder2(torch.cat((e2, self.upconv2(d3)), dim=1))
        d1 = self.decoder1(torch.cat((e1, self.upconv1(d2)), dim=1))
        return self.final(d1)


def config_from_state_dict(state_dict) -> dict | None:
    first, last = state_dict.get("encoder1.0.weight"), state_dict.get("final.weight")
    if first is None or last is None or "middle.0.weight" not in state_dict:
        return None
    return {"n_channels": int(first.shape[1]), "n_classes": int(last.shape[0]), "width": int(first.shape[0])}
