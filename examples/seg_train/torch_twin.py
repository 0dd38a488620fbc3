# PyTorch eager twin of seg_train's SegNet (keel::models::seg), for `seg_train bench --vs-torch`.
# Same structure and widths as keel's SegNet (ResNet-style encoder w, 2w, 4w, 8w; FPN-lite
# decoder; nearest upsampling in the FPN, bilinear to the input size at the end), one SGD
# training step (momentum 0.9, weight decay 1e-4, cross-entropy with ignore_index 255) on ONE
# fixed batch, so it pays nothing for data. CPU (threads given) or CUDA (f32, tf32, f16 AMP with
# a GradScaler, bf16 autocast). Prints one JSON line last.
# Derived from the project's shared anchor scripts (torch_seg_twin.py / torch_seg_twin_cpu.py).
import argparse, json, resource, statistics, time
import torch, torch.nn as nn, torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--width", type=int, default=16)
p.add_argument("--fpn", type=int, default=32)
p.add_argument("--classes", type=int, default=5)
p.add_argument("--batch", type=int, default=2)
p.add_argument("--size", type=int, default=96)
p.add_argument("--norm", choices=["gn", "bn"], default="gn")
p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
p.add_argument("--amp", choices=["off", "tf32", "f16", "bf16"], default="off")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--warmup", type=int, default=5)
p.add_argument("--steps", type=int, default=20)
a = p.parse_args()
torch.set_num_threads(a.threads)
dev = torch.device(a.device)
if a.device == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = a.amp == "tf32"
    torch.backends.cudnn.allow_tf32 = a.amp == "tf32"
    torch.backends.cudnn.benchmark = True
elif a.amp != "off":
    raise SystemExit(f"--amp {a.amp}: the CPU twin runs f32 only")

def norm(c):
    return nn.GroupNorm(min(32, c), c) if a.norm == "gn" else nn.BatchNorm2d(c)

class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False); self.n1 = norm(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False); self.n2 = norm(cout)
        self.skip = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))
    def forward(self, x):
        y = F.silu(self.n1(self.c1(x)))
        y = self.n2(self.c2(y))
        return F.silu(y + (x if self.skip is None else self.skip(x)))

class SegNet(nn.Module):
    def __init__(self, w, fpn, classes):
        super().__init__()
        widths = (w, 2 * w, 4 * w, 8 * w)
        self.stem = nn.Sequential(nn.Conv2d(3, w // 2, 3, 2, 1, bias=False), norm(w // 2), nn.SiLU(),
                                  nn.Conv2d(w // 2, w, 3, 2, 1, bias=False), norm(w), nn.SiLU())
        stages, cin = [], w
        for i, c in enumerate(widths):
            stages.append(nn.Sequential(Block(cin, c, 1 if i == 0 else 2), Block(c, c, 1))); cin = c
        self.stages = nn.ModuleList(stages)
        self.lat = nn.ModuleList([nn.Conv2d(c, fpn, 1) for c in widths])
        self.smooth = nn.Sequential(nn.Conv2d(fpn, fpn, 3, 1, 1, bias=False), norm(fpn), nn.SiLU())
        self.head = nn.Conv2d(fpn, classes, 1)
    def forward(self, x):
        h, w = x.shape[-2:]
        feats, y = [], self.stem(x)
        for s in self.stages:
            y = s(y); feats.append(y)
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

def sync():
    if a.device == "cuda":
        torch.cuda.synchronize()

for _ in range(a.warmup):
    step()
sync()
if a.device == "cuda":
    torch.cuda.reset_peak_memory_stats()
ts = []
for _ in range(a.steps):
    t0 = time.perf_counter(); step(); sync(); ts.append(time.perf_counter() - t0)
out = {
    "median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
    "params": sum(q.numel() for q in m.parameters()), "threads": torch.get_num_threads(),
    "torch": torch.__version__,
    # CUDA: the allocator's peak during the timed steps; CPU: the process's peak RSS.
    "peak_mib": (torch.cuda.max_memory_allocated() if a.device == "cuda"
                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
}
print(json.dumps(out))
