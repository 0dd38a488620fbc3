# PyTorch eager twin of det_train's FCOS (examples/det_train/model.rs), for
# `det_train bench --vs-torch`. Same structure, widths and state-dict names as keel's FcosNet:
# the SegEncoder (ResNet-style w, 2w, 4w, 8w; `backbone.*`), keel-det's FPN on C3-C5
# (1x1 laterals and 3x3 outputs with bias, no norm, nearest 2x top-down cropped to the
# lateral; `fpn.fpn_inner{2,3,4}`, `fpn.fpn_layer{2,3,4}`), the shared FCOS head
# (`head.cls_tower` / `head.bbox_tower`: conv + GroupNorm(8 channels per group) + SiLU,
# cls_logits, bbox_pred, centerness on the cls tower, exp(scale_l * x) per level); the
# same FCOS targets (keel-det's prepare_targets: center sampling radius 1.5, sizes of
# interest from --soi-base, smallest area (x2 - x1 + 1) * (y2 - y1 + 1) wins) computed
# every step on the device, vectorized as the FCOS reference does; the same loss (torchvision's
# sigmoid_focal_loss alpha 0.25 gamma 2 / max(num_pos, 1), generalized_box_iou_loss eps 1e-7
# weighted by the centerness targets / their sum, centerness BCE-with-logits / max(num_pos, 1);
# both torchvision.ops functions are copied below, so torchvision is not needed);
# AdamW (betas 0.9, 0.999, eps 1e-8) with weight decay off for biases and norm weights
# (keel_optim::split_no_decay, NoDecay::Rank) and a global grad-norm clip.
#
# The weights are keel's init (--init, a safetensors file of keel's VarMap, loaded by name:
# any missing or extra name is an error) and the batch is keel's (--batch-file: `images`
# (N, 3, H, W) f32, `boxes` (M, 4) f32 xyxy, `box_image` (M) i64, `box_class` (M) i64), so
# the losses of the first two steps ("losses") can be compared with keel's: the first checks
# the forward, targets and loss, the second the gradients, the clip and the AdamW update too. One fixed batch: nothing
# is paid for data. CPU (threads given) or CUDA (f32, tf32, f16 AMP with a GradScaler, bf16
# autocast). Prints one JSON line last: median_ms, min_ms, peak_mib, params, losses. The
# flags, the encoder and the timed loop are examples/twin_common.py's.
import argparse, json, os, struct, sys
import torch, torch.nn as nn, torch.nn.functional as F

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_here, os.path.dirname(_here)]
from twin_common import (add_run_flags, encoder_layers, group_count, norm_layer, run_encoder,  # noqa: E402
                         setup, time_and_report)

p = argparse.ArgumentParser()
p.add_argument("--width", type=int, default=16)
p.add_argument("--fpn", type=int, default=32)
p.add_argument("--head-convs", type=int, default=2)
p.add_argument("--classes", type=int, required=True)
p.add_argument("--soi-base", type=float, required=True)
p.add_argument("--norm", choices=["gn", "bn"], default="gn")
p.add_argument("--init", required=True, help="keel's init weights (safetensors)")
p.add_argument("--batch-file", required=True, help="keel's batch (safetensors)")
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--weight-decay", type=float, default=0.05)
p.add_argument("--clip", type=float, default=0.0, help="global grad-norm clip (0: none)")
add_run_flags(p, warmup=3, steps=10)
a = p.parse_args()
dev = setup(a)
norm = norm_layer(a.norm)

STRIDES, INF = (8, 16, 32), 100_000_000.0

