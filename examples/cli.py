"""LightningCLI for the MNIST-1D example: K-FAC from a YAML config, no code.

    python examples/cli.py fit --config examples/configs/mnist1d_kfac.yaml
    python examples/cli.py fit --config examples/configs/mnist1d_kfac_ddp.yaml

The callback is named by class path (``lightning_kfac.KFACCallback``) with its options under
``init_args``; ``trainer.strategy: kfac_ddp`` selects the distributed strategy (importing
``lightning_kfac``, as the callback's class path does, registers it).

Bad values fail before training, with a line naming the option and what is allowed, and exit
status 2: each option's value is checked by jsonargparse while it parses the config (any
LightningCLI gets that), and the rules between options (``inv_update_freq`` a multiple of
``factor_update_freq``, ``staleness`` at most ``inv_update_freq``), which the constructors
check, are reported the same way by ``KFACLightningCLI`` below instead of as a traceback.
Copy it into your own script to get the same.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.cli import LightningCLI
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


class KFACLightningCLI(LightningCLI):
    """LightningCLI that reports an invalid K-FAC setting as a one-line usage error."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            cause = _kfac_value_error(error)
            if cause is None:
                raise
            self.parser.error(str(cause))


def main() -> None:
    KFACLightningCLI(MNIST1DClassifier, MNIST1DDataModule, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
