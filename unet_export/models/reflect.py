"""Seed 003's U-Net (the bilibili tutorial, qiaofengsheng/pytorch-UNet): reflect-padded
Conv_Blocks with Dropout2d and LeakyReLU, strided-conv DownSample, UpSample = nearest x2 then a
1x1 conv (or, in the variant the blog shows, ConvTranspose then the 1x1 conv), 3x3 output conv.
Keys c1..c9, d1..d4, u1..u4, out. H and W must be multiples of 16."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet_export.models._checks import check_input


class Conv_Block(nn.Module):  # noqa: N801 - the original's name, kept for recognisability
    """(conv3x3 reflect => BN => Dropout2d => LeakyReLU) * 2, attribute ``layer``."""

    def __init__(self, in_channel, out_channel):
        super().__init__()
        self.layer = nn.Sequential(
            nn.Conv2d(in_channel, out_channel, 3, 1, 1, padding_mode="reflect", bias=False),
            nn.BatchNorm2d(out_channel),
            nn.Dropout2d(0.3),
            nn.LeakyReLU(),
            nn.Conv2d(out_channel, out_channel, 3, 1, 1, padding_mode="reflect", bias=False),
            nn.BatchNorm2d(out_channel),
            nn.Dropout2d(0.3),
            nn.LeakyReLU(),
        )

    def forward(self, x):
        return self.layer(x)


class DownSample(nn.Module):
    """Stride-2 conv3x3 reflect => BN => LeakyReLU (no max-pool)."""

    def __init__(self, channel):
        super().__init__()
        self.layer = nn.Sequential(
            nn.Conv2d(channel, channel, 3, 2, 1, padding_mode="reflect", bias=False),
            nn.BatchNorm2d(channel),
            nn.LeakyReLU(),
        )

    def forward(self, x):
        return self.layer(x)


class UpSample(nn.Module):
    """x2 (nearest, or ConvTranspose), 1x1 conv to half the channels, then cat([up, skip])."""

    def __init__(self, channel, transpose: bool = False):
        super().__init__()
        self.layer = nn.Conv2d(channel, channel // 2, 1, 1)
        self.up = nn.ConvTranspose2d(channel, channel, 2, 2) if transpose else nn.Identity()
        self.transpose = transpose

    def forward(self, x, feature_map):
        up = self.up(x) if self.transpose else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return torch.cat((self.layer(up), feature_map), dim=1)


class ReflectUNet(nn.Module):
    """Returns logits (or, with ``sigmoid``, the early versions' sigmoid outputs)."""

    def __init__(self, n_classes=3, n_channels=3, width=64, transpose=False, sigmoid=False):
        super().__init__()
        self.n_channels, self.n_classes, self.sigmoid = n_channels, n_classes, sigmoid
        w = width
        self.c1, self.d1 = Conv_Block(n_channels, w), DownSample(w)
        self.c2, self.d2 = Conv_Block(w, w * 2), DownSample(w * 2)
        self.c3, self.d3 = Conv_Block(w * 2, w * 4), DownSample(w * 4)
        self.c4, self.d4 = Conv_Block(w * 4, w * 8), DownSample(w * 8)
        self.c5 = Conv_Block(w * 8, w * 16)
        self.u1, self.c6 = UpSample(w * 16, transpose), Conv_Block(w * 16, w * 8)
        self.u2, self.c7 = UpSample(w * 8, transpose), Conv_Block(w * 8, w * 4)
        self.u3, self.c8 = UpSample(w * 4, transpose), Conv_Block(w * 4, w * 2)
        self.u4, self.c9 = UpSample(w * 2, transpose), Conv_Block(w * 2, w)
        self.out = nn.Conv2d(w, n_classes, 3, 1, 1)

    def forward(self, x):
        if not torch.jit.is_scripting():
            check_input(x, self.n_channels, min_size=32, multiple=16)
        r1 = self.c1(x)
        r2 = self.c2(self.d1(r1))
        r3 = self.c3(self.d2(r2))
        r4 = self.c4(self.d3(r3))
        r5 = self.c5(self.d4(r4))
        o1 = self.c6(self.u1(r5, r4))
        o2 = self.c7(self.u2(o1, r3))
        o3 = self.c8(self.u3(o2, r2))
        out = self.out(self.c9(self.u4(o3, r1)))
        return torch.sigmoid(out) if self.sigmoid else out


def config_from_state_dict(state_dict) -> dict | None:
    first, last = state_dict.get("c1.layer.0.weight"), state_dict.get("out.weight")
    if first is None or last is None or "u1.layer.weight" not in state_dict:
        return None
    return {"n_channels": int(first.shape[1]), "n_classes": int(last.shape[0]), "width": int(first.shape[0]),
            "transpose": "u1.up.weight" in state_dict, "sigmoid": False}  # fmt: skip
