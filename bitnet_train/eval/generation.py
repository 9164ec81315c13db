"""Batched generation with a KV cache: greedy or sampled, stop strings and EOS.

    generate(model, input_ids, attention_mask, GenerationConfig(...), tokenizer)
      prefill the (left-padded) prompts in one forward that fills a static KV cache
      -> per step: choose the next token of every row (argmax, or temperature / top-k / top-p
         sampling from a seeded generator), feed it alone with the cached keys and values
      -> a row finishes at an EOS id, at a stop string (needs the tokenizer) or at
         max_new_tokens; finished rows are padded (as transformers' `generate` does); the loop
         ends when every row has finished.

Runs under `torch.inference_mode()` with every BitLinear's ternary weight quantized once for
the call (`frozen_ternary_weights`); fused layers (bitnet_train.kernels) keep their ternary codes
from the last refresh. Left padding: position ids count real tokens only (the first real token
of every row is position 0, as in training) and padded keys are masked, so a padded row decodes
exactly as it would alone. Greedy output equals transformers' `generate` on the exported model
(tests/eval/test_generation.py).

Only the last position's logits are computed (through the model's `head_fn`), so prefill never
materialises (B, L, vocab) logits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from bitnet_train.model import BitNetForCausalLM, KVCache, frozen_ternary_weights

log = logging.getLogger(__name__)

FINISH_REASONS = ("eos", "stop", "length")


@dataclass
class GenerationConfig:
    """How to decode. The defaults are greedy decoding of up to 256 tokens."""

    max_new_tokens: int = 256
    do_sample: bool = False
    """False: greedy (argmax). True: sample from the tempered, top-k / top-p filtered softmax."""
    temperature: float = 1.0
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to >= top_p."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    seed: int | None = None
    """Seeds a private generator (same seed, same samples); None: torch's global RNG."""
    eos_token_ids: Sequence[int] = ()
    """A row stops after emitting any of these (the id is kept in its tokens)."""
    stop_strings: Sequence[str] = ()
    """A row stops once its decoded continuation contains one of these (needs a tokenizer);
    `GenerationOutput.texts` is cut before the first one."""
    pad_token_id: int = 0
    """Written after a row has finished."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 when sampling; use "
                             "do_sample=False for greedy decoding")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0: off)")


@dataclass
class GenerationOutput:
    """sequences: (B, L + n) prompts (left-padded as given) followed by the generated tokens,
    pad_token_id after a row finished. new_tokens: each row's generated ids up to and including
    the one that finished it. texts: those decoded (special tokens skipped) and cut before the
    first stop string, when a tokenizer was given. finish_reasons: "eos" | "stop" | "length"."""

    sequences: Tensor
    new_tokens: list[list[int]]
    finish_reasons: list[str]
    texts: list[str] | None = None
    prompt_length: int = 0
    steps: int = field(default=0)
    """Decoding steps run (forwards after the prefill)."""


def sample_next_token(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: int = 0, generator: torch.Generator | None = None) -> Tensor:
    """One token per row from logits (B, vocab): softmax(logits / temperature) restricted to
    the top_k most likely tokens and to the nucleus of probability top_p (the smallest set of
    most likely tokens whose mass reaches top_p; the most likely token always stays). -> (B,)."""
    scores = logits.float() / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)  # ascending
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1.0 - top_p  # the least likely tokens outside the nucleus
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def left_pad_positions(attention_mask: Tensor) -> Tensor:
    """(B, L) 0/1 mask of left-padded rows -> position ids (B, L): 0 at each row's first real
    token; padding gets 0 (it is masked anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class _StopStrings:
    """Detects stop strings in each row's continuation by decoding only its tail: a string of
    b UTF-8 bytes spans at most b + 1 byte-level tokens, so that many suffice."""

    def __init__(self, tokenizer, stops: Sequence[str]) -> None:
        if stops and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode the continuation")
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.window = max((len(s.encode("utf-8")) for s in self.stops), default=0) + 1

    def hit(self, tokens: list[int]) -> bool:
        if not self.stops:
            return False
        tail = self.tokenizer.decode(tokens[-self.window:], skip_special_tokens=False)
        return any(s in tail for s in self.stops)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def _last_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    return F.linear(hidden[:, -1], weight).float()  # (B, vocab)


@torch.inference_mode()
def generate(model: BitNetForCausalLM, input_ids: Tensor, attention_mask: Tensor | None = None,
             config: GenerationConfig | None = None, tokenizer=None) -> GenerationOutput:
    """Continue every row of `input_ids` (B, L), left-padded when rows differ in length
    (attention_mask (B, L): 1 = real token). See the module doc."""
    config = config or GenerationConfig()
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate() needs LEFT padding: the last position of every row must be "
                         "a real token (tokenizer(..., padding_side='left'))")
    stops = _StopStrings(tokenizer, config.stop_strings)
    eos = torch.tensor(sorted(set(config.eos_token_ids)), dtype=torch.long, device=device)
    generator = None
    if config.do_sample and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)

    total = prompt_len + config.max_new_tokens
    out = torch.full((batch, total), config.pad_token_id, dtype=torch.long, device=device)
    out[:, :prompt_len] = input_ids
    mask = torch.ones((batch, total), dtype=attention_mask.dtype, device=device)
    mask[:, :prompt_len] = attention_mask
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    reasons = ["length"] * batch
    generated: list[list[int]] = [[] for _ in range(batch)]
    positions = left_pad_positions(attention_mask)
    next_pos = positions[:, -1:] + 1  # (B, 1)

    was_training = model.training
    model.eval()
    steps = 0
    try:
        with frozen_ternary_weights(model):
            cache = KVCache.for_model(model.config, batch, max(total, 1))
            logits = model(input_ids, attention_mask, positions, cache=cache,
                           head_fn=_last_logits)
            for step in range(config.max_new_tokens):
                if config.do_sample:
                    token = sample_next_token(logits, config.temperature, config.top_p,
                                              config.top_k, generator)
                else:
                    token = logits.argmax(dim=-1)
                token = token.masked_fill(finished, config.pad_token_id)
                out[:, prompt_len + step] = token
                hit_eos = torch.isin(token, eos) & ~finished if eos.numel() else None
                # one host sync per step: the new tokens (and which rows just hit EOS)
                host = token.tolist()
                eos_rows = hit_eos.tolist() if hit_eos is not None else [False] * batch
                done = finished.tolist()
                for i in range(batch):
                    if done[i]:
                        continue
                    generated[i].append(host[i])
                    if eos_rows[i]:
                        reasons[i], done[i] = "eos", True
                    elif stops.hit(generated[i]):
                        reasons[i], done[i] = "stop", True
                finished = torch.tensor(done, dtype=torch.bool, device=device)
                steps = step + 1
                if all(done) or step == config.max_new_tokens - 1:
                    break
                logits = model(token[:, None], mask[:, :prompt_len + step + 1], next_pos,
                               cache=cache, head_fn=_last_logits)
                next_pos = next_pos + 1
    finally:
        model.train(was_training)
    texts = None
    if tokenizer is not None:
        texts = [cut_at_stop(tokenizer.decode(g, skip_special_tokens=True), stops.stops)
                 for g in generated]
    return GenerationOutput(sequences=out[:, :prompt_len + steps], new_tokens=generated,
                            finish_reasons=reasons, texts=texts, prompt_length=prompt_len,
                            steps=steps)


