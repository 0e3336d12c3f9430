"""The short names of the dtypes the kernels run in, as the tuned tables, the tuner and the ahead-of-time
check write them (Triton's own names for its pointer types)."""
import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
