"""`make demo`'s pipeline end to end, shortened: data -> pretrain -> SFT -> DPO -> export."""

from __future__ import annotations

import pytest

from bitnet_train.demo import run_demo


@pytest.mark.slow
def test_demo_pipeline_runs_every_stage(tmp_path, capsys):
    numbers = run_demo(tmp_path / "demo", steps_scale=0.05)
    out = capsys.readouterr().out
    for stage in ("1/5 data", "2/5 pretrain", "3/5 SFT", "4/5 DPO", "5/5 export"):
        assert stage in out
    assert numbers["pretrain_last_loss"] < numbers["pretrain_first_loss"]
    assert numbers["margin_before"] == pytest.approx(0.0, abs=1e-6)
    assert (tmp_path / "demo" / "export" / "hf" / "model.safetensors").exists()
    assert (tmp_path / "demo" / "export" / "model-i2_s.gguf").stat().st_size > 0
    assert "Assistant (transformers" in out
