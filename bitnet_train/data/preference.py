"""Preference pairs for DPO: a shared prompt, a chosen and a rejected response.

    build_preference_dataset(cfg, tokenizer, rank, world_size) -> PreferenceDataset
      load each source -> adapter (record -> Pair) -> encode_pair -> mixture by weight
      -> each epoch: a seeded permutation of the pairs, split over ranks, served as batches

Encoding is SFT's: `[bos] + template(prompt + [assistant response])`, labels only on the
response tokens and the closing `<|eot_id|>` (the `Assistant:` prefix, like the prompt, is
-100). The prompt ids are shared by chosen and rejected. Length rule, per pair:
- the prompt (through `Assistant:`) alone leaves no room in max_len: the pair is dropped;
- otherwise each response is cut at its end to fit max_len (its eot then cut too); counted.

A batch of B pairs has 2B rows: [0, B) prompt + chosen, [B, 2B) prompt + rejected, same order,
right-padded to the longest row of the batch (attention_mask 0, labels -100 on padding), with
position_ids 0.., document_ids 1 (0 on padding), and `pair_index` (B,): each pair's index in the
epoch's example list (fixed across epochs), e.g. to look up precomputed reference log-probs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bitnet_train.data.adapters import Pair
from bitnet_train.data.chat import IGNORE_INDEX, ChatEncoder, EncodeStats
from bitnet_train.data.sft import (
    ChatDataConfig,
    EpochDataset,
    encode_mixture,
    pad_rows,
    pad_token_id,
)
from bitnet_train.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class PreferenceDataConfig(ChatDataConfig):
    """The `data` section of a DPO run: preference sources (formats ultrafeedback, magpie_dpo,
    pairs) with weights."""

    max_len: int = 2048
    """Tokens per row (prompt + one response)."""


def encode_pair(encoder: ChatEncoder, pair: Pair, max_len: int,
                stats: EncodeStats | None = None) -> dict[str, list[int]] | None:
    """{prompt_ids, chosen_ids, rejected_ids} of a pair (see module doc), or None if dropped.

    prompt_ids + chosen_ids equals `[bos] + apply_chat_template(prompt + [chosen])` (before any
    truncation); chosen_ids / rejected_ids are the trained tokens.
    """
    stats = stats if stats is not None else EncodeStats()
    stats.seen += 1
    turns = encoder.turn_ids([*pair.prompt, {"role": "assistant", "content": pair.chosen},
                              {"role": "assistant", "content": pair.rejected}])
    (chosen, n_c), (rejected, n_r) = turns[-2], turns[-1]
    n = min(n_c, n_r)  # the `Assistant:` tokens; equal for BPE tokenizers that split at ':'
    prompt = [encoder.bos_id]
    for turn, _ in turns[:-2]:
        prompt += turn
    prompt += chosen[:n]
    room = max_len - len(prompt)
    if room < 1:
        stats.dropped_too_long += 1
        return None
    chosen, rejected = chosen[n:], rejected[n:]
    if len(chosen) > room or len(rejected) > room:
        stats.truncated_response += 1
        chosen, rejected = chosen[:room], rejected[:room]
    stats.kept += 1
    stats.tokens += len(prompt) + len(chosen) + len(rejected)
    stats.trained_tokens += len(chosen) + len(rejected)
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


class PreferenceDataset(EpochDataset):
    """Encoded pairs; each batch of B pairs is 2B rows (chosen, then rejected)."""

    def __init__(self, parts: list, examples: np.ndarray, pad_id: int, seed: int, rank: int,
                 world_size: int, stats: dict[str, EncodeStats]) -> None:
        super().__init__(len(examples), seed, rank, world_size)
        self.parts = parts          # encoded datasets.Dataset per source
        self.examples = examples    # (n, 2): (source, index in its encoded dataset)
        self.pad_id = pad_id
        self.stats = stats
        self.heldout: PreferenceDataset | None = None  # built with heldout > 0

    def collate(self, rows: list[int]) -> dict[str, Tensor]:
        chosen, rejected = [], []
        for r in rows:
            part, idx = self.examples[r]
            ex = self.parts[part][int(idx)]
            for out, key in ((chosen, "chosen_ids"), (rejected, "rejected_ids")):
                ids = ex["prompt_ids"] + ex[key]
                out.append({
                    "input_ids": ids,
                    "labels": [IGNORE_INDEX] * len(ex["prompt_ids"]) + ex[key],
                    "position_ids": list(range(len(ids))),
                    "document_ids": [1] * len(ids),
                })
        batch = pad_rows(chosen + rejected, self.pad_id)
        batch["pair_index"] = torch.tensor(rows, dtype=torch.long)
        return batch

    def log_dict(self) -> dict[str, int]:
        """Encoding counts, `data/<source>/<field>`, plus totals."""
        total = EncodeStats()
        out: dict[str, int] = {}
        for name, st in self.stats.items():
            out.update(st.as_dict(f"data/{name}/"))
            total.update(st)
        out.update(total.as_dict("data/total/"))
        out["data/pairs_per_epoch"] = self.num_rows
        return out


def build_preference_dataset(cfg: PreferenceDataConfig, tokenizer, rank: int = 0,
                             world_size: int = 1, heldout: int = 0) -> PreferenceDataset:
    """Load, encode and mix `cfg.sources` for this rank (see module doc); with `heldout`,
    `dataset.heldout` holds that many pairs per source, never trained on (rank 0 of 1: the
    evaluator shards them)."""
    if not cfg.sources:
        raise ConfigError("data.sources is empty: list at least one {path, format, weight}")
    encoder = ChatEncoder(tokenizer)

    def encode_one(pair: Pair, stats: EncodeStats):
        return encode_pair(encoder, pair, cfg.max_len, stats)

    rng = np.random.default_rng(cfg.seed)
    parts, examples_arr, stats, held = encode_mixture(
        cfg, "preference", encode_one, ["prompt_ids", "chosen_ids", "rejected_ids"], rng,
        heldout)
    log.info("preference data: %d pairs per epoch", len(examples_arr))
    dataset = PreferenceDataset(parts, examples_arr, pad_token_id(tokenizer), cfg.seed, rank,
                                world_size, stats)
    if len(held):
        dataset.heldout = PreferenceDataset(parts, held, pad_token_id(tokenizer), cfg.seed, 0, 1,
                                            stats)
    return dataset
