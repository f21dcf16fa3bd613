"""Layer discovery: what K-FAC registers, and that nothing it leaves plain goes unreported."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.utils.data import TensorDataset

from lightning_kfac import KFACCallback
from lightning_kfac.blocks import ConvBlock, LinearBlock
from lightning_kfac.discovery import FROZEN_NOTE, Discovery, Skipped, discover, summary_table
from lightning_kfac.registry import block_type_for
from tests.helpers import Classifier, loader, trainer


def reasons(found: Discovery) -> dict[str, str]:
    return {s.name: s.reason for s in found.skipped}


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


class Scaled(nn.Module):
    """A container holding a raw parameter next to its children."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))
        self.body = nn.Sequential(nn.Linear(4, 6), nn.PReLU(6), nn.Linear(6, 2))
        self.frozen = nn.PReLU(2).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.body(x)) * self.scale


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x)[0])


class Square(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * weight


def test_only_leaf_layers_are_unsupported_and_containers_report_their_own_parameters():
    found = discover(Scaled())
    assert set(found.blocks) == {"body.0", "body.2"}
    got = reasons(found)
    assert set(got) == {"", "body.1"}  # no Sequential, and the frozen PReLU is not worth it
    assert got["body.1"] == "unsupported layer type"
    assert "container" in got[""] and "scale" in got[""]
    assert "<root> (Scaled)" in summary_table(found)


def test_frozen_supported_layers_are_still_listed():
    net = mlp()
    net[0].requires_grad_(False)
    net[2].weight.requires_grad_(False)
    found = discover(net)
    assert set(found.blocks) == {"4"}
    assert reasons(found) == {
        "0": "all parameters frozen" + FROZEN_NOTE,
        "2": "weight frozen" + FROZEN_NOTE,
    }
    assert "unfrozen later" in FROZEN_NOTE


def test_include_exclude_globs_and_unmatched_patterns_are_reported():
    found = discover(mlp(), include=["[02]", "encoder.*"], exclude=["2", "head", "2"])
    assert set(found.blocks) == {"0"}
    assert reasons(found) == {"2": "matched by exclude", "4": "not matched by include"}
    assert found.unmatched_patterns == [("include", "encoder.*"), ("exclude", "head")]
    messages = found.warnings()
    assert len(messages) == 2
    assert "include pattern 'encoder.*' matches no module" in messages[0]
    assert "exclude pattern 'head' matches no module" in messages[1]
    assert all("module names look like: ['0', '2', '4']" in m for m in messages)
    assert "include 'encoder.*'" in summary_table(found)
    assert discover(mlp(), include=["*"], exclude=["4"]).warnings() == []
    assert set(discover(mlp(), exclude=None).blocks) == {"0", "2", "4"}


def test_unmatched_pattern_naming_a_container_suggests_the_glob():
    model = nn.Sequential()
    model.add_module("encoder", mlp())
    found = discover(model, include=["encoder"])
    assert found.blocks == {}
    (message,) = found.warnings()
    assert "did you mean 'encoder.*'?" in message
    assert "'encoder.0', 'encoder.2', 'encoder.4'" in message


def test_parametrized_layers_are_skipped_with_the_reason():
    model = nn.Sequential(
        parametrizations.spectral_norm(nn.Linear(4, 4)),
        parametrizations.weight_norm(nn.Linear(4, 4, bias=False)),
        nn.Linear(4, 4),
        nn.Linear(4, 4),
    )
    parametrize.register_parametrization(model[2], "weight", Square())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old-style helpers are deprecated
        model.add_module("4", torch.nn.utils.weight_norm(nn.Linear(4, 4)))
        model.add_module("5", torch.nn.utils.spectral_norm(nn.Conv2d(4, 4, 1)))
    found = discover(model)
    assert set(found.blocks) == {"3"}
    got = reasons(found)
    assert set(got) == {"0", "1", "2", "4", "5"}  # the ParametrizationLists are not listed
    for name in ("0", "1", "2"):
        assert "weight is parametrized (torch.nn.utils.parametrize)" in got[name]
        assert "original parameters" in got[name]
    assert "weight_g, weight_v" in got["4"] and "not an nn.Parameter" in got["4"]
    assert "weight_orig" in got["5"]


def test_multihead_attention_is_one_block_covering_its_out_proj():
    found = discover(Attention())
    assert set(found.blocks) == {"attn", "head"}
    assert reasons(found) == {}  # out_proj's parameters are the attention block's
    found = discover(Attention(), exclude=["attn"])
    assert set(found.blocks) == {"head"}
    got = reasons(found)
    assert got == {
        "attn": "matched by exclude",
        "attn.out_proj": "used functionally by MultiheadAttention (its forward is never called)",
    }

    def without_attention(module):
        return None if isinstance(module, nn.MultiheadAttention) else block_type_for(module)

    got = reasons(discover(Attention(), block_type_for=without_attention))
    assert "in_proj_weight" in got["attn"] and "MultiheadAttention" in got["attn"]
    assert set(got) == {"attn", "attn.out_proj"}


def test_lazy_modules_are_skipped_until_materialised():
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.Flatten(), nn.LazyLinear(2))
    found = discover(model)
    assert found.blocks == {}
    assert found.lazy == ["0", "2"]
    assert all("lazy module not yet materialised" in r for r in reasons(found).values())
    model(torch.randn(1, 2, 5, 5))
    found = discover(model)
    assert found.lazy == [] and found.skipped == []
    assert isinstance(found.blocks["0"], ConvBlock) and isinstance(found.blocks["2"], LinearBlock)


