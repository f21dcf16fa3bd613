"""K-FAC for ``nn.MultiheadAttention``: its four projections as Linear blocks (reference, 2-3).

``nn.MultiheadAttention`` runs its projections inside ``F.multi_head_attention_forward``:
the query, key and value projections from the packed ``in_proj_weight`` (or the separate
``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when ``kdim``/``vdim`` differ from
``embed_dim``), the output projection from ``out_proj.weight`` without calling ``out_proj``.
Each of them calls the module-global ``torch.nn.functional.linear``, so while a capture is
armed a forward pre-hook on the attention module replaces that name with a wrapper that
calls the original with the same arguments (the outputs, and so the gradients, are bit for
bit what they are without K-FAC) and reports every call whose weight is one of the
module's projections (the packed weight, a ``split``/``chunk`` view of it, a separate
weight, or ``out_proj.weight``) as one observation: its input for ``A``, its output's
gradient for ``G``. A forward hook that always runs (also when the forward raises) restores
the original. The replacement is visible to any thread calling ``F.linear`` during the
attention's forward; the wrapper passes such calls through unchanged.

**Factors.** Every projection ``p`` in ``q, k, v, o`` is a Linear block of its own with the
expand rule: ``A_p`` averages ``[a, 1][a, 1]^T`` over the projection's input rows (every
position of every call, the homogeneous 1 when the projection has a bias) and
``G_p = K sum_r g_r g_r^T`` over its output rows. The keys are always the eight
``A_q, G_q, A_k, G_k, A_v, G_v, A_o, G_o``, whatever a call passes: self-attention (query,
key and value one tensor) runs one packed projection, whose input ``A`` is computed once and
counted under ``A_q``, ``A_k`` and ``A_v`` (three equal running copies, each decomposed:
fixed keys cost two redundant ``(E+1)^2`` factors); cross-attention with key ``is`` value
shares one ``A`` between ``k`` and ``v``; three different tensors give three. The ``G`` of
a packed output ``(..., 3E)`` is split into its projections' ``E``-wide parts (the
cross-terms between projections are not kept: block-diagonal, as for separate layers).

**The gradient** of a block is the flat concatenation of ``V_p = grad [W_p | b_p]``
(``(E, a_p)``, ``W_p`` the projection's rows of ``in_proj_weight``, ``b_p`` of
``in_proj_bias``), preconditioned per projection as ``(G_p (x) A_p + lambda I)^-1``; blocks
of one geometry are preconditioned together, their projections of one shape in one batched
product.

``bias_k``/``bias_v`` (``add_bias_kv=True``) keep their plain gradient (reported in the
fit-start summary); ``add_zero_attn`` appends zeros after the projections and changes
nothing here. A module whose projections are partly frozen is left plain, with the reason.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
import torch.nn.functional as functional
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_kfac.capture import ObservedBlock, Observer
from lightning_kfac.curvature import BlockDecompositions, CurvatureBlock, Operator, gram
from lightning_kfac.decomposition import Eigen
from lightning_kfac.preconditioning import damped_inverse_eigenvalues, rotate_and_scale

#: The projections, in the order of ``in_proj_weight``'s rows and then the output.
PROJECTIONS = ("q", "k", "v", "o")
PARTLY_FROZEN_REASON = (
    "some MultiheadAttention projection weights are frozen ({names}): the layer keeps its "
    "plain gradient"
)
PLAIN_BIAS_KV_REASON = (
    "{names} of nn.MultiheadAttention keep their plain gradient (its projections are "
    "preconditioned)"
)


class MultiheadAttentionBlock(ObservedBlock):
    """``nn.MultiheadAttention``: four Linear K-FAC blocks, one per projection.

    Attributes:
        embed_dim: E, the output width of every projection.
        in_features: ``{projection: input width}`` (``kdim``, ``vdim`` for ``k``, ``v``).
        has_bias: ``{projection: whether its bias is part of [W | b]}``.
    """

    def __init__(self, module: nn.MultiheadAttention) -> None:
        super().__init__(module)
        self.embed_dim = e = module.embed_dim
        self.packed = bool(module._qkv_same_embed_dim)
        self.in_features = {"q": e, "k": module.kdim, "v": module.vdim, "o": e}
        if self.packed:
            weights = {"in_proj_weight": module.in_proj_weight}
        else:
            weights = {f"{p}_proj_weight": getattr(module, f"{p}_proj_weight") for p in "qkv"}
        weights["out_proj.weight"] = module.out_proj.weight
        frozen = [name for name, w in weights.items() if not w.requires_grad]
        if frozen:
            raise TypeError(PARTLY_FROZEN_REASON.format(names=", ".join(frozen)))
        in_bias, out_bias = module.in_proj_bias, module.out_proj.bias
        self.in_bias = in_bias if in_bias is not None and in_bias.requires_grad else None
        self.out_bias = out_bias if out_bias is not None and out_bias.requires_grad else None
        self.has_bias = {p: self.in_bias is not None for p in "qkv"}
        self.has_bias["o"] = self.out_bias is not None
        self._weights = list(weights.values())
        self._parameters = self._weights[:-1] + ([self.in_bias] if self.in_bias is not None else [])
        self._parameters += [self._weights[-1]] + ([self.out_bias] if self.has_bias["o"] else [])

    # -- what is kept ----------------------------------------------------------------------

    def a_dim(self, projection: str) -> int:
        """Side of ``A_projection`` (its input width, + 1 with a bias)."""
        return self.in_features[projection] + int(self.has_bias[projection])

    def parameters(self) -> list[nn.Parameter]:
        return self._parameters

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for p in PROJECTIONS:
            shapes[f"A_{p}"] = (1, self.a_dim(p), self.a_dim(p))
            shapes[f"G_{p}"] = (1, self.embed_dim, self.embed_dim)
        return shapes

    def decomposition_shapes(self, key: str) -> tuple[tuple[int, ...], ...]:
        groups, d, _ = self.factor_shapes()[key]
        return (groups, d), (groups, d, d)

    def rebuild(self, key: str, tensors: Sequence[Tensor]) -> Eigen:
        values, vectors = tensors
        return Eigen(vectors=vectors, values=values)

    # -- capture ---------------------------------------------------------------------------

    def projections_of(self, weight: Tensor) -> tuple[str, ...]:
        """The projections whose rows ``weight`` is (empty if none of this module's)."""
        module = self.module
        if weight is module.out_proj.weight:
            return ("o",)
        if not self.packed:
            for p in "qkv":
                if weight is getattr(module, f"{p}_proj_weight"):
                    return (p,)
            return ()
        packed = module.in_proj_weight
        if weight is packed:
            return ("q", "k", "v")
        if weight._base is not packed or weight.dim() != 2 or weight.stride() != packed.stride():
            return ()
        start, e = (weight.storage_offset() - packed.storage_offset()), self.embed_dim
        first, rows = divmod(start, packed.stride(0))
        if rows or first % e or weight.shape[0] % e or weight.shape[1] != packed.shape[1]:
            return ()
        return PROJECTIONS[first // e : (first + weight.shape[0]) // e]

    def install(self, observer: Observer) -> list[RemovableHandle]:
        """A pre-hook that wraps ``F.linear`` for the forward (only while the observer is
        watching), and a forward hook that always runs to restore it."""
        module = self.module
        saved: list[Any] = []  # the replaced F.linear of the call in progress, or None

        def before(mod, args, kwargs) -> None:
            if not observer.watching():
                saved.append(None)
                return
            query = args[0] if args else kwargs["query"]
            batched = query.dim() == 3
            examples = (query.shape[0] if mod.batch_first else query.shape[1]) if batched else 1
            original = functional.linear

            def linear(*args, **kwargs):
                output = original(*args, **kwargs)
                weight = args[1] if len(args) > 1 else kwargs["weight"]
                projections = self.projections_of(weight)
                if projections and isinstance(output, Tensor):
                    x = args[0] if args else kwargs["input"]
                    observer.observe(
                        x,
                        output,
                        projections,
                        layer_output=projections == ("o",),
                        examples=examples,
                    )
                return output

            saved.append(original)
            functional.linear = linear

        def after(mod, args, kwargs, output) -> None:
            original = saved.pop() if saved else None
            if original is not None:
                functional.linear = original

        return [
            module.register_forward_pre_hook(before, with_kwargs=True),
            module.register_forward_hook(after, with_kwargs=True, always_call=True),
        ]

    def capture_observed(
        self, x: Tensor, examples: int, tag: tuple[str, ...]
    ) -> tuple[dict[str, Tensor], int, Any]:
        rows = x.reshape(1, -1, x.shape[-1])
        a = gram(rows, self.has_bias[tag[0]])  # one input: counted for each projection
        return {f"A_{p}": a for p in tag}, rows.shape[1], tag

    def capture_output(self, grad_output: Tensor, context: tuple[str, ...]) -> dict[str, Tensor]:
        rows = grad_output.reshape(-1, len(context), self.embed_dim).transpose(0, 1)
        grams = rows.mT @ rows  # (projections, E, E)
        return {f"G_{p}": grams[i : i + 1] for i, p in enumerate(context)}

    # -- the gradient ----------------------------------------------------------------------

    def _rows(self, projection: str) -> tuple[Tensor, slice]:
        """The weight holding ``projection`` and its rows there."""
        e = self.embed_dim
        if projection == "o":
            return self._weights[-1], slice(0, e)
        if self.packed:
            i = "qkv".index(projection)
            return self._weights[0], slice(i * e, (i + 1) * e)
        return self._weights["qkv".index(projection)], slice(0, e)

    def _bias_rows(self, projection: str) -> tuple[Tensor | None, slice]:
        e = self.embed_dim
        if projection == "o":
            return self.out_bias, slice(0, e)
        i = "qkv".index(projection)
        return self.in_bias, slice(i * e, (i + 1) * e)

    def gradient(self) -> Tensor | None:
        """The flat concatenation of ``V_p = grad [W_p | b_p]`` for ``p`` in ``q, k, v, o``
        (row-major, ``(E, a_p)`` each), or None without the weights' gradients."""
        if any(w.grad is None for w in self._weights):
            return None
        parts = []
        for p in PROJECTIONS:
            weight, rows = self._rows(p)
            matrix = weight.grad[rows]
            if self.has_bias[p]:
                bias, bias_rows = self._bias_rows(p)
                column = bias.grad[bias_rows] if bias.grad is not None else None
                if column is None:
                    column = matrix.new_zeros(self.embed_dim)
                matrix = torch.cat([matrix, column.unsqueeze(-1)], dim=-1)
            parts.append(matrix.reshape(-1))
        return torch.cat(parts)

    def split(self, gradient: Tensor) -> list[Tensor]:
        """``gradient`` as the four ``V_p``, each ``(1, E, a_p)`` (views)."""
        sizes = [self.embed_dim * self.a_dim(p) for p in PROJECTIONS]
        return [
            part.view(1, self.embed_dim, self.a_dim(p))
            for p, part in zip(PROJECTIONS, gradient.split(sizes))
        ]

    def set_gradient(self, gradient: Tensor) -> None:
        for p, part in zip(PROJECTIONS, self.split(gradient)):
            weight, rows = self._rows(p)
            width = self.in_features[p]
            weight.grad[rows] = part[0, :, :width]
            if self.has_bias[p]:
                bias, bias_rows = self._bias_rows(p)
                if bias.grad is not None:
                    bias.grad[bias_rows] = part[0, :, width]

    def precondition(
        self, gradient: Tensor, decompositions: BlockDecompositions, damping: float, method: str
    ) -> Tensor:
        return type(self).operator([self], [decompositions], damping, method)([gradient])[0]

    def batch_key(self) -> Hashable:
        return (MultiheadAttentionBlock, self.embed_dim, tuple(map(self.a_dim, PROJECTIONS)))

    @classmethod
    def operator(
        cls,
        blocks: Sequence[CurvatureBlock],
        decompositions: Sequence[BlockDecompositions],
        damping: float,
        method: str,
    ) -> Operator:
        """Every projection of every block, those of one ``A`` side stacked along the groups
        dimension: one ``damped_inverse_eigenvalues`` and four batched products per shape."""
        first = blocks[0]
        assert isinstance(first, MultiheadAttentionBlock)
        by_width: dict[int, list[str]] = {}
        for p in PROJECTIONS:
            by_width.setdefault(first.a_dim(p), []).append(p)
        stacks = []
        for projections in by_width.values():
            eigen_a, eigen_g = (
                Eigen(
                    vectors=torch.cat(
                        [d[f"{f}_{p}"].vectors for d in decompositions for p in projections]
                    ),
                    values=torch.cat(
                        [d[f"{f}_{p}"].values for d in decompositions for p in projections]
                    ),
                )
                for f in "AG"
            )
            scale = damped_inverse_eigenvalues(eigen_g, eigen_a, damping, method)
            stacks.append(([PROJECTIONS.index(p) for p in projections], eigen_g, eigen_a, scale))

        def apply(gradients: Sequence[Tensor]) -> list[Tensor]:
            dtype = gradients[0].dtype
            parts = [blk.split(g) for blk, g in zip(blocks, gradients)]
            out: list[list[Tensor | None]] = [[None] * len(PROJECTIONS) for _ in blocks]
            for indices, eigen_g, eigen_a, scale in stacks:
                work = torch.cat([part[i] for part in parts for i in indices])
                done = rotate_and_scale(work.to(scale.dtype), eigen_g, eigen_a, scale)
                done = done.to(dtype).unbind()
                for j, (b, i) in enumerate((b, i) for b in range(len(blocks)) for i in indices):
                    out[b][i] = done[j].reshape(-1)
            return [torch.cat(row) for row in out]

        return apply


def plain_parameter_names(module: nn.MultiheadAttention, block: CurvatureBlock) -> list[str]:
    """The trainable parameters of ``module`` itself that ``block`` leaves plain
    (``bias_k``, ``bias_v``)."""
    covered = {id(p) for p in block.parameters()}
    return [
        name
        for name, p in module.named_parameters(recurse=False)
        if p.requires_grad and id(p) not in covered
    ]
