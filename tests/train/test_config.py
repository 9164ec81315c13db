"""Hydra composition of every recipe, validation at the edge, and clear errors on bad keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from bitnet_train.data.config import PretrainDataConfig
from bitnet_train.data.preference import PreferenceDataConfig
from bitnet_train.data.sft import SFTDataConfig
from bitnet_train.errors import ConfigError
from bitnet_train.train.config import (
    TrainConfig,
    compose,
    config_dir,
    derive_grad_accum,
    to_train_config,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.stem for p in (config_dir() / "recipe").glob("*.yaml"))
DATA_TYPE = {"pretrain": PretrainDataConfig, "sft": SFTDataConfig, "dpo": PreferenceDataConfig}


def test_every_recipe_is_listed():
    assert {"pretrain_2b4t", "demo_pretrain", "sft_2b4t", "demo_sft", "dpo_2b4t", "demo_dpo",
            "pretrain_700m", "pretrain_1.3b", "pretrain_3b"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_validates(recipe):
    cfg = to_train_config(compose([f"+recipe={recipe}"]))
    assert isinstance(cfg, TrainConfig)
    assert isinstance(cfg.data, DATA_TYPE[cfg.objective.name])
    assert cfg.run_name == recipe


def test_pretrain_2b4t_names_the_real_things():
    cfg = to_train_config(compose(["+recipe=pretrain_2b4t"]))
    assert cfg.model.hidden_size == 2560 and cfg.model.num_hidden_layers == 30
    assert cfg.model.vocab_size == 128256 and cfg.model.tie_word_embeddings
    assert cfg.data.seq_len == 4096
    assert cfg.tokenizer == "microsoft/bitnet-b1.58-2B-4T"
    paths = {s.path for s in cfg.data.stage1.sources} | {s.path for s in cfg.data.stage2.sources}
    assert {"mlfoundations/dclm-baseline-1.0", "HuggingFaceFW/fineweb-edu"} <= paths
    assert cfg.trainer.mixed_precision == "bf16"
    # the global batch in tokens is stated and consistent with 8 processes
    assert derive_grad_accum(cfg.trainer, cfg.data.seq_len, 8) * 4 * 4096 * 8 == 4194304


def test_paper_scale_recipes_follow_the_training_notes():
    lr = {}
    for name in ("700m", "1.3b", "3b"):
        cfg = to_train_config(compose([f"+recipe=pretrain_{name}"]))
        lr[name] = (cfg.schedule.lr_peak, cfg.schedule.lr_stage2_peak)
        assert cfg.schedule.warmup_steps == 375 and cfg.optim.betas == [0.9, 0.95]
        assert cfg.schedule.wd_peak == 0.1 and cfg.data.seq_len == 2048
        assert cfg.trainer.global_batch_tokens == 2**20
    assert lr == {"700m": (1.5e-3, 1.0e-3), "1.3b": (1.2e-3, 8e-4), "3b": (1.2e-3, 8e-4)}


def test_dpo_2b4t_uses_the_reports_values():
    cfg = to_train_config(compose(["+recipe=dpo_2b4t"]))
    assert (cfg.trainer.epochs, cfg.schedule.lr_peak, cfg.objective.beta) == (2, 2e-7, 0.1)


@pytest.mark.parametrize("override", ["trainer.bogus=1", "model.hidden_sise=64",
                                      "data.stage1.sources.0.txt_field=x"])
def test_unknown_key_fails_at_composition(override):
    key = override.split("=")[0].rsplit(".", 1)[-1]
    with pytest.raises(ConfigCompositionException, match=key):
        compose(["+recipe=demo_pretrain", override])


def test_wrong_type_fails():
    with pytest.raises(ConfigCompositionException, match="max_steps"):
        compose(["+recipe=demo_pretrain", "trainer.max_steps=lots"])


def test_semantic_validation_names_the_key():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        to_train_config(compose(["+recipe=demo_pretrain", "model.num_key_value_heads=3"]))
    with pytest.raises(ConfigError, match="objective.reduction"):
        to_train_config(compose(["+recipe=demo_sft", "objective.reduction=median"]))


def test_global_batch_must_divide():
    cfg = to_train_config(compose(["+recipe=pretrain_2b4t", "trainer.micro_batch_size=3"]))
    with pytest.raises(ConfigError, match="global_batch_tokens"):
        derive_grad_accum(cfg.trainer, cfg.data.seq_len, 8)


def test_train_py_prints_the_composed_config():
    out = subprocess.run([sys.executable, "train.py", "+recipe=pretrain_2b4t", "--cfg", "job"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "hidden_size: 2560" in out.stdout and "fineweb-edu" in out.stdout
    bad = subprocess.run([sys.executable, "train.py", "+recipe=demo_pretrain", "trainer.bogus=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "bogus" in bad.stderr


@pytest.mark.parametrize("recipe, override, key", [
    ("demo_pretrain", "trainer.log_every=0", "trainer.log_every"),
    ("demo_pretrain", "trainer.checkpoint_every=-5", "trainer.checkpoint_every"),
    ("demo_pretrain", "trainer.keep_last=-1", "trainer.keep_last"),
    ("demo_pretrain", "trainer.eval_every=-1", "trainer.eval_every"),
    ("demo_pretrain", "trainer.peak_tflops=-1", "trainer.peak_tflops"),
    ("demo_pretrain", "trainer.divergence_sigma=-1", "trainer.divergence_sigma"),
    ("demo_pretrain", "trainer.divergence_sigma=nan", "trainer.divergence_sigma"),
    ("demo_pretrain", "trainer.divergence_window=1", "trainer.divergence_window"),
    ("demo_pretrain", "trainer.divergence_max_skips=0", "trainer.divergence_max_skips"),
    ("demo_pretrain", "trainer.on_divergence=retry", "trainer.on_divergence"),
    ("demo_pretrain", "optim.grad_clip=-1", "optim.grad_clip"),
    ("demo_pretrain", "optim.grad_clip=inf", "optim.grad_clip"),
    ("demo_pretrain", "optim.eps=0", "optim.eps"),
    ("demo_pretrain", "data.seq_len=513", "data.seq_len=513 exceeds model.max_position_embeddings"),
    ("demo_pretrain", "seed=-1", "seed"),
    ("demo_sft", "data.max_len=100000", "data.max_len=100000 exceeds model.max_position"),
    ("demo_sft", "data.num_proc=0", "data.num_proc"),
    ("demo_dpo", "objective.beta=0", "objective.beta"),
])
def test_every_interval_ratio_and_length_is_bounded(recipe, override, key):
    """Fails at composition (before any weight is allocated), naming the key."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_train_config(compose([f"+recipe={recipe}", override]))


