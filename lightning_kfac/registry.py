"""Which curvature block a module class gets: an open table with a per-fit override.

Defaults: Linear and Conv1d/2d/3d (dense Kronecker), Embedding (diagonal input factor),
LayerNorm, GroupNorm, BatchNorm1d/2d/3d and RMSNorm (scale-and-shift), MultiheadAttention
(one dense Kronecker block per projection).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from lightning_kfac.attention import MultiheadAttentionBlock
from lightning_kfac.blocks import ConvBlock, LinearBlock
from lightning_kfac.curvature import CurvatureBlock
from lightning_kfac.embedding import EmbeddingBlock
from lightning_kfac.normalization import (
    BatchNormBlock,
    GroupNormBlock,
    LayerNormBlock,
    RMSNormBlock,
)

#: Builds the block of one module; raises TypeError for a module it cannot handle (the
#: message becomes the reason in the fit-start summary).
BlockFactory = Callable[[nn.Module], CurvatureBlock]

_BLOCK_TYPES: dict[type[nn.Module], BlockFactory] = {
    nn.Linear: LinearBlock,
    nn.Conv1d: ConvBlock,
    nn.Conv2d: ConvBlock,
    nn.Conv3d: ConvBlock,
    nn.Embedding: EmbeddingBlock,
    nn.LayerNorm: LayerNormBlock,
    nn.GroupNorm: GroupNormBlock,
    nn.BatchNorm1d: BatchNormBlock,
    nn.BatchNorm2d: BatchNormBlock,
    nn.BatchNorm3d: BatchNormBlock,
    nn.RMSNorm: RMSNormBlock,
    nn.MultiheadAttention: MultiheadAttentionBlock,
}


def register_block_type(module_type: type[nn.Module], block_type: BlockFactory) -> None:
    """Give every module of ``module_type`` (and of its subclasses that keep its
    ``forward``) the curvature block ``block_type``, replacing any earlier entry.

    Example::

        register_block_type(nn.Linear, DiagonalLinearBlock)
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ValueError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not callable(block_type):
        raise ValueError(f"block_type must be a CurvatureBlock class, got {block_type!r}")
    _BLOCK_TYPES[module_type] = block_type


def registered_block_types() -> dict[type[nn.Module], BlockFactory]:
    """A copy of the table: ``{module class: block class}``."""
    return dict(_BLOCK_TYPES)


def block_type_for(
    module: nn.Module, overrides: Mapping[type[nn.Module], BlockFactory] | None = None
) -> BlockFactory | None:
    """The block class for ``module``, or None if its type is not supported.

    ``overrides`` (for one fit) are looked up before the table; the most specific class in
    the module's method resolution order wins. A subclass of a supported layer qualifies
    only if it keeps the base class's ``forward``: one that overrides it may compute
    something the block cannot see.
    """
    tables = [overrides or {}, _BLOCK_TYPES]
    for base in type(module).__mro__:
        for table in tables:
            block_type = table.get(base)
            if block_type is not None:
                return block_type if type(module).forward is base.forward else None
    return None
