"""LightningCLI for the MNIST-1D example: K-FAC from a YAML config, no code.

    python examples/cli.py fit --config examples/configs/mnist1d_kfac.yaml
    python examples/cli.py fit --config examples/configs/mnist1d_kfac_ddp.yaml

The callback is named by class path (``lightning_kfac.KFACCallback``) with its options under
``init_args``; ``trainer.strategy: kfac_ddp`` selects the distributed strategy (importing
``lightning_kfac``, as the callback's class path does, registers it).

Bad values fail before training with exit status 2: each option's value is checked by
jsonargparse while it parses the config (any LightningCLI gets that, inside its usage text);
``KFACLightningCLI`` below prints just the one line naming the option and what is allowed,
and reports the rules between options (``inv_update_freq`` a multiple of
``factor_update_freq``, ``staleness`` at most ``inv_update_freq``), which the constructors
check, the same way instead of as a traceback. Copy it into your own script to get the same.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from mnist1d_kfac import MNIST1DClassifier, MNIST1DDataModule

import lightning_kfac  # (registers strategy="kfac_ddp")

_PACKAGE = str(Path(lightning_kfac.__file__).resolve().parent)


def _kfac_value_error(error: BaseException) -> ValueError | None:
    """The ValueError raised by lightning_kfac's code behind ``error``, if there is one."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ValueError) and error.__traceback__ is not None:
            frame = error.__traceback__
            while frame.tb_next is not None:
                frame = frame.tb_next
            if str(Path(frame.tb_frame.f_code.co_filename).resolve()).startswith(_PACKAGE):
                return error
        error = error.__cause__ or error.__context__
    return None


#: How jsonargparse reports a value that one of lightning_kfac's option types refused.
_TYPE_ERROR = re.compile(r"Not of type \w+: (.+)")


def _fail(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)


class _ConciseParser(LightningArgumentParser):
    """Reports a value a K-FAC option type refused as that one line (jsonargparse would
    print the usage and every Union alternative it tried around it)."""

    def error(self, message: str, ex: Exception | None = None):
        found = _TYPE_ERROR.search(message)
        if found is None:
            super().error(message, ex)
        _fail(self.prog, found.group(1).strip())


class KFACLightningCLI(LightningCLI):
    """LightningCLI that reports an invalid K-FAC setting as one line and exit status 2."""

    def __init__(self, *args, parser_class: type = _ConciseParser, **kwargs) -> None:
        super().__init__(*args, parser_class=parser_class, **kwargs)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            cause = _kfac_value_error(error)
            if cause is None:
                raise
            _fail(self.parser.prog, str(cause))


def main() -> None:
    KFACLightningCLI(MNIST1DClassifier, MNIST1DDataModule, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
