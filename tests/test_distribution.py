"""The data-parallel distribution on 2 gloo processes, without Lightning."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_kfac.assignment import greedy_assignment
from lightning_kfac.blocks import LinearBlock
from lightning_kfac.capture import CapturedFactors
from lightning_kfac.communication import buckets, free_port, pack, unpack
from lightning_kfac.distribution import DataParallelDistribution
from lightning_kfac.factors import update_running
from lightning_kfac.options import DataParallelOptions
from tests.helpers import loads


def run_ranks(fn, *args, world_size: int = 2) -> None:
    mp.spawn(_entry, args=(fn, free_port(), world_size, *args), nprocs=world_size, join=True)


def _entry(rank, fn, port, world_size, *args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def test_pack_unpack_round_trip_and_buckets():
    torch.manual_seed(0)
    tensors = [torch.randn(2, 3, 3), torch.randn(1, 4, 4)]
    tensors = [t + t.mT for t in tensors]
    flat = pack(tensors, symmetric=True)
    assert flat.numel() == 2 * 6 + 10 and flat.is_contiguous()
    for got, want in zip(unpack(flat, [t.shape for t in tensors], symmetric=True), tensors):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert buckets([4, 4, 4, 10, 1], cap=8) == [[0, 1], [2], [3], [4]]


def test_greedy_assignment_is_balanced_and_deterministic():
    costs = {f"f{i}": float(c) for i, c in enumerate([64, 27, 27, 8, 8, 8, 1, 125])}
    owners = greedy_assignment(costs, 2)
    assert owners == greedy_assignment(dict(costs), 2)
    assert set(owners.values()) == {0, 1}
    totals = loads(costs, owners, 2)
    assert max(totals) - min(totals) <= max(costs.values())
    assert owners["f7"] == 0 and owners["f0"] == 1  # largest first, to the least loaded


def _blocks(widths):
    return {f"l{i}": LinearBlock(nn.Linear(w, 3)) for i, w in enumerate(widths)}


class BatchFactors(CapturedFactors):
    """A captured Kronecker batch with ``A`` and ``G`` attributes."""

    def __init__(self, A, G, examples):
        super().__init__({"A": A, "G": G}, examples)

    A = property(lambda self: self.factors["A"])
    G = property(lambda self: self.factors["G"])


def _pair(factors):
    return factors["A"], factors["G"]


def _uneven_and_non_finite(rank, every_update):
    torch.manual_seed(rank)
    blocks = _blocks([4, 5])
    distribution = DataParallelDistribution(
        options=DataParallelOptions(reduce_every_update=every_update)
    )
    distribution.setup(blocks, torch.float32)
    n = [6, 2][rank]  # uneven local batches

    def symmetric(d):
        x = torch.randn(1, d, d)
        return x + x.mT

    batch = {
        name: BatchFactors(A=symmetric(b.a_dim), G=symmetric(3), examples=n)
        for name, b in blocks.items()
    }
    everyone = [None, None]
    dist.all_gather_object(everyone, {k: (v.A, v.G) for k, v in batch.items()})
    combined = {n: _pair(f) for n, f in distribution.combine_batch(batch, list(blocks)).items()}
    # Whatever each rank folds in, the mean over ranks is the batch-size-weighted mean.
    for name in blocks:
        for index in range(2):
            local = combined[name][index].clone()
            dist.all_reduce(local)
            expected = (6 * everyone[0][name][index] + 2 * everyone[1][name][index]) / 8
            if every_update:
                torch.testing.assert_close(combined[name][index], expected)
            else:
                torch.testing.assert_close(local / 2, expected)
    # a non-finite factor on rank 1 only: both ranks skip
    if rank == 1:
        batch["l0"].G[0, 0, 0] = float("nan")
    assert distribution.combine_batch(batch, list(blocks)) is None
    # a block that fired only on rank 0 is left out on both ranks
    if rank == 1:
        del batch["l1"]
    batch["l0"].G.nan_to_num_(0.0)
    assert set(distribution.combine_batch(batch, list(blocks))) == {"l0"}


@pytest.mark.parametrize("every_update", [False, True])
def test_uneven_batches_weighted_and_non_finite_skipped_everywhere(every_update):
    run_ranks(_uneven_and_non_finite, every_update)


def _lazy_reduction_is_exact(rank):
    torch.manual_seed(10 + rank)
    blocks = _blocks([4])
    distribution = DataParallelDistribution(options=DataParallelOptions(pack_triangular=True))
    distribution.setup(blocks, torch.float64)
    running = {}
    history = []
    for _ in range(4):
        x = torch.randn(1, 5, 5, dtype=torch.float64)
        batch = {"l0": BatchFactors(A=x @ x.mT, G=x[:, :3, :3] @ x[:, :3, :3].mT, examples=4)}
        update_running([(running, distribution.combine_batch(batch, ["l0"])["l0"])], 0.9)
        gathered = [None, None]
        dist.all_gather_object(gathered, batch["l0"])
        history.append(gathered)
    factors = distribution.refresh(
        {"l0": running}, lambda units: dict.fromkeys(u for u, _ in units)
    )
    reduced = _pair(factors[0]["l0"])
    expected = None
    for gathered in history:  # the running average of the global (mean over ranks) batches
        batch_mean = (gathered[0].A + gathered[1].A) / 2
        expected = batch_mean if expected is None else 0.9 * expected + 0.1 * batch_mean
    torch.testing.assert_close(reduced[0], expected, rtol=1e-12, atol=1e-12)


def test_lazy_reduction_equals_running_average_of_global_batches():
    run_ranks(_lazy_reduction_is_exact)


def _mismatched_layers(rank, queue):
    blocks = _blocks([4, 5] if rank == 0 else [4, 6])
    try:
        DataParallelDistribution().setup(blocks, torch.float32)
        queue.put((rank, "no error"))
    except RuntimeError as error:
        queue.put((rank, str(error)))


def test_ranks_with_different_layers_fail_clearly_on_every_rank():
    queue = mp.get_context("spawn").Queue()
    run_ranks(_mismatched_layers, queue)
    messages = dict(queue.get(timeout=30) for _ in range(2))
    for message in messages.values():
        assert "ranks registered different layers" in message and "l1" in message
