"""Ahead-of-time compilation of every kernel specialization for NVIDIA GPUs, on a machine without one.

``python -m sknet_triton.aot`` compiles each specialization :func:`sknet_triton.launch.specializations`
lists with Triton's own compiler for sm_80 and sm_90 and prints the registers, spills and shared memory
that Triton's ptxas run reports for each. It exits with status 1 if anything spills.
This catches GPU-only compile errors and register pressure in CI. It needs the real ``@triton.jit``
functions, so it refuses to run under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import os
import re
import sys
from dataclasses import dataclass

import torch

DEFAULT_ARCHS = (80, 90)
# The pointer arguments whose element type is the data's; every other pointer is float32 workspace.
_DATA_POINTERS = re.compile(r"^(d?u\d|dv|out|d?logits)_ptr$")
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Resources:
    """What one specialization uses on one architecture."""

    kernel: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def _signature(spec) -> tuple[dict, dict]:
    """Triton signature and divisibility attributes of a specialization's arguments.

    Every pointer and integer is taken as 16-divisible (the aligned case the launchers produce for
    the SKNet shapes); integers are 32-bit.
    """
    signature, attrs = {}, {}
    for index, name in enumerate(spec.kernel.arg_names):
        if name in spec.constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            element = _TRITON_DTYPES[spec.dtype] if _DATA_POINTERS.match(name) else "fp32"
            signature[name] = "*" + element
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name == "inv_hw":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _ptxas_usage(log: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from a ``ptxas -v`` log."""
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return registers, stores, loads


def compile_specialization(index: int, arch: int) -> Resources:
    """Compile specialization ``index`` of :func:`launch.specializations` for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sknet_triton import launch

    # Triton's own ptxas run (with Triton's flags) prints its -v report when asked; the cache would skip it.
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    spec = list(launch.specializations())[index]
    signature, attrs = _signature(spec)
    source = ASTSource(fn=spec.kernel, signature=signature, constexprs=spec.constexprs, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})
    registers, stores, loads = _ptxas_usage(log.getvalue())
    return Resources(spec.name, arch, registers, stores, loads, compiled.metadata.shared)


def compile_all(archs=DEFAULT_ARCHS, jobs: int = 1, progress=None) -> list[Resources]:
    """Compile every specialization for every architecture, ``jobs`` processes at a time."""
    from sknet_triton import launch

    count = len(list(launch.specializations()))
    work = [(index, arch) for arch in archs for index in range(count)]
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(compile_specialization, index, arch) for index, arch in work]
        results = []
        for future in futures:
            results.append(future.result())
            if progress is not None:
                progress.update()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="compute capabilities")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compiler processes")
    args = parser.parse_args(argv)

    import pandas as pd
    import triton
    from tqdm import tqdm

    from sknet_triton import kernels, launch

    if not isinstance(kernels.sk_fuse_fwd_kernel, triton.runtime.JITFunction):
        parser.error("the kernels are interpreted here (TRITON_INTERPRET is set); run without it")
    total = len(list(launch.specializations())) * len(args.arch)
    with tqdm(total=total, desc="compiling", file=sys.stderr) as bar:
        results = compile_all(args.arch, args.jobs, bar)
    table = pd.DataFrame([r.__dict__ for r in results])
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 120):
        print(table.to_string(index=False))
    spilled = table[(table.spill_stores > 0) | (table.spill_loads > 0)]
    print(f"\n{len(table)} compilations, max {table.registers.max()} registers, {len(spilled)} with spills")
    return 1 if len(spilled) else 0


if __name__ == "__main__":
    sys.exit(main())
