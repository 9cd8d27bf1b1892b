"""torchvision's DeepLabV3-ResNet50 (seed 001), returning the 'out' tensor instead of a dict so
it exports like the U-Nets. Module names are torchvision's, so its state_dicts load unchanged."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet_export.models._checks import check_input


class DeepLabV3(nn.Module):
    def __init__(self, n_classes=21, n_channels=3, aux_loss=False):
        super().__init__()
        from torchvision.models.segmentation import deeplabv3_resnet50  # heavy: only when built

        if n_channels != 3:
            raise ValueError("DeepLabV3-ResNet50 takes 3 input channels")
        self.n_channels, self.n_classes = n_channels, n_classes
        net = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=n_classes, aux_loss=aux_loss)
        self.backbone, self.classifier = net.backbone, net.classifier
        self.aux_classifier = net.aux_classifier  # kept so checkpoints with it load; unused at inference

    def forward(self, x):
        if not torch.jit.is_scripting():
            check_input(x, self.n_channels, min_size=32)
        size = x.shape[-2:]
        features = self.backbone(x)["out"]
        return F.interpolate(self.classifier(features), size=size, mode="bilinear", align_corners=False)


def config_from_state_dict(state_dict) -> dict | None:
    last = state_dict.get("classifier.4.weight")
    if "backbone.conv1.weight" not in state_dict or last is None:
        return None
    return {"n_classes": int(last.shape[0]), "aux_loss": any(k.startswith("aux_classifier.") for k in state_dict)}
