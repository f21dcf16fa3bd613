"""Small models and synthetic data shared by the Trainer tests (importable by spawned ranks)."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_kfac.curvature import CurvatureBlock
from lightning_kfac.decomposition import DecompositionMethod, DecompositionReport


def classification_data(n: int = 256, features: int = 12, classes: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    w = torch.randn(features, classes, generator=generator)
    y = (x @ w + 0.3 * torch.randn(n, classes, generator=generator)).argmax(1)
    return TensorDataset(x, y)


def sequence_data(n: int = 256, channels: int = 2, length: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, length, generator=generator)
    y = (x[:, 0, : length // 2].sum(1) > x[:, -1, length // 2 :].sum(1)).long()
    return TensorDataset(x, y)


def loader(dataset, batch_size: int, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


class Classifier(L.LightningModule):
    """A LightningModule around any network, with a choice of optimizer."""

    def __init__(self, net: nn.Module, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__()
        self.net = net
        self.optimizer = optimizer
        self.lr = lr
        self.losses: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.optimizer == "adamw_groups":
            decay = [p for n, p in self.named_parameters() if n.endswith("weight")]
            rest = [p for n, p in self.named_parameters() if not n.endswith("weight")]
            return torch.optim.AdamW(
                [{"params": decay, "weight_decay": 0.01}, {"params": rest, "lr": self.lr / 2}],
                lr=self.lr,
            )
        raise ValueError(self.optimizer)


def mlp(features: int = 12, classes: int = 3, inplace: bool = False) -> nn.Module:
    return nn.Sequential(
        nn.Linear(features, 32),
        nn.ReLU(inplace=inplace),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Linear(32, classes),
    )


def cnn(channels: int = 2, length: int = 16, classes: int = 2) -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(channels, 8, 3, padding="same"),
        nn.ReLU(inplace=True),
        nn.Conv1d(8, 8, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * (length // 2), classes),
    )


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class InterleavedData(L.LightningDataModule):
    """Rank r of R takes examples r, r + R, ... in order, so that R ranks with local batch
    size b see exactly the examples of one process with batch size R * b.

    Use with ``Trainer(use_distributed_sampler=False)``.
    """

    def __init__(self, dataset, batch_size: int) -> None:
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = DistributedSampler(
            self.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
        )
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler)


class StepIndexedClassifier(Classifier):
    """Trains on batch ``global_step % batches`` of ``dataset`` whatever the dataloader
    yields, so that a resumed run sees exactly the batches of an uninterrupted one however
    the loop's epoch bookkeeping resumes. Rank r of R takes rows r, r + R, ... of each
    global batch."""

    def __init__(self, net: nn.Module, dataset: TensorDataset, batch_size: int, **kwargs) -> None:
        super().__init__(net, **kwargs)
        self.dataset = dataset
        self.batch_size = batch_size

    def training_step(self, batch, batch_idx):
        x, y = self.dataset.tensors
        batches = len(x) // self.batch_size
        start = (self.trainer.global_step % batches) * self.batch_size
        rank, world = self.trainer.global_rank, self.trainer.world_size
        rows = slice(start + rank, start + self.batch_size, world)
        return super().training_step((x[rows], y[rows]), batch_idx)


class LocalBatch:
    """``KFACCallback(batch_size=...)`` for ``StepIndexedClassifier``, whose loader's batch is
    a placeholder: the rank's share of the global batch."""

    def __init__(self, global_batch: int) -> None:
        self.global_batch = global_batch

    def __call__(self, batch) -> int:
        return self.global_batch // (dist.get_world_size() if dist.is_initialized() else 1)


def dummy_loader(length: int = 10_000) -> DataLoader:
    """Drives the training loop for ``StepIndexedClassifier``; its contents are unused."""
    return DataLoader(TensorDataset(torch.zeros(length)), batch_size=1)


