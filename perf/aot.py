"""Ahead-of-time compilation of every kernel specialization for NVIDIA and AMD GPUs, on a machine without one.

``python perf/aot.py`` compiles each specialization :func:`specializations` lists (every kernel family's
launches, with every configuration, tile shape and flag the launcher can choose) with Triton's own compiler
for each architecture of ``--arch`` (compute capabilities such as ``80 90 120`` and AMD targets such as
``gfx942``; their limits are :mod:`sknet_triton.targets`'), sm_80 and sm_90 by default (``--family``,
``--sample`` and ``--representatives`` choose fewer; the test suite compiles the sample for sm_80 and sm_90
and the representatives for every other target, CI the whole sweep). For NVIDIA it reads the registers and
spills of Triton's ptxas run and the widest global load in the PTX; for AMD, the code object's VGPR and
SGPR counts, spills and scratch from its metadata and the widest global or buffer load in the AMDGCN
assembly (Triton builds the code object with its own LLVM and linker: no ROCm needed). It writes that table
with each kernel's shared memory (LDS) to ``--out`` (CSV), prints a summary, and exits with status 1 if
registers spill to memory (SGPRs spilled into VGPR lanes are listed only), a kernel needs more shared
memory than its chip allows a block, or a kernel that streams dense tiles loads in narrower vectors than
its tile allows (16 bytes, or each thread's whole share of a tile where that is less, with the chip's warp
or wavefront size; the split convolution's taps start at offsets no alignment analysis can prove, so it
is held to no width). It needs the real ``@triton.jit``
functions, so it refuses to run under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import functools
import io
import itertools
import os
import re
import subprocess
import sys
import tempfile
import dataclasses
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from sknet_triton.dtypes import DTYPE_NAMES
from perf.examples import EXAMPLES, Problem, problem_inputs
from perf.recording import recording
from sknet_triton.families import FAMILIES
from sknet_triton.ops.launch import BRANCH_COUNTS
from sknet_triton.targets import TARGETS, Target, parse_arch

DEFAULT_ARCHS = ("sm_80", "sm_90")  # the whole sweep's default, and the targets of the test suite's sample
DEFAULT_OUT = Path("perf/aot_report.csv")
# The widest load a thread can issue: a streaming kernel should load each thread's share of a tile in
# vectors this wide, or as wide as that share (the signature below declares 16-divisible arguments).
VECTOR_BYTES = 16
# ld.global[.nc][.v2|.v4].<type><bits>: the vector width and element bits of one global load.
_GLOBAL_LOAD = re.compile(r"ld\.global[\w.:]*?(?:\.v(\d))?\.[bfsu](\d+)\s")
# AMDGCN's vector-memory loads, global_load_<width> or buffer_load_<width> (gfx9's dwordx4, ushort, ...; the
# b128, u16, ... of later ISAs), and the bytes of each width.
_AMD_LOAD = re.compile(r"^\s*(?:global|buffer)_load_(\w+)", re.MULTILINE)
_AMD_LOAD_BYTES = {"dwordx4": 16, "dwordx3": 12, "dwordx2": 8, "dword": 4, "ushort": 2, "sshort": 2, "short_d16": 2,
                   "short_d16_hi": 2, "ubyte": 1, "sbyte": 1, "ubyte_d16": 1, "ubyte_d16_hi": 1, "sbyte_d16": 1,
                   "sbyte_d16_hi": 1, "b128": 16, "b96": 12, "b64": 8, "b32": 4, "u16": 2, "i16": 2, "d16_b16": 2,
                   "d16_hi_b16": 2, "u8": 1, "i8": 1}
# One SASS instruction in nvdisasm's listing: /*0a30*/ followed by the instruction.
_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+[A-Z@]", re.MULTILINE)
# One AMDGCN instruction: an indented mnemonic (directives start with '.', labels end with ':').
_AMD_INSTRUCTION = re.compile(r"^\s+(?!\.)[a-z_][a-z0-9_]*(?:\s|$)(?!.*:\s*$)", re.MULTILINE)
# The code object's metadata: ``.<name>: <count>`` for VGPRs, SGPRs, their spills and the scratch per thread.
_AMD_USAGE = ("vgpr_count", "sgpr_count", "vgpr_spill_count", "sgpr_spill_count", "private_segment_fixed_size")
_AMD_METADATA = re.compile(rf"\.({'|'.join(_AMD_USAGE)}):\s+(\d+)")


@dataclass(frozen=True)
class Resources:
    """What one specialization uses on one architecture."""

    kernel: str
    arch: str  # the target's name: sm_90, gfx942
    registers: int  # per thread: ptxas's registers (NVIDIA), the VGPRs (AMD)
    scalar_registers: int  # SGPRs per wavefront (AMD; 0 on NVIDIA)
    spill_stores: int  # bytes ptxas spills to local memory (NVIDIA)
    spill_loads: int  # bytes ptxas reloads from it (NVIDIA)
    vgpr_spills: int  # VGPRs spilled (AMD): to scratch memory
    # SGPRs spilled (AMD): into VGPR lanes, no memory traffic unless scratch_bytes says so; listed, not failed
    sgpr_spills: int
    scratch_bytes: int  # scratch (private segment) per thread (AMD)
    shared_bytes: int
    shared_limit: int  # shared memory (LDS) the chip allows one block (workgroup)
    widest_load_bytes: int
    vector_bytes: int  # what the widest load should be: each thread's share of one tile, at most 16 (0: no rule)
    instructions: int = 0  # machine instructions of the kernel: SASS (NVIDIA), AMDGCN (AMD); 0: not counted

    @property
    def spills(self) -> bool:
        """Whether registers spill to memory."""
        return self.spill_stores > 0 or self.spill_loads > 0 or self.vgpr_spills > 0 or self.scratch_bytes > 0

    @property
    def over_shared(self) -> bool:
        return self.shared_bytes > self.shared_limit

    @property
    def narrow_loads(self) -> bool:
        return self.widest_load_bytes < self.vector_bytes


@dataclass(frozen=True)
class Specialization:
    """One compiled variant of a kernel: a recorded launch's arguments with one set of constexprs and options."""

    family: str
    args: tuple
    constexprs: dict
    options: dict

    @property
    def kernel(self):
        return FAMILIES[self.family].kernel

    @property
    def name(self) -> str:
        flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items())
        options = ",".join(f"{k}={v}" for k, v in self.options.items())
        dtype = DTYPE_NAMES[self.args[0].dtype]
        return f"{self.kernel.__name__}[{dtype},{flags},{options}]"


