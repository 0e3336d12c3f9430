"""What every kernel promises the launcher: its arguments in the order kernels/tile.py documents, and
64-bit arithmetic for everything that grows with the batch (the batch may be any size; only one image is
held under 2**31 elements)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sknet_triton.families import FAMILIES
from sknet_triton.kernels import tile

ROOT = Path(__file__).resolve().parents[1]
# The split kernel reads one image x, not branches: its arguments follow kernels/split.py alone.
NOT_OVER_BRANCHES = {"split_fwd"}


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - NOT_OVER_BRANCHES))
def test_kernel_arguments_follow_the_convention(family):
    names = list(FAMILIES[family].kernel.arg_names)
    assert tuple(names[:len(tile.BRANCH_ARGS)]) == tile.BRANCH_ARGS
    rest = names[len(tile.BRANCH_ARGS):]
    prologue = "AFFINE" in names
    if prologue:
        assert tuple(rest[:len(tile.PROLOGUE_ARGS)]) == tile.PROLOGUE_ARGS
        rest = rest[len(tile.PROLOGUE_ARGS):]
    else:
        assert not set(tile.PROLOGUE_ARGS) & set(names), "prologue pointers without the AFFINE flag"
    # The kernel's own arguments, then the shared trailing ones, the shared constexprs and its own flags.
    shape_at = next(i for i in range(len(rest)) if tuple(rest[i:i + len(tile.SHAPE_ARGS)]) == tile.SHAPE_ARGS)
    constexprs = tuple(name for name in tile.CONSTEXPR_ARGS if prologue or name != "AFFINE")
    trailing = rest[shape_at + len(tile.SHAPE_ARGS):]
    assert tuple(trailing[:len(constexprs)]) == constexprs
    assert tuple(trailing[len(constexprs):]) == FAMILIES[family].flags
    assert not set(rest[:shape_at]) & set(tile.SHAPE_ARGS + tile.CONSTEXPR_ARGS + tile.BRANCH_ARGS)


def test_the_convention_names_a_kernel_with_and_without_a_prologue():
    """Both forms the convention allows are in use, so that the test above checks each."""
    with_prologue = {name for name, f in FAMILIES.items() if "AFFINE" in f.kernel.arg_names}
    assert with_prologue and set(FAMILIES) - NOT_OVER_BRANCHES - with_prologue == {"bn_stats"}


BATCH_INDEX_SCRIPT = textwrap.dedent('''
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from perf import aot

    unwidened = {}
    for family in sys.argv[1:]:
        spec = next(s for s in aot.all_specializations() if s.family == family and aot.in_sample(s))
        types, attrs = aot.signature(spec)
        source = ASTSource(fn=spec.kernel, signature=types, constexprs=spec.constexprs, attrs=attrs)
        ttir = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=spec.options).asm["ttir"]
        # The image index and the program count along the batch axis (x): every use must widen them.
        values = re.findall(r"(%[\\w.]+) = tt\\.get_(?:program_id|num_programs) x\\b", ttir)
        uses = [line.strip() for value in values for line in ttir.splitlines()
                if re.search(re.escape(value) + r"(?![\\w.])", line) and not line.strip().startswith(value + " =")]
        unwidened[family] = [use for use in uses if not re.search(r"= arith\\.extsi %", use)]
        unwidened[family + " uses"] = len(uses)
    print(json.dumps(unwidened))
''')


def test_batch_indices_enter_arithmetic_only_as_64_bit():
    """Offsets that grow with the batch (b * batch stride, B * splits * C partial rows, B * M * C sums rows)
    wrap in 32 bits for batches of about 2**31 / (M * C) images: the kernels' TTIR must widen the image
    index and the batch's program count before any arithmetic. Compiled without a GPU by Triton itself,
    in a subprocess without TRITON_INTERPRET."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", BATCH_INDEX_SCRIPT, *FAMILIES], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for family in FAMILIES:
        assert found[family + " uses"] > 0, f"{family}: no batch index found in its TTIR"
        assert found[family] == [], f"{family}: 32-bit arithmetic on the batch index: {found[family]}"
