"""What one training-mode split attention keeps for its backward pass: timm's SplitAttn against sknet_triton's
FusedSplitAttn, measured on the tensors autograd saves, for each unit shape of ResNeSt-50.

``python perf/saved_bytes.py [--batch 8] [--image-size 224] [--out perf/results/saved_bytes.csv]``

Each unit is built as resnest50d builds it, in training mode, and run once on a random input of its shape
inside ``torch.autograd.graph.saved_tensors_hooks``; the bytes are those of the distinct storages saved,
less the input and the parameters (both ways keep them). The fused unit runs the kernels where
sknet_triton runs them (a CUDA GPU, or the CPU under ``TRITON_INTERPRET=1``); elsewhere it runs timm's
computation, and the script says so and stops.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import timm
import torch
from timm.layers import SplitAttn
from torch import nn

from sknet_triton import accelerate
from sknet_triton.device import uses_triton
from sknet_triton.layers import UnitPath


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in ``module(x)``, less x's and the parameters'."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    kept = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in module.parameters()}
    return sum(t.untyped_storage().nbytes() for ptr, t in saved.items() if ptr not in kept)


def unit_inputs(image_size: int) -> dict[str, tuple]:
    """Each SplitAttn of resnest50d by name, and the shape [C, H, W] of its input at ``image_size``."""
    shapes = {}

    def keep(name):
        def hook(module, inputs):
            shapes[name] = tuple(inputs[0].shape[1:])
        return hook

    with torch.device("meta"):
        model = timm.create_model("resnest50d").eval()
        for name, module in model.named_modules():
            if isinstance(module, SplitAttn):
                module.register_forward_pre_hook(keep(name))
        model(torch.empty(1, 3, image_size, image_size))
    return shapes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=Path("perf/results/saved_bytes.csv"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not uses_triton(device):
        print(f"saved_bytes: the kernels do not run on {device} here (set TRITON_INTERPRET=1 on a CPU)")
        return 2
    torch.manual_seed(0)
    model = timm.create_model("resnest50d").to(device).train()
    units = dict(model.named_modules())
    rows, seen = [], set()
    for name, shape in unit_inputs(args.image_size).items():
        timm_unit = units[name]
        key = (timm_unit.conv.in_channels, timm_unit.conv.stride, shape)
        if key in seen:  # one row per distinct unit shape
            continue
        seen.add(key)
        fused_unit = accelerate(copy.deepcopy(timm_unit))
        x = torch.randn(args.batch, *shape, device=device, requires_grad=True)
        if fused_unit.unit_path(x) is not UnitPath.BATCH_STATISTICS:
            raise RuntimeError(f"saved_bytes: {name} would not run BatchNorm in the kernels")
        timm_bytes, fused_bytes = saved_bytes(timm_unit, x), saved_bytes(fused_unit, x)
        rows.append({"unit": name, "input": "×".join(map(str, x.shape)), "radix": timm_unit.radix,
                     "timm MB": timm_bytes / 1e6, "sknet_triton MB": fused_bytes / 1e6,
                     "sknet_triton / timm": fused_bytes / timm_bytes})
        print(f"{name} {tuple(x.shape)}: timm {timm_bytes / 1e6:.2f} MB, sknet_triton {fused_bytes / 1e6:.2f} MB "
              f"({fused_bytes / timm_bytes:.2f}×)")
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
