"""Truncated and bit-flipped files of every kind: checkpoints fall back to the previous whole one,
exports and imports refuse, every message names the damaged file (or tensor)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bitnet_train.errors import CheckpointError, IntegrityError
from bitnet_train.export.gguf import _BitNetCppReader, export_gguf
from bitnet_train.export.gpu import export_gpu, read_gpu_checkpoint
from bitnet_train.export.hf import export_hf
from bitnet_train.export_cli import import_main
from bitnet_train.integrity import MANIFEST_FILE, sidecar_path
from bitnet_train.io import load_model, save_model
from bitnet_train.model import BitNetForCausalLM
from bitnet_train.train.checkpoint import Checkpointer
from bitnet_train.train.run import run
from tests.conftest import tiny_config
from tests.export.gguf_assets import build_tokenizer
from tests.train.helpers import make_tokenizer, pretrain_config, write_corpus

RUN = ["trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.keep_last=3"]
CHECKPOINT_FILES = ["model.safetensors", "optimizer.bin", "random_states_0.pkl",
                    "data_state_shard00000.pt", "trainer_state.pt", "metadata.json",
                    "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "COMPLETE"]


def damage(path: Path, how: str) -> None:
    """truncate: keep the first half; flip4k: invert 4 KiB (or the whole file if smaller) in the
    middle; bit: flip one bit in the middle."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
        return
    mid = len(data) // 2
    if how == "bit":
        data[mid] ^= 0x04
    else:
        start = max(0, mid - 2048)
        for i in range(start, min(len(data), start + 4096)):
            data[i] ^= 0xFF
    path.write_bytes(data)


# -- checkpoints ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    make_tokenizer(root)
    corpus = write_corpus(root / "corpus")
    (root / "straight").mkdir()
    shutil.copytree(root / "tokenizer", root / "straight" / "tokenizer")
    result = run(pretrain_config(root / "straight", corpus, *RUN))
    losses = [h.metrics["loss"] for h in result.history]
    return root, corpus, losses, load_file(result.final_dir / "model.safetensors")


@pytest.mark.parametrize("how", ["truncate", "flip4k", "bit"])
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_damaged_newest_checkpoint_is_named_and_skipped(trained, tmp_path, name, how):
    root, *_ = trained
    ck = tmp_path / "checkpoints"
    shutil.copytree(root / "straight" / "run" / "checkpoints", ck)
    damage(ck / "step_00000006" / name, how)
    checkpointer = Checkpointer(ck, keep_last=3)
    assert checkpointer.latest().name == "step_00000006"  # still looks whole
    path, damaged = checkpointer.newest_intact()
    assert path == ck / "step_00000004"
    [(bad, err)] = damaged
    assert bad == ck / "step_00000006"
    assert err.file.endswith(name) and str(ck / "step_00000006" / name) in str(err)


def _copy_run(root: Path, where: Path) -> Path:
    shutil.copytree(root / "straight", where, dirs_exist_ok=True)
    shutil.rmtree(where / "run" / "final")
    return where


def test_resume_falls_back_to_the_previous_checkpoint_and_stays_exact(trained, tmp_path,
                                                                      caplog):
    root, corpus, losses, final = trained
    work = _copy_run(root, tmp_path)
    ck = work / "run" / "checkpoints"
    damage(ck / "step_00000006" / "optimizer.bin", "truncate")
    with caplog.at_level(logging.INFO, logger="bitnet_train"):
        resumed = run(pretrain_config(work, corpus, *RUN))
    log = caplog.text
    assert f"checkpoint {ck / 'step_00000006'} is damaged" in log and "optimizer.bin" in log
    assert f"falling back to {ck / 'step_00000004'}" in log
    assert [h.step for h in resumed.history] == [4, 5]
    assert [h.metrics["loss"] for h in resumed.history] == losses[4:]
    got = load_file(resumed.final_dir / "model.safetensors")
    assert all(torch.equal(got[k], final[k]) for k in final)
    # the damaged checkpoint was moved aside (kept for inspection), a new step 6 written
    assert (ck / "step_00000006.damaged" / "optimizer.bin").exists()
    assert Checkpointer(ck, 3).newest_intact() == (ck / "step_00000006", [])


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_checkpoint_damaged_refuses_and_changes_nothing(trained, tmp_path):
    root, corpus, *_ = trained
    work = _copy_run(root, tmp_path)
    ck = work / "run" / "checkpoints"
    for step in (2, 4, 6):
        damage(ck / f"step_{step:08d}" / "model.safetensors", "bit")
    before = _snapshot(work / "run")
    with pytest.raises(CheckpointError, match="every checkpoint under .* failed verification") \
            as err:
        run(pretrain_config(work, corpus, *RUN))
    assert str(err.value).count("model.safetensors is damaged") == 3
    assert _snapshot(work / "run") == before


