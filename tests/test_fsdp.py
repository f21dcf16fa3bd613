"""K-FAC under FSDP2 (sharded parameters): 2 CPU ranks (gloo), float64, against one process.

One worker script (``tests/scripts/fit_sharded.py``), started as 2 ranks sharing a process
group, runs every sharded fit; the single-process references run here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_kfac import KFACCallback, KFACModelParallelStrategy
from lightning_kfac.blocks import ConvBlock, LinearBlock
from lightning_kfac.communication import free_port
from lightning_kfac.curvature import CurvatureBlock
from lightning_kfac.options import ShardedOptions
from tests.helpers import LocalBatch, StepIndexedClassifier, dummy_loader, trainer
from tests.scripts.fit_sharded import (
    CNN_KFAC,
    EKFAC,
    GLOBAL_BATCH,
    KFAC,
    STEPS,
    WIDE_SGD_LRS,
    dataset,
    network,
)

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "fit_sharded.py"
RANKS = 2


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The worker's results (both ranks run every fit; rank 0 writes them)."""
    out = tmp_path_factory.mktemp("fsdp")
    port = str(free_port())
    processes = []
    for rank in range(RANKS):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            WORLD_SIZE=str(RANKS),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            NODE_RANK="0",
        )
        log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        processes.append(
            (
                subprocess.Popen(
                    [sys.executable, str(SCRIPT), str(out)],
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    codes = []
    for process, log in processes:
        try:
            codes.append(process.wait(timeout=300))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append(None)
        log.close()
    logs = "".join((out / f"rank{r}.log").read_text()[-3000:] for r in range(RANKS))
    assert codes == [0] * RANKS, logs
    return torch.load(out / "results.pt", weights_only=False)


def single_process(kind="mlp", **callback_options) -> dict[str, torch.Tensor]:
    """One process with the global batch (2N), the worker's model, data and options."""
    net = network(kind, ranks=RANKS)
    module = StepIndexedClassifier(net, dataset(kind), GLOBAL_BATCH, lr=0.05)
    kfac = KFACCallback(batch_size=LocalBatch(GLOBAL_BATCH), **KFAC, **callback_options)
    trainer(max_steps=STEPS, callbacks=[kfac]).fit(module, dummy_loader())
    return {name: p.detach() for name, p in module.named_parameters()}


def assert_params_close(got, want, rtol=1e-8, atol=1e-10):
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


def test_gather_mode_equals_one_process_with_the_global_batch(sharded):
    """Exact mode: the gathered rows preconditioned whole, local rows kept."""
    result = sharded["gather"]
    assert result["distribution"] == "ShardedDistribution"
    assert_params_close(result["params"], single_process())
    moved = [
        not torch.equal(p, q) for p, q in zip(result["params"].values(), network().parameters())
    ]
    assert all(moved), "training must have moved every parameter"
    assert result["traffic"][0]["all_gather"] > 0


def test_plain_model_parallel_strategy_is_detected(sharded):
    """Lightning's own ModelParallelStrategy: the callback shards K-FAC by itself."""
    assert sharded["plain"]["distribution"] == "ShardedDistribution"
    assert_params_close(sharded["plain"]["params"], sharded["gather"]["params"], 0, 0)


def test_replicated_state_identical_and_kl_scale_equal_on_every_rank(sharded):
    for mode in ("gather", "block_diagonal", "resumed", "owner", "owner_resumed"):
        result = sharded[mode]
        assert result["identical"], mode
        first, second = result["scales"]
        assert first == second, mode  # the same scale, bit for bit, on both ranks
        assert min(first) < 1.0, "the KL clip must be active in this test"


def test_resume_from_a_sharded_checkpoint_equals_an_unbroken_run(sharded):
    assert sharded["checkpoint_is_dir"], "a distributed (sharded) checkpoint is a directory"
    assert_params_close(sharded["resumed"]["params"], sharded["gather"]["params"], 1e-12, 1e-14)
    # the saved factors are the mean over ranks: equal up to the order of the sums
    unbroken = sharded["gather"]["scales"][0][STEPS // 2 :]
    assert sharded["resumed"]["scales"][0] == pytest.approx(unbroken, rel=1e-12)


def test_owner_mode_equals_one_process_with_the_global_batch(sharded):
    """Each layer preconditioned whole by its owner, which sends every rank its rows: an
    MLP; a CNN with a grouped conv and background decompositions; an embedding, LayerNorm
    and BatchNorm1d with factors reduced on every update and sends of one layer a round."""
    assert_params_close(sharded["owner"]["params"], single_process())
    assert_params_close(sharded["cnn_owner"]["params"], single_process("cnn", **CNN_KFAC))
    assert_params_close(sharded["tokens_owner"]["params"], single_process("tokens"))
    for kind in ("owner", "cnn_owner", "tokens_owner"):
        result = sharded[kind]
        assert "owner" in result["describe"] and result["identical"], kind
        traffic = result["traffic"][0]
        # gradient rows sent point to point; no decomposition is broadcast, nothing gathered
        assert traffic["send"] > 0 and "broadcast" not in traffic and "all_gather" not in traffic


def test_owner_mode_keeps_each_decomposition_on_one_rank(sharded):
    owner, gather = sharded["owner"], sharded["gather"]
    for kind, every_rank in (("owner", "gather"), ("cnn_owner", "cnn"), ("tokens_owner", "tokens")):
        kept = sharded[kind]["kept"]
        assert all(kept) and not set(kept[0]) & set(kept[1]), kind
        assert (
            sorted(kept[0] + kept[1])
            == sharded[every_rank]["kept"][0]
            == sharded[every_rank]["kept"][1]
        )
    for mine, every in zip(owner["memory"], gather["memory"]):
        assert mine["running"] == every["running"]
        assert mine["decompositions"] < 0.6 * every["decompositions"]
    split = sum(m["decompositions"] for m in owner["memory"])
    assert split == gather["memory"][0]["decompositions"]  # each one on exactly one rank


def test_owner_mode_resumes_from_a_sharded_checkpoint_as_an_unbroken_run(sharded):
    assert_params_close(
        sharded["owner_resumed"]["params"], sharded["owner"]["params"], 1e-12, 1e-14
    )
    unbroken = sharded["owner"]["scales"][0][STEPS // 2 :]
    assert sharded["owner_resumed"]["scales"][0] == pytest.approx(unbroken, rel=1e-12)


class BlockDiagonal:
    """The block-diagonal approximation, dense and explicit: rank r's rows R_r of the
    gradient preconditioned with ``(G[R_r, R_r] (x) A + lambda I)^-1`` as a matrix (layers
    with one group; the sharded run gathers grouped convolutions, exactly)."""

    def batch_key(self):
        return id(self)

    # one block at a time, through ``precondition`` (not the dense blocks' batched operator)
    operator = classmethod(CurvatureBlock.operator.__func__)

    def precondition(self, gradient, decompositions, damping, method):
        if self.groups > 1:
            return super().precondition(gradient, decompositions, damping, method)
        assert method == "exact"

        def dense(eigen):
            q, e = eigen.vectors[0], eigen.values[0].clamp(min=0)
            return q @ torch.diag(e) @ q.T

        a, g = dense(decompositions["A"]), dense(decompositions["G"])
        out = torch.empty_like(gradient)
        for rows in torch.arange(self.g_dim).chunk(RANKS):
            block = g[rows][:, rows]
            matrix = torch.kron(block, a) + damping * torch.eye(len(rows) * self.a_dim).double()
            v = gradient[0, rows].reshape(-1)
            out[0, rows] = torch.linalg.solve(matrix, v).reshape(len(rows), self.a_dim)
        return out


class BlockDiagonalLinear(BlockDiagonal, LinearBlock):
    pass


class BlockDiagonalConv(BlockDiagonal, ConvBlock):
    pass


BLOCK_DIAGONAL = {nn.Linear: BlockDiagonalLinear, nn.Conv1d: BlockDiagonalConv}


def test_convolutions_embeddings_and_normalisation_layers(sharded):
    """A CNN in block-diagonal mode with background decompositions (its grouped conv
    gathered: the gradient is sharded along the groups) and an embedding, LayerNorm and
    BatchNorm1d (gathered in buckets of one layer, factors reduced on every update) against
    one process."""
    assert_params_close(
        sharded["cnn"]["params"], single_process("cnn", block_types=BLOCK_DIAGONAL, **CNN_KFAC)
    )
    assert_params_close(sharded["tokens"]["params"], single_process("tokens"))
    for kind in ("cnn", "tokens"):
        assert sharded[kind]["identical"] and sharded[kind]["traffic"][0]["all_gather"] > 0


def test_block_diagonal_mode_against_an_explicit_dense_reference(sharded):
    want = single_process(block_types=BLOCK_DIAGONAL)
    assert_params_close(sharded["block_diagonal"]["params"], want)
    # an approximation: not the exact run, and no gradient traffic
    assert not torch.allclose(
        sharded["block_diagonal"]["params"]["net.0.weight"],
        sharded["gather"]["params"]["net.0.weight"],
    )
    assert "all_gather" not in sharded["block_diagonal"]["traffic"][0]


def test_memory_per_rank_reported_and_smaller_block_diagonal(sharded):
    gather, block = sharded["gather"], sharded["block_diagonal"]
    for result in (gather, block):
        assert "per rank" in result["describe"] and "MiB" in result["describe"]
    # running factors are whole on every rank (never more with more ranks), the same in both
    # modes; block-diagonal keeps only each rank's diagonal blocks of G, gathers nothing
    for g, b in zip(gather["memory"], block["memory"]):
        assert g["running"] == b["running"] > 0
        assert b["decompositions"] < g["decompositions"]
        assert b["gradient_buffers"] == 0 < g["gradient_buffers"]
    # every rank's shard is about half of the registered parameters
    whole = sum(p.numel() * 8 for p in network().parameters())
    assert sum(m["parameter_shards"] for m in gather["memory"]) == whole


def test_ekfac_under_sharding_equals_one_process_with_the_global_batch(sharded):
    """EKFAC (its second moments S live, reduced on every factor update) gathered under
    sharding equals one process with the global batch. The model's factors are full rank
    at this batch: EKFAC's S depends on the basis chosen inside a repeated eigenvalue (a
    rank-deficient factor's null space), which round-off picks differently per layout."""
    assert_params_close(sharded["ekfac"]["params"], single_process("narrow", **EKFAC))
    assert sharded["ekfac"]["identical"]


def final_loss(run, last: int = 8) -> float:
    """The global batch's training loss (the mean of the ranks' halves), averaged over the
    ``last`` steps: one number, whichever rank computes it."""
    steps = [sum(halves) / len(halves) for halves in zip(*run["losses"])]
    return sum(steps[-last:]) / last


def test_a_wide_model_holds_less_per_rank_than_under_ddp_and_beats_sgd(sharded):
    """A 7-layer, 64-wide MLP on badly scaled inputs, 40 steps: FSDP2 + K-FAC (gather and
    owner, one layer a bucket) against FSDP2 + SGD at three learning rates and against K-FAC
    under kfac_ddp (shared and owner), memory per rank measured from the tensors each rank
    holds: parameters, running factors, the factors behind the decompositions and the
    decompositions."""
    runs = sharded["wide"]
    kfac, ddp = runs["kfac"], runs["ddp"]
    assert kfac["identical"] and kfac["distribution"] == "ShardedDistribution"
    # the same training as kfac_ddp, in both its modes (gather mode is exact)
    assert_params_close(kfac["params"], ddp["params"])
    assert_params_close(runs["ddp_owner"]["params"], ddp["params"])
    sgd = {lr: final_loss(runs[f"sgd {lr}"]) for lr in WIDE_SGD_LRS}
    assert min(sgd, key=sgd.get) == WIDE_SGD_LRS[1], f"SGD's best rate must be inside {sgd}"
    assert final_loss(kfac) < 0.6 * min(sgd.values()), (final_loss(kfac), sgd)
    assert final_loss(kfac) < 0.5 * final_loss(runs[f"sgd {WIDE_SGD_LRS[0]}"])  # it learns
    # the report agrees with the tensors (decompositions read from a broadcast buffer hold
    # its success flags too: one element per factor)
    factors = 2 * sum(isinstance(m, nn.Linear) for m in network("wide").modules())
    for held, reported in zip(kfac["held"], kfac["memory"]):
        assert held["running"] == held["decomposed"] == reported["running"]
        assert 0 <= held["decompositions"] - reported["decompositions"] <= 8 * factors
    # per rank: half the parameters, the same K-FAC state (it is not sharded in gather mode)
    for sharded_rank, whole_rank in zip(kfac["held"], ddp["held"]):
        assert sharded_rank["parameters"] < 0.51 * whole_rank["parameters"]
        state = {k: v for k, v in sharded_rank.items() if k != "parameters"}
        assert state == {k: v for k, v in whole_rank.items() if k != "parameters"}
    fsdp = max(sum(held.values()) for held in kfac["held"])
    whole = min(sum(held.values()) for held in ddp["held"])
    assert fsdp < 0.95 * whole
    # owner mode: the same training; each rank keeps about half the decompositions, and its
    # peak (its state and the whole gradients it preconditions, as reported) is well below
    # what kfac_ddp holds
    owner = runs["owner"]
    assert_params_close(owner["params"], kfac["params"])
    every = ddp["held"][0]["decompositions"]
    for held, reported in zip(owner["held"], owner["memory"]):
        assert held["decompositions"] == reported["decompositions"] < 0.55 * every
        assert sum(held.values()) + reported["gradient_buffers"] < 0.9 * whole
    # against kfac_ddp's own owner mode: half the parameters less, the same K-FAC state
    for sharded_rank, whole_rank in zip(owner["held"], runs["ddp_owner"]["held"]):
        saved = whole_rank["parameters"] - sharded_rank["parameters"]
        assert sum(whole_rank.values()) - sum(sharded_rank.values()) == saved > 0


def test_unsupported_layouts_refused_with_what_is_supported(sharded):
    hsdp, column, attention, ekfac_owner = sharded["refusals"]
    assert "MultiheadAttentionBlock" in attention and "exclude" in attention
    assert "kfac_shard_preconditioning='gather'" in ekfac_owner
    for message in (hsdp, column):
        assert "(Shard(dim=0),)" in message and "tensor_parallel_size=1" in message
    assert "Replicate()" in hsdp and "Shard(dim=1)" in column


def test_strategy_options_and_meshes_refused_at_construction():
    with pytest.raises(ValueError, match="tensor_parallel_size must be 1"):
        KFACModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    allowed = r"kfac_shard_preconditioning must be one of \('gather', 'block_diagonal', 'owner'\)"
    with pytest.raises(ValueError, match=allowed):
        KFACModelParallelStrategy(kfac_shard_preconditioning="rows")
    owner = KFACModelParallelStrategy(kfac_shard_preconditioning="owner")
    assert owner.kfac_options.shard_preconditioning == "owner"
    with pytest.raises(ValueError, match=r"unknown options \['start_method'\]"):
        KFACModelParallelStrategy(start_method="spawn")
    with pytest.raises(ValueError, match="shard_preconditioning='owner'"):
        ShardedOptions(precondition_mode="owner")
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry["kfac_model_parallel"]["strategy"] is KFACModelParallelStrategy
