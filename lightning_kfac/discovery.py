"""Finding the layers K-FAC preconditions, and the summary table of what it found.

Nothing is left silent: every module with trainable parameters of its own that K-FAC does
not precondition is listed in :attr:`Discovery.skipped` exactly once, with the reason, every
``include``/``exclude`` pattern that matches no module is reported, and so are the layers
that an option chosen away from its default (``reduce``, ``factor_examples``, the Cholesky
inverse) does not apply to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from lightning_kfac import registry
from lightning_kfac.attention import (
    PLAIN_BIAS_KV_REASON,
    MultiheadAttentionBlock,
    plain_parameter_names,
)
from lightning_kfac.blocks import LinearBlock
from lightning_kfac.curvature import CurvatureBlock, KroneckerBlock
from lightning_kfac.doubly_factored import DoublyFactoredLinearBlock, flattened_map_shape
from lightning_kfac.embedding import EmbeddingBlock
from lightning_kfac.normalization import ScaleShiftBlock
from lightning_kfac.registry import BlockFactory
from lightning_kfac.structure import StructurePolicy

#: The lookup from a module to the factory of its block (None if unsupported).
BlockTypeFor = Callable[[nn.Module], BlockFactory | None]

_NAMES_SHOWN = 5

LAZY_REASON = "lazy module not yet materialised (discover again after the first forward)"
ZERO_WIDTH_REASON = "zero-width layer (no parameters to precondition)"
MHA_CHILD_REASON = "used functionally by MultiheadAttention (its forward is never called)"
PARAMETRIZED_REASON = (
    "{names} parametrized (torch.nn.utils.parametrize): the gradient lands on the original "
    "parameters, which K-FAC does not precondition"
)
NOT_A_PARAMETER_REASON = (
    "weight is not an nn.Parameter (e.g. the old torch.nn.utils.weight_norm/spectral_norm): "
    "its gradient lands on {names}, which K-FAC does not precondition"
)
MHA_REASON = (
    "parameters of nn.MultiheadAttention ({names}) are used functionally and keep their "
    "plain gradient"
)
FROZEN_NOTE = (
    " at fit start: the layer keeps its plain gradient for the whole fit, even if it is "
    "unfrozen later (BackboneFinetuning); fit again after unfreezing to precondition it"
)
CONTAINER_REASON = "parameters of a container module ({names}) keep their plain gradient"

#: Per option: the blocks it applies to, and why some other block kinds keep their own rule.
_OPTION_SCOPES: dict[str, tuple[str, tuple[tuple[type[CurvatureBlock], str], ...]]] = {
    "inverse_method": (
        "only dense Linear and Conv factors take Cholesky inverses",
        (
            (KroneckerBlock, "block-diagonal and diagonal factor sides are eigendecomposed"),
            (EmbeddingBlock, "an Embedding's A is diagonal, inverted exactly"),
            (ScaleShiftBlock, "normalisation blocks are 2x2 per element, inverted exactly"),
            (MultiheadAttentionBlock, "MultiheadAttention's projections are eigendecomposed"),
            (DoublyFactoredLinearBlock, "doubly-factored heads have three factors"),
        ),
    ),
    "reduce": (
        "only Linear and Conv Kronecker blocks have K-FAC-reduce",
        (
            (EmbeddingBlock, "an Embedding counts every lookup"),
            (ScaleShiftBlock, "normalisation blocks always sum an example's positions"),
            (MultiheadAttentionBlock, "MultiheadAttention's projections use expand"),
            (DoublyFactoredLinearBlock, "doubly-factored heads use expand"),
        ),
    ),
    "factor_examples": (
        "only Linear and Conv Kronecker blocks take statistics from part of the batch, the "
        "others from every example",
        (),
    ),
}


@dataclass
class NotApplied:
    """An option chosen away from its default, and the registered layers it leaves as they
    are.

    Attributes:
        option: its name, ``"inverse_method"``, ``"reduce"`` or ``"factor_examples"``.
        value: its value.
        layers: the layers' names.
        reasons: why some of their block kinds keep their own rule (may be empty).
    """

    option: str
    value: object
    layers: list[str]
    reasons: list[str]

    def message(self) -> str:
        """The warning: the option, the first layers, their count and why."""
        names = [repr(name or "<root>") for name in self.layers]
        shown = ", ".join(names[:_NAMES_SHOWN]) + (", ..." if len(names) > _NAMES_SHOWN else "")
        count = f"{len(names)} layer{'s' if len(names) > 1 else ''}"
        why = f" ({'; '.join(self.reasons)})" if self.reasons else ""
        return (
            f"K-FAC: {self.option}={self.value!r} does not apply to {count} ({shown}): "
            f"{_OPTION_SCOPES[self.option][0]}{why}"
        )


@dataclass
class Skipped:
    """A module with parameters that K-FAC leaves with its plain gradient, and why."""

    name: str
    type_name: str
    reason: str


@dataclass
class Discovery:
    """The result of scanning a model.

    Attributes:
        blocks: the registered blocks by module name.
        skipped: modules with parameters of their own left with their plain gradient, each
            once, with the reason.
        unmatched_patterns: ``include``/``exclude`` patterns matching no module with
            parameters, as ``(option, pattern)``: ``("include", "enc.*")``.
        lazy: names of lazy modules not yet materialised; discover again after a forward.
        layer_names: names of the modules with parameters of their own (what patterns match).
        plain_parameter_count: trainable parameter elements left with their plain gradient
            (parameters of unmaterialised lazy modules are not counted).
        not_applied: the options chosen away from their default that some registered
            layers do not use (for ``reduce``, layers its patterns match), with the reason.
    """

    blocks: dict[str, CurvatureBlock]
    skipped: list[Skipped]
    unmatched_patterns: list[tuple[str, str]] = field(default_factory=list)
    lazy: list[str] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)
    plain_parameter_count: int = 0
    not_applied: list[NotApplied] = field(default_factory=list)

    def warnings(self) -> list[str]:
        """One message per pattern in :attr:`unmatched_patterns`, naming it (the options of
        :attr:`not_applied` have theirs in ``NotApplied.message``)."""
        names = [name for name in self.layer_names if name]
        shown = ", ".join(repr(name) for name in names[:_NAMES_SHOWN])
        if len(names) > _NAMES_SHOWN:
            shown += ", ..."
        messages = []
        for kind, pattern in self.unmatched_patterns:
            if kind in ("reduce", "factor_structure"):
                messages.append(
                    f"K-FAC: {kind} pattern {pattern!r} matches no registered Linear or Conv "
                    "layer; it changes nothing"
                )
                continue
            message = f"K-FAC: {kind} pattern {pattern!r} matches no module"
            if any(name.startswith(f"{pattern}.") for name in names):
                message += f" (patterns match full module names: did you mean '{pattern}.*'?)"
            if names:
                message += f"; module names look like: [{shown}]"
            else:
                message += "; the model has no module with parameters"
            messages.append(message)
        return messages


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def _names(parameters: Mapping[str, nn.Parameter]) -> str:
    return ", ".join(parameters) or "none"


def discover(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = (),
    *,
    reduce: Sequence[str] = (),
    structures: StructurePolicy | None = None,
    inverse: str = "eigen",
    factor_examples: int | None = None,
    block_type_for: BlockTypeFor = registry.block_type_for,
) -> Discovery:
    """Register every supported layer of ``model``.

    Args:
        model: the model; names are those of ``model.named_modules()``.
        include: glob patterns (``fnmatch``, e.g. ``"encoder.*"``); if given, only matching
            modules are registered.
        exclude: glob patterns of modules never registered (None: none).
        reduce: glob patterns of Linear and Conv layers that use K-FAC-reduce (their
            positions pooled into one prediction per example) instead of expand.
        structures: how wide factor sides of Linear and Conv layers are stored (default:
            ``StructurePolicy()``, dense up to 2048).
        inverse: ``"eigen"``, or ``"cholesky"`` for the dense Linear and Conv blocks
            (damped inverses instead of eigendecompositions; factored damping only).
        factor_examples: Linear and Conv layers take their statistics from the first this
            many examples of each pass (None: all).
        block_type_for: the lookup from a module to its block class (called as
            ``block_type_for(module)``, None if unsupported).

    Returns:
        The registered blocks by module name, the modules with trainable parameters of
        their own that were skipped (with the reason), the patterns that matched nothing and
        the lazy modules still to be materialised.
    """
    include = None if include is None else list(include)
    structures = structures or StructurePolicy()
    exclude = list(exclude or ())
    blocks: dict[str, CurvatureBlock] = {}
    skipped: list[Skipped] = []
    lazy: list[str] = []
    layer_names: list[str] = []
    covered: list[str] = []  # ``parametrizations`` subtrees, reported with their layer
    mha_children = {
        id(child)
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention)
        for child in module.children()
    }

    for name, module in model.named_modules():
        if any(name == prefix or name.startswith(f"{prefix}.") for prefix in covered):
            continue
        own = dict(module.named_parameters(recurse=False))
        parametrized = parametrize.is_parametrized(module)
        if parametrized:
            prefix = f"{name}.parametrizations" if name else "parametrizations"
            covered.append(prefix)
            own.update(
                (f"parametrizations.{key}", p)
                for key, p in module.parametrizations.named_parameters()
            )
        if not own:
            continue
        layer_names.append(name)
        if id(module) in mha_children and _covered(own, blocks):
            continue  # out_proj of a registered MultiheadAttention: preconditioned there
        block_type = block_type_for(module)
        reason = _reason(
            name,
            module,
            own,
            block_type,
            parametrized,
            id(module) in mha_children,
            include,
            exclude,
        )
        if reason == LAZY_REASON:
            lazy.append(name)
        if reason is None:
            try:
                blocks[name] = block_type(module)
            except TypeError as error:
                reason = str(error)
            if name in blocks and isinstance(module, nn.MultiheadAttention):
                plain = plain_parameter_names(module, blocks[name])
                if plain:  # bias_k, bias_v: listed, the projections are registered
                    reason = PLAIN_BIAS_KV_REASON.format(names=", ".join(plain))
        block = blocks.get(name)
        if type(block) is LinearBlock:
            block = blocks[name] = _doubly_factored(model, name, block, structures) or block
        if isinstance(block, KroneckerBlock):
            block.reduce = _matches(name, reduce)
            block.set_structure(
                structures.structure(name, "A", block.a_dim),
                structures.structure(name, "G", block.g_dim),
            )
            block.inverse = inverse if block.dense else "eigen"
            block.factor_examples = factor_examples
        if reason:
            skipped.append(Skipped(name, type(module).__name__, reason))

    unmatched = [
        (kind, pattern)
        for kind, patterns in (("include", include or []), ("exclude", exclude))
        for pattern in dict.fromkeys(patterns)
        if not any(fnmatchcase(name, pattern) for name in layer_names)
    ]
    reducible = [n for n, b in blocks.items() if isinstance(b, KroneckerBlock)]
    structured = reducible + [
        n for n, b in blocks.items() if isinstance(b, DoublyFactoredLinearBlock)
    ]
    unmatched += [
        (kind, pattern)
        for kind, patterns, names in (
            ("reduce", reduce, reducible),
            ("factor_structure", structures.overrides, structured),
        )
        for pattern in dict.fromkeys(patterns)
        if not any(fnmatchcase(name, pattern) for name in names)
    ]
    for name, reason in _tied(model, blocks).items():
        skipped.append(Skipped(name, type(blocks.pop(name).module).__name__, reason))
    preconditioned = {id(p) for block in blocks.values() for p in block.parameters()}
    plain = sum(
        p.numel()
        for p in model.parameters()
        if p.requires_grad
        and id(p) not in preconditioned
        and not isinstance(p, UninitializedParameter)
    )
    chosen = {"inverse_method": inverse, "reduce": list(reduce), "factor_examples": factor_examples}
    defaults = {"inverse_method": "eigen", "reduce": [], "factor_examples": None}
    applied = {"inverse_method": inverse, "reduce": True, "factor_examples": factor_examples}
    not_applied = [
        found
        for option, value in chosen.items()
        if value != defaults[option]
        and (found := _not_applied(option, value, applied[option], blocks)).layers
    ]
    return Discovery(blocks, skipped, unmatched, lazy, layer_names, plain, not_applied)


#: The block attribute each option sets where it applies.
_OPTION_ATTRIBUTES = {
    "inverse_method": "inverse",
    "reduce": "reduce",
    "factor_examples": "factor_examples",
}


def _not_applied(
    option: str, value: object, applied: object, blocks: Mapping[str, CurvatureBlock]
) -> NotApplied:
    """The blocks that ``option`` leaves as they are (for ``reduce``, of those its patterns
    match): those whose attribute did not become ``applied`` when they were registered, and
    why."""
    found = NotApplied(option, value, [], [])
    for name, block in blocks.items():
        if option == "reduce" and not _matches(name, value):
            continue
        if getattr(block, _OPTION_ATTRIBUTES[option], None) == applied:
            continue
        found.layers.append(name)
        clauses = _OPTION_SCOPES[option][1]
        reason = next((clause for kind, clause in clauses if isinstance(block, kind)), None)
        if reason is not None and reason not in found.reasons:
            found.reasons.append(reason)
    return found


def _covered(own: Mapping[str, nn.Parameter], blocks: Mapping[str, CurvatureBlock]) -> bool:
    """Whether every parameter in ``own`` is preconditioned by one of ``blocks``."""
    covered = {id(p) for block in blocks.values() for p in block.parameters()}
    return all(id(p) in covered for p in own.values())


def _doubly_factored(
    model: nn.Module, name: str, block: LinearBlock, structures: StructurePolicy
) -> DoublyFactoredLinearBlock | None:
    """The doubly-factored block of a Linear layer after ``nn.Flatten()``, where declared or
    where its input side is above the size limit and the map shape can be found."""
    choice = structures.doubly_factored(name, block.a_dim)
    if choice is None:
        return None
    declared, channels = choice
    module = block.module
    if channels:
        shape = (channels, module.in_features // channels)
    else:
        shape = flattened_map_shape(model, name)
    if shape is None or shape[0] * shape[1] != module.in_features:
        if declared:
            raise ValueError(
                f"factor_structure: the map shape of {name!r} (in_features="
                f"{module.in_features}) cannot be found; give 'doubly-factored:<channels>'"
            )
        return None
    return DoublyFactoredLinearBlock(module, *shape)


def _tied(model: nn.Module, blocks: Mapping[str, CurvatureBlock]) -> dict[str, str]:
    """Blocks holding a parameter that another module also owns (tied weights, such as an
    embedding and its output head), with the reason they stay plain: the parameter's
    gradient sums every use, and one layer's factors describe only its own."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    reasons = {}
    for name, block in blocks.items():
        inside = f"{name}." if name else ""
        others = sorted(
            {
                owner
                for p in block.parameters()
                for owner in owners.get(id(p), [])
                if owner != name and not owner.startswith(inside)  # the root holds all
            }
        )
        if others:
            reasons[name] = (
                f"shares a parameter with {', '.join(others)} (tied weights): its gradient "
                "holds every use, so this layer's factors alone would be wrong; plain gradient"
            )
    return reasons