# -- exports ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """hf, hf-bf16, gguf (i2_s) and gpu exports of a random relu2 model every format accepts."""
    config = tiny_config(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=320, bos_token_id=0, eos_token_id=1)
    model = BitNetForCausalLM(config)
    model.init_weights(seed=3)
    model.eval()
    tok = build_tokenizer(320)
    out = tmp_path_factory.mktemp("exports")
    export_hf(model, tok, out / "hf")
    export_hf(model, tok, out / "hf-bf16", packed=False)
    export_gguf(model, tok, out / "model.gguf", "i2_s")
    export_gpu(model, out / "gpu")
    save_model(model, out / "master", tokenizer=tok)
    return out


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst / src.name)
        shutil.copy(sidecar_path(src), dst)
        dst = dst / src.name
    return dst


EXPORT_CASES = [
    ("hf", "model.safetensors", "truncate"), ("hf", "model.safetensors", "flip4k"),
    ("hf", "config.json", "bit"), ("hf", "tokenizer.json", "truncate"),
    ("hf-bf16", "model.safetensors", "flip4k"), ("hf-bf16", "model.safetensors", "bit"),
    ("master", "model.safetensors", "bit"), ("master", "generation_config.json", "flip4k"),
    ("model.gguf", None, "truncate"), ("model.gguf", None, "flip4k"), ("model.gguf", None, "bit"),
]


@pytest.mark.parametrize("kind, name, how", EXPORT_CASES)
def test_damaged_export_is_refused_naming_the_file(exported, tmp_path, kind, name, how):
    target = _copy(exported / kind, tmp_path / "copy")
    load_model(target)  # intact: loads
    damaged_file = target / name if name else target
    damage(damaged_file, how)
    with pytest.raises(IntegrityError) as err:
        load_model(target)
    assert str(damaged_file) in str(err.value) and "damaged" in str(err.value)


@pytest.mark.parametrize("name", ["model_state_int2.pt", "model_state_fp16.pt", "config.json"])
def test_damaged_gpu_export_is_refused(exported, tmp_path, name):
    target = _copy(exported / "gpu", tmp_path / "gpu")
    read_gpu_checkpoint(target)
    damage(target / name, "flip4k")
    with pytest.raises(IntegrityError, match=name):
        read_gpu_checkpoint(target)


def test_import_of_a_damaged_export_fails_and_writes_nothing(exported, tmp_path, capsys):
    target = _copy(exported / "hf", tmp_path / "hf")
    damage(target / "model.safetensors", "flip4k")
    assert import_main([str(target), "--out", str(tmp_path / "master")]) == 1
    assert "model.safetensors is damaged" in capsys.readouterr().err
    assert not (tmp_path / "master").exists()


def test_non_finite_weights_are_refused_naming_the_tensor(exported, tmp_path):
    """Without a manifest (written elsewhere, or deleted), a NaN still never loads silently."""
    target = _copy(exported / "master", tmp_path / "master")
    (target / MANIFEST_FILE).unlink()
    tensors = load_file(target / "model.safetensors")
    tensors["model.layers.1.post_attention_layernorm.weight"][3] = float("nan")
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError,
                       match=r"tensor model\.layers\.1\.post_attention_layernorm\.weight holds 1 "
                             r"non-finite"):
        load_model(target)


def test_non_finite_gguf_tensor_is_refused(exported, tmp_path):
    target = _copy(exported / "model.gguf", tmp_path / "g")
    sidecar_path(target).unlink()
    norm = next(t for t in _BitNetCppReader(target).tensors if t.name == "output_norm.weight")
    with open(target, "r+b") as f:  # an f32 tensor: overwrite its first value with +inf
        f.seek(int(norm.data_offset))
        f.write(np.float32(np.inf).tobytes())
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight holds 1 non-finite"):
        load_model(target)
