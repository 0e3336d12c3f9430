"""Benchmarks of sknet_triton: whole networks against timm (run.py) and the fused ops against the bytes floor (ops.py)."""
