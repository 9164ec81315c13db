"""Console entry points: `bitnet-train` (the Hydra app of train.py; `bitnet-train data-preview`)
and `bitnet-export`."""

from __future__ import annotations

import sys


def train_main() -> None:
    """`bitnet-train +recipe=NAME key=value ...`: same as `python train.py ...`.
    `bitnet-train data-preview +recipe=NAME ...`: the first packed rows of a pretraining stage."""
    if sys.argv[1:2] == ["data-preview"]:
        from bitnet_train.data.preview import main

        sys.exit(main(sys.argv[2:]))
    import hydra

    from bitnet_train.train.config import config_dir, register_configs
    from bitnet_train.train.run import run_from_hydra

    register_configs()
    hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(
        run_from_hydra
    )()


def export_main() -> None:
    """`bitnet-export CHECKPOINT --format FORMAT --out PATH`."""
    from bitnet_train.export.cli import main

    sys.exit(main())
