"""Hooks that collect one factor batch's statistics (reference, sections 1-2).

The layer input is taken by a forward hook, the output gradient by a tensor hook on the
layer's output (unlike ``register_full_backward_hook``, this works when an in-place
activation such as ``ReLU(inplace=True)`` follows the layer). Hooks do work only while the
capture is armed, in the factor dtype with autocast disabled.

What a block's factors see follows its gradient. The statistics of a forward pass are
*pending* until its backward pass ends; they are then *committed* with that pass's N (the
examples of the micro-batch: a property of the step, never read from a layer's input) and
K (what the loss averages over). A backward pass that does not reach a layer's weight
(frozen, or toggled off by another optimizer) commits nothing for it, and a backward pass
that starts a layer's gradient afresh (its ``.grad`` is None) drops what the layer had
committed before, so a layer's factors come from exactly the passes its gradient sums.

A layer that one forward hook on its module cannot observe (``nn.MultiheadAttention``, whose
projections run inside one functional call) has an ``ObservedBlock``: the block installs
hooks of its own and reports each ``(input, output)`` pair it sees through an ``Observer``.
Every such *observation* is pending and committed exactly like one call of a plain layer,
and an input statistic averages over the rows of the observations that produced it.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from abc import abstractmethod
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_kfac.curvature import CurvatureBlock
from lightning_kfac.tiles import tile_runs, tiles, untile

#: What the loss was multiplied by before backward: a number or a one-element tensor (a
#: GradScaler's scale, read by the hooks without a host sync).
LossScale = float | Tensor

#: What a mean-reduced loss averages over (reference, section 1): ``"examples"`` (K = N),
#: ``"positions"`` (K = the number of output positions of the last registered layer the
#: forward pass ran, N*T for a language model's head), ``"elements"`` (K = the number of
#: elements of that output: MSE averaged over every output), or K itself as a number.
LossTerms = str | float
LOSS_TERMS = ("examples", "positions", "elements")


@dataclass
class CapturedFactors:
    """One factor batch of one block.

    Attributes:
        factors: ``{key: tensor}`` of ``block.factor_shapes()``.
        examples: N summed over the passes that reached the block (weights ranks).
    """

    factors: dict[str, Tensor]
    examples: int


class Observer:
    """What an ``ObservedBlock``'s hooks report to: one per block, made by the capture."""

    def __init__(self, capture: FactorCapture, name: str, block: ObservedBlock) -> None:
        self._capture, self._name, self._block = capture, name, block

    def watching(self) -> bool:
        """Whether an observation made now would be recorded (the capture is armed, grad
        is enabled and the block's first parameter trains): hooks may skip all work else."""
        return (
            self._capture.armed
            and torch.is_grad_enabled()
            and self._block.parameters()[0].requires_grad
        )

    def observe(
        self, x: Tensor, output: Tensor, tag: Any, *, layer_output: bool, examples: int
    ) -> None:
        """Record one observation: ``block.capture_observed(x, N, tag)`` now, and
        ``block.capture_output`` on the gradient of ``output`` in the backward pass.

        Args:
            x: the input whose rows the input statistics average over.
            output: the tensor whose gradient the output statistics take (it must require
                grad; it is not changed).
            tag: which part of the layer this is, handed to ``capture_observed``.
            layer_output: whether ``output`` is the layer's output, counted by
                ``loss_terms="positions"``/``"elements"`` (the last such one of a pass gives K).
            examples: the examples this call holds, used as N when the pass does not say.
        """
        if not self.watching() or not output.requires_grad:
            return
        block = self._block
        self._capture._record(
            self._name,
            block,
            x,
            output,
            lambda rows, n: block.capture_observed(rows, n, tag),
            layer_output,
            examples,
        )


class ObservedBlock(CurvatureBlock):
    """A block whose layer installs its own hooks instead of the capture's forward hook,
    and may make several observations per call of its module (``Observer.observe``).

    ``capture_input`` is not used: the input statistics of an observation come from
    ``capture_observed``, its output statistics from ``capture_output`` as for any block.
    """

    @abstractmethod
    def install(self, observer: Observer) -> list[RemovableHandle]:
        """Register the hooks that observe the layer; returns their handles."""

    @abstractmethod
    def capture_observed(
        self, x: Tensor, examples: int, tag: Any
    ) -> tuple[dict[str, Tensor], int, Any]:
        """``capture_input`` for one observation: from its input (detached, in the factor
        dtype) ``(statistics summed over rows, number of rows, context)``."""

    def capture_input(self, x: Tensor, examples: int) -> tuple[dict[str, Tensor], int, Any]:
        raise TypeError(f"{type(self).__name__} is observed through install(), not its input")


