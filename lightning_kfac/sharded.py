"""K-FAC with sharded parameters: FSDP2 (``fully_shard``) under ``ModelParallelStrategy``.

``ShardedDistribution`` is the second implementation of the ``Distribution`` protocol. Under
FSDP2 every parameter is a DTensor sharded along dim 0 over the data-parallel ranks, while
the forward hooks see the full (unsharded) input of the rank's own batch and the backward
hooks the full output gradient. So:

- **factors** are captured whole on every rank and reduced over the ranks exactly as under
  data parallelism (the reduction policies, the assignment of decompositions by cost and the
  wire format of ``DataParallelDistribution``, which this class extends);
- **gradients** are what the blocks read from ``.grad``: DTensors, whose local part holds
  this rank's rows of the block's gradient ``V`` (DTensor's own view and ``cat`` rules carry
  the sharding through the block's ``gradient()``; blocks import nothing distributed). In
  ``"gather"`` mode the rows of each shape group are all-gathered, bucket by bucket, the
  block's operator is applied to the whole ``V`` and only the local rows are kept: exactly
  the rows of ``G^-1 V A^-1``. In ``"block_diagonal"`` mode a Kronecker layer's rows are
  preconditioned where they are, with the diagonal block of ``G`` for this rank's rows (no
  gradient traffic; an approximation, reference section 12), whose decomposition each rank
  computes for itself. In ``"owner"`` mode each layer's decompositions stay on the rank that
  computes them (greedy by cost, as ``precondition_mode="owner"`` under data parallelism):
  every rank sends it its rows (point to point, straight into the whole gradient), the
  owner preconditions the layer whole and sends each rank its rows of the result;
- the **KL clip**'s inner product is summed over the shards with one all-reduce of a scalar,
  so every rank applies the same scale.

Nothing in K-FAC's state grows with the number of ranks: running factors are whole on every
rank (they are not sharded), decompositions are those this rank's rows need (all of them in
gather mode, about ``1/R`` of them in owner mode).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lightning_kfac.assignment import greedy_assignment
from lightning_kfac.communication import Collectives, buckets
from lightning_kfac.curvature import CurvatureBlock, KroneckerBlock
from lightning_kfac.distribution import (
    Apply,
    DataParallelDistribution,
    Decompose,
    Inner,
    OwnerPreconditioning,
    Unit,
)
from lightning_kfac.ekfac import EigenvalueCorrectedBlock
from lightning_kfac.embedding import EmbeddingBlock
from lightning_kfac.normalization import ScaleShiftBlock
from lightning_kfac.options import ShardedOptions
from lightning_kfac.state import Decompositions, Factors

SUPPORTED = (
    "K-FAC supports sharded parameters as FSDP2 lays them out under ModelParallelStrategy "
    "with tensor_parallel_size=1: fully_shard over the 1-D data-parallel mesh of every rank, "
    "each parameter a DTensor with placements (Shard(dim=0),) (or a plain, replicated tensor)"
)


def rows_of(size: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of the rows ``rank`` holds of ``size`` rows sharded over
    ``world_size`` ranks (``torch.chunk``'s rule, as DTensor's ``Shard`` uses)."""
    chunk = math.ceil(size / world_size) if size else 0
    return min(rank * chunk, size), min((rank + 1) * chunk, size)


def check_parameter(name: str, parameter: nn.Parameter, world_size: int) -> None:
    """Refuse a parameter K-FAC cannot precondition exactly under sharding.

    Raises:
        ValueError: naming the layer, the layout found and what is supported.
    """
    if not isinstance(parameter, DTensor):
        return
    mesh, placements = parameter.device_mesh, tuple(parameter.placements)
    ok = (
        mesh.ndim == 1
        and mesh.size() == world_size
        and len(placements) == 1
        and placements[0].is_shard(0)
    )
    if not ok:
        raise ValueError(
            f"{SUPPORTED}. Layer {name!r} has a parameter with placements {placements} on "
            f"{mesh} over {world_size} ranks (HSDP meshes, tensor parallelism and sharding "
            "along another dim are not supported); exclude the layer from K-FAC "
            "(KFACCallback(exclude=[...])) or shard it with fully_shard only."
        )


