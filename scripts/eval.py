"""Score a model on an lm-evaluation-harness suite: `bitnet-train eval` as a script.

    python scripts/eval.py checkpoint=outputs/run/final eval=2b4t_suite
    python scripts/eval.py checkpoint=outputs/run/checkpoints/step_00001000 eval=quick
    python scripts/eval.py checkpoint=microsoft/bitnet-b1.58-2B-4T-bf16 eval=2b4t_suite \\
        eval.limit=100 output_dir=outputs/eval/released

`checkpoint` is a run dir, DIR/final, a checkpoint step, an exported transformers dir, a GGUF
file of ours or a hub id; suites live in configs/eval/. Writes the harness's JSON, every sample,
and results.md (our numbers beside the 2B4T report's) under output_dir.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitnet_train.cli import eval_main  # noqa: E402

if __name__ == "__main__":
    eval_main()