def _reason(
    name: str,
    module: nn.Module,
    own: dict[str, nn.Parameter],
    block_type: BlockFactory | None,
    parametrized: bool,
    mha_child: bool,
    include: list[str] | None,
    exclude: list[str],
) -> str | None:
    """Why ``module`` is not registered: a reason, ``""`` to leave it unlisted, or None."""
    if any(isinstance(p, UninitializedParameter) for p in own.values()):
        return LAZY_REASON
    trainable = any(p.requires_grad for p in own.values())
    if block_type is None:
        if not trainable:
            return ""  # frozen: the plain gradient is no gradient
        if isinstance(module, nn.MultiheadAttention):
            return MHA_REASON.format(names=_names(own))
        if parametrized:
            return PARAMETRIZED_REASON.format(names=_parametrized_names(module))
        if next(module.children(), None) is not None:
            return CONTAINER_REASON.format(names=_names(own))
        return "unsupported layer type"
    if parametrized:
        return PARAMETRIZED_REASON.format(names=_parametrized_names(module))
    weight = getattr(module, "weight", None)
    if weight is not None and not isinstance(weight, nn.Parameter):
        return NOT_A_PARAMETER_REASON.format(names=_names(own))
    if mha_child:
        return MHA_CHILD_REASON
    if any(p.numel() == 0 for p in own.values()):
        return ZERO_WIDTH_REASON
    if include is not None and not _matches(name, include):
        return "not matched by include"
    if _matches(name, exclude):
        return "matched by exclude"
    if not trainable:
        return "all parameters frozen" + FROZEN_NOTE
    if weight is not None and not weight.requires_grad:
        return "weight frozen" + FROZEN_NOTE
    return None


