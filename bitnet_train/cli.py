"""Console entry points: `bitnet-train` (and `bitnet-train data-preview`, `bitnet-train eval`),
`bitnet-export`, `bitnet-import`, `bitnet-demo`.

Each works from any directory: the configs and recipes ship inside the package
(`bitnet_train/configs`), and every path on the command line is taken relative to the current
directory.
"""

from __future__ import annotations

import sys


def train_main() -> None:
    """`bitnet-train +recipe=NAME key=value ...`: same as `python train.py ...`.
    `bitnet-train data-preview +recipe=NAME ...`: the first packed rows of a pretraining stage.
    `bitnet-train eval checkpoint=PATH eval=SUITE ...`: same as `python scripts/eval.py ...`.

    Add a config directory of your own with Hydra's `--config-dir DIR` (its `recipe/`,
    `model/`, `data/` ... files are then found beside the shipped ones).
    """
    if sys.argv[1:2] == ["data-preview"]:
        from bitnet_train.data_preview_cli import main

        sys.exit(main(sys.argv[2:]))
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
    """`bitnet-export CHECKPOINT --format FORMAT --out PATH` (or `--dry-run`)."""
    from bitnet_train.export_cli import main

    sys.exit(main())


def import_main() -> None:
    """`bitnet-import SOURCE --out DIR`: released or exported weights -> master weights."""
    from bitnet_train.export_cli import import_main as main

    sys.exit(main())


def demo_main() -> None:
    """`bitnet-demo [--out DIR] [--data-only]`: the `make demo` pipeline."""
    import os

    # before any Hugging Face import (huggingface_hub reads HF_HUB_OFFLINE once, at import)
    for key, value in (("WANDB_MODE", "offline"), ("HF_HUB_OFFLINE", "1"),
                       ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    from bitnet_train.demo import main

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
