"""`make demo`'s pipeline end to end, shortened: data -> pretrain -> SFT -> DPO -> export."""

from __future__ import annotations

import datasets
import pytest
import transformers

from bitnet_train.demo import quiet_libraries, run_demo


@pytest.mark.slow
def test_demo_pipeline_runs_every_stage(tmp_path, capsys):
    quiet_libraries()  # as bitnet-demo does
    try:
        numbers = run_demo(tmp_path / "demo", steps_scale=0.05)
    finally:
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
        transformers.utils.logging.set_verbosity_warning()
    captured = capsys.readouterr()
    out = captured.out
    for stage in ("1/5 data", "2/5 pretrain", "3/5 SFT", "4/5 DPO", "5/5 export"):
        assert stage in out
    assert numbers["pretrain_last_loss"] < numbers["pretrain_first_loss"]
    assert numbers["margin_before"] == pytest.approx(0.0, abs=1e-6)
    assert (tmp_path / "demo" / "export" / "hf" / "model.safetensors").exists()
    assert (tmp_path / "demo" / "export" / "model-i2_s.gguf").stat().st_size > 0
    assert "Assistant (transformers" in out
    # the five stages and their figures, without the libraries' progress bars
    for clutter in ("Generating train split", "Filter:", "encoding python-chat", "Loading weights"):
        assert clutter not in captured.err, clutter
