"""Bad values in a LightningCLI config fail before training, with one line that names the
option and what is allowed, and exit status 2 (a usage error), not a traceback.

Each option's value is checked while jsonargparse parses the config (any LightningCLI: the
in-process tests use Lightning's own class); the rules between options are checked by the
constructors and reported as a usage error by the example's ``KFACLightningCLI``.
"""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

from lightning_kfac import KFACCallback, KFACDDPStrategy

pytest.importorskip("jsonargparse")

ROOT = Path(__file__).resolve().parent.parent

CALLBACK = (
    "trainer:\n  accelerator: cpu\n  callbacks:\n"
    "    - class_path: lightning_kfac.KFACCallback\n      init_args:\n"
)
STRATEGY = (
    "trainer:\n  accelerator: cpu\n  strategy:\n"
    "    class_path: lightning_kfac.KFACDDPStrategy\n    init_args:\n"
)
METRICS = (
    "('damping', 'kl_scale', 'layers', 'factor_update_ms', 'decomposition_ms', "
    "'skipped_batches', 'staleness')"
)

BAD_VALUES = [
    ("damping: -0.01", "damping must be a positive finite number, got -0.01"),
    ("damping: .inf", "damping must be a positive finite number, got inf"),
    ("factor_decay: 1.0", "factor_decay must be a finite real number in [0.0, 1.0), got 1.0"),
    ("kl_clip: 0", "kl_clip must be a positive finite number or None (off), got 0"),
    ("momentum: -0.5", "momentum must be a finite real number in [0.0, 1.0), got -0.5"),
    ("factor_update_freq: 0", "factor_update_freq must be an integer >= 1, got 0"),
    ("inv_update_freq: -10", "inv_update_freq must be an integer >= 1, got -10"),
    ("staleness: -1", "staleness must be an integer >= 0, got -1"),
    ("log_every_n_steps: -5", "log_every_n_steps must be an integer >= 0, got -5"),
    ("progress_bar: [dampng]", f"progress_bar must be one of {METRICS}, got 'dampng'"),
    (
        "damping_method: cholesky",
        "damping_method must be one of ('exact', 'factored'), got 'cholesky'",
    ),
    ("loss_reduction: avg", "loss_reduction must be one of ('mean', 'sum'), got 'avg'"),
    (
        "factor_dtype: float16",
        "factor_dtype must be one of ('auto', 'float32', 'float64'), got 'float16'",
    ),
    (
        "loss_terms: tokens",
        "loss_terms must be one of ('examples', 'positions', 'elements'), got 'tokens'",
    ),
]
BAD_STRATEGY_VALUES = [
    (
        "kfac_precondition_mode: everyone",
        "kfac_precondition_mode must be one of ('shared', 'owner'), got 'everyone'",
    ),
    ("kfac_bucket_cap_mb: 0", "kfac_bucket_cap_mb must be a positive finite number, got 0"),
    ("kfac_bucket_cap_mb: -25.0", "kfac_bucket_cap_mb must be a positive finite number"),
]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli.py"])  # LightningCLI(args=...) warns otherwise


def parse_in_process(config: Path, capsys) -> tuple[int, str]:
    """Lightning's own LightningCLI on ``config``: (exit status, stderr)."""
    with pytest.raises(SystemExit) as exited:
        LightningCLI(
            BoringModel,
            BoringDataModule,
            args=["fit", "--config", str(config)],
            save_config_callback=None,
        )
    return exited.value.code, capsys.readouterr().err


def assert_usage_error(status: int, stderr: str, message: str) -> None:
    assert status == 2, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if message in line]
    assert lines, f"no line contains {message!r}:\n{stderr[-2000:]}"


