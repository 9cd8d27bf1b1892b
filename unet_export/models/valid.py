"""Seed 004's U-Net as in the 2015 paper: unpadded 3x3 convs, so the output is smaller than
the input (572 -> 388). ``concat`` chooses how skips are joined: 0 center-crops the skip (the
paper), 1 pads the decoder map up to the skip, 2 uses padding=1 convs (same-size output)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet_export.models._checks import check_input
from unet_export.models.sizes import SizeRule


class conv_block(nn.Module):  # noqa: N801 - the original's name
    """(conv3x3 => BN => ReLU) * 2, attribute ``conv``; padding 0 unless concat == 2."""

    def __init__(self, in_channels, out_channels, padding=0):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=padding),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=padding),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.conv(x)


class DownSample(nn.Module):
    def __init__(self, in_channels, out_channels, padding=0):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2, 2), conv_block(in_channels, out_channels, padding))

    def forward(self, x):
        return self.maxpool_conv(x)


class UpSample(nn.Module):
    """ConvTranspose x2, join with the skip as ``concat`` says, then conv_block."""

    def __init__(self, in_channels, out_channels, concat=0):
        super().__init__()
        self.concat = concat
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = conv_block(in_channels, out_channels, padding=1 if concat == 2 else 0)

    def forward(self, x, x_copy):
        x = self.up(x)
        if self.concat == 0:  # center-crop the skip to the decoder map
            top, left = (x_copy.size(2) - x.size(2)) // 2, (x_copy.size(3) - x.size(3)) // 2
            x_copy = x_copy[:, :, top : top + x.size(2), left : left + x.size(3)]
        elif self.concat == 1:
            dy, dx = x_copy.size(2) - x.size(2), x_copy.size(3) - x.size(3)
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([x_copy, x], dim=1))


class ValidUNet(nn.Module):
    def __init__(self, n_channels=1, n_classes=2, concat=0, width=64):
        super().__init__()
        if concat not in (0, 1, 2):
            raise ValueError(f"concat must be 0 (crop), 1 (pad) or 2 (same padding), got {concat}")
        self.n_channels, self.n_classes, self.concat = n_channels, n_classes, concat
        pad = 1 if concat == 2 else 0
        c = [width * 2**i for i in range(5)]
        self.inc = conv_block(n_channels, c[0], pad)
        self.down1, self.down2 = DownSample(c[0], c[1], pad), DownSample(c[1], c[2], pad)
        self.down3, self.down4 = DownSample(c[2], c[3], pad), DownSample(c[3], c[4], pad)
        self.up1, self.up2 = UpSample(c[4], c[3], concat), UpSample(c[3], c[2], concat)
        self.up3, self.up4 = UpSample(c[2], c[1], concat), UpSample(c[1], c[0], concat)
        self.outc = nn.Conv2d(c[0], n_classes, kernel_size=1)

    def forward(self, x):
        if not torch.jit.is_scripting():
            rule = sizes({"concat": self.concat})
            check_input(x, self.n_channels, min_size=rule.first(), multiple=rule.multiple, offset=rule.offset)
        e1 = self.inc(x)
        e2 = self.down1(e1)
        e3 = self.down2(e2)
        e4 = self.down3(e3)
        e5 = self.down4(e4)
        x = self.up1(e5, e4)
        x = self.up2(x, e3)
        x = self.up3(x, e2)
        return self.outc(self.up4(x, e1))


def sizes(config: dict) -> SizeRule:
    """Crop: 16k + 124 (k >= 4: 188, 204, ..., 572), output 184 smaller. Pad: any size from 188,
    output about 8 smaller. Same padding: multiples of 16, same-size output."""
    concat = config.get("concat", 0)
    if concat == 0:
        return SizeRule(min=188, multiple=16, offset=124, shrink=184)
    return SizeRule(min=188, shrink=8) if concat == 1 else SizeRule(min=16, multiple=16)


def config_from_state_dict(state_dict) -> dict | None:
    """The keys do not say how skips are joined: crop (the paper) unless --model says otherwise."""
    first, last = state_dict.get("inc.conv.0.weight"), state_dict.get("outc.weight")
    if first is None or last is None:
        return None
    return {"n_channels": int(first.shape[1]), "n_classes": int(last.shape[0]), "concat": 0,
            "width": int(first.shape[0])}  # fmt: skip
