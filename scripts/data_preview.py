"""Stream the first packed rows of a pretraining stage and report on them (no training).

    python scripts/data_preview.py +recipe=pretrain_2b4t --rows 256 --stage 2
    python scripts/data_preview.py +recipe=demo_pretrain --show 3

Same as `bitnet-train data-preview ...`: realised token share per source, document lengths,
padding / splitting counts, tokens/s of the pipeline in one process, decoded rows with document
boundaries marked. Takes the same Hydra overrides as train.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitnet_train.data_preview_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
