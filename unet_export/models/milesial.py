"""milesial/Pytorch-UNet, with identical module names so its checkpoints load unchanged.

Reads top to bottom like the original ``unet_parts.py`` / ``unet_model.py``; two additions:
``width`` (the base channel count, 64 in every published checkpoint) and ``conv_bias`` (the
pre-December-2021 checkpoints whose 3x3 convs carry biases).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet_export.models._checks import check_input


class DoubleConv(nn.Module):
    """(conv3x3 => BN => ReLU) * 2"""

    def __init__(self, in_channels, out_channels, mid_channels=None, bias=False):
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=bias),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=bias),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.double_conv(x)


class Down(nn.Module):
    """Max-pool by 2, then DoubleConv."""

    def __init__(self, in_channels, out_channels, bias=False):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels, bias=bias))

    def forward(self, x):
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Up-sample by 2, pad to the skip's size, concatenate [skip, up], DoubleConv."""

    def __init__(self, in_channels, out_channels, bilinear=False, bias=False):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2, bias=bias)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels, bias=bias)

    def forward(self, x1, x2):
        x1 = self.up(x1)
        # Padding from runtime shapes is what lets any H, W work (odd sizes lose a row in
        # max-pool); exporters must keep these as shape computations, not constants.
        diff_y = x2.size(2) - x1.size(2)
        diff_x = x2.size(3) - x1.size(3)
        x1 = F.pad(x1, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class OutConv(nn.Module):
    """1x1 conv to class logits."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        return self.conv(x)


class UNet(nn.Module):
    """milesial's UNet: returns logits of shape (N, n_classes, H, W)."""

    def __init__(self, n_channels=3, n_classes=2, bilinear=False, width=64, conv_bias=False):
        super().__init__()
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.bilinear = bilinear
        w, factor, b = width, (2 if bilinear else 1), conv_bias
        self.inc = DoubleConv(n_channels, w, bias=b)
        self.down1 = Down(w, w * 2, bias=b)
        self.down2 = Down(w * 2, w * 4, bias=b)
        self.down3 = Down(w * 4, w * 8, bias=b)
        self.down4 = Down(w * 8, w * 16 // factor, bias=b)
        self.up1 = Up(w * 16, w * 8 // factor, bilinear, bias=b)
        self.up2 = Up(w * 8, w * 4 // factor, bilinear, bias=b)
        self.up3 = Up(w * 4, w * 2 // factor, bilinear, bias=b)
        self.up4 = Up(w * 2, w, bilinear, bias=b)
        self.outc = OutConv(w, n_classes)

    def forward(self, x):
        if not torch.jit.is_scripting():  # TorchScript compiles nothing under this branch
            check_input(x, self.n_channels, min_size=16)
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)


def config_from_state_dict(state_dict) -> dict | None:
    """The UNet config a milesial state_dict was saved from, or None if it is not one.

    ConvTranspose checkpoints carry ``up1.up.weight``; bilinear ones have no up-sampling
    parameters. Checkpoints from before Dec 2021 carry biases on the 3x3 convs.
    """
    first, last = state_dict.get("inc.double_conv.0.weight"), state_dict.get("outc.conv.weight")
    if first is None or last is None or first.dim() != 4 or last.dim() != 4:
        return None
    return {
        "n_channels": int(first.shape[1]),
        "n_classes": int(last.shape[0]),
        "bilinear": "up1.up.weight" not in state_dict,
        "width": int(first.shape[0]),
        "conv_bias": "inc.double_conv.0.bias" in state_dict,
    }
