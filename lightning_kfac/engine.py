"""The K-FAC step: running factors, decompositions and preconditioned gradients.

``KFACEngine`` is plain PyTorch. It owns the blocks' statistics capture, their typed state
(``BlockState``) and the order of work in a step, and turns the gradients in ``.grad`` into
preconditioned ones in place. What a factor is, how it is decomposed and applied belongs to
the blocks; how work is shared between processes belongs to the distribution. Blocks whose
factors share a shape are decomposed and preconditioned in one batched call.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kfac.background import BackgroundDecomposer
from lightning_kfac.capture import FactorCapture, LossScale, LossTerms
from lightning_kfac.curvature import CurvatureBlock, Live, Operator
from lightning_kfac.decomposition import Decomposition
from lightning_kfac.distribution import Distribution, LocalDistribution, Unit
from lightning_kfac.factors import update_running
from lightning_kfac.likelihood import TrueFisher
from lightning_kfac.options import KFACOptions
from lightning_kfac.preconditioning import kl_clip_scale
from lightning_kfac.state import (
    FORMAT,
    BlockState,
    Decompositions,
    Factors,
    PendingDecomposition,
    upgrade,
)
from lightning_kfac.tiles import tiles


@dataclass
class StepStats:
    """What one K-FAC step did, for logging.

    ``kl_scale`` is a 0-dim tensor (reading it synchronises with the device).
    """

    step: int
    damping: float
    kl_scale: Tensor | None = None
    factor_seconds: float = 0.0
    decomposition_seconds: float = 0.0


@dataclass
class Counters:
    """Running counts of notable events (all ranks alike under data parallelism)."""

    skipped_batches: int = 0
    decompositions: int = 0
    decomposition_seconds: float = 0.0
    decomposition_fallbacks: Counter = field(default_factory=Counter)


class KFACEngine:
    """K-FAC for a fixed set of curvature blocks.

    Args:
        blocks: ``{module name: block}``.
        options: the hyperparameters.
        distribution: how work is shared between processes (default: single process).
        warn: called with a message for conditions reported once (default ``warnings.warn``).
        output_module: with ``fisher="true"``, the module whose output is the model output
            the targets are sampled at (default: the last registered layer the forward runs).
        seed: with ``fisher="true"``, the seed of the sampling generator (with the rank).
    """

    def __init__(
        self,
        blocks: Mapping[str, CurvatureBlock],
        options: KFACOptions,
        distribution: Distribution | None = None,
        warn: Callable[[str], None] | None = None,
        output_module: nn.Module | None = None,
        seed: int = 0,
    ) -> None:
        self.blocks = dict(blocks)
        self.options = options
        self.distribution: Distribution = distribution or LocalDistribution()
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=2))
        some = next(iter(self.blocks.values()), None)
        #: The factor dtype (``options.factor_dtype``, or following the parameters; fixed at
        #: ``attach``, after Lightning has converted the model's precision).
        self.dtype = options.dtype_for(some.parameters()[0].dtype if some else torch.float32)
        self.capture = FactorCapture(
            self.blocks,
            loss_reduction=options.loss_reduction,
            dtype=self.dtype,
            loss_terms="examples" if callable(options.loss_terms) else options.loss_terms,
        )
        self.capture.sampled = options.fisher == "true"
        #: The true Fisher's sampler (None for the empirical Fisher).
        self.true_fisher = (
            TrueFisher(options.likelihood, seed, self.distribution.rank)
            if options.fisher == "true"
            else None
        )
        self.output_module = output_module
        self._output: Tensor | None = None
        self._output_handle = None
        self.state = {name: BlockState() for name in self.blocks}
        #: Steps taken by each optimizer, by its index (a GAN's generator and discriminator
        #: each count their own).
        self.optimizer_steps: dict[int, int] = {}
        self.counters = Counters()
        #: Step whose factors the installed decompositions were computed from.
        self.decomposed_at: int | None = None
        #: Background decompositions in flight, by optimizer index.
        self.pending_by_optimizer: dict[int, PendingDecomposition] = {}
        self.background = BackgroundDecomposer()
        self._reported_silent = False
        self._restored_decompositions = False
        self._operators: dict[Hashable, tuple[float, Operator]] = {}
        self._is_set_up = False
        #: ``{name: live keys}`` of the blocks that have any (see ``CurvatureBlock.live_keys``).
        self._live = {n: tuple(b.live_keys()) for n, b in self.blocks.items() if b.live_keys()}
        #: ``{name: (keys decomposed, live keys)}``: what preconditioning a block needs.
        self._needed = {
            n: (set(b.factor_shapes()) - set(self._live.get(n, ())), set(self._live.get(n, ())))
            for n, b in self.blocks.items()
        }
        self._batch_keys = {n: b.batch_key() for n, b in self.blocks.items()}

    @property
    def pending(self) -> PendingDecomposition | None:
        """The first optimizer's background decomposition in flight, if any."""
        return self.pending_by_optimizer.get(0)

    @property
    def steps(self) -> int:
        """Optimizer steps taken (the most of any optimizer)."""
        return max(self.optimizer_steps.values(), default=0)

    # -- lifecycle -------------------------------------------------------------------------

    def attach(self) -> None:
        """Set up the distribution (a collective, once) and install the hooks."""
        if not self._is_set_up:
            some = next(iter(self.blocks.values()), None)
            if some is not None:
                self.dtype = self.options.dtype_for(some.parameters()[0].dtype)
                self.capture.dtype = self.dtype
            self.distribution.setup(self.blocks, self.dtype)
            self._is_set_up = True
        self.capture.attach()
        if self.output_module is not None and self._output_handle is None:
            self._output_handle = self.output_module.register_forward_hook(self._output_hook)

    def detach(self) -> None:
        """Remove the hooks."""
        self.capture.detach()
        if self._output_handle is not None:
            self._output_handle.remove()
            self._output_handle = None
        self._output = None

    def _output_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.capture.armed and torch.is_grad_enabled() and isinstance(output, Tensor):
            self._output = output

    def close(self) -> None:
        """Remove the hooks and stop background work: a decomposition not yet started is
        cancelled, a running one is waited for. A pending decomposition is kept as its
        input factors and restarted by the next step, so training can go on afterwards."""
        self.detach()
        self.background.close()
        for pending in self.pending_by_optimizer.values():
            pending.future = None

    def start_microbatch(
        self,
        loss_scale: LossScale = 1.0,
        examples: int | None = None,
        loss_terms: LossTerms | None = None,
    ) -> None:
        """Called before each training forward pass: arms the hooks on factor steps.

        Args:
            loss_scale: what the loss is multiplied by before backward.
            examples: N of this micro-batch (see ``FactorCapture.start_microbatch``).
            loss_terms: K of this micro-batch, overriding the ``loss_terms`` option.
        """
        if self._restored_decompositions and self._live:
            # blocks with live factors capture in the installed basis: restore it first
            self._restore_decompositions(self.options.damping_at(self.steps))
        if self.options.is_factor_step(self.steps):
            self.capture.start_microbatch(loss_scale, examples, loss_terms)
        else:
            self.capture.stop()

    def begin_backward(self, loss_scale: LossScale | None = None) -> None:
        """Called before each backward pass (see ``FactorCapture.begin_backward``). With the
        true Fisher, on factor steps, first runs the sampled backward pass."""
        self.capture.begin_backward(loss_scale)
        if self.true_fisher is not None and self.capture.armed:
            self.capture.sampled_backward(self._sampled_loss)

    def _sampled_loss(self) -> Tensor:
        """The sampled loss at the model output (the named module's output, else that of the
        last registered layer the forward pass ran), averaged over the pass's K terms."""
        if self.output_module is not None:
            output, module = self._output, self.output_module
            if output is None:
                raise ValueError(
                    "K-FAC: fisher='true': the fisher_output module "
                    f"{type(module).__name__} did not run in this forward pass"
                )
        elif self.capture.last_output is None:
            raise ValueError("K-FAC: fisher='true': no registered layer gave a model output")
        else:
            output, block = self.capture.last_output
            module = block.module
        self._output = None
        class_dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
        return self.true_fisher.sampled_loss(output, self.capture.terms(), class_dim)

    def end_backward(self) -> None:
        """Called after each backward pass (see ``FactorCapture.end_backward``)."""
        self.capture.end_backward()

    # -- the step --------------------------------------------------------------------------

    def step(self, param_groups: Iterable[Mapping[str, Any]], optimizer: int = 0) -> StepStats:
        """Precondition the gradients of the registered blocks this optimizer holds.

        Call after backward (and after AMP unscaling), before the optimizer steps.

        Args:
            param_groups: the optimizer's param groups; each block's learning rate (for the
                KL clip) is that of the group holding its first parameter, and blocks in no
                group are left alone (a layer unfrozen later joins when its group is added).
            optimizer: the optimizer's index; each optimizer counts its own steps, updates
                the factors of its own blocks and decomposes them.
        """
        param_groups = list(param_groups)
        rates = {id(p): group["lr"] for group in param_groups for p in group["params"]}
        names = tuple(n for n, b in self.blocks.items() if id(b.parameters()[0]) in rates)
        step = self.optimizer_steps.get(optimizer, 0)
        stats = StepStats(step=step, damping=self.options.damping_at(step))
        if self.options.is_factor_step(step):
            start = time.perf_counter()
            hook_seconds = self.capture.seconds
            self._update_factors(names, self.options.factor_decay_at(step))
            stats.factor_seconds = hook_seconds + time.perf_counter() - start
        start = time.perf_counter()
        self._update_decompositions(names, optimizer, step, stats.damping)
        stats.decomposition_seconds = time.perf_counter() - start
        learning_rates = {n: rates[id(self.blocks[n].parameters()[0])] for n in names}
        stats.kl_scale = self._precondition(learning_rates, stats.damping, step)
        self._apply_momentum(param_groups, step)
        self.optimizer_steps[optimizer] = step + 1
        return stats

    def _update_factors(self, names: tuple[str, ...], decay: float) -> None:
        batch = self.capture.pop(names)
        self._report_silent(batch, names)
        update = self.distribution.combine_batch(batch, names)
        if update is None:
            self.counters.skipped_batches += 1
            return
        update_running(((self.state[n].running, f) for n, f in update.items()), decay)
        live = {n for n in update if n in self._live}
        if live:  # operators read the live factors: rebuild those of the updated blocks
            stale = [key for key in self._operators if live.intersection(key[1])]
            for key in stale:
                del self._operators[key]

    def _report_silent(self, batch: Mapping[str, Any], names: tuple[str, ...]) -> None:
        if self._reported_silent:
            return
        self._reported_silent = True
        silent = [name for name in names if name not in batch]
        if silent:
            self.warn(
                "K-FAC: no forward/backward pass reached these registered layers on the first "
                f"factor step: {silent}. They keep their plain gradient until one does."
            )

    def _update_decompositions(
        self, names: tuple[str, ...], optimizer: int, step: int, damping: float
    ) -> None:
        """Install and start decompositions due at ``step`` for ``names``.

        In order: after a resume, decompose again the saved factors behind the interrupted
        run's decompositions; install an asynchronous decomposition due now; on an
        inversion step, reduce the factors and decompose them, synchronously (always the
        very first time) or, with ``staleness`` s, in the background, to be installed at
        step + s, a step every rank knows in advance.
        """

        def decompose(units: Sequence[tuple[Unit, Tensor]]) -> dict[Unit, Decomposition | None]:
            return self._decompose(units, damping)

        if self._restored_decompositions:
            self._restore_decompositions(damping)
        pending = self.pending_by_optimizer.get(optimizer)
        if pending is not None and pending.future is None:
            self._submit(pending, decompose)  # restarted after a resume or a close
        if pending is not None and pending.install_step == step:
            del self.pending_by_optimizer[optimizer]
            owned = self.background.result(pending.future)
            decompositions = self.distribution.share(owned, pending.factors)
            self._install(decompositions, pending.factors, pending.origin_step)
        if self.options.is_inverse_step(step):
            running = {
                n: self._decomposed_keys(n, self.state[n].running)
                for n in names
                if self.state[n].running
            }
            decomposed = any(self.state[n].decompositions for n in names)
            if self.options.staleness and decomposed:
                factors = self.distribution.reduce(running)
                pending = PendingDecomposition(step, step + self.options.staleness, factors)
                self.pending_by_optimizer[optimizer] = pending
                self._submit(pending, decompose)
            else:
                factors, decompositions = self.distribution.refresh(running, decompose)
                self._install(decompositions, factors, step)

    def _restore_decompositions(self, damping: float) -> None:
        """After a resume: decompose again the saved factors behind the interrupted run's
        decompositions and install them as they were (a collective under data parallelism;
        every rank does it at the same point)."""
        self._restored_decompositions = False
        saved = {n: s.decomposed for n, s in self.state.items() if s.decomposed}

        def decompose(units: Sequence[tuple[Unit, Tensor]]) -> dict[Unit, Decomposition | None]:
            return self._decompose(units, damping)

        owned = self.distribution.decompose_owned(saved, decompose)
        self._install(self.distribution.share(owned, saved), saved, self.decomposed_at, new=False)

    def _decomposed_keys(self, name: str, factors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``factors`` without the block's live keys (those are never decomposed)."""
        live = self._live.get(name, ())
        return {k: t for k, t in factors.items() if k not in live} if live else dict(factors)

    def _submit(self, pending: PendingDecomposition, decompose) -> None:
        inputs = [t for pair in pending.factors.values() for t in pair.values()]
        pending.future = self.background.submit(
            lambda: self.distribution.decompose_owned(pending.factors, decompose), inputs
        )

    def _install(
        self,
        decompositions: Decompositions,
        factors: Factors,
        origin_step: int | None,
        new: bool = True,
    ) -> None:
        for name, pair in factors.items():
            state = self.state[name]
            state.decomposed = pair
            for key, decomposition in decompositions.get(name, {}).items():
                if decomposition is not None:
                    state.decompositions[key] = decomposition
            if name in decompositions:
                self.blocks[name].installed(state.decompositions, state.running, new)
        self._operators.clear()
        self.decomposed_at = origin_step

    def _decompose(
        self, units: Sequence[tuple[Unit, Tensor]], damping: float
    ) -> dict[Unit, Decomposition | None]:
        """Decompose ``units``, one batched call per decomposition method and shape."""
        start = time.perf_counter()
        batches: dict[Hashable, list[tuple[Unit, Tensor]]] = defaultdict(list)
        for unit, matrix in units:
            method = self.blocks[unit[0]].decomposition_method(unit[1])
            batches[(id(method), method.batch_key(matrix))].append((unit, matrix))
        out: dict[Unit, Decomposition | None] = {}
        for batch in batches.values():
            method = self.blocks[batch[0][0][0]].decomposition_method(batch[0][0][1])
            results = method.decompose([matrix for _, matrix in batch], damping)
            for (unit, _), (decomposition, report) in zip(batch, results):
                out[unit] = decomposition
                if report.outcome != "ok":
                    self.counters.decomposition_fallbacks[report.outcome] += 1
                    self.warn(
                        f"K-FAC: decomposing {unit[1]} of {unit[0]!r} needed a fallback "
                        f"({report.outcome}"
                        + (f", added {report.jitter:.3g} I" if report.jitter else "")
                        + "); the previous decomposition is kept if it failed."
                    )
        self.counters.decompositions += len(units)
        self.counters.decomposition_seconds += time.perf_counter() - start
        return out

    def _precondition(
        self, learning_rates: Mapping[str, float], damping: float, step: int
    ) -> Tensor | None:
        # Blocks never decomposed (the same set on every rank) keep their plain gradient and
        # stay out of the KL-clip sum.
        grads: dict[str, Tensor] = {}
        batches: list[list[str]] = []  # of the blocks with a gradient
        for names in self._batches(n for n in learning_rates if self.state[n].decomposed):
            blocks = [self.blocks[n] for n in names]
            pairs = [p for p in zip(names, type(blocks[0]).gradients(blocks)) if p[1] is not None]
            grads.update(pairs)
            if pairs:
                batches.append([name for name, _ in pairs])
        if not grads:
            return None
        preconditioned = self.distribution.precondition(
            grads, lambda subset: self._apply(subset, damping)
        )
        kl_clip = self.options.kl_clip_at(step)
        scale = None
        if kl_clip is not None:
            total = self.distribution.inner(
                preconditioned,
                grads,
                lambda new, old: self._weighted_inner(new, old, learning_rates),
            )
            scale = kl_clip_scale(total, kl_clip)
            values = tiles(list(preconditioned.values()))
            torch._foreach_mul_(values, scale.to(values[0].dtype))
        for names in batches:
            blocks = [self.blocks[n] for n in names]
            type(blocks[0]).set_gradients(blocks, [preconditioned[n] for n in names])
        return scale

    def _batches(self, names: Iterable[str]) -> list[list[str]]:
        """``names`` grouped by the blocks' batch keys."""
        batches: dict[Hashable, list[str]] = defaultdict(list)
        for name in names:
            batches[self._batch_keys[name]].append(name)
        return list(batches.values())

    def _apply(self, grads: Mapping[str, Tensor], damping: float) -> dict[str, Tensor]:
        """Precondition ``grads``: blocks of one batch key through one cached operator; a
        block missing a decomposition passes its gradient through."""
        batches: dict[Hashable, list[str]] = defaultdict(list)
        out: dict[str, Tensor] = {}
        for name in grads:
            state, (needed, live) = self.state[name], self._needed[name]
            if needed <= state.decompositions.keys() and live <= state.running.keys():
                batches[self._batch_keys[name]].append(name)
            else:
                out[name] = grads[name]
        for key, names in batches.items():
            cache_key = (key, tuple(names))
            cached = self._operators.get(cache_key)
            if cached is None or cached[0] != damping:
                blocks = [self.blocks[n] for n in names]
                decompositions = [self._in_use(n) for n in names]
                operator = type(blocks[0]).operator(
                    blocks, decompositions, damping, self.options.damping_method
                )
                cached = self._operators[cache_key] = (damping, operator)
            out.update(zip(names, cached[1]([grads[n] for n in names])))
        return {name: out[name] for name in grads}

    def _in_use(self, name: str) -> dict[str, Any]:
        """The block's decompositions, with its live factors' current values as ``Live``."""
        state = self.state[name]
        live = self._live.get(name, ())
        if not live:
            return state.decompositions
        return {**state.decompositions, **{key: Live(state.running[key]) for key in live}}

    @staticmethod
    def _weighted_inner(
        preconditioned: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        learning_rates: Mapping[str, float],
    ) -> Tensor:
        """``sum_l lr_l**2 <V'_l, V_l>``: one dot product per stacked tensor of each
        distinct learning rate's blocks."""
        by_rate: dict[float, list[str]] = defaultdict(list)
        for name in preconditioned:
            by_rate[learning_rates[name]].append(name)
        terms = []  # one dot product per stacked tile: no copy of the gradients
        for rate, names in by_rate.items():
            new = tiles([preconditioned[n] for n in names])
            old = tiles([grads[n] for n in names])
            if [t.numel() for t in new] != [t.numel() for t in old]:  # stacked differently
                new, old = ([torch.cat([t.reshape(-1) for t in ts])] for ts in (new, old))
            for a, b in zip(new, old):
                terms.append(torch.dot(a.reshape(-1), b.reshape(-1).to(a.dtype)) * rate**2)
        if len(terms) < 2:
            return terms[0] if terms else None
        return torch.stack(terms).sum()

    def skip_step(self) -> None:
        """Drop this step's captured factors without counting the step (e.g. when a
        GradScaler found non-finite gradients and will skip the optimizer step)."""
        self.capture.stop()
        self.capture.discard()

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

    def _layers(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "kind": getattr(block, "kind", type(block).__name__),
                "factors": {k: list(s) for k, s in block.factor_shapes().items()},
            }
            for name, block in self.blocks.items()
        }

    def state_dict(self) -> dict[str, Any]:
        """The engine's state: only tensors, dicts, lists and primitives (``weights_only``-safe).

        Under data parallelism this is a collective (the running factors are averaged over
        ranks), so every rank must call it, as Lightning's checkpointing does.
        """
        running = self.distribution.reduce(
            {name: s.running for name, s in self.state.items() if s.running}
        )
        return {
            "format": FORMAT,
            "steps": self.steps,
            "optimizer_steps": dict(self.optimizer_steps),
            "layers": self._layers(),
            "running": running,
            "decomposed": {n: dict(s.decomposed) for n, s in self.state.items() if s.decomposed},
            "decomposed_at": self.decomposed_at,
            "pending": [
                {
                    "optimizer": optimizer,
                    "origin_step": p.origin_step,
                    "install_step": p.install_step,
                    "factors": p.factors,
                }
                for optimizer, p in self.pending_by_optimizer.items()
            ],
            "skipped_batches": self.counters.skipped_batches,
            "decompositions": self.counters.decompositions,
            "decomposition_fallbacks": dict(self.counters.decomposition_fallbacks),
            "reported_silent": self._reported_silent,
            **({"true_fisher": self._sampler_states()} if self.true_fisher else {}),
        }

    def _sampler_states(self) -> dict[str, Any]:
        """Every rank's sampling generator state, in rank order (a collective under data
        parallelism, as ``state_dict`` already is)."""
        mine = self.true_fisher.state_dict()
        collectives = getattr(self.distribution, "collectives", None)
        if self.distribution.world_size == 1 or collectives is None:
            return {"ranks": [mine]}
        return {"ranks": list(collectives.all_gather_object(mine))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` (this format, or format 1, upgraded); decompositions are
        recomputed at the next step from the saved factors they were computed from (and a
        pending asynchronous decomposition is restarted from its saved input factors), so a
        resumed run continues exactly.

        Raises:
            ValueError: for an unknown format, or if the checkpoint's layers (names, kinds
                or factor shapes) differ from the registered ones, naming them.
        """
        state = upgrade(state)
        self._check_layers(state["layers"])
        some = next(iter(self.blocks.values()))
        device = some.parameters()[0].device

        def to_device(factors: Mapping[str, Mapping[str, Tensor]]) -> Factors:
            return {n: {k: t.to(device) for k, t in pair.items()} for n, pair in factors.items()}

        self.optimizer_steps = {int(k): int(n) for k, n in state["optimizer_steps"].items()}
        self.state = {name: BlockState() for name in self.blocks}
        for name, pair in to_device(state["running"]).items():
            self.state[name].running = pair
        for name, pair in to_device(state["decomposed"]).items():
            self.state[name].decomposed = pair
        self._restored_decompositions = bool(state["decomposed"])
        self._operators.clear()
        self.decomposed_at = state["decomposed_at"]
        self.background.close()
        self.pending_by_optimizer = {
            int(p["optimizer"]): PendingDecomposition(
                origin_step=int(p["origin_step"]),
                install_step=int(p["install_step"]),
                factors=to_device(p["factors"]),
            )
            for p in state["pending"]
        }
        self.counters = Counters(
            skipped_batches=int(state["skipped_batches"]),
            decompositions=int(state["decompositions"]),
            decomposition_fallbacks=Counter(state["decomposition_fallbacks"]),
        )
        self._reported_silent = bool(state["reported_silent"])
        if self.true_fisher is not None and "true_fisher" in state:
            ranks = state["true_fisher"]["ranks"]
            if len(ranks) == self.distribution.world_size:
                self.true_fisher.load_state_dict(ranks[self.distribution.rank])
            else:  # another number of ranks: fresh streams, as a new run would draw
                self.warn(
                    f"K-FAC: the checkpoint's sampling generators are of {len(ranks)} ranks, "
                    f"this run has {self.distribution.world_size}; they start afresh"
                )

    def _check_layers(self, saved: Mapping[str, Mapping[str, Any]]) -> None:
        current = self._layers()

        def same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
            shapes = {k: tuple(s) for k, s in a["factors"].items()}
            if shapes != {k: tuple(s) for k, s in b["factors"].items()}:
                return False
            return a["kind"] is None or b["kind"] is None or a["kind"] == b["kind"]

        if set(saved) == set(current) and all(same(saved[n], current[n]) for n in saved):
            return
        missing = sorted(set(saved) - set(current))
        extra = sorted(set(current) - set(saved))
        changed = sorted(n for n in set(saved) & set(current) if not same(saved[n], current[n]))
        raise ValueError(
            "K-FAC: the checkpoint's registered layers differ from the model's: "
            f"in the checkpoint only: {missing}; in the model only: {extra}; "
            f"kind or factor shapes changed: {changed}. Resume with the same model and the "
            "same include/exclude patterns, or start K-FAC afresh without its callback state."
        )

    # -- introspection ---------------------------------------------------------------------

    def factors(self) -> dict[str, tuple[Tensor, ...]]:
        """``{name: factors}`` in the order of ``factor_shapes`` (``(A, G)`` for Kronecker
        blocks), without the groups dimension when it is 1.

        On one process these are the current running averages; under data parallelism, the
        globally reduced factors as of the last decomposition step.
        """
        if self.distribution.world_size == 1:
            source = {n: s.running for n, s in self.state.items() if s.running}
        else:
            source = {n: s.decomposed for n, s in self.state.items() if s.decomposed}
        return {
            name: tuple(t[0] if t.shape[0] == 1 else t for t in pair.values())
            for name, pair in source.items()
        }
