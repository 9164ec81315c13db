"""The 2B4T chat template: rendering, ids, assistant-only labels, the truncation rule."""

from __future__ import annotations

import pytest

from bitnet_train.data.chat import (
    CHAT_TEMPLATE,
    ChatEncoder,
    EncodeStats,
    encode_chat,
    encode_prompt,
    render,
)
from bitnet_train.errors import DataError
from tests.data.chat_fixtures import bpe_tokenizer, word_tokenizer

X = -100
# word_tokenizer ids: bos 0, eot 2, System 4, User 5, Assistant 6, ":" 7, be 8, brief 9, hi 10,
# hello 11, what 12, is 13, two 14, four 15, "." 16
CONV = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "  hi \n"},  # trimmed by the template
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "what is two"},
    {"role": "assistant", "content": "four ."},
]
GOLDEN_IDS = [0, 4, 7, 8, 9, 2, 5, 7, 10, 2, 6, 7, 11, 2, 5, 7, 12, 13, 14, 2, 6, 7, 15, 16, 2]
GOLDEN_LABELS = [X, X, X, X, X, X, X, X, X, X, X, X, 11, 2, X, X, X, X, X, X, X, X, 15, 16, 2]



def _conv(*turns: str, system: str | None = None) -> list[dict]:
    """Alternating user / assistant turns."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": ("user", "assistant")[i % 2], "content": t}
                   for i, t in enumerate(turns)]


HARD = [  # content the BPE splits across the `Assistant: ` boundary in different ways
    _conv("Hello there!", "Hello, how"),
    _conv("1234?", "56.7 percent", "and\nnewlines", "...ok\n\nyes",
          system="You are a helpful assistant."),
    _conv("caf\u00e9", "\u4e2d\u6587 \U0001f600"),
    _conv("x", "'s fine"),
    _conv("empty?", ""),
]


def test_render_matches_released_template_string():
    text = ("System: be brief<|eot_id|>User: hi<|eot_id|>Assistant: hello<|eot_id|>"
            "User: what is two<|eot_id|>Assistant: four .<|eot_id|>")
    assert render(CONV) == text
    assert render(CONV[:2], add_generation_prompt=True) == (
        "System: be brief<|eot_id|>User: hi<|eot_id|>Assistant: ")
    tok = word_tokenizer()
    for conv in [CONV, *HARD]:
        for gen in (False, True):
            assert render(conv, gen) == tok.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=gen)


def test_golden_ids_and_labels_by_hand():
    ids, labels = encode_chat(word_tokenizer(), CONV, max_len=100)
    assert ids == GOLDEN_IDS
    assert labels == GOLDEN_LABELS


@pytest.mark.parametrize("make", [word_tokenizer, bpe_tokenizer])
def test_ids_equal_apply_chat_template_with_bos(make):
    tok = make()
    convs = [CONV] if make is word_tokenizer else HARD
    for conv in convs:
        ids, _ = encode_chat(tok, conv, max_len=10_000)
        assert ids == [tok.bos_token_id] + tok.apply_chat_template(conv)["input_ids"]
        prompt = conv[:-1]
        assert encode_prompt(tok, prompt) == [tok.bos_token_id] + tok.apply_chat_template(
            prompt, add_generation_prompt=True)["input_ids"]


def test_labels_are_exactly_the_assistant_replies():
    """Each run of labelled tokens decodes to ' ' + reply + eot, in order; nothing else."""
    tok = bpe_tokenizer()
    for conv in HARD:
        ids, labels = encode_chat(tok, conv, max_len=10_000)
        assert all(lab in (X, i) for i, lab in zip(ids, labels))
        runs, cur = [], []
        for i, lab in zip(ids, labels):
            if lab == X and cur:
                runs.append(cur)
                cur = []
            elif lab != X:
                cur.append(i)
        runs.append(cur)
        replies = [m["content"].strip() for m in conv if m["role"] == "assistant"]
        assert [tok.decode(r) for r in runs] == [f" {r}<|eot_id|>" for r in replies]
        assert labels[0] == X  # BOS


def test_masking_per_role_word_tokenizer():
    _, labels = encode_chat(word_tokenizer(), CONV, max_len=100)
    system, user = slice(1, 6), slice(6, 10)
    assert set(labels[system]) == {X} and set(labels[user]) == {X}
    assert labels[10:12] == [X, X]  # "Assistant" ":" of the first reply
    trained = [lab for lab in labels if lab != X]
    assert trained == [11, 2, 15, 16, 2]  # both assistant turns, each with its eot


def test_prompt_for_generation_can_stop_at_the_colon():
    tok = bpe_tokenizer()
    conv = HARD[0]
    full, _ = encode_chat(tok, conv, max_len=1000)
    stripped = encode_prompt(tok, conv[:1], strip_trailing_space=True)
    assert full[: len(stripped)] == stripped  # training ids continue this prompt
    assert tok.decode(stripped).endswith("Assistant:")


# -- truncation: lengths (word tokenizer) BOS 1, system 5, user 4, reply 4, user 5, reply 5 ----

def _encode(conv, max_len):
    stats = EncodeStats()
    out = ChatEncoder(word_tokenizer()).encode(conv, max_len, stats)
    return out, stats


def test_fits_exactly():
    (ids, _), stats = _encode(CONV, 25)
    assert ids == GOLDEN_IDS and stats.kept == 1 and stats.truncated_turns == 0


@pytest.mark.parametrize("max_len", [24, 14])
def test_trailing_exchange_dropped_whole_and_counted(max_len):
    (ids, labels), stats = _encode(CONV, max_len)
    assert ids == GOLDEN_IDS[:14]  # ends with the first reply, never with the second question
    assert labels == GOLDEN_LABELS[:14]
    assert stats.truncated_turns == 1 and stats.kept == 1 and stats.dropped_too_long == 0


def test_first_reply_cut_when_only_its_prompt_fits():
    (ids, labels), stats = _encode(CONV, 13)  # prompt through "Assistant :" is 12 tokens
    assert ids == GOLDEN_IDS[:13]
    assert labels == [X] * 12 + [11]  # the kept reply token only; its eot was cut
    assert stats.truncated_response == 1 and stats.kept == 1


def test_dropped_when_prompt_alone_fills_max_len():
    out, stats = _encode(CONV, 12)
    assert out is None
    assert stats.dropped_too_long == 1 and stats.kept == 0 and stats.seen == 1


def test_trailing_user_turn_removed_and_no_assistant_dropped():
    (ids, _), _ = _encode(CONV[:4], 100)
    assert ids == GOLDEN_IDS[:14]
    out, stats = _encode(CONV[:2], 100)
    assert out is None and stats.dropped_no_assistant == 1


def test_stats_accumulate_tokens():
    enc, stats = ChatEncoder(word_tokenizer()), EncodeStats()
    enc.encode(CONV, 100, stats)
    enc.encode(CONV, 24, stats)
    assert stats.as_dict() == {
        "seen": 2, "kept": 2, "truncated_turns": 1, "truncated_response": 0,
        "dropped_too_long": 0, "dropped_no_assistant": 0, "skipped_bad_records": 0,
        "tokens": 25 + 14, "trained_tokens": 5 + 2}


def test_bad_messages_and_tokenizer_rejected():
    tok = word_tokenizer()
    with pytest.raises(DataError, match="role"):
        encode_chat(tok, [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}],
                    10)
    with pytest.raises(DataError, match="content"):
        encode_chat(tok, [{"role": "user", "content": None}, {"role": "assistant", "content": ""}],
                    10)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, "a")))
    with pytest.raises(DataError, match="eot_id|begin_of_text"):
        ChatEncoder(plain)


def test_template_constant_is_what_tokenizers_carry():
    tok = word_tokenizer()
    assert tok.chat_template == CHAT_TEMPLATE
    assert "<|begin_of_text|>" not in CHAT_TEMPLATE  # the framework prepends BOS
