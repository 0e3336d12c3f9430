"""The registry of kernel families: every :class:`sknet_triton.ops.launch.Family` that the op modules
declare, by name. Everything that loops over kernels reads it: the ahead-of-time check (perf/aot.py), the
tuner (perf/tune.py), the op table's byte floors (perf/bytes_model.py) and the launch tests. The runtime
itself never does: each launcher holds its own family."""
from __future__ import annotations

from sknet_triton.ops import batchnorm, fuse, select, split
from sknet_triton.ops.launch import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (*fuse.FAMILIES, *select.FAMILIES, *batchnorm.FAMILIES, *split.FAMILIES)}
