"""Small local corpora, tokenizers and configs for trainer tests (no hub, real loaders)."""

from __future__ import annotations

import json
from pathlib import Path

from bitnet_train.data.tokenizer import train_demo_tokenizer
from bitnet_train.train.config import TrainConfig, compose, to_train_config

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be or not to be, that is the question.",
    "All that glitters is not gold.",
    "The early bird catches the worm, but the second mouse gets the cheese.",
    "Simple is better than complex, and complex is better than complicated.",
]

TINY_MODEL = [
    "model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=128",
    "model.num_hidden_layers=2", "model.num_attention_heads=4", "model.num_key_value_heads=2",
    "model.max_position_embeddings=128",
]


def write_corpus(root: Path, docs: list[str] | None = None, repeat: int = 20) -> Path:
    """jsonl shards of `docs` (default: SENTENCES), `repeat` copies each."""
    root.mkdir(parents=True, exist_ok=True)
    docs = docs or SENTENCES
    path = root / "corpus.jsonl"
    with path.open("w") as f:
        for _ in range(repeat):
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    return root


def make_tokenizer(root: Path, texts: list[str] | None = None, vocab_size: int = 400):
    """A byte-level BPE with the LLaMA-3 specials, saved under root/tokenizer."""
    return train_demo_tokenizer(texts or SENTENCES * 5, root / "tokenizer", vocab_size=vocab_size)


def pretrain_config(tmp: Path, corpus: Path, *overrides: str) -> TrainConfig:
    """demo_pretrain shrunk to a 2-layer hidden-64 model on `corpus`, logging off."""
    return to_train_config(compose([
        "+recipe=demo_pretrain", f"tokenizer={tmp / 'tokenizer'}", f"output_dir={tmp / 'run'}",
        f"data.stage1.sources.0.path={corpus}", "data.seq_len=32", "data.shuffle_buffer=0",
        "trainer.micro_batch_size=4", "trainer.log_every=1000", "trainer.progress_bar=false",
        "trainer.checkpoint_every=0", "schedule.warmup_steps=2", "logger=none", *TINY_MODEL,
        *overrides,
    ]))


QA = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What do bees make?", "Bees make honey and wax."),
    ("Which planet is red?", "Mars is the red planet."),
    ("What is frozen water called?", "Frozen water is called ice."),
]


def write_chat_data(root: Path) -> Path:
    """root/chat.jsonl (30 conversations), the demo preference pairs and a tokenizer with the
    chat template, for SFT and DPO runs."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "chat.jsonl").open("w") as f:
        for i in range(30):
            q, a = QA[i % len(QA)]
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if i % 3 == 0:
                msgs.insert(0, {"role": "system", "content": "Answer in one sentence."})
            f.write(json.dumps({"messages": msgs}) + "\n")
    write_chat_pairs_and_tokenizer(root, QA, pair_lines=400)
    return root


def write_chat_pairs_and_tokenizer(root: Path, qa: list[tuple[str, str]], pair_lines: int
                                   ) -> None:
    """root/pairs.jsonl (the demo preference pairs) and root/tokenizer: a 500-token BPE trained
    on the `qa` texts and the first `pair_lines` pairs, with the chat template."""
    from bitnet_train.data.chat import CHAT_TEMPLATE
    from bitnet_train.data.demo_data import write_demo_pairs

    write_demo_pairs(root)
    texts = [q + " " + a for q, a in qa] * 20
    texts += [json.loads(line)["prompt"] + " " + json.loads(line)["chosen"]
              for line in (root / "pairs.jsonl").read_text().splitlines()[:pair_lines]]
    tok = train_demo_tokenizer(texts, root / "tokenizer", vocab_size=500)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(root / "tokenizer"))


def chat_config(recipe: str, root: Path, out: Path, *overrides: str) -> TrainConfig:
    """A demo SFT / DPO recipe on the tiny model and `root`'s tokenizer, logging off."""
    return to_train_config(compose([
        f"+recipe={recipe}", f"tokenizer={root / 'tokenizer'}", f"output_dir={out}",
        "model.init=null", "trainer.progress_bar=false", "trainer.log_every=1000", *TINY_MODEL,
        *overrides,
    ]))


def bitlinear_modules(model) -> dict:
    """name -> BitLinear of every ternary projection in `model`."""
    from bitnet_train.model.bitlinear import BitLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, BitLinear)}
