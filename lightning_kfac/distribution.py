"""How factors, decompositions and preconditioned gradients are shared between processes.

``LocalDistribution`` is the single-process case: every operation is local. The engine talks
only to this interface, so data-parallel training is a different ``Distribution`` and not a
different engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

from lightning_kfac.assignment import greedy_assignment
from lightning_kfac.blocks import LayerBlock
from lightning_kfac.capture import BatchFactors
from lightning_kfac.communication import Collectives, buckets, pack, packed_size, unpack
from lightning_kfac.decomposition import Eigen
from lightning_kfac.factors import KroneckerFactors

#: ``(A, G)`` per block name.
FactorPairs = dict[str, tuple[Tensor, Tensor]]
#: ``(eigen of A, eigen of G)`` per block name; None where the decomposition failed.
EigenPairs = dict[str, tuple[Eigen | None, Eigen | None]]
#: Decompositions by ``(block name, "A" or "G")``.
OwnedEigens = dict[tuple[str, str], Eigen | None]


def all_finite(batch: Mapping[str, BatchFactors]) -> bool:
    """Whether every factor in ``batch`` is finite, with one host synchronisation."""
    if not batch:
        return True
    flags = [torch.isfinite(b.A).all() & torch.isfinite(b.G).all() for b in batch.values()]
    return bool(torch.stack(flags).all())


class LocalDistribution:
    """Single process: nothing is communicated and every decomposition is computed here."""

    world_size = 1
    rank = 0

    def setup(self, blocks: Mapping[str, LayerBlock], dtype: torch.dtype) -> None:
        """Prepare for ``blocks`` whose factors are in ``dtype`` (distributed versions check
        that ranks agree and assign the work)."""

    def combine_batch(self, batch: Mapping[str, BatchFactors]) -> FactorPairs | None:
        """The batch factors to fold into this process's running averages, or None to skip.

        A batch with any non-finite factor is skipped whole.
        """
        if not all_finite(batch):
            return None
        return {name: (b.A, b.G) for name, b in batch.items()}

    def reduce(self, factors: Mapping[str, KroneckerFactors]) -> FactorPairs:
        """The global factors: a snapshot that later steps do not change."""
        return {name: (f.A.clone(), f.G.clone()) for name, f in factors.items() if f.ready}

    def decompose_owned(
        self, pairs: FactorPairs, decompose: Callable[[Tensor], Eigen | None]
    ) -> OwnedEigens:
        """Decompose the factors this process owns (all of them here). Local work only:
        safe to run in a background thread."""
        return {
            (name, kind): decompose(pair[index])
            for name, pair in pairs.items()
            for index, kind in enumerate("AG")
        }

    def share(self, owned: OwnedEigens, pairs: FactorPairs) -> EigenPairs:
        """The decompositions this process keeps, from those each process owns."""
        return {name: (owned[(name, "A")], owned[(name, "G")]) for name in pairs}

    def refresh(
        self,
        factors: Mapping[str, KroneckerFactors],
        decompose: Callable[[Tensor], Eigen | None],
    ) -> tuple[FactorPairs, EigenPairs]:
        """On a synchronous decomposition step: the global factors and the decompositions
        kept here."""
        pairs = self.reduce(factors)
        return pairs, self.share(self.decompose_owned(pairs, decompose), pairs)

    def precondition(
        self, grads: Mapping[str, Tensor], apply: Callable[[str, Tensor], Tensor]
    ) -> dict[str, Tensor]:
        """The preconditioned gradient of every block in ``grads``."""
        return {name: apply(name, grad) for name, grad in grads.items()}


PRECONDITION_MODES = ("shared", "owner")


class DataParallelDistribution(LocalDistribution):
    """Data parallel over a process group (reference, section 2; D-KFAC).

    Every rank keeps running averages of its own factors. By default they are averaged over
    ranks only on decomposition steps (exact, since the running average is linear); with
    ``reduce_every_update`` the batch factors are reduced on every factor update instead.
    Each factor's eigendecomposition is computed by exactly one rank, chosen by a
    deterministic greedy load balancer (cost ``groups * d**3``), and then either shared with
    every rank (``precondition_mode="shared"``, communication-optimised) or kept by its owner,
    which preconditions its layers and broadcasts their gradients (``"owner"``,
    memory-optimised: decompositions live on one rank only).

    Args:
        collectives: the process group wrapper (default: the default group).
        reduce_every_update: reduce factors on every factor update, not only before
            decompositions.
        pack_triangular: send only the upper triangle of each symmetric factor.
        precondition_mode: ``"shared"`` or ``"owner"``.
        bucket_cap_mb: the largest buffer handed to one collective, in MiB.
    """

    def __init__(
        self,
        collectives: Collectives | None = None,
        *,
        reduce_every_update: bool = False,
        pack_triangular: bool = True,
        precondition_mode: str = "shared",
        bucket_cap_mb: float = 25.0,
    ) -> None:
        if precondition_mode not in PRECONDITION_MODES:
            raise ValueError(
                f"precondition_mode must be one of {PRECONDITION_MODES}, got {precondition_mode!r}"
            )
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be a positive number, got {bucket_cap_mb}")
        self.collectives = collectives or Collectives()
        self.reduce_every_update = reduce_every_update
        self.pack_triangular = pack_triangular
        self.precondition_mode = precondition_mode
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self.owners: dict = {}

    @property
    def world_size(self) -> int:
        return self.collectives.world_size

    @property
    def rank(self) -> int:
        return self.collectives.rank

    # -- set-up ----------------------------------------------------------------------------

    def setup(self, blocks: Mapping[str, LayerBlock], dtype: torch.dtype) -> None:
        """Check every rank registered the same layers, then assign the decompositions.

        Raises:
            RuntimeError: on every rank alike, naming the layers that differ.
        """
        signature = [(name, b.factor_shapes()) for name, b in blocks.items()]
        everyone = self.collectives.all_gather_object(signature)
        if any(other != everyone[0] for other in everyone):
            mine = set(map(repr, signature))
            differing = sorted(
                {entry for other in everyone for entry in map(repr, other)}
                - set.intersection(*(set(map(repr, other)) for other in everyone))
            )
            raise RuntimeError(
                "K-FAC: ranks registered different layers (name, factor shapes); every rank "
                f"must run the same model. Entries not on every rank: {differing}. "
                f"This is rank {self.rank} with {len(mine)} layers."
            )
        self.names = list(blocks)
        self.dtype = dtype
        self.device = next(iter(blocks.values())).module.weight.device if blocks else None
        self.shapes = {name: b.factor_shapes() for name, b in blocks.items()}

        def cost(shape) -> float:
            return float(shape[0]) * shape[1] ** 3

        if self.precondition_mode == "shared":
            costs = {(n, k): cost(s) for n, pair in self.shapes.items() for k, s in zip("AG", pair)}
        else:
            costs = {n: cost(a) + cost(g) for n, (a, g) in self.shapes.items()}
        self.costs = costs
        self.owners = greedy_assignment(costs, self.world_size)

    def _owner(self, name: str, kind: str) -> int:
        return (
            self.owners[(name, kind)] if self.precondition_mode == "shared" else self.owners[name]
        )

    # -- factors ---------------------------------------------------------------------------

    def _all_reduce_buckets(
        self, tensors: list[Tensor], head: Tensor | None = None
    ) -> Iterator[tuple[Tensor | None, list[tuple[int, Tensor]]]]:
        """Sum ``tensors`` (symmetric matrices) over ranks, bucketed and asynchronous.

        Every bucket is in flight before the first is waited for; yields, bucket by bucket
        as each completes, the reduced ``head`` (a small vector riding in the first bucket,
        else None) and ``(index, reduced tensor)`` pairs, so the caller can work on one
        bucket while the next is still travelling.
        """
        symmetric = self.pack_triangular
        sizes = [packed_size(t.shape, symmetric) * t.element_size() for t in tensors]
        groups = buckets(sizes, self.bucket_cap_bytes) if tensors else [[]]
        pending = []
        for index, bucket in enumerate(groups):
            parts = [pack([tensors[i] for i in bucket], symmetric)] if bucket else []
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
            shapes = [tensors[i].shape for i in bucket]
            yield head_out, list(zip(bucket, unpack(buffer, shapes, symmetric)))

    def _all_reduce(self, tensors: list[Tensor], head: Tensor | None = None):
        """``_all_reduce_buckets`` gathered: the reduced head and tensors, in order."""
        reduced: list[Tensor | None] = [None] * len(tensors)
        head_out = None
        for bucket_head, items in self._all_reduce_buckets(tensors, head):
            head_out = bucket_head if bucket_head is not None else head_out
            for index, tensor in items:
                reduced[index] = tensor
        return head_out, reduced

    def combine_batch(self, batch: Mapping[str, BatchFactors]) -> FactorPairs | None:
        """Agree with every rank on this factor batch (one collective).

        A batch with a non-finite factor on any rank is skipped on every rank; a block
        enters only if it fired on every rank; ranks are weighted by their local batch size.
        """
        names = self.names
        head = torch.tensor(
            [0.0 if all_finite(batch) else 1.0]
            + [1.0 if name in batch else 0.0 for name in names]
            + [float(batch[name].examples) if name in batch else 0.0 for name in names],
            dtype=self.dtype,
            device=self.device,
        )
        if self.reduce_every_update:
            tensors = []
            for name in names:
                shape_a, shape_g = self.shapes[name]
                if name in batch:
                    n = batch[name].examples
                    tensors += [batch[name].A * n, batch[name].G * n]
                else:
                    tensors += [head.new_zeros(shape_a), head.new_zeros(shape_g)]
            head, reduced = self._all_reduce(tensors, head)
        else:
            work = self.collectives.all_reduce(head)
            work.wait()
        head = head.tolist()
        if head[0] > 0:
            return None
        count = len(names)
        fired, examples = head[1 : 1 + count], head[1 + count :]
        out = {}
        for i, name in enumerate(names):
            if fired[i] < self.world_size:
                continue
            if self.reduce_every_update:
                out[name] = (reduced[2 * i] / examples[i], reduced[2 * i + 1] / examples[i])
            else:
                weight = self.world_size * batch[name].examples / examples[i]
                A, G = batch[name].A, batch[name].G
                out[name] = (A * weight, G * weight) if weight != 1.0 else (A, G)
        return out

    def reduce(self, factors: Mapping[str, KroneckerFactors]) -> FactorPairs:
        """The mean over ranks of the running factors (a collective: every rank calls it).

        Also what a checkpoint saves: the running average is linear, so every rank
        restarting from this mean continues exactly as the uninterrupted run.
        """
        if self.reduce_every_update:
            return super().reduce(factors)
        ready = [name for name in self.names if factors[name].ready]
        tensors = [t for name in ready for t in (factors[name].A, factors[name].G)]
        _, reduced = self._all_reduce(tensors)
        return {
            name: (reduced[2 * i] / self.world_size, reduced[2 * i + 1] / self.world_size)
            for i, name in enumerate(ready)
        }

    def _units(self, pairs: FactorPairs) -> list[tuple[str, str]]:
        return [(name, kind) for name in self.names if name in pairs for kind in "AG"]

    def decompose_owned(
        self, pairs: FactorPairs, decompose: Callable[[Tensor], Eigen | None]
    ) -> OwnedEigens:
        """Decompose the factors this rank owns. Local work only: safe in a background thread."""
        return {
            (name, kind): decompose(pairs[name][0 if kind == "A" else 1])
            for name, kind in self._units(pairs)
            if self._owner(name, kind) == self.rank
        }

    def refresh(
        self,
        factors: Mapping[str, KroneckerFactors],
        decompose: Callable[[Tensor], Eigen | None],
    ) -> tuple[FactorPairs, EigenPairs]:
        """Reduce the running factors over ranks and decompose each on its owner.

        Lazily reduced factors arrive bucket by bucket; this rank decomposes the factors it
        owns in each bucket while later buckets are still in flight. The decompositions are
        then shared (``share``).
        """
        if self.reduce_every_update:
            return super().refresh(factors, decompose)
        ready = [name for name in self.names if factors[name].ready]
        units = [(name, kind) for name in ready for kind in "AG"]
        tensors = [factors[name].A if kind == "A" else factors[name].G for name, kind in units]
        reduced: dict[tuple[str, str], Tensor] = {}
        owned: OwnedEigens = {}
        for _, items in self._all_reduce_buckets(tensors):
            for index, tensor in items:
                unit = units[index]
                reduced[unit] = tensor / self.world_size
                if self._owner(*unit) == self.rank:
                    owned[unit] = decompose(reduced[unit])
        pairs = {name: (reduced[(name, "A")], reduced[(name, "G")]) for name in ready}
        return pairs, self.share(owned, pairs)

    def share(self, owned: OwnedEigens, pairs: FactorPairs) -> EigenPairs:
        """The decompositions this rank keeps: its own (owner mode) or, after the owners'
        broadcasts, everyone's (shared mode, a collective).

        In shared mode every rank, the owner included, reads the decompositions back from
        the broadcast buffers: identical memory layouts give bitwise identical
        preconditioning on every rank.
        """
        if self.precondition_mode == "owner":
            return {
                name: (owned[(name, "A")], owned[(name, "G")])
                for name in pairs
                if self.owners[name] == self.rank
            }
        units = self._units(pairs)
        received: OwnedEigens = {}
        pending = []
        for src in range(self.world_size):
            from_src = [u for u in units if self._owner(*u) == src]
            if not from_src:
                continue
            shapes = [self.shapes[name][0 if kind == "A" else 1] for name, kind in from_src]
            like = pairs[from_src[0][0]][0]
            if src == self.rank:
                parts = [_flatten_eigen(owned[u], s, like) for u, s in zip(from_src, shapes)]
                buffer = torch.cat(parts)
            else:
                size = sum(1 + s[0] * s[1] + s[0] * s[1] * s[2] for s in shapes)
                buffer = like.new_zeros(size)
            pending.append((from_src, shapes, buffer, self.collectives.broadcast(buffer, src)))
        for from_src, shapes, buffer, work in pending:
            work.wait()
            offset = 0
            for unit, shape in zip(from_src, shapes):
                received[unit], offset = _read_eigen(buffer, offset, shape)
        return {name: (received[(name, "A")], received[(name, "G")]) for name in pairs}

    def precondition(
        self, grads: Mapping[str, Tensor], apply: Callable[[str, Tensor], Tensor]
    ) -> dict[str, Tensor]:
        """Shared mode: local. Owner mode: owners precondition and broadcast their layers."""
        if self.precondition_mode == "shared":
            return super().precondition(grads, apply)
        result: dict[str, Tensor] = {}
        pending = []
        for src in range(self.world_size):
            owned = [name for name in self.names if name in grads and self.owners[name] == src]
            if not owned:
                continue
            if src == self.rank:
                for name in owned:
                    result[name] = apply(name, grads[name])
                buffer = torch.cat([result[name].reshape(-1) for name in owned]).contiguous()
            else:
                buffer = grads[owned[0]].new_empty(sum(grads[name].numel() for name in owned))
            pending.append((src, owned, buffer, self.collectives.broadcast(buffer, src)))
        # Every rank, the owner included, reads the gradients from the broadcast buffers, so
        # that later reductions over them (the KL clip) see identical memory on every rank.
        for _, owned, buffer, work in pending:
            work.wait()
            offset = 0
            for name in owned:
                count = grads[name].numel()
                result[name] = buffer[offset : offset + count].reshape(grads[name].shape)
                offset += count
        return {name: result[name] for name in grads}  # the same order on every rank


def _flatten_eigen(eigen: Eigen | None, shape, reference: Tensor) -> Tensor:
    """``[ok, values, vectors]`` of one decomposition as a flat buffer (zeros if it failed)."""
    groups, d, _ = shape
    if eigen is None:
        return reference.new_zeros(1 + groups * d + groups * d * d)
    ok = reference.new_ones(1)
    return torch.cat([ok, eigen.values.reshape(-1), eigen.vectors.reshape(-1)])


def _read_eigen(buffer: Tensor, offset: int, shape) -> tuple[Eigen | None, int]:
    groups, d, _ = shape
    ok = buffer[offset] > 0
    offset += 1
    values = buffer[offset : offset + groups * d].reshape(groups, d)
    offset += groups * d
    vectors = buffer[offset : offset + groups * d * d].reshape(groups, d, d)
    offset += groups * d * d
    return (Eigen(vectors=vectors, values=values) if ok else None), offset
