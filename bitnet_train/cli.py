"""Console entry points: `bitnet-train` (the Hydra app of train.py; `bitnet-train eval ...`
runs the evaluation app of scripts/eval.py) and `bitnet-export`."""

from __future__ import annotations

import sys


def train_main() -> None:
    """`bitnet-train +recipe=NAME key=value ...`: same as `python train.py ...`;
    `bitnet-train eval checkpoint=PATH eval=SUITE ...`: same as `python scripts/eval.py ...`."""
    import hydra

    if sys.argv[1:2] == ["eval"]:
        del sys.argv[1]
        eval_main()
        return

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


def eval_main() -> None:
    """`bitnet-train eval checkpoint=PATH eval=2b4t_suite|quick key=value ...`."""
    import hydra

    from bitnet_train.eval.config import register_eval_configs
    from bitnet_train.eval.run import eval_from_hydra
    from bitnet_train.train.config import config_dir

    register_eval_configs()
    hydra.main(config_path=str(config_dir()), config_name="evaluate", version_base="1.3")(
        eval_from_hydra
    )()
