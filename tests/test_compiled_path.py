"""On CUDA the ops are triton_ops: torch.compile traces their launchers and emits the kernels itself.

That path never runs on this machine, but it traces here: fake CUDA tensors (no GPU needed) go through
AOTAutograd in a subprocess without TRITON_INTERPRET, where the kernels are the real @triton.jit functions.
The tests check that each op becomes one kernel launch in the graph, that every result the graph returns
is the tensor the kernel writes (s, out, the branch gradients, dlogits), not a stand-in, and that the
launch options Inductor compiles with include the register cap where a configuration has one.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent('''
    import json, torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._functorch.aot_autograd import aot_function
    from functorch.compile import make_boxed_func
    from sknet_triton import device, ops, planning, tuned

    assert not device.INTERPRETED
    # No GPU here to ask: an H100's capability and SM count.
    tuned.arch_name = lambda device: "sm_90"
    planning.min_programs = lambda device, config: 132 * config.programs_per_sm

    def sk_ops(u0, u1, logits, grad_out, grad_s, scale, bias):
        s = ops.sk_fuse([u0, u1], scale, bias, True)
        out = ops.sk_select([u0, u1], logits, scale, bias, True)
        fuse_grads = torch.ops.sknet_triton.sk_fuse_relu_backward(grad_s, [u0, u1], scale, bias)
        select_grads = torch.ops.sknet_triton.sk_select_backward(grad_out, [u0, u1], logits, scale, bias, True)
        return s, out, *fuse_grads, *select_grads

    graphs = []
    def keep(gm, inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    with FakeTensorMode():
        def cuda(*shape, fmt=torch.channels_last):
            t = torch.empty(*shape, device="cuda")
            return t.contiguous(memory_format=fmt) if t.dim() == 4 else t
        u0, u1, grad_out = cuda(4, 64, 14, 14), cuda(4, 64, 14, 14), cuda(4, 64, 14, 14)
        args = (u0, u1, cuda(4, 2, 64), grad_out, cuda(4, 64), cuda(2, 64), cuda(2, 64))
        aot_function(sk_ops, fw_compiler=keep)(*args)

    [gm] = graphs
    launches = [n for n in gm.graph.nodes if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target)]
    def source(node):
        """Which kernel argument an output is (through getitem of a launch), or the node's own name."""
        if node.target is __import__("operator").getitem and node.args[0] in launches:
            return node.args[1]
        return str(node.target)
    [output] = [n for n in gm.graph.nodes if n.op == "output"]
    results = list(output.args[0])[-7:]  # after any inputs the graph writes back
    print(json.dumps({"launches": len(launches), "sources": [source(n) for n in results],
                      "other_ops": sorted({str(n.target) for n in gm.graph.nodes
                                           if n.op == "call_function" and n not in launches})}))
''')


def test_ops_trace_to_kernel_launches_that_write_what_they_return():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    traced = json.loads(result.stdout.strip().splitlines()[-1])
    assert traced["launches"] == 4, traced
    assert traced["sources"] == ["s_ptr", "out_ptr", "du0_ptr", "du1_ptr", "du0_ptr", "du1_ptr", "dlogits_ptr"], traced
    assert not any("sknet_triton" in op for op in traced["other_ops"]), "an op stayed opaque"


REGISTER_CAP_SCRIPT = textwrap.dedent('''
    import json, torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._functorch.aot_autograd import aot_function
    from functorch.compile import make_boxed_func
    from sknet_triton import families, planning, tuned
    from sknet_triton.ops.batchnorm import batch_norm_statistics
    from sknet_triton.ops.split import split_forward

    tuned.arch_name = lambda device: "sm_90"  # no GPU here to ask: an H100's
    planning.min_programs = lambda device, config: 132 * config.programs_per_sm
    graphs = []

    def keep(gm, inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def capped_launches(u0, u1, x, weight, scale, bias):
        mean, var = batch_norm_statistics([u0, u1])
        branches, s = split_forward(x, weight, scale, bias, 1, False)
        return mean, var, branches, s

    with FakeTensorMode():
        def cuda(*shape):
            t = torch.empty(*shape, device="cuda")
            return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
        args = (cuda(4, 64, 14, 14), cuda(4, 64, 14, 14), cuda(4, 64, 14, 14), cuda(2, 64, 16, 3, 3),
                cuda(2, 64), cuda(2, 64))
        aot_function(capped_launches, fw_compiler=keep)(*args)

    [gm] = graphs
    launches = [n for n in gm.graph.nodes if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target)]
    print(json.dumps({
        "caps": {name: f.defaults[2].maxnreg for name, f in families.FAMILIES.items() if f.defaults[2].maxnreg},
        "launches": [{"launch_kwargs": list(n.kwargs.get("launch_kwargs", ())),
                      "maxnreg": n.kwargs["kwargs"].get("maxnreg")} for n in launches],
    }))
''')


def test_the_register_cap_reaches_the_compiled_launch():
    """The bn_stats, select_bn_bwd and split kernels' default configurations cap ptxas's registers
    (``maxnreg``), without which some of their specializations spill. Under torch.compile, Inductor compiles the kernels itself
    from the traced launch: the cap must be among the launch options the trace keeps for it. (torch
    releases whose traced launches keep no launch options beyond num_warps and num_stages drop it.)"""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", REGISTER_CAP_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    traced = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(traced["caps"]) == {"bn_stats", "select_bn_bwd", "split_fwd"}, traced
    assert len(traced["launches"]) == 2, traced
    if not any(launched["launch_kwargs"] for launched in traced["launches"]):
        pytest.skip(f"torch {torch.__version__} traces no launch options beyond num_warps and num_stages: under "
                    "torch.compile the register cap is dropped, and applies in eager mode alone")
    for launched, cap in zip(traced["launches"], (traced["caps"]["bn_stats"], traced["caps"]["split_fwd"])):
        assert "maxnreg" in launched["launch_kwargs"] and launched["maxnreg"] == cap, traced