@pytest.mark.parametrize(
    "setting,message", BAD_VALUES, ids=[s.split(":")[0] for s, _ in BAD_VALUES]
)
def test_bad_callback_value_fails_at_parse_time(setting, message, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(CALLBACK + f"        {setting}\n")
    assert_usage_error(*parse_in_process(config, capsys), message)


@pytest.mark.parametrize(
    "setting,message",
    BAD_STRATEGY_VALUES,
    ids=[s.replace(": ", "=") for s, _ in BAD_STRATEGY_VALUES],
)
def test_bad_strategy_value_fails_at_parse_time(setting, message, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(STRATEGY + f"      {setting}\n")
    assert_usage_error(*parse_in_process(config, capsys), message)


def test_valid_values_and_schedules_parse_and_print_back(tmp_path, capsys):
    config = tmp_path / "good.yaml"
    config.write_text(
        CALLBACK + "        damping:\n          class_path: lightning_kfac.ExponentialDecay\n"
        "          init_args: {value: 0.05, rate: 0.5, every: 300}\n"
        "        kl_clip: null\n        factor_update_freq: 2\n        inv_update_freq: 20\n"
        "        progress_bar: [damping, kl_scale]\n        loss_terms: 0.5\n"
    )
    with pytest.raises(SystemExit) as exited:
        LightningCLI(
            BoringModel, BoringDataModule, args=["fit", "--config", str(config), "--print_config"]
        )
    printed = capsys.readouterr().out
    assert exited.value.code == 0
    for line in (
        "class_path: lightning_kfac.ExponentialDecay",
        "kl_clip: null",
        "factor_update_freq: 2",
        "inv_update_freq: 20",
        "- kl_scale",
        "loss_terms: 0.5",
        "factor_dtype: auto",
    ):
        assert line in printed, printed


def test_parse_time_types_are_plain_types_to_type_checkers_and_resolve_at_run_time():
    hints = typing.get_type_hints(KFACCallback.__init__)
    assert set(hints) >= {"damping", "progress_bar", "loss_terms"}
    assert typing.get_type_hints(KFACDDPStrategy.__init__)["kfac_bucket_cap_mb"]


def run_example_cli(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "examples/cli.py", "fit", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "settings,message",
    [
        (
            "        factor_update_freq: 3\n        inv_update_freq: 10\n",
            "error: inv_update_freq must be a multiple of factor_update_freq (so that every "
            "decomposition sees freshly updated factors), got inv_update_freq=10 and "
            "factor_update_freq=3",
        ),
        ("        damping: -0.01\n", "damping must be a positive finite number, got -0.01"),
    ],
    ids=["cross-field-rule", "value"],
)
def test_example_cli_reports_a_usage_error(settings, message, tmp_path):
    """examples/cli.py as a user runs it: exit status 2, the message as the one line of
    stderr (apart from Lightning's seed line), no traceback, no usage block."""
    config = tmp_path / "bad.yaml"
    config.write_text("seed_everything: 0\n" + CALLBACK + settings)
    result = run_example_cli(config)
    assert_usage_error(result.returncode, result.stderr, message)
    assert "Trainer.fit" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if not line.startswith("Seed set")]
    assert lines == [f"cli.py: error: {message.removeprefix('error: ')}"], result.stderr


def test_lightning_kfac_imports_without_jsonargparse():
    """jsonargparse is an optional extra: without it the annotations are the plain types."""
    code = (
        "import sys; sys.modules['jsonargparse'] = None\n"
        "import typing, lightning_kfac\n"
        "from lightning_kfac import options\n"
        "assert options.Damping is float and options.FactorUpdateFreq is int, options.Damping\n"
        "typing.get_type_hints(lightning_kfac.KFACCallback.__init__)\n"
        "typing.get_type_hints(lightning_kfac.KFACDDPStrategy.__init__)\n"
        "lightning_kfac.KFACCallback(damping=0.05, progress_bar=['damping'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    "config", sorted(p.name for p in (ROOT / "examples/configs").glob("*.yaml"))
)
def test_shipped_configs_log_within_an_epoch(config):
    """Lightning warns when ``log_every_n_steps`` exceeds the training batches of an epoch."""
    yaml = pytest.importorskip("yaml")
    settings = yaml.safe_load((ROOT / "examples/configs" / config).read_text())
    trainer, data = settings["trainer"], settings.get("data") or {}
    train_examples = 4000  # MNIST1DDataModule's default: 80% of 5000 sequences
    batches = train_examples // trainer.get("devices", 1) // data.get("batch_size", 100)
    assert trainer.get("log_every_n_steps", 50) <= batches, (config, batches)