def example_launches(family: str, dtype: torch.dtype, M: int) -> list:
    """``family``'s launches (recorded, not run) of every call its entry lists, on a small CPU problem of M
    branches of ``dtype``: the argument types and flags (a prologue's AFFINE, ...) each launch passes."""
    inputs = problem_inputs(family, Problem(2, 32, 4, 4, M, dtype, False), torch.device("cpu"), seed=0)
    with recording() as launches:
        for call in EXAMPLES[family].calls(inputs):
            call()
    return [recorded for recorded in launches if recorded.family == family]


def specializations(dtypes=tuple(DTYPE_NAMES)) -> Iterator[Specialization]:
    """Every kernel specialization the launchers can launch, once each: each example launch's arguments
    (and so its AFFINE flag) with every reachable configuration and every constexpr variant (tile shape,
    layout, flags) its family's launcher can choose. (The split kernel takes M as an argument: its
    launches for different M are one specialization.)"""
    from sknet_triton.planning import reachable_configs

    seen = set()
    for family, dtype, M in itertools.product(FAMILIES.values(), dtypes, BRANCH_COUNTS):
        for recorded in example_launches(family.name, dtype, M):
            for config in sorted(reachable_configs(family, M), key=repr):
                options = config.options()
                for variant in family.constexpr_variants(config, dtype):
                    spec = Specialization(family.name, recorded.args, dict(recorded.constexprs, **variant), options)
                    if spec.name not in seen:
                        seen.add(spec.name)
                        yield spec


