# PyTorch eager twin of seg_train's SegNet (keel::models::seg), for `seg_train bench --vs-torch`.
# Same structure and widths as keel's SegNet (ResNet-style encoder w, 2w, 4w, 8w; FPN-lite
# decoder; nearest upsampling in the FPN, bilinear to the input size at the end), one SGD
# training step (momentum 0.9, weight decay 1e-4, cross-entropy with ignore_index 255) on ONE
# fixed batch, so it pays nothing for data. CPU (threads given) or CUDA (f32, tf32, f16 AMP with
# a GradScaler, bf16 autocast). Prints one JSON line last.
# Derived from the project's shared anchor scripts (torch_seg_twin.py / torch_seg_twin_cpu.py);
# the flags, the encoder and the timed loop are examples/twin_common.py's.
import argparse, os, sys
import torch, torch.nn as nn, torch.nn.functional as F

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_here, os.path.dirname(_here)]
from twin_common import add_run_flags, encoder_layers, norm_layer, run_encoder, setup, time_and_report  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--width", type=int, default=16)
p.add_argument("--fpn", type=int, default=32)
p.add_argument("--classes", type=int, default=5)
p.add_argument("--batch", type=int, default=2)
p.add_argument("--size", type=int, default=96)
p.add_argument("--norm", choices=["gn", "bn"], default="gn")
add_run_flags(p, warmup=5, steps=20)
a = p.parse_args()
dev = setup(a)
norm = norm_layer(a.norm)

class SegNet(nn.Module):
    def __init__(self, w, fpn, classes):
        super().__init__()
        widths = (w, 2 * w, 4 * w, 8 * w)
        self.stem, self.stages = encoder_layers(w, norm)
        self.lat = nn.ModuleList([nn.Conv2d(c, fpn, 1) for c in widths])
        self.smooth = nn.Sequential(nn.Conv2d(fpn, fpn, 3, 1, 1, bias=False), norm(fpn), nn.SiLU())
        self.head = nn.Conv2d(fpn, classes, 1)
    def forward(self, x):
        h, w = x.shape[-2:]
        feats = run_encoder(self.stem, self.stages, x)
        p = self.lat[-1](feats[-1])
        for f, l in zip(reversed(feats[:-1]), reversed(self.lat[:-1])):
            p = l(f) + F.interpolate(p, size=f.shape[-2:], mode="nearest")
        return F.interpolate(self.head(self.smooth(p)), size=(h, w), mode="bilinear", align_corners=False)

torch.manual_seed(0)
m = SegNet(a.width, a.fpn, a.classes).to(dev)
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
x = torch.randn(a.batch, 3, a.size, a.size, device=dev)
t = torch.randint(0, a.classes, (a.batch, a.size, a.size), device=dev)
ac = {"f16": torch.float16, "bf16": torch.bfloat16}.get(a.amp)
scaler = torch.amp.GradScaler("cuda") if a.amp == "f16" else None

def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(a.device, dtype=ac, enabled=ac is not None):
        loss = F.cross_entropy(m(x), t, ignore_index=255)
    if scaler:
        scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
    else:
        loss.backward(); opt.step()

time_and_report(a, m, step)
