"""The Hydra entry of `bitnet-train eval` / scripts/eval.py: config in, results out, and a
project error (bad checkpoint, unknown task, data set that cannot be downloaded) as one line."""

from __future__ import annotations

import logging
import sys

from omegaconf import DictConfig

from bitnet_train.errors import BitNetTrainError


def eval_from_hydra(cfg: DictConfig) -> None:
    from bitnet_train.eval.config import to_eval_config
    from bitnet_train.eval.suites import run_eval

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_config = to_eval_config(cfg)
        if run_config.output_dir is None:
            from hydra.core.hydra_config import HydraConfig

            run_config.output_dir = HydraConfig.get().runtime.output_dir
        out = run_eval(run_config)
    except BitNetTrainError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(out.markdown)
    print(f"results written to {out.output_dir}")  # the table above is results.md