def vector_bytes(spec, warp_size: int) -> int:
    """The widest load a specialization's tile allows with ``warp_size`` threads per warp (wavefront): each
    thread's contiguous share of one streamed [BLOCK_C, BLOCK_HW] tile, at most VECTOR_BYTES; 0 for a family
    that streams no dense tiles."""
    if not FAMILIES[spec.family].streaming:
        return 0
    tile_bytes = spec.constexprs["BLOCK_C"] * spec.constexprs["BLOCK_HW"] * spec.args[0].element_size()
    return min(VECTOR_BYTES, tile_bytes // (warp_size * spec.options["num_warps"]))


def _argument_type(value) -> str:
    """Triton's signature type of one launch argument, read from the recorded value."""
    if isinstance(value, torch.Tensor):
        return "*" + DTYPE_NAMES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument of type {type(value).__name__}")


def signature(spec) -> tuple[dict, dict]:
    """Triton signature and divisibility attributes of a specialization, from its recorded arguments.

    Every pointer and integer is taken as 16-divisible (the aligned case the launchers produce for the
    SKNet shapes).
    """
    names = [name for name in spec.kernel.arg_names if name not in spec.constexprs]
    if len(names) != len(spec.args):
        raise ValueError(f"{spec.name}: {len(spec.args)} recorded arguments for {len(names)} parameters")
    types = dict(zip(names, map(_argument_type, spec.args)))
    signature, attrs = {}, {}
    for index, name in enumerate(spec.kernel.arg_names):
        if name in spec.constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = types[name]
        if types[name].startswith("*") or types[name] == "i32":
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _ptxas_usage(log: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from a ``ptxas -v`` log."""
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return registers, stores, loads


def widest_global_load(ptx: str) -> int:
    """Bytes of the widest global-memory load in a PTX listing (0 if it has none)."""
    return max((int(v or 1) * int(bits) // 8 for v, bits in _GLOBAL_LOAD.findall(ptx)), default=0)


def widest_amd_load(amdgcn: str) -> int:
    """Bytes of the widest global or buffer load in an AMDGCN listing (0 if it has none)."""
    return max((_AMD_LOAD_BYTES[width] for width in _AMD_LOAD.findall(amdgcn)), default=0)


def amd_usage(amdgcn: str) -> dict:
    """VGPRs, SGPRs, VGPRs and SGPRs spilled, and scratch bytes per thread, from the code object metadata
    an AMDGCN listing ends with (one kernel)."""
    usage = {name: int(count) for name, count in _AMD_METADATA.findall(amdgcn)}
    missing = set(_AMD_USAGE) - set(usage)
    if missing:
        raise ValueError(f"the AMDGCN listing's metadata lacks {', '.join(sorted(missing))}")
    return usage


def sass_instructions(cubin: bytes) -> int:
    """The SASS instructions of a cubin, as the nvdisasm Triton ships disassembles it (one line per
    instruction, each starting with its address comment)."""
    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        listing = subprocess.run([str(nvdisasm), f.name], capture_output=True, text=True, check=True).stdout
    return len(_SASS_INSTRUCTION.findall(listing))


def amdgcn_instructions(amdgcn: str) -> int:
    """The instructions of an AMDGCN listing: its lines that are neither directives, labels nor comments."""
    return len(_AMD_INSTRUCTION.findall(amdgcn))


def in_sample(spec) -> bool:
    """Whether a specialization is in the test suite's sample (tests/test_aot.py): SKNet's M = 2 in bfloat16,
    the models' training dtype, in every family, configuration, tile shape and flag (the split kernel, whose
    M is no constexpr: bfloat16). The other dtypes and M compile in the full sweep, which CI runs too."""
    return spec.args[0].dtype == torch.bfloat16 and spec.constexprs.get("M", 2) == 2


@functools.cache
def all_specializations() -> tuple:
    """:func:`specializations`, listed once per process (listing them takes longer than a tenth of a
    compilation)."""
    return tuple(specializations())


def launched(spec: Specialization, chip: Target) -> Specialization:
    """``spec`` with the launch options ``chip`` takes for its configuration's (see
    :meth:`sknet_triton.targets.Target.launch_options`): what the launcher starts there."""
    return dataclasses.replace(spec, options=chip.launch_options(spec.options))


def compile_specialization(index: int, arch: str) -> Resources:
    """Compile specialization ``index`` of :func:`all_specializations` for the target named ``arch``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # Triton's own ptxas run (with Triton's flags) prints its -v report when asked; the cache would skip it.
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    chip = parse_arch(arch)
    spec = launched(all_specializations()[index], chip)
    types, attrs = signature(spec)
    source = ASTSource(fn=spec.kernel, signature=types, constexprs=spec.constexprs, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=GPUTarget(chip.backend, chip.arch, chip.warp_size),
                                  options=spec.options)
    if chip.backend == "cuda":
        registers, stores, loads = _ptxas_usage(log.getvalue())
        amd = dict(scalar_registers=0, vgpr_spills=0, sgpr_spills=0, scratch_bytes=0)
        widest = widest_global_load(compiled.asm["ptx"])
        instructions = sass_instructions(compiled.asm["cubin"])
    else:
        usage = amd_usage(compiled.asm["amdgcn"])
        registers, stores, loads = usage["vgpr_count"], 0, 0
        amd = dict(scalar_registers=usage["sgpr_count"], vgpr_spills=usage["vgpr_spill_count"],
                   sgpr_spills=usage["sgpr_spill_count"], scratch_bytes=usage["private_segment_fixed_size"])
        widest = widest_amd_load(compiled.asm["amdgcn"])
        instructions = amdgcn_instructions(compiled.asm["amdgcn"])
    return Resources(spec.name, chip.name, registers, spill_stores=stores, spill_loads=loads, **amd,
                     shared_bytes=compiled.metadata.shared, shared_limit=chip.shared_bytes,
                     widest_load_bytes=widest, vector_bytes=vector_bytes(spec, chip.warp_size),
                     instructions=instructions)


def selected(families=None, sample: bool = False, representatives: bool = False) -> list[int]:
    """Indices in :func:`all_specializations` of the kernel families named (all of them by default): only
    those :func:`in_sample` with ``sample``; with ``representatives``, each family's first one in the sample
    (its default configuration, first tile shape and flags: a compile check of every family on a target at
    a fraction of the sample's time)."""
    indices = [index for index, spec in enumerate(all_specializations())
               if (families is None or spec.family in families)
               and (not (sample or representatives) or in_sample(spec))]
    if representatives:
        first = {}
        for index in indices:
            first.setdefault(all_specializations()[index].family, index)
        return sorted(first.values())
    return indices


