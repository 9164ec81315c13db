"""transformers 4.x loads our `hf` and `hf-bf16` exports, tokenizer included.

The suite runs on transformers 5.x (test_hf_export.py); here a second interpreter process runs
with a transformers 4.57 tree first on its path (`make test` installs it with
`pip install --target` into a cached directory and points BITNET_TRANSFORMERS4_DIR at it), loads
each export with AutoTokenizer and AutoModelForCausalLM, and hands back what it computed.
transformers 4.x cannot resolve transformers 5's `TokenizersBackend` class name, which is why
exports write `PreTrainedTokenizerFast` (as the released 2B4T does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitnet_train.data.chat import encode_prompt
from bitnet_train.export_cli import main as export_main
from bitnet_train.io import save_model
from tests.export.test_hf_export import CORPUS, REL_TOL, eval_batch, rel_rms, trained_tiny

ENV_VAR = "BITNET_TRANSFORMERS4_DIR"
MESSAGES = [{"role": "user", "content": "What is two plus two?"}]

LOAD_SCRIPT = r"""
import json, sys
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

req = json.loads(open(sys.argv[1]).read())
result = {"version": transformers.__version__, "file": transformers.__file__}
for fmt, path in req["dirs"].items():
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(req["text"])["input_ids"]
    with torch.compiler.set_stance("force_eager"), torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        logits = model(torch.tensor(req["batch"])).logits.float()
    torch.save(logits, f"{req['out']}/{fmt}.pt")
    result[fmt] = {
        "tokenizer_class": type(tok).__name__,
        "ids": ids,
        "decoded": tok.decode(ids, skip_special_tokens=True),
        "chat_ids": tok.apply_chat_template(req["messages"], add_generation_prompt=True),
        "eos": model.generation_config.eos_token_id,
    }
print(json.dumps(result))
"""


def transformers4_dir() -> Path:
    value = os.environ.get(ENV_VAR)
    if not value:
        pytest.skip(f"{ENV_VAR} is not set (make test installs transformers 4.57 and sets it)")
    path = Path(value)
    if not (path / "transformers").is_dir():
        pytest.fail(f"{ENV_VAR}={path} holds no transformers package; run `make test` (its "
                    "transformers-4.57 step) or pip install --target there")
    return path


def test_transformers_4_loads_hf_exports_with_their_tokenizers(tmp_path):
    target = transformers4_dir()
    model, tok = trained_tiny()
    save_model(model, tmp_path / "final", tokenizer=tok)
    dirs = {}
    for fmt in ("hf", "hf-bf16"):
        assert export_main([str(tmp_path / "final"), "--format", fmt, "--out",
                            str(tmp_path / fmt)]) == 0
        config = json.loads((tmp_path / fmt / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
        dirs[fmt] = str(tmp_path / fmt)
    batch = eval_batch(tok)
    request = {"dirs": dirs, "text": CORPUS[3], "messages": MESSAGES, "batch": batch.tolist(),
               "out": str(tmp_path)}
    (tmp_path / "request.json").write_text(json.dumps(request))
    env = dict(os.environ, PYTHONPATH=str(target))  # 4.57 first; torch from this venv
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "request.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["version"].startswith("4.57."), result["version"]
    assert result["file"].startswith(str(target))

    with torch.no_grad():
        ours = model(batch).logits
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    for fmt in dirs:
        got = result[fmt]
        assert got["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert got["ids"] == tok(CORPUS[3])["input_ids"]
        assert got["decoded"] == CORPUS[3]  # BOS dropped as special, text round-trips
        # the released template from chat_template.jinja; our renderer adds the BOS itself
        assert [tok.bos_token_id, *got["chat_ids"]] == encode_prompt(tok, MESSAGES)
        assert got["eos"] == [tok.eos_token_id, eot]
        err = rel_rms(torch.load(tmp_path / f"{fmt}.pt"), ours)
        assert err < REL_TOL, (fmt, err)
