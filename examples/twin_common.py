# What keel's PyTorch eager twins share (examples/seg_train/torch_twin.py,
# examples/det_train/torch_twin.py; each finds this file beside itself or one folder up):
# the run flags and device setup, keel_norm::group_count, the blocks of keel's SegEncoder
# (keel::models::seg: same structure and state-dict names), and the timed loop whose JSON
# line keel::train::bench::run_twin_checked reads.
import json, resource, statistics, time
import torch, torch.nn as nn, torch.nn.functional as F


def add_run_flags(p, warmup, steps):
    """The flags every twin takes: where and how long it runs."""
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--amp", choices=["off", "tf32", "f16", "bf16"], default="off")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--steps", type=int, default=steps)


def setup(a):
    """Threads, TF32 and cuDNN autotuning as the flags say; the device."""
    torch.set_num_threads(a.threads)
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = a.amp == "tf32"
        torch.backends.cudnn.allow_tf32 = a.amp == "tf32"
        torch.backends.cudnn.benchmark = True
    elif a.amp != "off":
        raise SystemExit(f"--amp {a.amp}: the CPU twin runs f32 only")
    return torch.device(a.device)


def group_count(c, preferred):
    """keel_norm::group_count: the largest divisor of c that is at most `preferred`."""
    g = min(preferred, c)
    while g > 1 and c % g:
        g -= 1
    return max(g, 1)


def norm_layer(kind):
    """keel's backbone norms: gn = GroupNorm(group_count(C, 32)), bn = BatchNorm2d."""
    return lambda c: nn.GroupNorm(group_count(c, 32), c) if kind == "gn" else nn.BatchNorm2d(c)


class Block(nn.Module):
    """The SegEncoder's basic block: conv-norm-SiLU, conv-norm, skip, SiLU."""
    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False); self.n1 = norm(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False); self.n2 = norm(cout)
        self.skip = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        y = F.silu(self.n1(self.c1(x)))
        y = self.n2(self.c2(y))
        return F.silu(y + (x if self.skip is None else self.skip(x)))


def encoder_layers(w, norm):
    """The SegEncoder's `stem` (two stride-2 conv-norm-SiLU) and `stages` (w, 2w, 4w, 8w)."""
    stem = nn.Sequential(nn.Conv2d(3, w // 2, 3, 2, 1, bias=False), norm(w // 2), nn.SiLU(),
                         nn.Conv2d(w // 2, w, 3, 2, 1, bias=False), norm(w), nn.SiLU())
    stages, cin = [], w
    for i, c in enumerate((w, 2 * w, 4 * w, 8 * w)):
        stages.append(nn.Sequential(Block(cin, c, 1 if i == 0 else 2, norm), Block(c, c, 1, norm)))
        cin = c
    return stem, nn.ModuleList(stages)


def run_encoder(stem, stages, x):
    """C2-C5."""
    feats, y = [], stem(x)
    for s in stages:
        y = s(y); feats.append(y)
    return feats


def time_and_report(a, model, step):
    """Runs `step()` (it may return the loss) a.warmup untimed then a.steps timed times,
    synchronized after each, and prints the JSON line: median_ms, min_ms, peak_mib, params,
    threads, torch, losses (the losses of the first two steps; empty when `step` returns none)."""
    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()
    losses, ts = [], []
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            sync()
            if a.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = step()
        sync()
        if i < 2 and loss is not None:
            losses.append(loss.item())
        if i >= a.warmup:
            ts.append(time.perf_counter() - t0)
    out = {
        "median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
        "params": sum(q.numel() for q in model.parameters()), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "losses": losses,
        # CUDA: the allocator's peak during the timed steps; CPU: the process's peak RSS.
        "peak_mib": (torch.cuda.max_memory_allocated() if a.device == "cuda"
                     else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
    }
    print(json.dumps(out))