def _verified_layout(block: CurvatureBlock) -> bool:
    """Whether ``block`` reads and writes its gradient in a way checked with DTensor
    gradients: that of the Kronecker (Linear, Conv), embedding or scale-and-shift
    (normalisation) blocks, or EKFAC around a Kronecker block."""
    if isinstance(block, EigenvalueCorrectedBlock):
        return _verified_layout(block.inner)
    return any(
        isinstance(block, base)
        and type(block).gradient is base.gradient
        and type(block).set_gradient is base.set_gradient
        for base in (KroneckerBlock, EmbeddingBlock, ScaleShiftBlock)
    )


def check_gradient_layouts(blocks: Mapping[str, CurvatureBlock]) -> None:
    """Refuse sharded layers whose block reads its gradient in a way not checked with
    DTensor gradients (it could slice across shards and write into a temporary).

    Raises:
        ValueError: naming the layers and what is supported.
    """
    refused = [
        f"{name!r} ({getattr(block, 'kind', type(block).__name__)})"
        for name, block in blocks.items()
        if any(isinstance(p, DTensor) for p in block.parameters()) and not _verified_layout(block)
    ]
    if refused:
        raise ValueError(
            "K-FAC under sharding supports Linear, Conv, Embedding and normalisation layers "
            "(and EKFAC on Linear and Conv); these sharded layers are of another kind: "
            f"{', '.join(refused)}. Exclude them from K-FAC (KFACCallback(exclude=[...])) "
            "or do not shard them."
        )


def _row_separable(block: CurvatureBlock) -> bool:
    """Whether ``block`` can precondition a slice of its gradient's rows with the matching
    diagonal block of ``G``: a dense eigen Kronecker block of one group whose
    preconditioning is the Kronecker block's own (not EKFAC, Cholesky inverses or a
    structured factor)."""
    return (
        isinstance(block, KroneckerBlock)
        and block.groups == 1
        and getattr(block, "dense", True)
        and getattr(block, "inverse", "eigen") == "eigen"
        and not getattr(block, "live_keys", tuple)()
        and type(block).precondition is KroneckerBlock.precondition
        and set(block.factor_shapes()) == {"A", "G"}
        and tuple(block.factor_shapes()["G"]) == (1, block.g_dim, block.g_dim)
    )


def _sharded_dim(tensor: Tensor) -> int | None:
    """The dim ``tensor`` (a block's gradient) is sharded along, None if it is whole here."""
    if not isinstance(tensor, DTensor):
        return None
    placements = tuple(tensor.placements)
    if all(p.is_replicate() for p in placements):
        return None
    if len(placements) == 1 and placements[0].is_shard():
        return placements[0].dim
    raise ValueError(f"{SUPPORTED}; a gradient has placements {placements}")


@dataclass
class _Sharded:
    """One block's sharded gradient: the local rows (moved to the front) and where they go."""

    name: str
    dim: int
    local: Tensor  # (rows here, *rest), contiguous
    rows: int  # rows of the whole gradient
    chunk: int  # rows per rank on the wire (padded)
    rest: torch.Size


