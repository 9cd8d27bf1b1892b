"""Train a small segmentation_models_pytorch Unet for a minute or two on the demo images and save
it as smp saves models (a stand-in for your own training), for docs/bring-your-own-model.md:

    python examples/byom/train_smp.py exports/my_unet    # -> exports/my_unet/{config.json,model.safetensors}
                                                         #    and exports/my_unet.pth (the bare state_dict)
"""

import sys
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
from PIL import Image

dest = Path(sys.argv[1])
folder = Path("unet_export/assets/demo_val")
images = sorted((folder / "imgs").glob("*.png"))
x = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in images])
x = (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]  # ImageNet mean/std: smp's resnet encoders'
y = np.stack([np.asarray(Image.open(folder / "masks" / f"{p.stem}_mask.png")) > 0 for p in images])
x, y = torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2), torch.tensor(y, dtype=torch.long)

torch.manual_seed(0)
torch.set_num_threads(1)  # one thread: the same training, so the same INT8 verdicts, on every run
net = smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=[32, 16, 8], classes=2)
optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
for step in range(200):
    batch = torch.randint(0, len(x), (8,))
    loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
    optimizer.zero_grad(), loss.backward(), optimizer.step()
net.eval().save_pretrained(dest)  # config.json + model.safetensors
torch.save(net.state_dict(), dest.with_suffix(".pth"))  # the same weights as a bare state_dict
print(f"trained smp Unet (resnet18, depth 3): loss {loss.item():.3f}; saved {dest}/ and {dest.with_suffix('.pth')}")