def replicas_identical(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are bitwise equal on every rank (a collective)."""
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()]).contiguous()
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def loads(costs, owners, world_size: int) -> list[float]:
    """Total decomposition cost per rank under an assignment ``{unit: rank}``."""
    totals = [0.0] * world_size
    for unit, rank in owners.items():
        totals[rank] += costs[unit]
    return totals


# -- a curvature kind defined outside the package -------------------------------------------


@dataclass
class Diagonal:
    """A "decomposition" that is the factor itself: ``(groups, d)``."""

    values: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor]:
        return (self.values,)


class AsIs(DecompositionMethod):
    """Diagonal factors need no decomposition: a copy is the unit of delegated work."""

    def decompose(self, matrices, damping):
        return [(Diagonal(m.clone()), DecompositionReport("ok")) for m in matrices]


class DiagonalLinearBlock(CurvatureBlock):
    """Diagonal K-FAC for a bias-free view of ``nn.Linear``: ``F ~= diag(g) (x) diag(a)`` with
    ``a = mean a**2`` over rows and ``g = K sum_r g_r**2``; the bias keeps its gradient."""

    method = AsIs()

    def parameters(self):
        return [self.module.weight]

    def factor_shapes(self):
        return {"a": (1, self.module.in_features), "g": (1, self.module.out_features)}

    def capture_input(self, x, examples):
        rows = x.reshape(-1, self.module.in_features)
        return {"a": (rows**2).sum(0, keepdim=True)}, rows.shape[0], None

    def capture_output(self, grad_output, context):
        rows = grad_output.reshape(-1, self.module.out_features)
        return {"g": (rows**2).sum(0, keepdim=True)}

    def decomposition_method(self, key):
        return self.method

    def decomposition_cost(self, key):
        return float(self.factor_shapes()[key][1])

    def decomposition_shapes(self, key):
        return (self.factor_shapes()[key],)

    def rebuild(self, key, tensors):
        return Diagonal(tensors[0])

    def gradient(self):
        return self.module.weight.grad

    def set_gradient(self, gradient):
        self.module.weight.grad.copy_(gradient)

    def precondition(self, gradient, decompositions, damping, method):
        curvature = decompositions["g"].values.mT * decompositions["a"].values  # (out, in)
        return gradient / (curvature + damping)


# -- embeddings and normalisation layers ------------------------------------------------------


def token_data(n: int = 192, length: int = 5, vocab: int = 12, seed: int = 0):
    """Token sequences (index 0 is padding, at the end of some) and a class from which
    tokens they hold."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (n, length), generator=generator)
    pads = torch.randint(0, 3, (n,), generator=generator)
    for row, pad in enumerate(pads.tolist()):
        if pad:
            x[row, length - pad :] = 0
    small = ((x > 0) & (x < vocab // 3)).sum(1)
    large = (x >= 2 * vocab // 3).sum(1)
    y = (small > large).long() + (small == large).long() * 2
    return TensorDataset(x, y)


class TokenNet(nn.Module):
    """Embedding -> LayerNorm -> mean over tokens -> Linear -> BatchNorm1d -> ReLU -> Linear.

    ``ghost_batches`` > 1 runs the BatchNorm on interleaved parts of the batch (examples
    i, i + k, ...), which is what each of k ranks sees of a batch split by
    ``InterleavedData``: one process then computes what k ranks do.
    """

    def __init__(
        self, vocab: int = 12, dim: int = 8, hidden: int = 16, classes: int = 3, ghost_batches=1
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.hidden = nn.Linear(dim, hidden)
        self.batch_norm = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, classes)
        self.ghost_batches = ghost_batches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(self.norm(self.embedding(x)).mean(1))
        k = self.ghost_batches
        if k == 1:
            h = self.batch_norm(h)
        else:
            parts = [self.batch_norm(h[i::k]) for i in range(k)]
            h = torch.stack(parts, dim=1).reshape(h.shape)  # rows back in batch order
        return self.head(torch.relu(h))


class AssertReplicasIdentical(L.Callback):
    """After every training batch, assert the parameters are bitwise equal on every rank."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert replicas_identical(pl_module), "replicas drifted"