@dataclass(slots=True)
class _Sums:
    inputs: dict[str, Tensor] = field(default_factory=dict)
    #: rows of one pending observation
    rows: int = 0
    outputs: dict[str, Tensor] = field(default_factory=dict)
    examples: int = 0
    #: committed: the rows behind each input statistic (the observations that made it)
    input_rows: dict[str, int] = field(default_factory=dict)
    #: a pending call whose statistics are computed after the backward pass, batched
    batched: _Batched | None = None
    #: whether ``outputs`` already carry the committing weight N K (batched calls)
    weighted: bool = False

    def reached(self) -> bool:
        """Whether a backward pass has reached this pending call."""
        return bool(self.outputs) or (self.batched is not None and self.batched.grad is not None)


@dataclass(slots=True)
class _Batched:
    """A call waiting for its statistics: its block, batch key, input and output gradient."""

    name: str
    block: CurvatureBlock
    key: Hashable
    x: Tensor
    #: ``x._version`` when the layer ran: the input must not have changed since
    version: int
    #: N of the call's pass
    examples: int
    grad: Tensor | None = None


def _add(total: dict[str, Tensor], part: Mapping[str, Tensor], weight: float = 1.0) -> None:
    for key, value in part.items():
        value = value * weight if weight != 1.0 else value
        total[key] = value if key not in total else total[key] + value


def _full_precision(device_type: str) -> contextlib.AbstractContextManager:
    """No autograd recording, and autocast off where it is on (entering an autocast context
    costs host time on every hook call, so it is skipped when there is nothing to undo)."""
    if torch.is_autocast_enabled(device_type):
        return _no_grad_no_autocast(device_type)
    return torch.no_grad()


@contextlib.contextmanager
def _no_grad_no_autocast(device_type: str):
    with torch.autocast(device_type, enabled=False), torch.no_grad():
        yield


