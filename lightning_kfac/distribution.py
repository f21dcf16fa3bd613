"""How factors, decompositions and preconditioned gradients are shared between processes.

The engine talks to one ``Distribution`` protocol and moves generic units: a block's factor
``(block name, factor key)``. ``LocalDistribution`` is the single-process case;
``DataParallelDistribution`` runs data parallel over a process group, with two policies
chosen by its options: *when* factors are reduced (``LazyReduction`` on decomposition steps,
``EagerReduction`` on every factor update) and *who* keeps decompositions
(``SharedDecompositions``: every rank, after the owners' broadcasts; ``OwnerPreconditioning``:
only the owner, which preconditions its blocks and broadcasts their gradients). Nothing here
assumes a rank holds whole parameters: gradients are whatever the blocks read on this rank.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor

from lightning_kfac.assignment import greedy_assignment
from lightning_kfac.capture import CapturedFactors
from lightning_kfac.communication import Collectives, buckets, pack, packed_size, unpack
from lightning_kfac.curvature import CurvatureBlock
from lightning_kfac.decomposition import Decomposition
from lightning_kfac.options import DataParallelOptions
from lightning_kfac.state import Decompositions, Factors
from lightning_kfac.tiles import tiles

#: A factor: ``(block name, factor key)``.
Unit = tuple[str, str]
#: Decomposes many factors at once (batched by shape): ``{unit: decomposition or None}``.
Decompose = Callable[[Sequence[tuple[Unit, Tensor]]], dict[Unit, Decomposition | None]]
#: Preconditions the gradients of a set of blocks.
Apply = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
#: The KL clip's weighted inner product of plain tensors (None when there are none).
Inner = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], "Tensor | None"]


def all_finite(batch: Mapping[str, CapturedFactors]) -> bool:
    """Whether every factor in ``batch`` is finite, with one host synchronisation."""
    by_key: dict[str, list[Tensor]] = defaultdict(list)  # a batched product's slices in turn
    for captured in batch.values():
        for key, factor in captured.factors.items():
            by_key[key].append(factor)
    sums = [t.sum() for t in tiles([t for same in by_key.values() for t in same])]
    return not sums or bool(torch.isfinite(torch.stack(sums).sum()))


class Distribution(Protocol):
    """What the engine needs from the processes it runs on."""

    world_size: int
    rank: int

    def setup(self, blocks: Mapping[str, CurvatureBlock], dtype: torch.dtype) -> None:
        """Prepare for ``blocks`` (check that ranks agree, assign the work)."""

    def combine_batch(
        self, batch: Mapping[str, CapturedFactors], names: Sequence[str]
    ) -> Factors | None:
        """The factor batch of ``names`` to fold into this rank's running averages, or None
        when it is skipped (a non-finite factor on any rank)."""

    def reduce(self, running: Mapping[str, Mapping[str, Tensor]]) -> Factors:
        """The global factors of ``running`` (a snapshot later steps do not change)."""

    def decompose_owned(self, factors: Factors, decompose: Decompose) -> dict[Unit, object]:
        """Decompose the factors this rank owns; local work only (safe in a thread)."""

    def share(self, owned: dict[Unit, object], factors: Factors) -> Decompositions:
        """The decompositions this rank keeps, from those each rank owns."""

    def refresh(
        self, running: Mapping[str, Mapping[str, Tensor]], decompose: Decompose
    ) -> tuple[Factors, Decompositions]:
        """A synchronous decomposition step: the global factors and the kept decompositions."""

    def precondition(self, grads: Mapping[str, Tensor], apply: Apply) -> dict[str, Tensor]:
        """The preconditioned gradient of every block in ``grads``, in the same order."""

    def inner(
        self, preconditioned: Mapping[str, Tensor], grads: Mapping[str, Tensor], local: Inner
    ) -> Tensor | None:
        """The KL clip's ``sum_l lr_l**2 <V'_l, V_l>`` over whole gradients, the same value
        on every rank: ``local`` of what this rank holds, summed over ranks where each holds
        a part (sharded parameters, with one all-reduce of a scalar)."""


def _units(factors: Mapping[str, Mapping[str, Tensor]]) -> list[Unit]:
    return [(name, key) for name, pair in factors.items() for key in pair]


def snapshot(running: Mapping[str, Mapping[str, Tensor]]) -> Factors:
    """A copy of ``running`` that later in-place updates do not change."""
    return {name: {key: t.clone() for key, t in pair.items()} for name, pair in running.items()}


class LocalDistribution:
    """Single process: nothing is communicated and every decomposition is computed here."""

    world_size = 1
    rank = 0

    def setup(self, blocks: Mapping[str, CurvatureBlock], dtype: torch.dtype) -> None:
        self.blocks = dict(blocks)

    def combine_batch(
        self, batch: Mapping[str, CapturedFactors], names: Sequence[str]
    ) -> Factors | None:
        if not all_finite(batch):
            return None
        return {name: batch[name].factors for name in names if name in batch}

    def reduce(self, running: Mapping[str, Mapping[str, Tensor]]) -> Factors:
        return snapshot(running)

    def decompose_owned(self, factors: Factors, decompose: Decompose) -> dict[Unit, object]:
        return decompose([(unit, factors[unit[0]][unit[1]]) for unit in _units(factors)])

    def share(self, owned: dict[Unit, object], factors: Factors) -> Decompositions:
        return {name: {key: owned[(name, key)] for key in pair} for name, pair in factors.items()}

    def refresh(
        self, running: Mapping[str, Mapping[str, Tensor]], decompose: Decompose
    ) -> tuple[Factors, Decompositions]:
        factors = self.reduce(running)
        return factors, self.share(self.decompose_owned(factors, decompose), factors)

    def precondition(self, grads: Mapping[str, Tensor], apply: Apply) -> dict[str, Tensor]:
        return apply(grads)

    def inner(
        self, preconditioned: Mapping[str, Tensor], grads: Mapping[str, Tensor], local: Inner
    ) -> Tensor | None:
        return local(preconditioned, grads)


# -- data parallel: who keeps decompositions ------------------------------------------------


class SharedDecompositions:
    """Each factor's decomposition is computed by one rank (greedy by cost) and broadcast
    to every rank; every rank preconditions its own gradient. Communication-optimised."""

    def assign(self, blocks: Mapping[str, CurvatureBlock], world_size: int) -> None:
        self.costs = {
            (name, key): block.decomposition_cost(key)
            for name, block in blocks.items()
            for key in block.factor_shapes()
        }
        self.owners = greedy_assignment(self.costs, world_size)

    def owner(self, unit: Unit) -> int:
        return self.owners[unit]

    def share(self, dist: DataParallelDistribution, owned, factors: Factors) -> Decompositions:
        """Broadcast every owner's decompositions. Every rank, the owner included, reads them
        back from the broadcast buffers: identical memory gives bitwise identical results."""
        units = _units(factors)
        pending = []
        for src in range(dist.world_size):
            from_src = [unit for unit in units if self.owner(unit) == src]
            if not from_src:
                continue
            like = factors[from_src[0][0]][from_src[0][1]]
            if src == dist.rank:
                buffer = torch.cat([dist.flatten(u, owned[u], like) for u in from_src])
            else:
                buffer = like.new_zeros(sum(dist.wire_size(u) for u in from_src))
            pending.append((from_src, buffer, dist.collectives.broadcast(buffer, src)))
        received: dict[Unit, Decomposition | None] = {}
        for from_src, buffer, work in pending:
            work.wait()
            offset = 0
            for unit in from_src:
                received[unit], offset = dist.read(unit, buffer, offset)
        return {
            name: {key: received[(name, key)] for key in pair} for name, pair in factors.items()
        }

    def precondition(
        self, dist: DataParallelDistribution, grads: Mapping[str, Tensor], apply: Apply
    ) -> dict[str, Tensor]:
        return apply(grads)


class OwnerPreconditioning:
    """All of a block's decompositions are computed and kept by one rank (greedy by cost),
    which preconditions that block and broadcasts its gradient. Memory-optimised."""

    def assign(self, blocks: Mapping[str, CurvatureBlock], world_size: int) -> None:
        self.costs = {
            name: sum(block.decomposition_cost(key) for key in block.factor_shapes())
            for name, block in blocks.items()
        }
        self.owners = greedy_assignment(self.costs, world_size)

    def owner(self, unit: Unit) -> int:
        return self.owners[unit[0]]

    def share(self, dist: DataParallelDistribution, owned, factors: Factors) -> Decompositions:
        return {
            name: {key: owned[(name, key)] for key in pair}
            for name, pair in factors.items()
            if self.owners[name] == dist.rank
        }

    def precondition(
        self, dist: DataParallelDistribution, grads: Mapping[str, Tensor], apply: Apply
    ) -> dict[str, Tensor]:
        """Owners precondition their blocks and broadcast them; every rank, the owner
        included, reads the results from the broadcast buffers (identical memory for the
        reductions that follow, such as the KL clip)."""
        result: dict[str, Tensor] = {}
        pending = []
        for src in range(dist.world_size):
            owned = [name for name in grads if self.owners[name] == src]
            if not owned:
                continue
            if src == dist.rank:
                mine = apply({name: grads[name] for name in owned})
                buffer = torch.cat([mine[name].reshape(-1) for name in owned]).contiguous()
            else:
                buffer = grads[owned[0]].new_empty(sum(grads[name].numel() for name in owned))
            pending.append((owned, buffer, dist.collectives.broadcast(buffer, src)))
        for owned, buffer, work in pending:
            work.wait()
            offset = 0
            for name in owned:
                count = grads[name].numel()
                result[name] = buffer[offset : offset + count].reshape(grads[name].shape)
                offset += count
        return {name: result[name] for name in grads}


# -- data parallel: when factors are reduced ------------------------------------------------


class LazyReduction:
    """Every rank keeps running averages of its own factors; they are averaged over ranks
    only on decomposition steps (exact, as the running average is linear), bucket by
    bucket, each rank decomposing what it owns while later buckets travel. Live factors
    (read by every step) ride with the head of every factor update instead, so they are
    global at all times."""

    def combine_batch(self, dist, batch, names, head) -> Factors:
        units = [(n, k) for n in names for k in dist.blocks[n].live_keys()]
        if not units:
            work = dist.collectives.all_reduce(head)
            work.wait()
            return {}
        return _reduce_weighted(dist, batch, units, head)

    def reduce(self, dist: DataParallelDistribution, running) -> Factors:
        units = [u for u in _units(running) if u[1] not in dist.blocks[u[0]].live_keys()]
        tensors = [running[name][key] for name, key in units]
        reduced = dict(zip(units, dist.all_reduce(tensors)))
        return {  # live factors are global already: copied
            name: {
                key: reduced[(name, key)] / dist.world_size
                if (name, key) in reduced
                else tensor.clone()
                for key, tensor in pair.items()
            }
            for name, pair in running.items()
        }

    def refresh(self, dist: DataParallelDistribution, running, decompose: Decompose):
        units = _units(running)
        tensors = [running[name][key] for name, key in units]
        factors: Factors = {name: {} for name in running}
        owned: dict[Unit, object] = {}
        for _, items in dist.all_reduce_buckets(tensors):
            mine = []
            for index, tensor in items:
                name, key = units[index]
                factors[name][key] = tensor / dist.world_size
                if dist.assignment.owner(units[index]) == dist.rank:
                    mine.append((units[index], factors[name][key]))
            if mine:
                owned.update(decompose(mine))
        return factors, dist.assignment.share(dist, owned, factors)


def _reduce_weighted(dist, batch, units: Sequence[Unit], head: Tensor) -> Factors:
    """The sum over ranks of each unit's batch factor times the rank's N (zeros where the
    block did not fire), with ``head`` reduced in place in the same collective."""
    tensors = []
    for name, key in units:
        if name in batch:
            tensors.append(batch[name].factors[key] * batch[name].examples)
        else:
            tensors.append(head.new_zeros(dist.blocks[name].factor_shapes()[key]))
    reduced = dist.all_reduce(tensors, head, symmetric=dist.symmetric(units))
    out: Factors = {}
    for (name, key), tensor in zip(units, reduced):
        out.setdefault(name, {})[key] = tensor
    return out


class EagerReduction:
    """The batch factors are averaged over ranks on every factor update (one collective),
    so every rank's running averages are already global."""

    def combine_batch(self, dist, batch, names, head) -> Factors:
        units = [(name, key) for name in names for key in dist.blocks[name].factor_shapes()]
        return _reduce_weighted(dist, batch, units, head)

    def reduce(self, dist: DataParallelDistribution, running) -> Factors:
        return snapshot(running)

    def refresh(self, dist: DataParallelDistribution, running, decompose: Decompose):
        factors = self.reduce(dist, running)
        owned = dist.decompose_owned(factors, decompose)
        return factors, dist.assignment.share(dist, owned, factors)


