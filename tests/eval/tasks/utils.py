"""Loaders of the tiny test tasks: local jsonl next to this file, read through datasets' json
builder (lm-eval calls `custom_dataset` with the task's metadata and dataset_kwargs)."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _jsonl(name: str) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(HERE / name)})


def tiny_mc(**kwargs) -> datasets.DatasetDict:
    return _jsonl("tiny_mc.jsonl")


def tiny_gen(**kwargs) -> datasets.DatasetDict:
    return _jsonl("tiny_gen.jsonl")
