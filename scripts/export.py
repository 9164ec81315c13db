"""Export a trained model: `python scripts/export.py CHECKPOINT --format FORMAT --out PATH`.

Formats: hf (packed, transformers), hf-bf16 (master weights), gguf (--quant tq2_0 | tq1_0 |
i2_s), gpu; `--dry-run` prints each format's size. See bitnet_train/export_cli.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from bitnet_train.export_cli import main  # noqa: E402

raise SystemExit(main())
