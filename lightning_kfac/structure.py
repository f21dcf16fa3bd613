"""How one side of a Kronecker block is stored: dense, block-diagonal or diagonal
(reference, section 12).

A dense ``d x d`` factor costs ``d**2`` memory, a ``rows x d**2`` product per update and a
``d**3`` decomposition. Above a size limit a side gets a cheaper structure:

- **block-diagonal**: the ``d`` coordinates split into contiguous, nearly equal blocks of at
  most ``b``; each block is a dense factor of its own (keys ``A0, A1, ...``), decomposed on
  its own (equal blocks are decomposed in one batched call), and exact damping applies to
  the products of their eigenvalues. One block is the dense factor.
- **diagonal**: the factor's diagonal, kept as a vector (the right choice for a
  vocabulary-sized side).

Either way a side is an eigenbasis that is block-diagonal (the identity for a diagonal
factor) and a vector of eigenvalues, which is all the Kronecker preconditioning needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor

from lightning_kfac.decomposition import (
    DIAGONAL,
    SYMMETRIC_EIGEN,
    Decomposition,
    DecompositionMethod,
    Diagonal,
    Eigen,
)

STRUCTURES = ("dense", "block-diagonal", "diagonal")
#: The structure of an input side that is a flattened map (``lightning_kfac.doubly_factored``).
DOUBLY_FACTORED = "doubly-factored"


@dataclass(frozen=True)
class FactorStructure:
    """The storage of one factor side of width ``d``.

    Attributes:
        kind: ``"dense"``, ``"block-diagonal"`` or ``"diagonal"``.
        sizes: the widths of the diagonal blocks (one for dense and diagonal), summing to d.
    """

    kind: str
    sizes: tuple[int, ...]

    @classmethod
    def dense(cls, d: int) -> FactorStructure:
        return cls("dense", (d,))

    @classmethod
    def diagonal(cls, d: int) -> FactorStructure:
        return cls("diagonal", (d,))

    @classmethod
    def block_diagonal(cls, d: int, block_size: int) -> FactorStructure:
        """Nearly equal contiguous blocks of at most ``block_size`` (sizes differ by 1 at
        most, so that most blocks share a shape and decompose in one batched call)."""
        count = max(1, math.ceil(d / block_size))
        base, extra = divmod(d, count)
        return cls("block-diagonal", tuple(base + (i < extra) for i in range(count)))

    @property
    def width(self) -> int:
        return sum(self.sizes)

    def keys(self, side: str) -> list[str]:
        """Factor keys of this side: ``side`` itself, or ``side0, side1, ...`` for blocks."""
        if self.kind == "block-diagonal":
            return [f"{side}{i}" for i in range(len(self.sizes))]
        return [side]

    def shapes(self, side: str, groups: int) -> dict[str, tuple[int, ...]]:
        if self.kind == "diagonal":
            return {side: (groups, self.width)}
        return {key: (groups, size, size) for key, size in zip(self.keys(side), self.sizes)}

    def describe(self) -> str:
        """For the fit-start summary, e.g. ``"5 blocks of 201"`` or ``"diagonal"``."""
        if self.kind != "block-diagonal":
            return self.kind
        low, high = min(self.sizes), max(self.sizes)
        width = f"{low}" if low == high else f"{low}-{high}"
        return f"{len(self.sizes)} block{'s' if len(self.sizes) > 1 else ''} of {width}"

    # -- capture ---------------------------------------------------------------------------

    def statistics(self, side: str, rows: Tensor) -> dict[str, Tensor]:
        """``rows^T rows`` in this structure, for rows ``(groups, M, d)`` summed over rows."""
        if self.kind == "diagonal":
            return {side: (rows * rows).sum(dim=1)}
        if self.kind == "dense":
            return {side: rows.mT @ rows}
        parts = rows.split(self.sizes, dim=-1)
        return {key: part.mT @ part for key, part in zip(self.keys(side), parts)}

    # -- decompositions --------------------------------------------------------------------

    def method(self) -> DecompositionMethod:
        return DIAGONAL if self.kind == "diagonal" else SYMMETRIC_EIGEN

    def decomposition_shapes(self, key: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        if self.kind == "diagonal":
            return (shape,)
        groups, d, _ = shape
        return (groups, d), (groups, d, d)

    def rebuild(self, tensors: Sequence[Tensor]) -> Decomposition:
        if self.kind == "diagonal":
            return Diagonal(tensors[0])
        values, vectors = tensors
        return Eigen(vectors=vectors, values=values)

    # -- the eigenbasis --------------------------------------------------------------------

    def eigenvalues(self, side: str, decompositions: Mapping[str, Decomposition]) -> Tensor:
        """All eigenvalues of the side, ``(groups, d)``, in coordinate order."""
        return torch.cat([decompositions[key].values for key in self.keys(side)], dim=-1)

    def rotate(
        self, matrix: Tensor, side: str, decompositions: Mapping[str, Decomposition], inverse: bool
    ) -> Tensor:
        """``matrix @ Q`` (``inverse``: ``matrix @ Q^T``) with ``Q`` this side's block-diagonal
        eigenbasis, for ``matrix`` ``(groups, m, d)``."""
        if self.kind == "diagonal":
            return matrix
        bases = [decompositions[key].vectors for key in self.keys(side)]
        if inverse:
            bases = [q.mT for q in bases]
        if len(bases) == 1:
            return matrix @ bases[0]
        parts = matrix.split(self.sizes, dim=-1)
        return torch.cat([part @ q for part, q in zip(parts, bases)], dim=-1)


def structure_for(
    d: int, kind: str | None, max_size: int | None, block_size: int, large: str
) -> FactorStructure:
    """The structure of a side of width ``d``: ``kind`` if given, else dense up to
    ``max_size`` (None: no limit) and ``large`` above it."""
    if kind is None:
        kind = "dense" if max_size is None or d <= max_size else large
    if kind == "dense":
        return FactorStructure.dense(d)
    if kind == "diagonal":
        return FactorStructure.diagonal(d)
    if kind == "block-diagonal":
        return FactorStructure.block_diagonal(d, block_size)
    raise ValueError(f"factor structure must be one of {STRUCTURES}, got {kind!r}")


@dataclass(frozen=True)
class StructurePolicy:
    """Which structure each side of each Kronecker block gets.

    Attributes:
        max_size: a side wider than this gets ``large`` (None: every side stays dense).
        block_size: the widest block of a block-diagonal side.
        large: ``"block-diagonal"`` or ``"diagonal"``.
        overrides: ``{module name pattern: structure}`` or ``{pattern: {"A": ..., "G": ...}}``
            (``fnmatch`` patterns; the first matching pattern wins), regardless of size.
    """

    max_size: int | None = 2048
    block_size: int = 512
    large: str = "block-diagonal"
    overrides: Mapping[str, str | Mapping[str, str]] = ()

    def __post_init__(self) -> None:
        if self.max_size is not None and (
            isinstance(self.max_size, bool)
            or not isinstance(self.max_size, int)
            or self.max_size < 1
        ):
            raise ValueError(
                f"max_factor_size must be an integer >= 1 or None, got {self.max_size!r}"
            )
        if (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, int)
            or self.block_size < 1
        ):
            raise ValueError(f"factor_block_size must be an integer >= 1, got {self.block_size!r}")
        if self.large not in ("block-diagonal", "diagonal"):
            raise ValueError(
                f"large_factors must be 'block-diagonal' or 'diagonal', got {self.large!r}"
            )
        overrides = dict(self.overrides or {})
        for pattern, value in overrides.items():
            sides = _sides(value)
            if (
                not isinstance(pattern, str)
                or not sides
                or set(sides) - {"A", "G"}
                or any(kind not in STRUCTURES for kind in sides.values() if kind is not None)
                or ("A" in sides and sides["A"] is None and _channels(value) is None)
                or (isinstance(value, Mapping) and _is_doubly_factored(value.get("G")))
            ):
                raise ValueError(
                    "factor_structure maps module name patterns to one of "
                    f"{STRUCTURES} or 'doubly-factored' / 'doubly-factored:<channels>' (a Linear "
                    "after nn.Flatten), or to {'A': ..., 'G': ...} of them, "
                    f"got {pattern!r}: {value!r}"
                )
        object.__setattr__(self, "overrides", overrides)

    def doubly_factored(self, name: str, a_dim: int) -> tuple[bool, int | None] | None:
        """Whether a Linear layer named ``name`` (input factor side ``a_dim``) should be
        doubly-factored: ``(declared, channels or None to infer)``, or None. Declared by an
        override, or automatic above the size limit (where the map shape can be found)."""
        for pattern, value in self.overrides.items():
            if fnmatchcase(name, pattern):
                a = value.get("A") if isinstance(value, Mapping) else value
                if isinstance(a, str) and a.startswith(DOUBLY_FACTORED):
                    return True, _channels(a)
                if a is not None:
                    return None
                break
        if self.max_size is not None and a_dim > self.max_size:
            return False, None
        return None

    def kind(self, name: str, side: str) -> str | None:
        """The structure an override gives ``side`` of module ``name``, if any."""
        for pattern, value in self.overrides.items():
            if fnmatchcase(name, pattern):
                return _sides(value).get(side)
        return None

    def structure(self, name: str, side: str, d: int) -> FactorStructure:
        return structure_for(d, self.kind(name, side), self.max_size, self.block_size, self.large)


def _sides(value: Any) -> dict[str, str | None]:
    """An override as ``{side: structure}``; a doubly-factored input side maps to None (not a
    structure of this module: the layer gets another block kind)."""
    sides = dict(value) if isinstance(value, Mapping) else {"A": value}
    if not isinstance(value, Mapping) and not _is_doubly_factored(value):
        sides["G"] = value
    return {
        side: None if _is_doubly_factored(kind) else kind
        for side, kind in sides.items()
        if side == "A" or not _is_doubly_factored(kind)
    }


def _is_doubly_factored(kind: Any) -> bool:
    return isinstance(kind, str) and kind.split(":")[0] == DOUBLY_FACTORED


def _channels(value: Any) -> int | None:
    """J of ``"doubly-factored:J"`` (0 for ``"doubly-factored"``: to be inferred), else None."""
    kind = value.get("A") if isinstance(value, Mapping) else value
    if not _is_doubly_factored(kind):
        return None
    _, _, channels = kind.partition(":")
    if not channels:
        return 0
    return int(channels) if channels.isdigit() and int(channels) > 0 else None
