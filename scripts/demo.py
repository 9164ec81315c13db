"""The whole pipeline on a tiny model, on the CPU, in minutes: `make demo` (or `bitnet-demo`).

Usage: python scripts/demo.py [--out demo_out] [--steps-scale 1.0] [--data-only]
See bitnet_train/demo.py for the stages.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")  # before any Hugging Face import; as bitnet-demo
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from bitnet_train.demo import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