def load_safetensors(path):
    """A safetensors file as {name: tensor} (the format: u64 header size, JSON header, data)."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "U32": torch.int32, "U8": torch.uint8}
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    header, data, out = json.loads(buf[8:8 + n]), memoryview(buf)[8 + n:], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        t = torch.frombuffer(bytearray(data[lo:hi]), dtype=dtypes[info["dtype"]]) if hi > lo \
            else torch.empty(0, dtype=dtypes[info["dtype"]])
        out[name] = t.reshape(info["shape"])
    return out

class Encoder(nn.Module):
    """keel::models::seg::SegEncoder: C2-C5 at strides 4-32."""
    def __init__(self, w):
        super().__init__()
        self.stem, self.stages = encoder_layers(w, norm)
    def forward(self, x):
        return run_encoder(self.stem, self.stages, x)

class Fpn(nn.Module):
    """keel_det::fcos::Fpn without a norm and without P6/P7."""
    def __init__(self, cins, out):
        super().__init__()
        for i, c in enumerate(cins):
            setattr(self, f"fpn_inner{i + 2}", nn.Conv2d(c, out, 1))
            setattr(self, f"fpn_layer{i + 2}", nn.Conv2d(out, out, 3, 1, 1))
    def forward(self, c):
        last = self.fpn_inner4(c[2])
        outs = [self.fpn_layer4(last)]
        for i in (1, 0):
            lateral = getattr(self, f"fpn_inner{i + 2}")(c[i])
            h, w = lateral.shape[-2:]
            up = F.interpolate(last, scale_factor=2, mode="nearest")[..., :h, :w]
            last = lateral + up
            outs.insert(0, getattr(self, f"fpn_layer{i + 2}")(last))
        return outs

class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
    def forward(self, x):
        return x * self.scale

class Head(nn.Module):
    """keel_det::fcos::FcosHead: GN (8 channels per group) + SiLU towers shared by the levels."""
    def __init__(self, c, classes, convs, levels):
        super().__init__()
        g = group_count(c, -(-c // 8))
        tower = lambda: nn.Sequential(*[m for _ in range(convs) for m in
                                        (nn.Conv2d(c, c, 3, 1, 1), nn.GroupNorm(g, c), nn.SiLU())])
        self.cls_tower, self.bbox_tower = tower(), tower()
        self.cls_logits = nn.Conv2d(c, classes, 3, 1, 1)
        self.bbox_pred = nn.Conv2d(c, 4, 3, 1, 1)
        self.centerness = nn.Conv2d(c, 1, 3, 1, 1)
        self.scales = nn.ModuleList([Scale() for _ in range(levels)])
    def forward(self, feats):
        cls, reg, ctr = [], [], []
        for x, s in zip(feats, self.scales):
            c, r = self.cls_tower(x), self.bbox_tower(x)
            cls.append(self.cls_logits(c)); ctr.append(self.centerness(c))
            reg.append(torch.exp(s(self.bbox_pred(r))))
        return cls, reg, ctr

class FcosNet(nn.Module):
    def __init__(self):
        super().__init__()
        w = a.width
        self.backbone = Encoder(w)
        self.fpn = Fpn((2 * w, 4 * w, 8 * w), a.fpn)
        self.head = Head(a.fpn, a.classes, a.head_convs, len(STRIDES))
    def forward(self, x):
        return self.head(self.fpn(self.backbone(x)[1:]))

def locations(h, w, s):
    ys, xs = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    return torch.stack([xs.reshape(-1) * s + s // 2, ys.reshape(-1) * s + s // 2], 1).float()

def level_targets(loc, boxes, classes, soi, radius):
    """One image at one level: labels (L,), reg targets (L, 4), as keel-det's prepare_targets."""
    if boxes.shape[0] == 0:
        return torch.zeros(loc.shape[0], dtype=torch.int64, device=dev), loc.new_zeros(loc.shape[0], 4)
    x, y = loc[:, 0:1], loc[:, 1:2]
    b = boxes[None]
    ltrb = torch.stack([x - b[..., 0], y - b[..., 1], b[..., 2] - x, b[..., 3] - y], 2)  # (L, B, 4)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    region = torch.stack([torch.maximum(cx - radius, boxes[:, 0]), torch.maximum(cy - radius, boxes[:, 1]),
                          torch.minimum(cx + radius, boxes[:, 2]), torch.minimum(cy + radius, boxes[:, 3])], 1)
    r = region[None]
    inside = torch.stack([x - r[..., 0], y - r[..., 1], r[..., 2] - x, r[..., 3] - y], 2).min(2).values > 0
    max_reg = ltrb.max(2).values
    ok = inside & (max_reg >= soi[0]) & (max_reg <= soi[1])
    area = ((boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1))[None].expand_as(max_reg)
    area = torch.where(ok, area, torch.full_like(area, INF))
    best, idx = area.min(1)  # the first box on ties, as keel (and the reference's torch.min)
    labels = torch.where(best == INF, torch.zeros_like(idx), classes[idx] + 1)
    return labels, ltrb[torch.arange(loc.shape[0], device=dev), idx]

def prepare_targets(sizes, gts):
    soi = [(-1.0 if l == 0 else a.soi_base * 2 ** (l - 1), INF if l + 1 == len(STRIDES) else a.soi_base * 2 ** l)
           for l in range(len(STRIDES))]
    labels, regs = [], []
    for l, ((h, w), s) in enumerate(zip(sizes, STRIDES)):
        loc = locations(h, w, s)
        for boxes, classes in gts:
            lab, reg = level_targets(loc, boxes, classes, soi[l], 1.5 * s)
            labels.append(lab); regs.append(reg)
    return torch.cat(labels), torch.cat(regs)

def sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction):
    """torchvision.ops.sigmoid_focal_loss (copied: the GPU machine may lack torchvision)."""
    p = torch.sigmoid(inputs)
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum() if reduction == "sum" else loss