class FactorCapture:
    """Forward and tensor hooks that accumulate factor statistics for a set of blocks.

    Args:
        blocks: ``{module name: block}``.
        loss_reduction: ``"mean"`` or ``"sum"`` (K = 1).
        dtype: dtype the statistics are computed in.
        loss_terms: what a mean-reduced loss averages over (``LOSS_TERMS`` or a number).
    """

    def __init__(
        self,
        blocks: Mapping[str, CurvatureBlock],
        *,
        loss_reduction: str,
        dtype: torch.dtype,
        loss_terms: LossTerms = "examples",
    ) -> None:
        self.blocks = dict(blocks)
        self.loss_reduction = loss_reduction
        self.dtype = dtype
        self.loss_terms = loss_terms
        self.armed = False
        self._loss_scale: LossScale = 1.0
        self._examples: int | None = None
        self._microbatch_terms: LossTerms | None = None
        #: (positions, elements) of each block's outputs since the last backward pass, and
        #: the block that ran last: what "positions"/"elements" count K from.
        self._outputs: dict[str, tuple[int, int]] = {}
        self._last_name: str | None = None
        #: Whether K counts the outputs (``_outputs`` is kept only then).
        self._counts_outputs = False
        #: Each block's forward calls not yet reached by a backward pass (one _Sums each).
        self._pending: dict[str, list[_Sums]] = {name: [] for name in self.blocks}
        self._committed = {name: _Sums() for name in self.blocks}
        self._handles: list[RemovableHandle] = []
        #: True Fisher: output statistics come from ``sampled_backward``'s gradients, not
        #: from the training backward pass (no tensor hooks are registered then).
        self.sampled = False
        #: The calls of this pass waiting for ``sampled_backward``: (call, block, context,
        #: gradient edge of the output).
        self._awaiting: list[tuple[_Sums, CurvatureBlock, Any, Any]] = []
        #: The output of the last registered layer the forward pass ran, and its block.
        self.last_output: tuple[Tensor, CurvatureBlock] | None = None
        #: Blocks whose call had no other of its statistics batch key in a pass: their calls
        #: are computed in the hooks, cheaper for one call than ``_batched_statistics``.
        self._lone: set[str] = set()
        #: Host seconds spent inside the hooks since the last ``pop`` (on a GPU this is the
        #: time to launch the kernels, not to run them).
        self.seconds = 0.0

    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        for name, block in self.blocks.items():
            if isinstance(block, ObservedBlock):
                self._handles += block.install(Observer(self, name, block))
                continue
            hook = self._forward_hook(name, block)
            self._handles.append(block.module.register_forward_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        """Remove every hook and disarm."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.armed = False

    def start_microbatch(
        self,
        loss_scale: LossScale = 1.0,
        examples: int | None = None,
        loss_terms: LossTerms | None = None,
    ) -> None:
        """Arm the hooks for one forward/backward pass (commits the previous one).

        Args:
            loss_scale: factor the loss was multiplied by before backward (``1/k`` under
                gradient accumulation over k micro-batches, times a GradScaler's scale).
            examples: N, the examples of this micro-batch. None: the leading dimension of
                the first registered layer's input in this pass (right for batch-first
                models only; the Lightning callback always passes N).
            loss_terms: K for this micro-batch, overriding the capture's ``loss_terms``.
        """
        self.end_backward()
        self._pending = {name: [] for name in self.blocks}  # never reached: dropped
        self.armed = True
        self._loss_scale = loss_scale
        self._examples = examples
        self._microbatch_terms = loss_terms
        terms = self.loss_terms if loss_terms is None else loss_terms
        self._counts_outputs = self.loss_reduction == "mean" and terms in ("positions", "elements")
        self._outputs, self._last_name = {}, None
        self._awaiting, self.last_output = [], None

    def stop(self) -> None:
        """Disarm the hooks; what was accumulated stays until ``pop``."""
        self.armed = False

    def begin_backward(self, loss_scale: LossScale | None = None) -> None:
        """Before a backward pass: a block whose gradient starts afresh (``.grad`` None)
        drops what it committed before.

        Args:
            loss_scale: what this pass's loss was multiplied by, if it differs from the
                micro-batch's (a GradScaler's scale exists only once it has scaled a loss).
        """
        if loss_scale is not None:
            self._loss_scale = loss_scale
        for name, block in self.blocks.items():
            if all(p.grad is None for p in block.parameters()):
                self._committed[name] = _Sums()

    def terms(self) -> float:
        """K of the pass whose forward just ran (before its backward)."""
        return self._terms(self._examples)

    def sampled_backward(self, sampled_loss: Callable[[], Tensor]) -> bool:
        """True Fisher: the output statistics of the calls of this pass from the gradients
        of ``sampled_loss()`` (called only if a call is waiting; unscaled: it is multiplied
        by the pass's loss scale here and divided again in the statistics, as the training
        loss is), by one extra backward pass over the same graph, which is kept for the
        training backward. No ``.grad`` is touched. Returns whether any call was waiting."""
        waiting, self._awaiting = self._awaiting, []
        if not waiting:
            return False
        start = time.perf_counter()
        grads = torch.autograd.grad(
            sampled_loss() * self._loss_scale,
            [edge for *_, edge in waiting],
            retain_graph=True,
            allow_unused=True,
        )
        for (call, block, context, _), grad in zip(waiting, grads):
            if grad is None:
                continue  # not reached by the model output: left pending, as in a backward
            if call.batched is not None:
                call.batched.grad = grad
                continue
            with _full_precision(grad.device.type):
                statistics = block.capture_output(self._unscaled(grad), context)
                _add(call.outputs, statistics)
        self.seconds += time.perf_counter() - start
        return True

    def end_backward(self) -> None:
        """After a backward pass: commit the pending statistics of every block it reached
        with this pass's N and K; drop those of blocks it did not reach."""
        self._awaiting, self.last_output = [], None
        reached = {n: [c for c in calls if c.reached()] for n, calls in self._pending.items()}
        reached = {n: calls for n, calls in reached.items() if calls}
        if not reached:
            return
        examples = self._examples
        k = self._terms(examples)
        self._outputs, self._last_name = {}, None
        weight = float((examples or 0) * k)
        batched = [c for calls in reached.values() for c in calls if c.batched is not None]
        if batched and examples:
            self._batched_statistics(batched, weight)
        for name, calls in reached.items():
            # calls this pass did not reach stay pending: a later backward of the step may
            # (one generator forward feeding a discriminator's and a generator's loss)
            self._pending[name] = [c for c in self._pending[name] if not c.reached()]
            if not examples:
                continue
            committed = self._committed[name]
            for call in calls:
                _add(committed.inputs, call.inputs)
                for key in call.inputs:
                    committed.input_rows[key] = committed.input_rows.get(key, 0) + call.rows
                _add(committed.outputs, call.outputs, 1.0 if call.weighted else weight)
            committed.examples += examples

    def _batched_statistics(self, calls: list[_Sums], weight: float | None) -> None:
        """The statistics of reached batchable calls, by one ``batched_statistics`` per
        batch key. Their output statistics are weighted by ``weight`` (N K) as committing
        weights those of the hooks; with None they are left unweighted, and the calls
        are committed as the hooks' are."""
        start = time.perf_counter()
        by_key: dict[Hashable, list[_Sums]] = defaultdict(list)
        for call in calls:
            if call.batched.x._version != call.batched.version:
                raise RuntimeError(
                    f"K-FAC: the input of layer {call.batched.name!r} was modified in place "
                    "after the layer ran, before the backward pass ended, so its factor "
                    "statistics cannot be taken from it; exclude the layer from K-FAC "
                    "(KFACCallback(exclude=[...])) or do not modify its input in place"
                )
            by_key[call.batched.key].append(call)
        for group in by_key.values():
            if weight is not None and len(group) == 1:
                # nothing to batch with: this block's later calls are computed in the hooks
                self._lone.add(group[0].batched.name)
            blocks = [call.batched.block for call in group]
            with _full_precision(group[0].batched.x.device.type):
                inputs = _stack([call.batched.x for call in group]).to(self.dtype)
                grads = _stack([call.batched.grad for call in group])
                grads = self._unscaled(grads)  # undone before the products
                examples = group[0].batched.examples  # the key's subset came from it: one per key
                results = type(blocks[0]).batched_statistics(blocks, inputs, grads, examples)
                if weight is not None:  # in place, on the products the views are slices of
                    outputs = tiles([t for *_, out in results for t in out.values()])
                    torch._foreach_mul_(outputs, weight)
            for call, (statistics, rows, outputs) in zip(group, results):
                call.inputs, call.rows, call.outputs = statistics, rows, outputs
                call.weighted = weight is not None
                call.batched = None
        self.seconds += time.perf_counter() - start

    def pop(self, names: Iterable[str] | None = None) -> dict[str, CapturedFactors]:
        """The committed factor batch of ``names`` (default: every block) that saw both
        passes; resets them."""
        self.end_backward()
        complete: dict[str, _Sums] = {}
        for name in self.blocks if names is None else names:
            sums, self._committed[name] = self._committed[name], _Sums()
            keys = self.blocks[name].factor_shapes()
            if sums.examples and set(sums.inputs) | set(sums.outputs) >= set(keys):
                complete[name] = sums
        # every input statistic, then every output one: the slices of one batched product
        # are then consecutive, and each product is scaled by one op
        values: list[Tensor] = []
        scales: list[float] = []  # inputs average over rows, outputs over examples
        for sums in complete.values():
            values += sums.inputs.values()
            scales += [1.0 / sums.input_rows[key] for key in sums.inputs]
        for sums in complete.values():
            values += sums.outputs.values()
            scales += [1.0 / sums.examples] * len(sums.outputs)
        runs = tile_runs(values)
        averages: list[Tensor] = []
        if runs:  # each run scaled by its first tensor's scale (a run's are all alike)
            firsts = itertools.accumulate([count for _, count in runs[:-1]], initial=0)
            scaled = torch._foreach_mul([t for t, _ in runs], [scales[i] for i in firsts])
            averages = untile(values, runs, scaled)
        found = iter(averages)
        inputs = {n: {key: next(found) for key in sums.inputs} for n, sums in complete.items()}
        outputs = {n: {key: next(found) for key in sums.outputs} for n, sums in complete.items()}
        self.seconds = 0.0
        return {
            name: CapturedFactors(inputs[name] | outputs[name], sums.examples)
            for name, sums in complete.items()
        }

    def discard(self) -> None:
        """Drop everything pending and committed."""
        self._awaiting, self.last_output = [], None
        self._pending = {name: [] for name in self.blocks}
        self._committed = {name: _Sums() for name in self.blocks}
        self.seconds = 0.0

    def _unscaled(self, grad: Tensor) -> Tensor:
        """``grad`` in the factor dtype with the loss scale undone: ``grad`` itself when
        neither changes it (statistics only read their output gradient, never write it)."""
        grad = grad.to(self.dtype)
        scale = self._loss_scale
        return grad if isinstance(scale, (int, float)) and scale == 1 else grad / scale

    def _terms(self, examples: int | None) -> float:
        """K: what the loss of the pass just ended averages over."""
        if self.loss_reduction == "sum":
            return 1.0
        terms = self._microbatch_terms if self._microbatch_terms is not None else self.loss_terms
        if not isinstance(terms, str):
            return float(terms)
        if terms == "examples" or self._last_name is None:
            return float(examples or 0)
        positions, elements = self._outputs[self._last_name]
        return float(elements if terms == "elements" else positions)

    def _forward_hook(self, name: str, block: CurvatureBlock):
        def hook(module, args, kwargs, output) -> None:
            if not self.armed or not torch.is_grad_enabled() or not isinstance(output, Tensor):
                return
            if not output.requires_grad or not block.parameters()[0].requires_grad:
                return
            x = args[0] if args else next(iter(kwargs.values()))
            examples = x.shape[0] if x.dim() > 1 else 1
            self._record(name, block, x, output, block.capture_input, True, examples, True)

        return hook

    def _record(
        self,
        name: str,
        block: CurvatureBlock,
        x: Tensor,
        output: Tensor,
        capture_input: Callable[[Tensor, int], tuple[dict[str, Tensor], int, Any]],
        layer_output: bool,
        examples: int,
        batchable: bool = False,
    ) -> None:
        """One call (or observation): its input statistics now, pending; a tensor hook on
        ``output`` for the output statistics. A ``batchable`` call of a block that gives it
        a statistics batch key keeps its input and output gradient instead, for
        ``_batched_statistics``."""
        start = time.perf_counter()
        if self._examples is None:
            self._examples = examples
        if layer_output:
            if self._counts_outputs:
                positions, elements = self._outputs.get(name, (0, 0))
                self._outputs[name] = (
                    positions + _positions(block, output),
                    elements + output.numel(),
                )
            self._last_name = name
            if self.sampled:
                self.last_output = (output, block)
        key = (
            block.statistics_batch_key(x, output, self._examples)
            if batchable and name not in self._lone
            else None
        )
        if key is not None:
            batched = _Batched(name, block, key, x, x._version, self._examples)
            call, context = _Sums(batched=batched), None
            self._pending[name].append(call)
        else:
            with _full_precision(x.device.type):
                statistics, rows, context = capture_input(x.detach().to(self.dtype), self._examples)
                call = _Sums(rows=rows)
                _add(call.inputs, statistics)
                self._pending[name].append(call)
        if self.sampled:
            edge = torch.autograd.graph.get_gradient_edge(output)
            self._awaiting.append((call, block, context, edge))
        else:
            output.register_hook(self._gradient_hook(call, block, context))
        self.seconds += time.perf_counter() - start

    def _gradient_hook(self, call: _Sums, block: CurvatureBlock, context: Any):
        def hook(grad: Tensor) -> None:
            if call.batched is not None:
                if call.batched.grad is None:
                    call.batched.grad = grad
                    return
                # a second gradient of one call (a backward over a retained graph): the
                # first one's statistics now, then this one's as the hooks take them
                self._batched_statistics([call], None)
            start = time.perf_counter()
            with _full_precision(grad.device.type):
                statistics = block.capture_output(self._unscaled(grad), context)
                _add(call.outputs, statistics)
            self.seconds += time.perf_counter() - start

        return hook


def _stack(tensors: list[Tensor]) -> Tensor:
    """``torch.stack(tensors)``, a view for one tensor."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _positions(block: CurvatureBlock, output: Tensor) -> int:
    """Output positions of one call: every element but the channels (a Linear's last
    dimension; a convolution's channel dimension, 1 or 0 unbatched)."""
    module = block.module
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        channels = output.shape[1 if output.dim() == len(module.kernel_size) + 2 else 0]
    else:
        channels = output.shape[-1] if output.dim() else 1
    return output.numel() // max(channels, 1)
