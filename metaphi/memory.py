"""Peak memory of a block of tensor code on any device, counted tensor by tensor.

``PeakTensorMemory`` is a dispatch mode that follows every storage created inside the block until it
is freed and keeps the peak of their total size: the autograd graph's saved tensors are counted,
inputs that existed before the block and kernels' internal scratch are not. It measures the same
thing on a CPU, where the allocator keeps no statistics, as ``torch.cuda.max_memory_allocated``
does on a GPU. Used by the memory tests and benchmarks (inner-loop checkpointing, speed).
"""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class PeakTensorMemory(TorchDispatchMode):
    """The peak of the bytes held by tensors created inside the block (storages counted once)."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage._cdata not in self.live:
                    self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def cpu_allocator_peak(fn) -> tuple[int, object]:
    """(peak bytes, result) of one call of ``fn``: the peak of what the CPU allocator handed out during
    it above what was held before, from the profiler's allocation events. Unlike ``PeakTensorMemory``
    it sees every allocation, those inside ``torch.compile``'d graphs (whose fused kernels do not go
    through the dispatcher) and kernels' scratch included."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == cpu)
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak, out
