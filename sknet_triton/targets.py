"""The GPU architectures the kernels are built for, and each one's limits: one table, read by the launcher's
planning (warp size, threads per block, the register budget option) and by the ahead-of-time check
(perf/aot.py: Triton's target, shared memory per block).

A target is named as its tuned table is (``sm_<major><minor>`` for NVIDIA, the LLVM processor ``gfx942`` for
AMD). An architecture missing from the table still runs: :func:`target` derives its vendor and warp size from
its name and gives it the smallest shared memory of its vendor's chips here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

__all__ = ["Target", "TARGETS", "target", "parse_arch", "MAX_THREADS", "CONFIG_WARP_SIZE"]

# Threads per block (workgroup) on every chip here, NVIDIA and AMD alike.
MAX_THREADS = 1024
# A configuration's num_warps counts warps of 32 threads on every chip, so that it means the same block, and
# each thread the same share of a tile, everywhere: a wave64 chip launches half as many wavefronts. (At the
# defaults' 8 wavefronts of 64, a workgroup's 512 threads leave each at most 256 VGPRs, and the split
# kernel's widest tl.dot tiles spilled on gfx90a and gfx942; at 4 they fit.)
CONFIG_WARP_SIZE = 32


@dataclass(frozen=True)
class Target:
    """One GPU architecture as Triton compiles for it, with the limits a launch must respect."""

    name: str  # the tuned table's name: sm_90, gfx942
    backend: str  # Triton's backend: "cuda" (NVIDIA) or "hip" (AMD)
    arch: Union[int, str]  # Triton's GPUTarget arch: the compute capability 90, or "gfx942"
    warp_size: int  # threads per warp (NVIDIA) or wavefront (AMD)
    shared_bytes: int  # shared memory (LDS) one block (workgroup) may use, opt-in maximum

    @property
    def takes_register_budget(self) -> bool:
        """Whether Triton takes a register budget (``maxnreg``) for this backend: ptxas's option, NVIDIA only."""
        return self.backend == "cuda"

    @property
    def max_warps(self) -> int:
        """The most warps (wavefronts) one block may have."""
        return MAX_THREADS // self.warp_size

    def launch_options(self, options: dict) -> dict:
        """A configuration's Triton launch options (num_warps of CONFIG_WARP_SIZE threads, num_stages,
        maxnreg) as this chip takes them: the same threads in warps (wavefronts) of its own size, at most
        :attr:`max_warps`, and the register budget only where the backend has one."""
        warps = max(1, options["num_warps"] * CONFIG_WARP_SIZE // self.warp_size)
        valid = dict(options, num_warps=min(warps, self.max_warps))
        if not self.takes_register_budget:
            valid.pop("maxnreg", None)
        return valid


TARGETS = {t.name: t for t in (
    Target("sm_80", "cuda", 80, 32, 166912),  # A100
    Target("sm_86", "cuda", 86, 32, 101376),  # RTX 3090, A40
    Target("sm_89", "cuda", 89, 32, 101376),  # RTX 4090, L40S
    Target("sm_90", "cuda", 90, 32, 232448),  # H100, H200
    Target("sm_100", "cuda", 100, 32, 232448),  # B200
    Target("sm_120", "cuda", 120, 32, 101376),  # RTX 5090, RTX Pro 6000
    Target("gfx90a", "hip", "gfx90a", 64, 65536),  # MI250, MI210
    Target("gfx942", "hip", "gfx942", 64, 65536),  # MI300X, MI325X
)}


def target(name: str) -> Target:
    """The target named ``name`` (``sm_<cc>`` or ``gfx<id>``): the table's, or for an architecture it lacks,
    its vendor's warp size (AMD: 64 on gfx9's CDNA/GCN chips, 32 on RDNA's gfx10 and later, as Triton
    compiles them) and the smallest shared memory of that vendor's chips in the table."""
    if name in TARGETS:
        return TARGETS[name]
    if name.startswith("sm_") and name[3:].isdigit():
        backend, arch, warp_size = "cuda", int(name[3:]), 32
    elif name.startswith("gfx"):
        backend, arch, warp_size = "hip", name, 64 if len(name) == 6 and name.startswith("gfx9") else 32
    else:
        raise ValueError(f"no GPU architecture {name!r}: sm_<compute capability> or gfx<id>")
    shared = min(t.shared_bytes for t in TARGETS.values() if t.backend == backend)
    return Target(name, backend, arch, warp_size, shared)


def parse_arch(text: str) -> Target:
    """A target from a command line: a compute capability (``90``), ``sm_90`` or an AMD target (``gfx942``)."""
    return target(f"sm_{text}" if text.isdigit() else text)
