"""Tokens/s of the pretraining data pipeline (read, tokenize, mix, shuffle, pack) per process.

    python scripts/bench_data.py                          # demo corpus, LLaMA-3 and demo BPE
    python scripts/bench_data.py --workers 0 2 4 --rows 400 --seq-len 4096
    python scripts/bench_data.py --data DIR --tokenizer PATH_OR_HUB_ID

One GPU at the 2B4T shape trains about 50k tokens/s, so a training process needs its data
at well above that: the script prints each setting's rate against 4 x 50k. Settings are the
2b4t data config's (tokenize_batch_size 512, a shuffle buffer, packing to seq_len) on the demo
corpus (Python's documentation as jsonl shards, written to a temporary directory unless --data
points at jsonl files). The clock starts after the first batch, so the shuffle buffer's fill
and the workers' start-up are not counted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitnet_train.data.config import MixtureConfig, PretrainDataConfig, SourceConfig  # noqa: E402
from bitnet_train.data.pretrain import build_pretrain_stream  # noqa: E402

TARGET = 4 * 50_000


def tokenizers(spec: list[str], tmp: Path) -> dict[str, object]:
    from bitnet_train.data.tokenizer import (
        find_llama3_tiktoken_model,
        llama3_tokenizer_from_tiktoken,
        load_tokenizer,
        train_demo_tokenizer,
    )

    out = {}
    for name in spec:
        if name == "llama3":
            out[name] = llama3_tokenizer_from_tiktoken(find_llama3_tiktoken_model(), tmp / "l3")
        elif name == "demo":
            from bitnet_train.data.corpus import python_docs_documents

            out[name] = train_demo_tokenizer((t for _, t in python_docs_documents()),
                                             tmp / "demo_tok", vocab_size=4096)
        else:
            out[name] = load_tokenizer(name)
    return out


def measure(cfg: PretrainDataConfig, tokenizer, rows: int, batch_size: int) -> float:
    """Tokens/s over `rows` packed rows after the first batch."""
    stream = build_pretrain_stream(cfg, tokenizer, batch_size=batch_size)
    next(stream)  # start-up: workers, shuffle buffer fill
    batches = max(1, rows // batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    seconds = time.perf_counter() - start
    return batches * batch_size * cfg.seq_len / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="jsonl file, directory or glob (default: the demo corpus)")
    parser.add_argument("--tokenizer", nargs="+", default=["llama3", "demo"],
                        help="llama3 (offline, from llama-models), demo, or a path / hub id")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=4, help="rows per batch")
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        data = args.data
        if data is None:
            from bitnet_train.data.corpus import write_python_docs_corpus

            data = str(write_python_docs_corpus(tmp / "corpus", num_shards=8)[0].parent)
        print(f"cpu cores visible: {len(os.sched_getaffinity(0))}; data {data}; seq_len "
              f"{args.seq_len}; target {TARGET:,} tokens/s per training process")
        for name, tok in tokenizers(args.tokenizer, tmp).items():
            for workers in args.workers:
                cfg = PretrainDataConfig(
                    seq_len=args.seq_len, tokenize_batch_size=512,
                    shuffle_buffer=args.shuffle_buffer, num_workers=workers,
                    stage1=MixtureConfig(sources=[SourceConfig(name="demo", path=data)]))
                rate = measure(cfg, tok, args.rows, args.batch_size)
                print(f"tokenizer {name:<8} num_workers {workers}: {rate:>10,.0f} tokens/s "
                      f"({rate / TARGET:.2f}x the target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