class ShardedDistribution(DataParallelDistribution):
    """FSDP2: factors as under data parallelism, gradients gathered by rows, preconditioned
    block-diagonally or by each layer's owner (see the module docstring).

    Args:
        collectives: the data-parallel process group (default: the default group).
        options: the validated options.
    """

    OWNER_OPTION = ("kfac_shard_preconditioning='owner'", "kfac_shard_preconditioning='gather'")

    def __init__(
        self, collectives: Collectives | None = None, options: ShardedOptions | None = None
    ) -> None:
        super().__init__(collectives, options or ShardedOptions())
        self.options: ShardedOptions
        if self.options.shard_preconditioning == "owner":
            self.assignment = OwnerPreconditioning()
        #: Blocks preconditioned with the diagonal block of ``G`` for this rank's rows.
        self.row_local: dict[str, tuple[int, int]] = {}

    # -- set-up ----------------------------------------------------------------------------

    def setup(self, blocks: Mapping[str, CurvatureBlock], dtype: torch.dtype) -> None:
        """Check the parameters' layout, then as under data parallelism; in block-diagonal
        mode the ``G`` of row-local blocks is left out of the assignment (every rank
        decomposes its own diagonal block).

        Raises:
            ValueError: for a layout other than FSDP2's dim-0 sharding on a 1-D mesh, and in
                owner mode for blocks with live factors (EKFAC).
        """
        for name, block in blocks.items():
            for parameter in block.parameters():
                check_parameter(name, parameter, self.world_size)
        check_gradient_layouts(blocks)
        super().setup(blocks, dtype)  # refuses live factors (EKFAC) in owner mode
        self.row_local = {}
        if self.options.shard_preconditioning == "block_diagonal":
            for name, block in self.blocks.items():
                if _row_separable(block) and isinstance(block.parameters()[0], DTensor):
                    self.row_local[name] = rows_of(block.g_dim, self.world_size, self.rank)
            local = {(name, "G") for name in self.row_local}
            costs = {u: c for u, c in self.assignment.costs.items() if u not in local}
            self.assignment.costs = costs
            self.assignment.owners = greedy_assignment(costs, self.world_size)

    # -- decompositions --------------------------------------------------------------------

    def _local_units(self, factors: Factors) -> list[Unit]:
        return [(name, "G") for name in self.row_local if "G" in factors.get(name, {})]

    def _delegated(self, factors: Factors) -> Factors:
        local = set(self._local_units(factors))
        return {
            name: {key: t for key, t in pair.items() if (name, key) not in local}
            for name, pair in factors.items()
        }

    def decompose_owned(self, factors: Factors, decompose: Decompose) -> dict[Unit, object]:
        """The delegated factors this rank owns, and (block-diagonal mode) the diagonal
        block of ``G`` for this rank's rows of every row-local layer."""
        delegated = self._delegated(factors)
        mine = [
            ((name, key), tensor)
            for name, pair in delegated.items()
            for key, tensor in pair.items()
            if self.assignment.owner((name, key)) == self.rank
        ]
        for name, key in self._local_units(factors):
            start, end = self.row_local[name]
            if end > start:
                g = factors[name][key]
                mine.append(((name, key), g[:, start:end, start:end].contiguous()))
        return decompose(mine) if mine else {}

    def share(self, owned: dict[Unit, object], factors: Factors) -> Decompositions:
        local = self._local_units(factors)
        if not local:
            return self.assignment.share(self, owned, factors)
        shared = self.assignment.share(self, owned, self._delegated(factors))
        for name, key in local:
            shared.setdefault(name, {})[key] = owned.get((name, key))
        return shared

    def refresh(self, running, decompose: Decompose) -> tuple[Factors, Decompositions]:
        if not self.row_local:
            return super().refresh(running, decompose)
        factors = self.reduce(running)
        return factors, self.share(self.decompose_owned(factors, decompose), factors)

    # -- preconditioning -------------------------------------------------------------------

    def precondition(self, grads: Mapping[str, Tensor], apply: Apply) -> dict[str, Tensor]:
        """Whole gradients (plain or replicated) are preconditioned here as they are (in
        owner mode by their owner, which broadcasts them); row-local blocks on their local
        rows; the others gathered by shape group, or sent to their owners."""
        out: dict[str, Tensor] = {}
        whole: dict[str, Tensor] = {}
        local_rows: dict[str, Tensor] = {}
        sharded: list[_Sharded] = []
        for name, grad in grads.items():
            dim = _sharded_dim(grad)
            if dim is None:
                whole[name] = grad.to_local() if isinstance(grad, DTensor) else grad
                continue
            if name in self.row_local:
                if dim != grad.dim() - 2:
                    raise ValueError(f"{SUPPORTED}; {name!r}'s rows are sharded along {dim}")
                local_rows[name] = grad.to_local()
                start, end = self.row_local[name]
                if local_rows[name].shape[-2] != end - start:
                    raise ValueError(f"{SUPPORTED}; {name!r} holds unexpected rows here")
                continue
            local = grad.to_local().movedim(dim, 0).contiguous()
            size = grad.shape[dim]
            start, end = rows_of(size, self.world_size, self.rank)
            if local.shape[0] != end - start:
                raise ValueError(f"{SUPPORTED}; {name!r} holds unexpected rows here")
            sharded.append(
                _Sharded(name, dim, local, size, math.ceil(size / self.world_size), local.shape[1:])
            )
        owner = self.options.shard_preconditioning == "owner"
        if whole:
            done = self.assignment.precondition(self, whole, apply) if owner else apply(whole)
            out.update({name: _like(grads[name], new) for name, new in done.items()})
        for name, new in (apply(local_rows) if local_rows else {}).items():
            out[name] = _like(grads[name], new)
        if owner and sharded:
            out.update(self._owned(sharded, grads, apply))
        elif sharded:
            groups: dict[object, list[_Sharded]] = defaultdict(list)
            for item in sharded:
                groups[self.blocks[item.name].batch_key()].append(item)
            for items in groups.values():
                out.update(self._gathered(items, grads, apply))
        return {name: out[name] for name in grads}

    def _gathered(
        self, items: Sequence[_Sharded], grads: Mapping[str, Tensor], apply: Apply
    ) -> dict[str, Tensor]:
        """One shape group: buckets of padded local rows all-gathered, the next bucket in
        flight while this one is preconditioned in one call of ``apply`` (peak: about one
        bucket of whole gradients three times over, and the next one gathering)."""
        itemsize = items[0].local.element_size()
        sizes = [item.chunk * item.rest.numel() * self.world_size * itemsize for item in items]
        order = [[items[i] for i in bucket] for bucket in buckets(sizes, self.bucket_cap_bytes)]
        out: dict[str, Tensor] = {}
        pending = self._start_gather(order[0])
        for index in range(len(order)):
            bucket, gathered, work = pending
            if index + 1 < len(order):
                pending = self._start_gather(order[index + 1])
            work.wait()
            full: dict[str, Tensor] = {}
            offset = 0
            for item in bucket:
                width = item.rest.numel()
                parts = []
                for rank, buffer in enumerate(gathered):
                    start, end = rows_of(item.rows, self.world_size, rank)
                    rows = buffer[offset : offset + (end - start) * width]
                    parts.append(rows.reshape(end - start, *item.rest))
                offset += item.chunk * width
                full[item.name] = torch.cat(parts).movedim(0, item.dim)
            del gathered
            for name, new in apply(full).items():
                item = next(i for i in bucket if i.name == name)
                start, end = rows_of(item.rows, self.world_size, self.rank)
                mine = new.movedim(item.dim, 0)[start:end].movedim(0, item.dim)
                # a copy: a view would keep the whole result alive to the end of the step
                out[name] = _like(grads[name], mine.clone(memory_format=torch.contiguous_format))
            del full
        return out

    def _start_gather(self, bucket: list[_Sharded]):
        parts = []
        for item in bucket:
            padded = item.local.new_zeros(item.chunk, *item.rest)
            padded[: item.local.shape[0]] = item.local
            parts.append(padded.reshape(-1))
        buffer = torch.cat(parts).contiguous()
        gathered = [torch.empty_like(buffer) for _ in range(self.world_size)]
        self.collectives.traffic.add("all_gather", buffer)
        work = dist.all_gather(gathered, buffer, group=self.collectives.group, async_op=True)
        return bucket, gathered, work

    def _owner_rounds(self, sizes: Mapping[str, int]) -> list[list[str]]:
        """Owner mode: the layers (``{name: bytes of the whole gradient}``, in order) in
        rounds; round ``k`` holds every owner's ``k``-th bucket of its own layers."""
        by_owner: dict[int, list[str]] = defaultdict(list)
        for name in sizes:
            by_owner[self.assignment.owners[name]].append(name)
        round_of: dict[str, int] = {}
        for names in by_owner.values():
            for k, bucket in enumerate(buckets([sizes[n] for n in names], self.bucket_cap_bytes)):
                round_of.update((names[i], k) for i in bucket)
        rounds: list[list[str]] = [[] for _ in range(max(round_of.values(), default=-1) + 1)]
        for name in sizes:
            rounds[round_of[name]].append(name)
        return rounds

    def _owned(
        self, items: Sequence[_Sharded], grads: Mapping[str, Tensor], apply: Apply
    ) -> dict[str, Tensor]:
        """Owner mode, round by round: every rank sends each owner its rows, straight into
        the owner's whole gradient (the next round in flight while this one is
        preconditioned), the owner preconditions its layers in one call of ``apply`` and
        sends every rank its rows of the result (peak on an owner: about three copies of its
        largest bucket)."""
        by_name = {item.name: item for item in items}
        tags = {item.name: 2 * index for index, item in enumerate(items)}
        sizes = {
            item.name: item.rows * item.rest.numel() * item.local.element_size() for item in items
        }
        rounds = self._owner_rounds(sizes)
        out: dict[str, Tensor] = {}
        pending = self._start_sends([by_name[n] for n in rounds[0]], tags)
        for index in range(len(rounds)):
            full, works = pending
            if index + 1 < len(rounds):
                pending = self._start_sends([by_name[n] for n in rounds[index + 1]], tags)
            for work in works:
                work.wait()
            mine = {name: t.movedim(0, by_name[name].dim) for name, t in full.items()}
            results = apply(mine) if mine else {}
            del full, mine
            works = []
            for name in rounds[index]:
                item, owner = by_name[name], self.assignment.owners[name]
                start, end = rows_of(item.rows, self.world_size, self.rank)
                if owner != self.rank:
                    out[name] = item.local.new_empty(end - start, *item.rest)
                    if end > start:
                        works.append(self._recv(out[name], owner, tags[name] + 1))
                    continue
                result = results[name].movedim(item.dim, 0).contiguous()  # (rows, *rest)
                for rank in range(self.world_size):
                    first, last = rows_of(item.rows, self.world_size, rank)
                    if rank != self.rank and last > first:
                        works.append(self._send(result[first:last], rank, tags[name] + 1))
                out[name] = result[start:end].clone()
            for work in works:
                work.wait()
            del results
        return {
            name: _like(grads[name], rows.movedim(0, by_name[name].dim).contiguous())
            for name, rows in out.items()
        }

    def _start_sends(
        self, bucket: Sequence[_Sharded], tags: Mapping[str, int]
    ) -> tuple[dict[str, Tensor], list[dist.Work]]:
        """Post one round's rows: this rank's to each layer's owner, and (for the layers it
        owns) every other rank's into a whole ``(rows, *rest)`` gradient."""
        full: dict[str, Tensor] = {}
        works = []
        for item in bucket:
            owner = self.assignment.owners[item.name]
            if owner != self.rank:
                if item.local.shape[0]:
                    works.append(self._send(item.local, owner, tags[item.name]))
                continue
            whole = full[item.name] = item.local.new_empty(item.rows, *item.rest)
            for rank in range(self.world_size):
                start, end = rows_of(item.rows, self.world_size, rank)
                if rank == self.rank:
                    whole[start:end] = item.local
                elif end > start:
                    works.append(self._recv(whole[start:end], rank, tags[item.name]))
        return full, works

    def _send(self, tensor: Tensor, rank: int, tag: int) -> dist.Work:
        """Start sending a contiguous ``tensor`` to group rank ``rank``."""
        assert tensor.is_contiguous()
        self.collectives.traffic.add("send", tensor)
        group = self.collectives.group
        return dist.isend(tensor, group=group, group_dst=rank, tag=tag)

    def _recv(self, tensor: Tensor, rank: int, tag: int) -> dist.Work:
        """Start receiving from group rank ``rank`` into a contiguous ``tensor``."""
        assert tensor.is_contiguous()
        return dist.irecv(tensor, group=self.collectives.group, group_src=rank, tag=tag)

    def inner(
        self, preconditioned: Mapping[str, Tensor], grads: Mapping[str, Tensor], local: Inner
    ) -> Tensor | None:
        """``local`` of this rank's rows (whole gradients counted on rank 0 only), summed
        over ranks with one all-reduce of a scalar."""
        mine_new, mine_old = {}, {}
        for name, grad in grads.items():
            if _sharded_dim(grad) is None and self.rank != 0:
                continue
            mine_new[name] = _plain(preconditioned[name])
            mine_old[name] = _plain(grad)
        some = _plain(next(iter(grads.values())))
        value = local(mine_new, mine_old) if mine_new else None
        total = some.new_zeros(1) if value is None else value.reshape(1).clone()
        self.collectives.all_reduce(total).wait()
        return total[0]

    # -- reporting -------------------------------------------------------------------------

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds: ``running`` factors (whole, as on one process), the
        ``decompositions`` it keeps, the ``gradient_buffers`` of the largest bucket it
        gathers or (owner mode) receives, and its local ``parameter_shards`` of the
        registered layers."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        owner = self.options.shard_preconditioning == "owner"
        running = sum(
            math.prod(shape)
            for block in self.blocks.values()
            for shape in block.factor_shapes().values()
        )
        kept = 0
        for name, block in self.blocks.items():
            if owner and self.assignment.owners[name] != self.rank:
                continue
            live = set(getattr(block, "live_keys", tuple)())  # never decomposed (EKFAC)
            for key in block.factor_shapes():
                if key in live:
                    continue
                if (name, key) in self.assignment.costs or name not in self.row_local:
                    kept += sum(math.prod(s) for s in block.decomposition_shapes(key))
                else:
                    start, end = self.row_local[name]
                    kept += (end - start) * (end - start + 1)
        sizes = {  # bytes of each gathered (or owner-preconditioned) layer's gradient
            name: sum(p.numel() * p.element_size() for p in block.parameters())
            for name, block in self.blocks.items()
            if name not in self.row_local and isinstance(block.parameters()[0], DTensor)
        }
        if owner:
            # a round's whole gradients and their results, and the next round's in flight
            mine = [
                sum(sizes[n] for n in names if self.assignment.owners[n] == self.rank)
                for names in self._owner_rounds(sizes)
            ]
            buffers = 3 * max(mine, default=0)
        else:
            # a bucket's gathered copy, its whole gradients and their results, and the next
            # bucket's gathered copy in flight
            groups: dict[object, list[int]] = defaultdict(list)
            for name, size in sizes.items():
                groups[self.blocks[name].batch_key()].append(size)
            largest = max(
                (
                    sum(group[i] for i in bucket)
                    for group in groups.values()
                    for bucket in buckets(group, self.bucket_cap_bytes)
                ),
                default=0,
            )
            buffers = 4 * largest
        shards = 0
        for block in self.blocks.values():
            for p in block.parameters():
                shards += (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
        return {
            "running": running * itemsize,
            "decompositions": kept * itemsize,
            "gradient_buffers": buffers,
            "parameter_shards": shards,
        }

    def describe(self) -> str:
        """The fit-start line: the mode and this rank's K-FAC memory."""
        mib = {k: v / 2**20 for k, v in self.memory().items()}
        mode = self.options.shard_preconditioning
        detail = ""
        if mode == "block_diagonal":
            detail = f", {len(self.row_local)} layers block-diagonal"
        elif mode == "owner":
            owned = sum(rank == self.rank for rank in self.assignment.owners.values())
            detail = f", {owned} of {len(self.blocks)} layers preconditioned here"
        return (
            f"K-FAC sharded over {self.world_size} ranks ({mode}{detail}); per rank (rank "
            f"{self.rank}): running factors {mib['running']:.3f} MiB, decompositions "
            f"{mib['decompositions']:.3f} MiB, gradient buffers up to "
            f"{mib['gradient_buffers']:.3f} MiB, parameter shards {mib['parameter_shards']:.3f} MiB"
        )


def _plain(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _like(reference: Tensor, local: Tensor) -> Tensor:
    """``local`` (this rank's part) laid out as ``reference``: a DTensor of the same global
    shape and placements when ``reference`` is one."""
    if not isinstance(reference, DTensor):
        return local
    return DTensor.from_local(
        local.to(reference.dtype),
        reference.device_mesh,
        reference.placements,
        run_check=False,
        shape=reference.shape,
        stride=reference.stride(),
    )
