"""The doubly-factored approximation of distributed K-FAC for a Linear layer fed by a
flattened ``J x T`` map (reference, section 5).

After ``nn.Flatten()`` of a ``(N, J, T)`` feature map (J channels, T locations) a Linear
layer's input factor ``A`` is ``(JT)^2``: too large to keep, update or decompose. Each input
row ``x = vec(X)`` (channel-major, as PyTorch flattens) is approximated by the best rank-one
``X ~= p q^T`` (``p = sqrt(s_1) u_1``, ``q = sqrt(s_1) v_1`` from its SVD), so that
``x ~= p (x) q`` and

    A ~= Phi (x) Omega,   Phi = mean_r p_r p_r^T  (J x J),   Omega = mean_r q_r q_r^T  (T x T).

The weight's curvature is ``G (x) Phi (x) Omega``, three eigendecomposed factors, damped
exactly (``1 / (e_G e_Phi e_Omega + lambda)``) or factored (``k = 3``). The bias's block is
exactly ``G`` (its input is the constant 1): ``(G + lambda I)^-1 g_b``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kfac.curvature import BlockDecompositions, CurvatureBlock
from lightning_kfac.decomposition import Eigen
from lightning_kfac.preconditioning import factored_damping


class DoublyFactoredLinearBlock(CurvatureBlock):
    """``nn.Linear`` whose input is a flattened ``(channels, locations)`` map.

    Factors ``"Phi"`` ``(1, J, J)``, ``"Omega"`` ``(1, T, T)`` and ``"G"``
    ``(1, d_out, d_out)``. The gradient layout is ``[W | b]``, ``(1, d_out, J*T (+1))``.

    Args:
        module: the Linear layer, ``in_features == channels * locations``.
        channels: J.
        locations: T.
    """

    def __init__(self, module: nn.Linear, channels: int, locations: int) -> None:
        super().__init__(module)
        if channels * locations != module.in_features:
            raise TypeError(
                f"a {channels} x {locations} map does not flatten to in_features="
                f"{module.in_features}"
            )
        self.channels, self.locations = channels, locations
        bias = module.bias
        self.has_bias = bias is not None and bias.requires_grad
        self._parameters = [module.weight] + ([bias] if self.has_bias else [])

    @property
    def kind(self) -> str:
        return f"{type(self).__name__} ({self.channels} x {self.locations} map)"

    def parameters(self) -> list[nn.Parameter]:
        return self._parameters

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        j, t, d = self.channels, self.locations, self.module.out_features
        return {"Phi": (1, j, j), "Omega": (1, t, t), "G": (1, d, d)}

    def capture_input(self, x: Tensor, examples: int) -> tuple[dict[str, Tensor], int, Any]:
        maps = x.reshape(-1, self.channels, self.locations)
        u, s, vh = torch.linalg.svd(maps, full_matrices=False)
        scale = s[:, :1].sqrt()  # (rows, 1)
        p, q = u[:, :, 0] * scale, vh[:, 0, :] * scale  # (rows, J), (rows, T)
        statistics = {"Phi": (p.mT @ p).unsqueeze(0), "Omega": (q.mT @ q).unsqueeze(0)}
        return statistics, maps.shape[0], None

    def capture_output(self, grad_output: Tensor, context: Any) -> dict[str, Tensor]:
        rows = grad_output.reshape(-1, self.module.out_features)
        return {"G": (rows.mT @ rows).unsqueeze(0)}

    def decomposition_cost(self, key: str) -> float:
        return float(self.factor_shapes()[key][-1] ** 3)

    def decomposition_shapes(self, key: str) -> tuple[tuple[int, ...], ...]:
        _, d, _ = self.factor_shapes()[key]
        return (1, d), (1, d, d)

    def rebuild(self, key: str, tensors: Sequence[Tensor]) -> Eigen:
        values, vectors = tensors
        return Eigen(vectors=vectors, values=values)

    def gradient(self) -> Tensor | None:
        weight_grad = self.module.weight.grad
        if weight_grad is None:
            return None
        if not self.has_bias:
            return weight_grad.unsqueeze(0)
        bias_grad = self.module.bias.grad
        if bias_grad is None:
            bias_grad = torch.zeros_like(self.module.bias)
        return torch.cat([weight_grad, bias_grad[:, None]], dim=1).unsqueeze(0)

    def set_gradient(self, gradient: Tensor) -> None:
        features = self.module.in_features
        self.module.weight.grad.copy_(gradient[0, :, :features])
        if self.has_bias and self.module.bias.grad is not None:
            self.module.bias.grad.copy_(gradient[0, :, features])

    def precondition(
        self, gradient: Tensor, decompositions: BlockDecompositions, damping: float, method: str
    ) -> Tensor:
        g, phi, omega = decompositions["G"], decompositions["Phi"], decompositions["Omega"]
        q_g, q_phi, q_omega = g.vectors[0], phi.vectors[0], omega.vectors[0]
        e_g, e_phi, e_omega = g.values[0], phi.values[0], omega.values[0]
        work = gradient[0].to(q_g.dtype)
        features = self.module.in_features
        weight = work[:, :features].reshape(-1, self.channels, self.locations)
        # Q_G^T, Q_Phi^T, Q_Omega^T along the three modes of the weight gradient
        rotated = torch.einsum("oa,ojt,jb,tc->abc", q_g, weight, q_phi, q_omega)
        if method == "exact":
            curvature = e_g[:, None, None] * e_phi[None, :, None] * e_omega[None, None, :]
            scaled = rotated / (curvature + damping)
        elif method == "factored":
            traces = [e.mean().reshape(1) for e in (e_g, e_phi, e_omega)]
            d_g, d_phi, d_omega = (d[0] for d in factored_damping(traces, damping))
            scaled = rotated / (
                (e_g + d_g)[:, None, None] * (e_phi + d_phi)[None, :, None] * (e_omega + d_omega)
            )
        else:
            raise ValueError(f"method must be 'exact' or 'factored', got {method!r}")
        out = torch.einsum("oa,abc,jb,tc->ojt", q_g, scaled, q_phi, q_omega).reshape(-1, features)
        if self.has_bias:  # the bias block is G: (G + lambda I)^-1 g_b
            bias = q_g @ ((q_g.mT @ work[:, features]) / (e_g + damping))
            out = torch.cat([out, bias[:, None]], dim=1)
        return out.unsqueeze(0).to(gradient.dtype)

    def batch_key(self) -> Hashable:
        return id(self)


def flattened_map_shape(model: nn.Module, name: str) -> tuple[int, int] | None:
    """``(J, T)`` of the map a Linear named ``name`` receives through ``nn.Flatten()`` in an
    ``nn.Sequential``: J from the nearest earlier module with a channel count (a conv's
    ``out_channels``, a norm's ``num_features``/``num_channels``); None if not that pattern."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return None
    children = list(parent.named_children())
    index = next((i for i, (n, _) in enumerate(children) if n == child), None)
    if index is None or index == 0:
        return None
    flatten = children[index - 1][1]
    if not (isinstance(flatten, nn.Flatten) and flatten.start_dim == 1 and flatten.end_dim == -1):
        return None
    linear = children[index][1]
    for _, module in reversed(children[: index - 1]):
        for attribute in ("out_channels", "num_features", "num_channels"):
            channels = getattr(module, attribute, None)
            if isinstance(channels, int) and channels > 0:
                if linear.in_features % channels:
                    return None
                return channels, linear.in_features // channels
    return None