def generalized_box_iou_loss(boxes1, boxes2, reduction, eps):
    """torchvision.ops.generalized_box_iou_loss (copied, as above)."""
    x1, y1, x2, y2 = boxes1.unbind(-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(-1)
    xk1, yk1 = torch.max(x1, x1g), torch.max(y1, y1g)
    xk2, yk2 = torch.min(x2, x2g), torch.min(y2, y2g)
    inter = torch.where((yk2 > yk1) & (xk2 > xk1), (xk2 - xk1) * (yk2 - yk1), torch.zeros_like(x1))
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    area_c = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    loss = 1 - (iou - (area_c - union) / (area_c + eps))
    return loss.sum() if reduction == "sum" else loss

def flatten(xs):
    return torch.cat([x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) for x in xs])

def fcos_loss(cls, reg, ctr, labels, reg_t):
    """keel_det::fcos::fcos_loss (single process)."""
    cls, reg, ctr = flatten(cls).float(), flatten(reg).float(), flatten(ctr).float().reshape(-1)
    one_hot = F.one_hot(labels, a.classes + 1)[:, 1:].float()
    pos = torch.nonzero(labels > 0).squeeze(1)
    norm = max(pos.numel(), 1)
    cls_loss = sigmoid_focal_loss(cls, one_hot, 0.25, 2.0, reduction="sum") / norm
    if pos.numel() == 0:
        return cls_loss + reg.sum() * 0 + ctr.sum() * 0
    rp, rt = reg[pos], reg_t[pos]
    l, t, r, b = rt.unbind(1)
    ctr_t = torch.sqrt((torch.minimum(l, r) / torch.maximum(l, r)) * (torch.minimum(t, b) / torch.maximum(t, b)))
    sign = torch.tensor([-1.0, -1.0, 1.0, 1.0], device=dev)
    giou = generalized_box_iou_loss(rp * sign, rt * sign, reduction="none", eps=1e-7)
    ctr_sum = ctr_t.sum()
    reg_loss = (giou * ctr_t).sum() / ctr_sum if ctr_sum.item() > 0 else giou.sum()
    ctr_loss = F.binary_cross_entropy_with_logits(ctr[pos], ctr_t, reduction="sum") / norm
    return cls_loss + reg_loss + ctr_loss

def no_decay_name(name):
    """keel_optim::is_no_decay_name."""
    parts = name.split(".")
    for i, s in enumerate(parts):
        s, last = s.lower(), i + 1 == len(parts)
        if last and s == "bias":
            return True
        if not last and ("norm" in s or s.startswith(("bn", "gn", "ln"))):
            return True
    return False

m = FcosNet().to(dev)
init = load_safetensors(a.init)
missing, unexpected = m.load_state_dict(init, strict=False)
missing = [k for k in missing if not k.endswith("num_batches_tracked")]
if missing or unexpected:
    raise SystemExit(f"--init {a.init}: keel's names and the twin's differ: missing {missing[:5]}, "
                     f"unexpected {unexpected[:5]}; torch_twin.py no longer mirrors det_train's FcosNet")
def no_decay(name, q):
    """keel_optim::NoDecay::Rank, det_train's rule for new runs: every rank <= 1 parameter
    (biases, norm weights, the per-level scales) and every name is_no_decay_name matches."""
    return q.ndim <= 1 or no_decay_name(name)

named = list(m.named_parameters())
opt = torch.optim.AdamW([
    {"params": [q for n, q in named if not no_decay(n, q)], "weight_decay": a.weight_decay},
    {"params": [q for n, q in named if no_decay(n, q)], "weight_decay": 0.0},
], lr=a.lr, betas=(0.9, 0.999), eps=1e-8)
batch = load_safetensors(a.batch_file)
x = batch["images"].to(dev)
boxes, owner, labels_of = batch["boxes"].to(dev), batch["box_image"], batch["box_class"].to(dev)
gts = [(boxes[owner == i], labels_of[owner == i]) for i in range(x.shape[0])]
ac = {"f16": torch.float16, "bf16": torch.bfloat16}.get(a.amp)
scaler = torch.amp.GradScaler("cuda") if a.amp == "f16" else None

def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(a.device, dtype=ac, enabled=ac is not None):
        cls, reg, ctr = m(x)
    labels, reg_t = prepare_targets([tuple(c.shape[-2:]) for c in cls], gts)
    loss = fcos_loss(cls, reg, ctr, labels, reg_t)
    if scaler:
        scaler.scale(loss).backward(); scaler.unscale_(opt)
    else:
        loss.backward()
    if a.clip > 0:
        torch.nn.utils.clip_grad_norm_(m.parameters(), a.clip)
    if scaler:
        scaler.step(opt); scaler.update()
    else:
        opt.step()
    return loss

time_and_report(a, m, step)
