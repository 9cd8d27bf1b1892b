"""Seed 002's U-Net with a ResNet-50 encoder (kevinlu1211/pytorch-unet-resnet-50-encoder),
rebuilt with the same attribute names so its checkpoints load unchanged. The original downloads
ImageNet weights and moves to CUDA at import; this one starts from random weights or from a local
torchvision ResNet-50 state_dict (``encoder_weights``). H and W must be multiples of 32."""

import torch
import torch.nn as nn

from unet_export.errors import UserError
from unet_export.models._checks import check_input
from unet_export.models.sizes import SizeRule


class ConvBlock(nn.Module):
    """conv3x3 (with bias) => BN => ReLU."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Bridge(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.bridge = nn.Sequential(ConvBlock(in_channels, out_channels), ConvBlock(out_channels, out_channels))

    def forward(self, x):
        return self.bridge(x)


class UpBlockForUNetWithResNet50(nn.Module):
    """ConvTranspose x2, cat([up, skip]), two ConvBlocks."""

    def __init__(self, in_channels, out_channels, up_conv_in_channels=None, up_conv_out_channels=None):
        super().__init__()
        up_in, up_out = up_conv_in_channels or in_channels, up_conv_out_channels or out_channels
        self.upsample = nn.ConvTranspose2d(up_in, up_out, kernel_size=2, stride=2)
        self.conv_block_1 = ConvBlock(in_channels, out_channels)
        self.conv_block_2 = ConvBlock(out_channels, out_channels)

    def forward(self, up_x, down_x):
        x = torch.cat([self.upsample(up_x), down_x], 1)
        return self.conv_block_2(self.conv_block_1(x))


class UNetWithResnet50Encoder(nn.Module):
    def __init__(self, n_classes=2, n_channels=3, encoder_weights: str | None = None):
        super().__init__()
        from torchvision.models import resnet50  # imported here: listing models costs nothing

        if n_channels != 3:
            raise ValueError("the ResNet-50 encoder takes 3 input channels")
        self.n_channels, self.n_classes = n_channels, n_classes
        resnet = resnet50(weights=None)
        if encoder_weights:
            _load_encoder(resnet, encoder_weights)
        self.input_block = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu)
        self.input_pool = resnet.maxpool
        self.down_blocks = nn.ModuleList([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4])
        self.bridge = Bridge(2048, 2048)
        self.up_blocks = nn.ModuleList([
            UpBlockForUNetWithResNet50(2048, 1024),
            UpBlockForUNetWithResNet50(1024, 512),
            UpBlockForUNetWithResNet50(512, 256),
            UpBlockForUNetWithResNet50(128 + 64, 128, up_conv_in_channels=256, up_conv_out_channels=128),
            UpBlockForUNetWithResNet50(64 + 3, 64, up_conv_in_channels=128, up_conv_out_channels=64),
        ])  # fmt: skip
        self.out = nn.Conv2d(64, n_classes, kernel_size=1, stride=1)

    def forward(self, x):
        if not torch.jit.is_scripting():
            check_input(x, self.n_channels, min_size=32, multiple=32)
        skips = [x]  # input (3), relu (64, H/2), layer1..3 (256..1024); layer4 feeds the bridge
        x = self.input_block(x)
        skips.append(x)
        x = self.input_pool(x)
        for i, block in enumerate(self.down_blocks):
            x = block(x)
            if i < 3:
                skips.append(x)
        x = self.bridge(x)
        for i, block in enumerate(self.up_blocks):
            x = block(x, skips[-1 - i])
        return self.out(x)


def _load_encoder(resnet: nn.Module, path: str) -> None:
    """A local torchvision ResNet-50 state_dict (no download at run time); the fc head is unused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing file, not a checkpoint, pickled code
        raise UserError(f"--encoder-weights {path}: cannot load ({type(exc).__name__}: {str(exc)[:100]})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        missing, _ = resnet.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError) as exc:  # strict=False still refuses a shape mismatch or a non-dict
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"--encoder-weights {path} is not a torchvision ResNet-50 state_dict ({detail})") from None
    if [k for k in missing if not k.startswith("fc.")]:
        raise UserError(f"--encoder-weights {path} is not a torchvision ResNet-50 state_dict ({len(missing)} keys missing)")


def config_from_state_dict(state_dict) -> dict | None:
    last = state_dict.get("out.weight")
    if "input_block.0.weight" not in state_dict or "bridge.bridge.0.conv.weight" not in state_dict or last is None:
        return None
    return {"n_classes": int(last.shape[0])}


SIZES = SizeRule(min=32, multiple=32)