def compile_all(archs=DEFAULT_ARCHS, families=None, jobs: int = 1, progress=None, sample: bool = False,
                representatives: bool = False) -> list[Resources]:
    """Compile every specialization of ``families`` (all by default; with ``sample`` or ``representatives``,
    those :func:`selected` names) for every target named in ``archs``, ``jobs`` processes at a time (one:
    in this process, with no pool to start)."""
    work = [(index, arch) for arch in archs for index in selected(families, sample, representatives)]
    with contextlib.ExitStack() as stack:
        apply = stack.enter_context(concurrent.futures.ProcessPoolExecutor(max_workers=jobs)).map if jobs > 1 else map
        results = []
        for result in apply(compile_specialization, *zip(*work)):
            results.append(result)
            if progress is not None:
                progress.update()
    return results


def write_table(results: list[Resources], path: Path) -> None:
    """Write ``results`` as CSV, one row per compilation, to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(Resources)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)


def read_table(path: Path) -> list[Resources]:
    """The results a :func:`write_table` file holds (a table written before the instructions column has
    them as 0, not counted)."""
    with Path(path).open(newline="") as f:
        return [Resources(row.pop("kernel"), row.pop("arch"), **{key: int(value) for key, value in row.items()})
                for row in csv.DictReader(f)]


def problems(results: list[Resources]) -> list[str]:
    """One line per specialization that spills to memory (NVIDIA's local memory, AMD's scratch), needs more
    shared memory than its chip allows or loads in narrower vectors than its tile allows."""
    lines = []
    for r in results:
        if r.spill_stores or r.spill_loads:
            lines.append(f"{r.arch} {r.kernel}: spills {r.spill_stores} B stored, {r.spill_loads} B loaded")
        if r.vgpr_spills or r.scratch_bytes:
            lines.append(f"{r.arch} {r.kernel}: spills {r.vgpr_spills} VGPRs, "
                         f"{r.scratch_bytes} B scratch per thread")
        if r.over_shared:
            lines.append(f"{r.arch} {r.kernel}: {r.shared_bytes} B of shared memory, "
                         f"the chip allows {r.shared_limit} B")
        if r.narrow_loads:
            lines.append(f"{r.arch} {r.kernel}: widest global load {r.widest_load_bytes} B, "
                         f"its tile allows {r.vector_bytes} B")
    return lines


def summary(results: list[Resources]) -> str:
    """One line: how many compilations for which architectures, the most registers, how many failed."""
    archs = ", ".join(sorted({r.arch for r in results}, key=lambda name: (name[:2], len(name), name)))
    return (f"{len(results)} compilations for {archs}: max {max(r.registers for r in results)} registers, "
            f"{sum(r.spills for r in results)} with spills, "
            f"{sum(r.over_shared for r in results)} over their chip's shared memory, "
            f"{sum(r.narrow_loads for r in results)} with loads narrower than their tile allows")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS),
                        help="NVIDIA compute capabilities (80 90 ...) and AMD targets (gfx942 ...); "
                             f"known: {' '.join(TARGETS)} (default: {' '.join(DEFAULT_ARCHS)})")
    parser.add_argument("--family", nargs="+", help="only these kernel families (default: all)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--sample", action="store_true",
                       help="only the test suite's sample: M = 2 in bfloat16 (default: every specialization)")
    scope.add_argument("--representatives", action="store_true",
                       help="only each family's first specialization of the sample")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compiler processes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the CSV table (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    import triton
    from tqdm import tqdm

    from sknet_triton.device import INTERPRETED

    if INTERPRETED:
        parser.error("the kernels are interpreted here (TRITON_INTERPRET is set); run without it")
    assert isinstance(FAMILIES["fuse_fwd"].kernel, triton.runtime.JITFunction)
    unknown = set(args.family or ()) - set(FAMILIES)
    if unknown:
        parser.error(f"no kernel family {', '.join(sorted(unknown))} (families: {', '.join(FAMILIES)})")
    try:
        archs = [parse_arch(arch).name for arch in args.arch]
    except ValueError as error:
        parser.error(str(error))
    total = len(selected(args.family, args.sample, args.representatives)) * len(archs)
    with tqdm(total=total, desc="compiling", file=sys.stderr, mininterval=15) as bar:
        results = compile_all(archs, args.family, args.jobs, bar, args.sample, args.representatives)
    write_table(results, args.out)
    found = problems(results)
    print("\n".join(found[:50]))
    print(f"{summary(results)}; table in {args.out}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