def _parametrized_names(module: nn.Module) -> str:
    names = list(module.parametrizations.keys())
    return "weight is" if names == ["weight"] else f"{', '.join(names)} are"


def _shape_text(shape: Sequence[int]) -> str:
    shape = tuple(shape)
    if len(shape) in (2, 3):  # (groups, d): a diagonal kept as a vector; (groups, d, d)
        groups = f"{shape[0]} x " if shape[0] > 1 else ""
        body = f"diag {shape[1]}" if len(shape) == 2 else f"{shape[1]}x{shape[2]}"
        return groups + body
    return "x".join(str(size) for size in shape)


def _factors_text(block: CurvatureBlock) -> str:
    """``"A 11x11, G 10x10"``; numbered keys of one side (a block-diagonal factor's
    ``A0, A1, ...``) as one entry, ``"A0-A3 250x250..251x251"``."""
    sides: dict[str, list[tuple[str, str]]] = {}
    for key, shape in block.factor_shapes().items():
        side = key.rstrip("0123456789") if key[-1:].isdigit() else key
        sides.setdefault(side, []).append((key, _shape_text(shape)))
    parts = []
    for entries in sides.values():
        texts = sorted(set(text for _, text in entries))
        keys = entries[0][0] if len(entries) == 1 else f"{entries[0][0]}-{entries[-1][0]}"
        parts.append(f"{keys} {'..'.join(texts[:1] + texts[1:][-1:])}")
    return ", ".join(parts)


def summary_table(discovery: Discovery) -> str:
    """A text table of the registered layers, then the skipped ones and unmatched patterns."""
    rows = [("Name", "Type", "Kind", "Factors")]
    rows += [
        (
            name or "<root>",
            type(block.module).__name__,
            getattr(block, "kind", type(block).__name__),
            _factors_text(block),
        )
        for name, block in discovery.blocks.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"K-FAC registered layers ({len(discovery.blocks)}):"]
    lines += [
        "  " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows
    ]
    if discovery.skipped:
        lines.append(
            f"K-FAC skipped (plain gradient, {discovery.plain_parameter_count} trainable "
            "parameters in all):"
        )
        lines += [f"  {s.name or '<root>'} ({s.type_name}): {s.reason}" for s in discovery.skipped]
    if discovery.unmatched_patterns:
        unmatched = ", ".join(
            f"{kind} {pattern!r}" for kind, pattern in discovery.unmatched_patterns
        )
        lines.append(f"K-FAC patterns matching no module: {unmatched}")
    return "\n".join(lines)