class DataParallelDistribution:
    """Data parallel over a process group (reference, section 2; D-KFAC).

    Each factor's decomposition is computed by exactly one rank, chosen by a deterministic
    greedy load balancer on the blocks' cost estimates; ``options`` choose the reduction
    and sharing policies (see the module docstring).

    Args:
        collectives: the process group wrapper (default: the default group).
        options: the validated data-parallel options.
    """

    #: The strategy option that asks for owner preconditioning, and the setting that keeps
    #: every rank's decompositions instead (named in error messages).
    OWNER_OPTION = ("kfac_precondition_mode='owner'", "kfac_precondition_mode='shared'")

    def __init__(
        self, collectives: Collectives | None = None, options: DataParallelOptions | None = None
    ) -> None:
        self.collectives = collectives or Collectives()
        self.options = options or DataParallelOptions()
        self.reduction = EagerReduction() if self.options.reduce_every_update else LazyReduction()
        self.assignment = (
            OwnerPreconditioning()
            if self.options.precondition_mode == "owner"
            else SharedDecompositions()
        )
        self.bucket_cap_bytes = int(self.options.bucket_cap_mb * 2**20)

    @property
    def world_size(self) -> int:
        return self.collectives.world_size

    @property
    def rank(self) -> int:
        return self.collectives.rank

    def setup(self, blocks: Mapping[str, CurvatureBlock], dtype: torch.dtype) -> None:
        """Check every rank registered the same blocks, then assign the decompositions.

        Raises:
            RuntimeError: on every rank alike, naming the blocks that differ.
        """
        signature = [
            (name, type(block).__name__, sorted(block.factor_shapes().items()))
            for name, block in blocks.items()
        ]
        everyone = self.collectives.all_gather_object(signature)
        if any(other != everyone[0] for other in everyone):
            common = set.intersection(*(set(map(repr, other)) for other in everyone))
            differing = sorted({e for other in everyone for e in map(repr, other)} - common)
            raise RuntimeError(
                "K-FAC: ranks registered different layers (name, kind, factor shapes); every "
                f"rank must run the same model. Entries not on every rank: {differing}. "
                f"This is rank {self.rank} with {len(signature)} layers."
            )
        live = sorted(name for name, block in blocks.items() if block.live_keys())
        if live and isinstance(self.assignment, OwnerPreconditioning):
            raise ValueError(
                "K-FAC: blocks with live factors (EKFAC's second moments, e.g. "
                f"{live[:3]}) capture in their eigenbasis on every rank, which "
                f"{self.OWNER_OPTION[0]} keeps on one rank only; use {self.OWNER_OPTION[1]}"
            )
        self.blocks = dict(blocks)
        self.dtype = dtype
        first = next(iter(blocks.values()), None)
        self.device = first.parameters()[0].device if first is not None else None
        self.assignment.assign(self.blocks, self.world_size)

    # -- the protocol ----------------------------------------------------------------------

    def combine_batch(
        self, batch: Mapping[str, CapturedFactors], names: Sequence[str]
    ) -> Factors | None:
        """Agree with every rank on this factor batch (one collective).

        A batch with a non-finite factor on any rank is skipped on every rank; a block
        enters only if it fired on every rank; ranks are weighted by their local N.
        """
        head = torch.tensor(
            [0.0 if all_finite(batch) else 1.0]
            + [1.0 if name in batch else 0.0 for name in names]
            + [float(batch[name].examples) if name in batch else 0.0 for name in names],
            dtype=self.dtype,
            device=self.device,
        )
        reduced = self.reduction.combine_batch(self, batch, names, head)
        flags = head.tolist()
        if flags[0] > 0:
            return None
        fired, examples = flags[1 : 1 + len(names)], flags[1 + len(names) :]
        out: Factors = {}
        for i, name in enumerate(names):
            if fired[i] < self.world_size:
                continue
            shared = reduced.get(name, {})
            weight = self.world_size * batch[name].examples / examples[i]
            out[name] = {
                key: shared[key] / examples[i]
                if key in shared
                else (t if weight == 1.0 else t * weight)
                for key, t in batch[name].factors.items()
            }
        return out

    def reduce(self, running: Mapping[str, Mapping[str, Tensor]]) -> Factors:
        """The mean over ranks of the running factors (a collective: every rank calls it).

        Also what a checkpoint saves: every rank restarting from this mean continues exactly
        as the uninterrupted run.
        """
        return self.reduction.reduce(self, running)

    def decompose_owned(self, factors: Factors, decompose: Decompose) -> dict[Unit, object]:
        mine = [
            (unit, factors[unit[0]][unit[1]])
            for unit in _units(factors)
            if self.assignment.owner(unit) == self.rank
        ]
        return decompose(mine) if mine else {}

    def share(self, owned: dict[Unit, object], factors: Factors) -> Decompositions:
        return self.assignment.share(self, owned, factors)

    def refresh(
        self, running: Mapping[str, Mapping[str, Tensor]], decompose: Decompose
    ) -> tuple[Factors, Decompositions]:
        return self.reduction.refresh(self, running, decompose)

    def precondition(self, grads: Mapping[str, Tensor], apply: Apply) -> dict[str, Tensor]:
        return self.assignment.precondition(self, grads, apply)

    def inner(
        self, preconditioned: Mapping[str, Tensor], grads: Mapping[str, Tensor], local: Inner
    ) -> Tensor | None:
        """Every rank holds whole, identical gradients: the local value is the global one."""
        return local(preconditioned, grads)

    def symmetric(self, units: Sequence[Unit]) -> list[bool]:
        """Whether each unit's factor is symmetric (live factors need not be)."""
        return [key not in self.blocks[name].live_keys() for name, key in units]

    # -- wire format -----------------------------------------------------------------------

    def wire_size(self, unit: Unit) -> int:
        """Elements of one decomposition on the wire: a success flag and its tensors."""
        shapes = self.blocks[unit[0]].decomposition_shapes(unit[1])
        return 1 + sum(torch.Size(shape).numel() for shape in shapes)

    def flatten(self, unit: Unit, decomposition, like: Tensor) -> Tensor:
        """``[ok, *tensors]`` of one decomposition, flat (zeros if it failed)."""
        if decomposition is None:
            return like.new_zeros(self.wire_size(unit))
        parts = [like.new_ones(1)] + [t.reshape(-1).to(like) for t in decomposition.tensors()]
        return torch.cat(parts)

    def read(self, unit: Unit, buffer: Tensor, offset: int):
        """The decomposition at ``offset`` of ``buffer`` (None if it failed), next offset."""
        block = self.blocks[unit[0]]
        ok = buffer[offset] > 0
        offset += 1
        tensors = []
        for shape in block.decomposition_shapes(unit[1]):
            count = torch.Size(shape).numel()
            tensors.append(buffer[offset : offset + count].reshape(shape))
            offset += count
        return (block.rebuild(unit[1], tensors) if ok else None), offset

    # -- bucketed all-reduce ---------------------------------------------------------------

    def all_reduce_buckets(
        self,
        tensors: list[Tensor],
        head: Tensor | None = None,
        symmetric: Sequence[bool] | None = None,
    ) -> Iterator[tuple[Tensor | None, list[tuple[int, Tensor]]]]:
        """Sum ``tensors`` over ranks, bucketed and asynchronous.

        Every bucket is in flight before the first is waited for; yields, bucket by bucket
        as each completes, the reduced ``head`` (a small vector riding in the first bucket,
        written back in place, else None) and ``(index, reduced tensor)`` pairs. Square
        matrices travel as their upper triangle when ``pack_triangular`` is on, except those
        ``symmetric`` (one flag per tensor; default: all) marks as not symmetric.
        """
        flags = [True] * len(tensors) if symmetric is None else list(symmetric)
        packed = [
            self.options.pack_triangular and flag and t.dim() >= 2 and t.shape[-1] == t.shape[-2]
            for t, flag in zip(tensors, flags)
        ]

        sizes = [packed_size(t.shape, p) * t.element_size() for t, p in zip(tensors, packed)]
        groups = buckets(sizes, self.bucket_cap_bytes) if tensors else [[]]
        pending = []
        for index, bucket in enumerate(groups):
            parts = [pack([tensors[i]], packed[i]) for i in bucket]
            if index == 0 and head is not None:
                parts.insert(0, head)
            if not parts:
                continue
            buffer = torch.cat(parts).contiguous()
            pending.append((bucket, buffer, self.collectives.all_reduce(buffer)))
        for index, (bucket, buffer, work) in enumerate(pending):
            work.wait()
            head_out = None
            if index == 0 and head is not None:
                head_out, buffer = buffer[: head.numel()], buffer[head.numel() :]
                head.copy_(head_out)
            items = []
            offset = 0
            for i in bucket:
                count = packed_size(tensors[i].shape, packed[i])
                [tensor] = unpack(buffer[offset : offset + count], [tensors[i].shape], packed[i])
                items.append((i, tensor))
                offset += count
            yield head_out, items

    def all_reduce(
        self,
        tensors: list[Tensor],
        head: Tensor | None = None,
        symmetric: Sequence[bool] | None = None,
    ) -> list[Tensor]:
        """``all_reduce_buckets`` gathered: the reduced tensors in order (``head`` reduced
        in place)."""
        reduced: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
        for _, items in self.all_reduce_buckets(tensors, head, symmetric):
            for index, tensor in items:
                reduced[index] = tensor
        return reduced
