"""A write error on one of two processes: both raise (no rank hangs at a barrier), the partial
checkpoint is removed, and the previous one resumes on both ranks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_write_error_on_one_rank_stops_every_rank(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()),
         str(ROOT / "tests/reliability/ddp_checkpoint_worker.py"), str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = (tmp_path / "rank0.txt").read_text().splitlines()
    rank1 = (tmp_path / "rank1.txt").read_text().splitlines()
    ck = tmp_path / "ck"
    assert rank0[0] == rank1[0] == "saved 1"
    assert rank0[1].startswith("error 2: checkpoint step 2: another process failed to write")
    assert rank1[1].startswith(f"error 2: disk full while writing checkpoint step 2 to {ck}")
    assert f"the previous checkpoint {ck / 'step_00000001'} is intact" in rank1[1]
    assert rank0[2] == rank1[2] == "resumed at 1"
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000001"]