def generate_text(model: BitNetForCausalLM, tokenizer, prompts: Sequence[str],
                  config: GenerationConfig | None = None, batch_size: int = 16,
                  add_special_tokens: bool = True, max_prompt_tokens: int | None = None,
                  ) -> list[str]:
    """Generate a continuation of every prompt string, `batch_size` at a time (longest first,
    so a batch pads little), returned in the order of `prompts`.

    The prompts are tokenized with `add_special_tokens` (BOS for LLaMA-3 tokenizers) and
    left-truncated to `max_prompt_tokens` (default: the model's positions minus the new
    tokens). EOS ids default to the tokenizer's EOS and `<|eot_id|>` when it has one.
    """
    config = config or GenerationConfig()
    if not config.eos_token_ids:
        config = _with_default_eos(config, tokenizer)
    device = next(model.parameters()).device
    limit = max_prompt_tokens or max(1, model.config.max_position_embeddings
                                     - config.max_new_tokens)
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"][-limit:]
               for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = left_pad([encoded[i] for i in rows], config.pad_token_id)
        out = generate(model, ids.to(device), mask.to(device), config, tokenizer)
        for i, text in zip(rows, out.texts or []):
            results[i] = text
    return results


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token lists -> (input_ids, attention_mask), each (B, longest), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def default_eos_ids(tokenizer) -> list[int]:
    """The tokenizer's EOS and, when it has one, LLaMA-3's end of turn `<|eot_id|>`."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    eot = tokenizer.get_vocab().get("<|eot_id|>")
    if eot is not None and eot not in ids:
        ids.append(int(eot))
    return ids


def _with_default_eos(config: GenerationConfig, tokenizer) -> GenerationConfig:
    from dataclasses import replace

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
    return replace(config, eos_token_ids=default_eos_ids(tokenizer), pad_token_id=pad)
