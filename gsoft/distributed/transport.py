"""Moving compressed payloads between processes with ``torch.distributed``, and what that costs on the wire.

Summable payloads (same support everywhere, linear decode) are added by ``all_reduce``; everything else is packed
into one byte buffer and ``all_gather``-ed, so what is counted is what the collective carries: values, indices
and scales, plus, for variable-size payloads, the exchanged counts and the padding up to the largest one.

Bytes are counted per process as a ring algorithm sends them: ``all_reduce`` of ``B`` bytes sends
``2 (p - 1) / p * B``, ``all_gather`` of ``B`` bytes sends ``(p - 1) * B``. With two processes both are exactly
the payload size, which the tests check and the benchmark compares with the interface counters.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Optional

import torch
import torch.distributed as dist

from .compressors import Compressor, Layout, Payload
from .feedback import mean_decoded


def shared_seed(*parts: Any) -> int:
    """A seed equal on every process for the same parts (Python's ``hash`` of a str differs between processes)."""
    return zlib.crc32(":".join(map(str, parts)).encode())


def allreduce_wire_bytes(nbytes: int, world_size: int) -> int:
    return math.ceil(2 * (world_size - 1) * nbytes / world_size)


def allgather_wire_bytes(nbytes: int, world_size: int) -> int:
    return (world_size - 1) * nbytes


def pack(payload: Payload) -> torch.Tensor:
    """The payload's tensors as one uint8 buffer, in order."""
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in payload])


def unpack(buffer: torch.Tensor, layout: Layout) -> Payload:
    out, offset = [], 0
    for dtype, count in layout:
        size = count * torch.empty((), dtype=dtype).element_size()
        out.append(buffer[offset: offset + size].clone().view(dtype))
        offset += size
    if offset != buffer.numel():
        raise ValueError(f"payload buffer has {buffer.numel()} bytes, its layout {layout} needs {offset}")
    return tuple(out)


class Exchange:
    """One collective round: ``start`` sends this process's payload, ``wait``/``future`` give the mean of the
    decoded payloads of all processes (summed in rank order, so every process gets the same bits)."""

    def __init__(self, compressor: Compressor, numel: int, *, group: Optional[dist.ProcessGroup] = None,
                 shared_seed: int = 0):
        self.compressor = compressor
        self.numel = numel
        self.group = group
        self.shared_seed = shared_seed
        self.world_size = dist.get_world_size(group)
        self.bytes_sent = 0
        self.payload_bytes = 0

    def start(self, payload: Payload) -> torch.futures.Future:
        c, world = self.compressor, self.world_size
        if c.summable:
            (tensor,) = payload
            self.payload_bytes = tensor.numel() * tensor.element_size()
            self.bytes_sent = allreduce_wire_bytes(self.payload_bytes, world)
            work = dist.all_reduce(tensor, group=self.group, async_op=True)
            return work.get_future().then(
                lambda _: c.decompress((tensor,), self.numel, shared_seed=self.shared_seed) / world)

        if c.variable_size:
            count = torch.tensor([c.count(payload)], dtype=torch.int32, device=payload[0].device)
            counts = [torch.empty_like(count) for _ in range(world)]
            dist.all_gather(counts, count, group=self.group)
            self.bytes_sent += allgather_wire_bytes(count.element_size(), world)
            sizes = [int(n) for n in torch.cat(counts).tolist()]
            payload = c.pad(payload, max(sizes))
            full = c.layout_for(max(sizes))
            layouts = [c.layout_for(n) for n in sizes]
        else:
            full = c.layout(self.numel)
            layouts = [full] * world
        buffer = pack(payload)
        self.payload_bytes = buffer.numel()
        self.bytes_sent += allgather_wire_bytes(buffer.numel(), world)
        received = [torch.empty_like(buffer) for _ in range(world)]
        work = dist.all_gather(received, buffer, group=self.group, async_op=True)

        def decode(_) -> torch.Tensor:
            payloads = [tuple(t[:n] for t, (_, n) in zip(unpack(buf, full), layout))
                        for buf, layout in zip(received, layouts)]
            return mean_decoded(c, payloads, self.numel, shared_seed=self.shared_seed)

        return work.get_future().then(decode)

    def run(self, payload: Payload) -> torch.Tensor:
        """Blocking :meth:`start`."""
        return self.start(payload).wait()