def test_zero_width_layers_are_skipped():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zero-element init
        model = nn.Sequential(nn.Linear(4, 0), nn.Linear(0, 3), nn.Linear(3, 2))
    found = discover(model)
    assert set(found.blocks) == {"2"}
    zero = "zero-width layer (no parameters to precondition)"
    assert reasons(found) == {"0": zero, "1": zero}
    summary_table(found)


def test_every_plain_module_with_trainable_parameters_is_listed_exactly_once():
    model = nn.Sequential(Scaled(), Attention(), nn.Embedding(3, 4), nn.Linear(4, 4))
    model.add_module("sn", parametrizations.spectral_norm(nn.Linear(4, 4)))
    model.add_module("lazy", nn.LazyLinear(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_module("wn", torch.nn.utils.weight_norm(nn.Linear(4, 4)))
    found = discover(model)
    listed = Counter(s.name for s in found.skipped)
    assert set(listed.values()) == {1}
    preconditioned = {id(p) for block in found.blocks.values() for p in block.parameters()}
    for name, module in model.named_modules():
        trainable = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not trainable:
            continue
        layer = name.split(".parametrizations")[0]  # the originals are reported with their layer
        all_preconditioned = all(id(p) in preconditioned for p in trainable)
        assert all_preconditioned != (layer in listed), name
    assert set(found.blocks) == {"2", "3", "0.body.0", "0.body.2", "1.attn", "1.head"}


def test_plain_parameter_count():
    net = mlp()
    net.insert(1, nn.PReLU(8))  # 8 parameters
    net[0].bias.requires_grad_(False)  # frozen: not counted
    found = discover(net, exclude=["5"])  # Linear(8, 2): 18 parameters
    assert found.plain_parameter_count == 8 + 18
    assert "26 trainable parameters" in summary_table(found)


def test_summary_table_columns_and_factor_shapes():
    model = nn.Sequential(nn.Linear(4, 3), nn.Conv2d(4, 8, 3, groups=2), nn.PReLU(3))
    table = summary_table(discover(model))
    lines = table.splitlines()
    assert lines[0] == "K-FAC registered layers (2):"
    assert [cell.strip() for cell in lines[1].split("|")] == ["Name", "Type", "Kind", "Factors"]
    assert [cell.strip() for cell in lines[2].split("|")] == [
        "0",
        "Linear",
        "LinearBlock",
        "A 5x5, G 3x3",
    ]
    assert [cell.strip() for cell in lines[3].split("|")] == [
        "1",
        "Conv2d",
        "ConvBlock",
        "A 2 x 19x19, G 2 x 4x4",
    ]
    assert "  2 (PReLU): unsupported layer type" in lines


class DictBlock:
    """A block of the coming registry: ``factor_shapes()`` is a dict."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters())

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"A": (1, 5, 5), "G": (3, 2, 2), "D": (7,)}


def test_injected_lookup_and_dict_factor_shapes():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    found = discover(
        model, block_type_for=lambda m: DictBlock if isinstance(m, nn.LayerNorm) else None
    )
    assert set(found.blocks) == {"1"} and reasons(found) == {"0": "unsupported layer type"}
    row = summary_table(found).splitlines()[2]
    assert [cell.strip() for cell in row.split("|")] == [
        "1",
        "LayerNorm",
        "DictBlock",
        "A 5x5, G 3 x 2x2, D 7",
    ]


def test_block_constructor_type_error_becomes_the_reason():
    def any_conv(module: nn.Module):
        return ConvBlock if isinstance(module, nn.modules.conv._ConvNd) else None

    model = nn.Sequential(nn.ConvTranspose2d(2, 2, 3), nn.Conv1d(2, 2, 3))
    found = discover(model, block_type_for=any_conv)
    assert set(found.blocks) == {"1"}
    assert found.skipped == [
        Skipped("0", "ConvTranspose2d", "transposed convolutions are not supported")
    ]
    assert reasons(discover(model)) == {"0": "unsupported layer type"}


@pytest.mark.parametrize("include", [None, ["*"]])
def test_root_layer_is_named_root_in_the_summary(include):
    found = discover(nn.Linear(3, 2), include=include)
    assert set(found.blocks) == {""}
    assert "<root>" in summary_table(found)


class Tokens(nn.Module):
    """Embedding and LayerNorm, then a Linear head (lazy: materialised by the first batch)."""

    def __init__(self, lazy: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.LazyLinear(3) if lazy else nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(tokens)).mean(1))


def option_warnings(net: nn.Module, **options) -> list[str]:
    """The K-FAC "does not apply" warnings of a two-step fit of ``net`` with ``options``."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 10, (32, 5), generator=generator)
    data = TensorDataset(tokens, torch.randint(0, 3, (32,), generator=generator))
    callback = KFACCallback(inv_update_freq=1, verbose=False, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=2, callbacks=[callback]).fit(Classifier(net), loader(data, 16))
    return [str(w.message) for w in caught if "does not apply" in str(w.message)]


CHOLESKY = {"inverse_method": "cholesky", "damping_method": "factored"}


@pytest.mark.parametrize(
    ("options", "why"),
    [
        (CHOLESKY, "an Embedding's A is diagonal, inverted exactly"),
        ({"reduce": ["*"]}, "normalisation blocks always sum an example's positions"),
        ({"factor_examples": 8}, "the others from every example"),
    ],
)
@pytest.mark.parametrize("lazy", [False, True])
def test_an_option_that_some_layers_do_not_use_warns_once_naming_them(options, why, lazy):
    torch.manual_seed(0)
    (message,) = option_warnings(Tokens(lazy), **options)
    option = next(iter(options))
    assert message.startswith(f"K-FAC: {option}={options[option]!r} does not apply to 2 layers")
    assert "('net.emb', 'net.norm')" in message and why in message
    assert "net.head" not in message


class OneHotMLP(nn.Module):
    """Linear layers only, on the tokens' one-hot counts."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.body(F.one_hot(tokens, 10).float().mean(1))


@pytest.mark.parametrize(
    ("net", "options"),
    [
        (Tokens, {}),
        (Tokens, {"reduce": ["net.head"]}),
        (OneHotMLP, CHOLESKY),
        (OneHotMLP, {"reduce": ["*"]}),
        (OneHotMLP, {"factor_examples": 8}),
    ],
)
def test_no_warning_when_the_option_is_at_its_default_or_every_layer_uses_it(net, options):
    torch.manual_seed(0)
    assert option_warnings(net(), **options) == []
