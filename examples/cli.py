"""LightningCLI for the MNIST-1D example: K-FAC from a YAML config, no code.

    python examples/cli.py fit --config examples/configs/mnist1d_kfac.yaml
    python examples/cli.py fit --config examples/configs/mnist1d_kfac_ddp.yaml

The callback is named by class path (``lightning_kfac.KFACCallback``) with its options under
``init_args``; ``trainer.strategy: kfac_ddp`` selects the distributed strategy (importing
``lightning_kfac``, as the callback's class path does, registers it). Options are validated
by jsonargparse before training starts.
"""

from lightning.pytorch.cli import LightningCLI
from mnist1d_kfac import MNIST1DClassifier, MNIST1DDataModule

import lightning_kfac  # noqa: F401  (registers strategy="kfac_ddp")


def main() -> None:
    LightningCLI(MNIST1DClassifier, MNIST1DDataModule, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
