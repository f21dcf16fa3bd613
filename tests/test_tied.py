"""Parameters used by several modules (reference, section 11): detected at fit start and
left with their plain gradient, never preconditioned with one use's factors."""

from __future__ import annotations

import logging

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACCallback
from lightning_kfac.discovery import discover, summary_table
from tests.helpers import token_data


class TiedLM(nn.Module):
    """Embedding tied to the output head (``head.weight = emb.weight``)."""

    def __init__(self, vocab: int = 12, width: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.emb(tokens))))


def test_tied_embedding_and_head_are_reported_and_stay_plain():
    found = discover(TiedLM())
    assert set(found.blocks) == {"mix"}
    reasons = {s.name: s.reason for s in found.skipped}
    assert "tied weights" in reasons["emb"] and "head" in reasons["emb"]
    assert "tied weights" in reasons["head"] and "emb" in reasons["head"]
    assert "tied weights" in summary_table(found)


def test_a_weight_shared_by_two_linear_layers_is_detected():
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    found = discover(nn.Sequential(first, nn.Tanh(), second, nn.Linear(4, 2)))
    assert set(found.blocks) == {"3"}


def test_a_module_called_twice_is_one_block_not_tied():
    layer = nn.Linear(4, 4)
    found = discover(nn.Sequential(layer, nn.Tanh(), layer))
    assert set(found.blocks) == {"0"}


class TiedModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TiedLM()

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        return F.cross_entropy(self.net(tokens).mean(1), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordGradients(L.Callback):
    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    def on_after_backward(self, trainer, pl_module):
        self.before = {n: p.grad.clone() for n, p in pl_module.named_parameters()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.after = {n: p.grad.clone() for n, p in pl_module.named_parameters()}


def test_in_a_fit_the_tied_weight_keeps_its_plain_gradient(caplog):
    torch.manual_seed(0)
    logging.getLogger("lightning.pytorch").setLevel(logging.INFO)
    record = RecordGradients()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        callbacks=[KFACCallback(inv_update_freq=1), record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(TiedModule(), token_data_loader())
    assert "tied weights" in caplog.text
    # the callback runs before the recorder: "after" is what the optimizer steps with
    assert torch.equal(record.after["net.emb.weight"], record.before["net.emb.weight"])
    assert torch.equal(record.after["net.head.bias"], record.before["net.head.bias"])
    assert not torch.equal(record.after["net.mix.weight"], record.before["net.mix.weight"])


def token_data_loader():
    from torch.utils.data import DataLoader

    return DataLoader(token_data(), batch_size=32)
