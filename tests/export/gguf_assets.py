"""Shared test assets for the GGUF / engine tests: a small byte-level BPE tokenizer and a briefly
trained tiny model (so that logits are far from uniform and engine comparisons mean something)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from bitnet_train.data.chat import CHAT_TEMPLATE
from bitnet_train.model import BitNetConfig, BitNetForCausalLM

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A ternary weight is minus one, zero or one; the scale is the mean absolute value.",
    "Small models learn short texts quickly when the text repeats many times.",
    "User: what is two plus two? Assistant: two plus two is four.",
    "Numbers 12 345 6789 and symbols like #, % and & appear here too.",
]


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 split regex) with merges, LLaMA-3-style specials and a BOS template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    bos = SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=SPECIALS[1], chat_template=CHAT_TEMPLATE
    )


def train_tiny(config: BitNetConfig, tokenizer, steps: int = 60, seq: int = 48,
               seed: int = 0) -> BitNetForCausalLM:
    """A few AdamW steps of next-token prediction on the repeated corpus (CPU, seconds)."""
    torch.manual_seed(seed)
    model = BitNetForCausalLM(config)
    model.init_weights(seed)
    ids = torch.tensor(tokenizer(" ".join(CORPUS * 8))["input_ids"])
    windows = ids.unfold(0, seq, seq // 2)  # (n, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = windows[torch.randint(len(windows), (8,), generator=gen)]
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()
