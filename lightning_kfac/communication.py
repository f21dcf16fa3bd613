"""Collectives for K-FAC: packing symmetric matrices, bucketing, byte accounting.

Only contiguous flat buffers are handed to the backend (gloo mis-sends non-contiguous
tensors without an error). Symmetric matrices travel as their upper triangle.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.distributed as dist
from torch import Tensor


@lru_cache(maxsize=256)
def _upper_indices(d: int, device: torch.device) -> tuple[Tensor, Tensor]:
    rows, cols = torch.triu_indices(d, d, device=device)
    return rows, cols


def pack(tensors: Sequence[Tensor], symmetric: bool) -> Tensor:
    """Flatten ``tensors`` into one contiguous buffer.

    Args:
        tensors: each ``(..., d, d)`` when ``symmetric`` (only the upper triangle is kept),
            any shape otherwise; all of one dtype and device.
    """
    parts = []
    for tensor in tensors:
        if symmetric:
            rows, cols = _upper_indices(tensor.shape[-1], tensor.device)
            tensor = tensor[..., rows, cols]
        parts.append(tensor.reshape(-1))
    return torch.cat(parts).contiguous()


def unpack(buffer: Tensor, shapes: Sequence[torch.Size], symmetric: bool) -> list[Tensor]:
    """Inverse of ``pack``: tensors of the given shapes (full symmetric matrices if packed)."""
    out, offset = [], 0
    for shape in shapes:
        if symmetric:
            rows, cols = _upper_indices(shape[-1], buffer.device)
            count = len(rows) * shape[:-2].numel()
            upper = buffer[offset : offset + count].reshape(*shape[:-2], len(rows))
            full = buffer.new_zeros(shape)
            full[..., rows, cols] = upper
            full[..., cols, rows] = upper
        else:
            count = shape.numel()
            full = buffer[offset : offset + count].reshape(shape)
        out.append(full)
        offset += count
    return out


def packed_size(shape: torch.Size, symmetric: bool) -> int:
    """Number of elements ``shape`` takes in a packed buffer."""
    if not symmetric:
        return shape.numel()
    d = shape[-1]
    return shape[:-2].numel() * d * (d + 1) // 2


def buckets(sizes: Sequence[int], cap: int) -> list[list[int]]:
    """Split item indices, in order, into runs whose total size is at most ``cap`` (>= 1 item)."""
    result: list[list[int]] = [[]]
    total = 0
    for index, size in enumerate(sizes):
        if result[-1] and total + size > cap:
            result.append([])
            total = 0
        result[-1].append(index)
        total += size
    return [bucket for bucket in result if bucket]


@dataclass
class TrafficCounter:
    """Bytes this rank handed to collectives, by kind (``all_reduce``, ``broadcast``)."""

    bytes: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, tensor: Tensor) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + tensor.numel() * tensor.element_size()

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


class Collectives:
    """Asynchronous collectives on one process group, with byte accounting.

    Args:
        group: the process group (None: the default group).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.traffic = TrafficCounter()

    def all_reduce(self, buffer: Tensor, op=dist.ReduceOp.SUM) -> dist.Work:
        """Start an in-place all-reduce of a contiguous buffer; returns the work handle."""
        assert buffer.is_contiguous()
        self.traffic.add("all_reduce", buffer)
        return dist.all_reduce(buffer, op=op, group=self.group, async_op=True)

    def broadcast(self, buffer: Tensor, src: int) -> dist.Work:
        """Start an in-place broadcast from group rank ``src``; returns the work handle."""
        assert buffer.is_contiguous()
        self.traffic.add("broadcast", buffer)
        return dist.broadcast(
            buffer,
            src=dist.get_global_rank(self.group, src) if self.group else src,
            group=self.group,
            async_op=True,
        )

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj`` (a small picklable value), in rank order."""
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def free_port() -> int:
    """A TCP port free on this machine now, for a local process group's ``MASTER_PORT``
    (launching ranks by hand with ``torch.multiprocessing``; Lightning picks its own)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
