"""Import released or exported weights as master weights to fine-tune:
`python scripts/import.py SOURCE --out DIR`, then train with `model.init=DIR`.

SOURCE: a transformers BitNet directory (packed microsoft/bitnet-b1.58-2B-4T or the bf16 master
-2B-4T-bf16, the recommended start) or one of our GGUF files. See bitnet_train/export_cli.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from bitnet_train.export_cli import import_main  # noqa: E402

raise SystemExit(import_main())
