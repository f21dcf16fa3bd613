"""The K-FAC step: running factors, decompositions and preconditioned gradients.

``KFACEngine`` is plain PyTorch: it owns the blocks' factor capture, their running averages
and decompositions, and turns the gradients in ``.grad`` into preconditioned ones in place.
The Lightning callback only tells it when a batch starts and when the optimizer is about to
step.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_kfac.background import BackgroundDecomposer
from lightning_kfac.blocks import LayerBlock
from lightning_kfac.capture import FactorCapture, LossScale
from lightning_kfac.decomposition import Eigen, symmetric_eigen
from lightning_kfac.distribution import EigenPairs, FactorPairs, LocalDistribution
from lightning_kfac.factors import KroneckerFactors, update_running
from lightning_kfac.options import KFACOptions
from lightning_kfac.preconditioning import (
    damped_inverse_eigenvalues,
    kl_clip_scale,
    rotate_and_scale,
)


@dataclass
class StepStats:
    """What one K-FAC step did, for logging.

    ``kl_scale`` is a 0-dim tensor (reading it synchronises with the device).
    """

    step: int
    damping: float
    kl_scale: Tensor | None = None
    factors_updated: bool = False
    decomposed: bool = False
    factor_seconds: float = 0.0
    decomposition_seconds: float = 0.0


@dataclass
class PendingDecomposition:
    """Decompositions started in the background at ``origin_step`` from ``factors`` (the
    global factors of that step), installed at ``install_step``."""

    origin_step: int
    install_step: int
    factors: FactorPairs
    future: Future | None = None


@dataclass
class Counters:
    """Running counts of notable events (all ranks alike under data parallelism)."""

    skipped_batches: int = 0
    decompositions: int = 0
    decomposition_seconds: float = 0.0
    decomposition_fallbacks: Counter = field(default_factory=Counter)


class KFACEngine:
    """K-FAC for a fixed set of layer blocks.

    Args:
        blocks: ``{module name: block}``.
        options: the hyperparameters.
        distribution: how work is shared between processes (default: single process).
        warn: called with a message for conditions reported once (default ``warnings.warn``).
    """

    def __init__(
        self,
        blocks: Mapping[str, LayerBlock],
        options: KFACOptions,
        distribution: Any = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.blocks = dict(blocks)
        self.options = options
        self.distribution = distribution or LocalDistribution()
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=2))
        self.capture = FactorCapture(
            self.blocks, loss_reduction=options.loss_reduction, dtype=options.dtype
        )
        self.running = {name: KroneckerFactors() for name in self.blocks}
        self.reduced: FactorPairs = {}
        self.eigens: EigenPairs = {}
        #: ``{name: (damping, 1 / damped eigenvalue products)}``, reused while both hold.
        self._inverse_eigenvalues: dict[str, tuple[float, Tensor]] = {}
        self.steps = 0
        self.counters = Counters()
        self._reported_silent = False
        self._restored_decompositions = False
        #: Step whose factors the installed decompositions were computed from.
        self.decomposed_at: int | None = None
        self.pending: PendingDecomposition | None = None
        self.background = BackgroundDecomposer()
        self.distribution.setup(self.blocks, options.dtype)

    # -- lifecycle -------------------------------------------------------------------------

    def attach(self) -> None:
        """Install the hooks."""
        self.capture.attach()

    def detach(self) -> None:
        """Remove the hooks."""
        self.capture.detach()

    def close(self) -> None:
        """Remove the hooks and stop background work: a decomposition not yet started is
        cancelled, a running one is waited for. A pending decomposition is kept as its
        input factors and restarted by the next step, so training can go on afterwards."""
        self.detach()
        self.background.close()
        if self.pending is not None:
            self.pending.future = None

    def start_microbatch(self, loss_scale: LossScale = 1.0) -> None:
        """Called before each forward pass of training: arms the hooks on factor steps."""
        if self.options.is_factor_step(self.steps):
            self.capture.start_microbatch(loss_scale)
        else:
            self.capture.stop()

    # -- the step --------------------------------------------------------------------------

    def step(self, param_groups: Iterable[Mapping[str, Any]]) -> StepStats:
        """Precondition the gradients of the registered layers, in place.

        Call after backward (and after AMP unscaling), before the optimizer steps.

        Args:
            param_groups: the optimizer's param groups; each layer's learning rate (for the
                KL clip) is that of the group holding its weight, and layers whose weight is
                in no group are left alone.
        """
        param_groups = list(param_groups)
        step = self.steps
        stats = StepStats(step=step, damping=self.options.damping_at(step))
        self.capture.stop()
        if self.options.is_factor_step(step):
            start = time.perf_counter()
            hook_seconds = self.capture.seconds
            stats.factors_updated = self._update_factors(self.options.factor_decay_at(step))
            stats.factor_seconds = hook_seconds + time.perf_counter() - start
        start = time.perf_counter()
        stats.decomposed = self._update_decompositions(step, stats.damping)
        stats.decomposition_seconds = time.perf_counter() - start
        stats.kl_scale = self._precondition(param_groups, stats.damping, step)
        self._apply_momentum(param_groups, step)
        self.steps += 1
        return stats

    def _update_factors(self, decay: float) -> bool:
        batch = self.capture.pop()
        self._report_silent(batch)
        update = self.distribution.combine_batch(batch)
        if update is None:
            self.counters.skipped_batches += 1
            return False
        update_running(((self.running[n], A, G) for n, (A, G) in update.items()), decay)
        return True

    def _report_silent(self, batch: Mapping[str, Any]) -> None:
        if self._reported_silent:
            return
        self._reported_silent = True
        silent = [name for name in self.blocks if name not in batch]
        if silent:
            self.warn(
                "K-FAC: no forward/backward pass reached these registered layers on the first "
                f"factor step: {silent}. They keep their plain gradient until one does."
            )

    def _update_decompositions(self, step: int, damping: float) -> bool:
        """Install and start decompositions due at ``step``; True if any work was done.

        In order: after a resume, decompose again the saved factors behind the interrupted
        run's decompositions; install an asynchronous decomposition due now; on an
        inversion step, reduce the factors and decompose them, synchronously (always the
        very first time) or, with ``staleness`` s, in the background, to be installed at
        step + s, a step every rank knows in advance.
        """
        worked = False

        def decompose(matrix: Tensor) -> Eigen | None:
            return self._decompose(matrix, damping)

        if self._restored_decompositions:
            self._restored_decompositions = False
            owned = self.distribution.decompose_owned(self.reduced, decompose)
            self._install(self.distribution.share(owned, self.reduced), self.decomposed_at)
            worked = True
        if self.pending is not None and self.pending.future is None:
            self._submit(self.pending, decompose)  # restarted after a resume or a close
        if self.pending is not None and self.pending.install_step == step:
            pending, self.pending = self.pending, None
            owned = self.background.result(pending.future)
            self.reduced = pending.factors
            self._install(self.distribution.share(owned, pending.factors), pending.origin_step)
            worked = True
        if self.options.is_inverse_step(step):
            staleness = self.options.staleness
            if staleness and self.eigens:
                factors = self.distribution.reduce(self.running)
                self.pending = PendingDecomposition(step, step + staleness, factors)
                self._submit(self.pending, decompose)
            else:
                self.reduced, eigens = self.distribution.refresh(self.running, decompose)
                self._install(eigens, step)
            worked = True
        return worked

    def _submit(self, pending: PendingDecomposition, decompose) -> None:
        inputs = [t for pair in pending.factors.values() for t in pair]
        pending.future = self.background.submit(
            lambda: self.distribution.decompose_owned(pending.factors, decompose), inputs
        )

    def _install(self, eigens: EigenPairs, origin_step: int | None) -> None:
        for name, (eigen_a, eigen_g) in eigens.items():
            self._inverse_eigenvalues.pop(name, None)
            old_a, old_g = self.eigens.get(name, (None, None))
            self.eigens[name] = (eigen_a or old_a, eigen_g or old_g)
        self.decomposed_at = origin_step

    def _decompose(self, matrix: Tensor, damping: float) -> Eigen | None:
        start = time.perf_counter()
        eigen, report = symmetric_eigen(matrix, damping)
        self.counters.decomposition_seconds += time.perf_counter() - start
        self.counters.decompositions += 1
        if report.outcome != "ok":
            self.counters.decomposition_fallbacks[report.outcome] += 1
            self.warn(
                f"K-FAC: an eigendecomposition needed a fallback ({report.outcome}"
                + (f", added {report.jitter:.3g} I" if report.jitter else "")
                + "); the previous decomposition is kept if it failed."
            )
        return eigen

    def _precondition(
        self, param_groups: list[Mapping[str, Any]], damping: float, step: int
    ) -> Tensor | None:
        learning_rates = {id(p): group["lr"] for group in param_groups for p in group["params"]}
        grads = {}
        for name, block in self.blocks.items():
            # Layers in no param group of this optimizer, or never decomposed (the same set
            # on every rank), keep their plain gradient and stay out of the KL-clip sum.
            if id(block.module.weight) not in learning_rates or name not in self.reduced:
                continue
            grad = block.gradient()
            if grad is not None:
                grads[name] = grad

        def apply(name: str, grad: Tensor) -> Tensor:
            eigen_a, eigen_g = self.eigens.get(name, (None, None))
            if eigen_a is None or eigen_g is None:
                return grad
            cached = self._inverse_eigenvalues.get(name)
            if cached is None or cached[0] != damping:
                method = self.options.damping_method
                cached = (damping, damped_inverse_eigenvalues(eigen_g, eigen_a, damping, method))
                self._inverse_eigenvalues[name] = cached
            work = grad.to(eigen_a.vectors.dtype)
            return rotate_and_scale(work, eigen_g, eigen_a, cached[1]).to(grad.dtype)

        preconditioned = self.distribution.precondition(grads, apply)
        kl_clip = self.options.kl_clip_at(step)
        scale = None
        if kl_clip is not None and preconditioned:
            names = [name for name in self.blocks if name in preconditioned]  # fixed order
            dots = torch.stack(
                [torch.vdot(preconditioned[n].reshape(-1), grads[n].reshape(-1)) for n in names]
            )
            rates = [learning_rates[id(self.blocks[n].module.weight)] ** 2 for n in names]
            inner = (dots * dots.new_tensor(rates)).sum()
            scale = kl_clip_scale(inner, kl_clip)
        for name, new in preconditioned.items():
            if scale is not None:
                new = new * scale.to(new.dtype)
            self.blocks[name].set_gradient(new)
        return scale

    def skip_step(self) -> None:
        """Drop this step's captured factors without counting the step (e.g. when a
        GradScaler found non-finite gradients and will skip the optimizer step)."""
        self.capture.stop()
        self.capture.pop()

    def _apply_momentum(self, param_groups: list[Mapping[str, Any]], step: int) -> None:
        momentum = self.options.momentum_at(step)
        if momentum is None:
            return
        for group in param_groups:
            if "momentum" in group:
                group["momentum"] = momentum
            elif "betas" in group:
                group["betas"] = (momentum, *tuple(group["betas"])[1:])

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The engine's state: only tensors, dicts, lists and primitives (``weights_only``-safe).

        Under data parallelism this is a collective (the running factors are averaged over
        ranks), so every rank must call it, as Lightning's checkpointing does.
        """
        running = self.distribution.reduce(self.running)
        return {
            "format": 1,
            "steps": self.steps,
            "layers": {
                name: [list(s) for s in b.factor_shapes()] for name, b in self.blocks.items()
            },
            "running": {name: {"A": A, "G": G} for name, (A, G) in running.items()},
            "decomposed": {name: {"A": A, "G": G} for name, (A, G) in self.reduced.items()},
            "decomposed_at": self.decomposed_at,
            "pending": None
            if self.pending is None
            else {
                "origin_step": self.pending.origin_step,
                "install_step": self.pending.install_step,
                "factors": {n: {"A": A, "G": G} for n, (A, G) in self.pending.factors.items()},
            },
            "skipped_batches": self.counters.skipped_batches,
            "decompositions": self.counters.decompositions,
            "decomposition_fallbacks": dict(self.counters.decomposition_fallbacks),
            "reported_silent": self._reported_silent,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; decompositions are recomputed at the next step from the
        saved factors they were computed from (and a pending asynchronous decomposition is
        restarted from its saved input factors), so a resumed run continues exactly.

        Raises:
            ValueError: if the checkpoint's layers (names or factor shapes) differ from the
                registered ones, naming them.
        """
        saved = {name: [tuple(s) for s in shapes] for name, shapes in state["layers"].items()}
        current = {name: [tuple(s) for s in b.factor_shapes()] for name, b in self.blocks.items()}
        if saved != current:
            missing = sorted(set(saved) - set(current))
            extra = sorted(set(current) - set(saved))
            changed = sorted(n for n in set(saved) & set(current) if saved[n] != current[n])
            raise ValueError(
                "K-FAC: the checkpoint's registered layers differ from the model's: "
                f"in the checkpoint only: {missing}; in the model only: {extra}; "
                f"factor shapes changed: {changed}. Resume with the same model and the same "
                "include/exclude patterns, or start K-FAC afresh without its callback state."
            )
        device = next(iter(self.blocks.values())).module.weight.device
        self.steps = int(state["steps"])
        self.running = {name: KroneckerFactors() for name in self.blocks}
        for name, pair in state["running"].items():
            self.running[name] = KroneckerFactors(pair["A"].to(device), pair["G"].to(device))
        self.reduced = {
            name: (pair["A"].to(device), pair["G"].to(device))
            for name, pair in state["decomposed"].items()
        }
        self.eigens = {}
        self._restored_decompositions = bool(self.reduced)
        self.decomposed_at = state["decomposed_at"]
        self.background.close()
        self.pending = None
        if state["pending"] is not None:
            self.pending = PendingDecomposition(
                origin_step=int(state["pending"]["origin_step"]),
                install_step=int(state["pending"]["install_step"]),
                factors={
                    name: (pair["A"].to(device), pair["G"].to(device))
                    for name, pair in state["pending"]["factors"].items()
                },
            )
        self.counters = Counters(
            skipped_batches=int(state["skipped_batches"]),
            decompositions=int(state["decompositions"]),
            decomposition_fallbacks=Counter(state["decomposition_fallbacks"]),
        )
        self._reported_silent = bool(state["reported_silent"])

    # -- introspection ---------------------------------------------------------------------

    def factors(self) -> FactorPairs:
        """``{name: (A, G)}``: the running averages the decompositions are computed from.

        On one process these are the current running averages; under data parallelism, the
        globally reduced factors as of the last decomposition step.
        """
        if self.distribution.world_size == 1:
            return {name: (f.A, f.G) for name, f in self.running.items() if f.ready}
        return dict(self.reduced)
