"""The clocks the op table (perf/ops.py) and the tuner (perf/tune.py) time calls with.

- **GPU time** (:func:`gpu_time_us`): every call captured once into a CUDA graph (one call per input set,
  :func:`input_sets_needed` of them so that they overflow the L2 cache), the graph replayed between CUDA
  events; the median replay over the number of calls. No host work is timed.
- **host time** (:func:`host_time_us`): the wall time of issuing a short burst of calls without
  synchronising, over the burst's length.
- **call time** (:func:`call_time_us`): the wall time of many back-to-back calls, synchronised at both ends,
  over their number: what a loop of calls costs a user.

:func:`device_time_us` is the GPU time on a GPU and its stand-in on the CPU (a tuner's dry run).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

# GPU time: the input sets of one graph should move at least this many times the L2's bytes, at most
# MAX_INPUT_SETS sets.
L2_OVERFLOW = 4
MAX_INPUT_SETS = 8
# Host time: bursts of this many calls (a few launches each: far from the launch queue's ~1000 entries).
HOST_BURST = 20
# Call time: this many back-to-back calls between synchronisations, repeated.
CALLS_PER_TIMING = 40


def input_sets_needed(min_bytes: int, device: torch.device) -> int:
    """How many input sets one CUDA graph cycles through so that its calls overflow the L2 cache; one on
    any other device."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(1, min(MAX_INPUT_SETS, math.ceil(L2_OVERFLOW * l2 / max(min_bytes, 1))))


def gpu_time_us(calls: list[Callable], replays: int) -> float:
    """GPU µs of one call: ``calls`` (one per input set) captured once into a CUDA graph, which is replayed
    ``replays`` times between CUDA events; the median replay over the number of calls.

    Runs on the current stream, which must not be the default stream (capture needs a side stream), and
    must be the one any forward pass of a backward closure ran on: autograd runs backward kernels on their
    forward's stream, and a capture sees only its own stream's work.
    """
    stream = torch.cuda.current_stream()
    if stream == torch.cuda.default_stream():
        raise RuntimeError("gpu_time_us: capture needs a side stream; call it inside torch.cuda.stream(...)")
    for call in calls:  # warm-up: compilation, autotuning and lazy initialisation stay out of the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    median_ms = statistics.median(start.elapsed_time(end) for start, end in events)
    del graph
    return median_ms * 1e3 / len(calls)


def device_time_us(calls: list[Callable], device: torch.device, replays: int) -> float:
    """:func:`gpu_time_us` on a GPU; on the CPU, its stand-in in a dry run: the median wall time of a call
    after a first, slower one."""
    if device.type == "cuda":
        return gpu_time_us(calls, replays)
    calls[0]()
    times = []
    for index in range(replays):
        start = time.perf_counter()
        calls[index % len(calls)]()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def host_time_us(call: Callable, bursts: int, synchronize: Callable[[], None]) -> float:
    """Host µs of one call: the median over ``bursts`` of the wall time of issuing HOST_BURST calls without
    synchronising, over HOST_BURST; ``synchronize`` drains the queue between bursts."""
    times = []
    for _ in range(bursts):
        synchronize()
        start = time.perf_counter()
        for _ in range(HOST_BURST):
            call()
        times.append((time.perf_counter() - start) / HOST_BURST)
    synchronize()
    return statistics.median(times) * 1e6


def call_time_us(calls: list[Callable], timings: int) -> float:
    """µs per call as a loop of calls sees it: CALLS_PER_TIMING back-to-back calls cycling through the
    input sets, synchronised at both ends; median of ``timings`` such loops."""
    times = []
    for _ in range(timings):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for index in range(CALLS_PER_TIMING):
            calls[index % len(calls)]()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / CALLS_PER_TIMING)
    return statistics.median(times) * 1e6