def test_the_bounds_admit_their_documented_sentinels():
    cfg = to_train_config(compose(["+recipe=demo_pretrain", "trainer.checkpoint_every=0",
                                   "trainer.keep_last=0", "optim.grad_clip=0",
                                   "trainer.divergence_sigma=0", "data.seq_len=512"]))
    assert (cfg.trainer.checkpoint_every, cfg.optim.grad_clip, cfg.data.seq_len) == (0, 0.0, 512)


def test_config_tree_ships_inside_the_package():
    import bitnet_train

    assert config_dir() == Path(bitnet_train.__file__).resolve().parent / "configs"
    assert (config_dir() / "config.yaml").is_file()
    for group in ("model", "data", "optim", "schedule", "trainer", "logger", "recipe"):
        assert any((config_dir() / group).glob("*.yaml")), group


def test_a_users_config_dir_adds_recipes_and_models(tmp_path):
    """A recipe and a model of the user's own, composed beside the shipped ones; the model's
    defaults list starts from a shipped model."""
    (tmp_path / "recipe").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "wide_tiny.yaml").write_text(
        "defaults: [tiny, _self_]\nname: wide_tiny\nhidden_size: 512\n")
    (tmp_path / "recipe" / "my_pretrain.yaml").write_text(
        "# @package _global_\ndefaults:\n  - demo_pretrain\n  - override /model: wide_tiny\n"
        "run_name: mine\ntrainer:\n  max_steps: 7\n")
    cfg = to_train_config(compose(["+recipe=my_pretrain"], config_dirs=[tmp_path]))
    assert (cfg.run_name, cfg.trainer.max_steps) == ("mine", 7)
    assert (cfg.model.name, cfg.model.hidden_size, cfg.model.num_hidden_layers) == (
        "wide_tiny", 512, 4)  # 4 layers: inherited from the shipped tiny.yaml
    assert cfg.trainer.micro_batch_size == 16  # from the shipped demo_pretrain recipe
    # the same directory through Hydra's command line flag
    out = subprocess.run([sys.executable, "train.py", "--config-dir", str(tmp_path),
                          "+recipe=my_pretrain", "--cfg", "job"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "hidden_size: 512" in out.stdout and "max_steps: 7" in out.stdout


def test_a_user_config_may_not_shadow_a_shipped_one(tmp_path):
    """Hydra searches the shipped tree first: a user's model/tiny.yaml would be ignored."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tiny.yaml").write_text("defaults: [model_schema]\nhidden_size: 96\n")
    with pytest.raises(ConfigError, match=r"model/tiny.yaml.*shipped.*Rename it"):
        compose(["+recipe=demo_pretrain"], config_dirs=[tmp_path])
    with pytest.raises(ConfigError, match="does not exist"):
        compose([], config_dirs=[tmp_path / "missing"])
