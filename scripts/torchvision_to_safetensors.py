#!/usr/bin/env python3
"""Convert a torchvision ResNet to a safetensors state dict that keel loads unchanged.

    python3 scripts/torchvision_to_safetensors.py resnet18 r18.safetensors \\
        --weights ~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth

keel never downloads anything, and neither does this script: --weights names a state dict
already on disk (a `torch.save` file: the .pth torchvision downloads into
~/.cache/torch/hub/checkpoints/, or one you trained). Without --weights the model keeps
torchvision's random initialisation (seeded by --seed): a file to test the pipeline with.

The weights are loaded into `torchvision.models.<name>()` with strict=True, so a file of
another architecture fails here, naming the missing and unexpected keys. The output holds
every tensor of the state dict under torchvision's names (`conv1.weight`, `bn1.*`,
`layer1.0.conv1.weight`, ..., `fc.weight`, `fc.bias`) except `num_batches_tracked`, in
float32 (or --dtype). In Rust, `keel_models::resnet::ResNet::from_state_dict` loads it with
BatchNorm kept, turned into FrozenBatchNorm (keys kept) or into GroupNorm (statistics
dropped), per the model's norm.
"""

import argparse
import os
import sys

NAMES = ["resnet18", "resnet34", "resnet50", "resnet101"]
DTYPES = ["float32", "float16", "bfloat16"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=NAMES, help="torchvision model name")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--weights", help="a state dict on disk (.pth / .pt, torch.save format)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init without --weights")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the tensors written")
    p.add_argument("--num-classes", type=int, default=None,
                   help="fc classes of the checkpoint (default: taken from --weights, else 1000)")
    return p.parse_args(argv)


def load_weights(path):
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any load failure is reported the same way
        sys.exit(f"error: cannot read --weights {path} as a torch.save state dict: {e}")
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]  # a training checkpoint that wraps the model's state dict
    if not isinstance(sd, dict):
        sys.exit(f"error: --weights {path} holds a {type(sd).__name__}, not a state dict")
    prefixes = {"module.", "model.", "backbone."}
    for p in prefixes:
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items()}
            print(f"stripped the prefix '{p}' from every key")
    return sd


def main(argv=None):
    args = parse_args(argv)
    if os.path.isdir(args.out):
        sys.exit(f"error: OUT {args.out} is a directory; name a file such as {args.model}.safetensors")
    if args.weights and os.path.abspath(args.weights) == os.path.abspath(args.out):
        sys.exit("error: OUT is the --weights file; writing it would destroy the input")
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    sd = load_weights(args.weights) if args.weights else None
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = sd["fc.weight"].shape[0] if sd is not None and "fc.weight" in sd else 1000
    model = getattr(torchvision.models, args.model)(weights=None, num_classes=num_classes)
    if sd is not None:
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            sys.exit(f"error: --weights {args.weights} is not a torchvision {args.model}: {e}")
    dtype = getattr(torch, args.dtype)
    out = {}
    dropped = 0
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            dropped += 1
            continue
        out[k] = v.detach().to(dtype).contiguous()
    tmp = args.out + ".tmp"
    save_file(out, tmp, metadata={"source": f"torchvision.models.{args.model}",
                                  "weights": os.path.basename(args.weights) if args.weights else f"random init, seed {args.seed}"})
    os.replace(tmp, args.out)
    n = sum(v.numel() for v in out.values())
    print(f"wrote {args.out}: {len(out)} tensors ({n} values, {args.dtype}) of {args.model}, "
          f"{dropped} num_batches_tracked dropped, fc {num_classes} classes")


if __name__ == "__main__":
    main()
