"""The thin CLIs run end to end: schedule plot, export dry run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plot_schedule_writes_png(tmp_path):
    out = tmp_path / "s.png"
    proc = subprocess.run([sys.executable, "scripts/plot_schedule.py", "+recipe=demo_pretrain",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_export_dry_run_reports_2b4t_sizes():
    proc = subprocess.run([sys.executable, "scripts/export.py", "2b4t", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"4[01]\d\.\d+ MB at log2\(3\)", proc.stdout), proc.stdout
    assert "gguf i2_s" in proc.stdout and "refused" in proc.stdout
