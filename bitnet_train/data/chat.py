"""The BitNet b1.58 2B4T chat template, and SFT encoding with assistant-only labels.

The released tokenizer (microsoft/bitnet-b1.58-2B-4T, `tokenizer_config.json`) renders each
message as `Role: content<|eot_id|>` (role capitalised, content trimmed, nothing between turns)
and `Assistant: ` as the generation prompt; the template adds no BOS, so the framework prepends
`<|begin_of_text|>` (as transformers' BitNet example does):

    <|begin_of_text|>System: Be brief.<|eot_id|>User: Hi<|eot_id|>Assistant: Hello!<|eot_id|>

The report's prose shows a space before `User:` (`...<|eot_id|> User: ...`). We match the
released Jinja template token for token, because that is what deployed engines (transformers,
llama.cpp / bitnet.cpp through the GGUF's template) apply at inference; `CHAT_TEMPLATE` is that
template, and exported tokenizers carry it (`tokenizer.chat_template = CHAT_TEMPLATE`).

Tokenisation. Special tokens split the text before BPE runs, so each message
`Role: content<|eot_id|>` tokenises independently and a conversation's ids are the concatenation
of its messages' ids: exactly `[bos] + tokenizer.apply_chat_template(messages)`. Inside an
assistant message the role prefix `Assistant:` is not trained; everything after it is: the
content (with the space that BPE merges into its first token, e.g. `Ġhello`) and the closing
`<|eot_id|>`. The prefix tokens are found as the longest common prefix of the message's ids and
the ids of `Assistant:` alone, so no token that carries content is ever masked.

Note for generation: after `Assistant:` training data holds tokens such as `Ġhello`, while the
released generation prompt ends with a lone space token. `encode_prompt(...,
strip_trailing_space=True)` stops at `Assistant:` instead, which matches the training
tokenisation; the default matches the released template (and deployed engines).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

from bitnet_train.data.packing import IGNORE_INDEX
from bitnet_train.errors import DataError

BOS_TOKEN = "<|begin_of_text|>"
EOT_TOKEN = "<|eot_id|>"
ROLES = ("system", "user", "assistant")
GENERATION_PROMPT = "Assistant: "

CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = message['role'] | capitalize + ': '+ message['content'] | trim"
    " + '<|eot_id|>' %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
"""The released 2B4T tokenizer's Jinja chat template, verbatim (no BOS; see module doc)."""

Message = dict[str, str]


def render_message(role: str, content: str) -> str:
    """One turn as the template renders it: `Role: content<|eot_id|>` (Jinja capitalize/trim)."""
    return f"{role.capitalize()}: {content.strip()}{EOT_TOKEN}"


def render(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as `CHAT_TEMPLATE` renders it (no BOS)."""
    text = "".join(render_message(m["role"], m["content"]) for m in messages)
    return text + (GENERATION_PROMPT if add_generation_prompt else "")


@dataclass
class EncodeStats:
    """What encoding did to a data set; the trainer logs these (`as_dict`)."""

    seen: int = 0
    """Records read."""
    kept: int = 0
    """Examples produced (conversations, or preference pairs)."""
    truncated_turns: int = 0
    """Conversations that lost whole trailing turns to fit max_len."""
    truncated_response: int = 0
    """Examples whose (first / preference) response was cut at max_len, closing eot included."""
    dropped_too_long: int = 0
    """Dropped: the prompt alone leaves no room for a response token."""
    dropped_no_assistant: int = 0
    """Dropped: no assistant turn, so nothing to train on."""
    skipped_bad_records: int = 0
    """Records an adapter could not read, skipped (on_bad_record: skip)."""
    tokens: int = 0
    """Tokens in kept examples (for pairs: prompt + both responses)."""
    trained_tokens: int = 0
    """Tokens that carry a label."""

    def update(self, other: EncodeStats) -> EncodeStats:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self, prefix: str = "") -> dict[str, int]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


class ChatEncoder:
    """Tokenises conversations with the 2B4T template for one tokenizer.

    The tokenizer must know `<|eot_id|>` and `<|begin_of_text|>` as added (special) tokens, so
    that they split the text before BPE; any transformers tokenizer (fast or slow) works.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.bos_id = self._special_id(BOS_TOKEN)
        self.eot_id = self._special_id(EOT_TOKEN)
        # "Assistant:" alone; its common prefix with a turn's ids is the untrained role prefix.
        self._assistant_prefix = self._tokenize([GENERATION_PROMPT.rstrip()])[0]

    def _special_id(self, token: str) -> int:
        tok = self.tokenizer
        if token not in tok.get_added_vocab():
            raise DataError(
                f"tokenizer {getattr(tok, 'name_or_path', '')!r} has no added token {token}; "
                f"the 2B4T chat template needs LLaMA-3's special tokens "
                f"(use the released tokenizer or bitnet_train.data.tokenizer)"
            )
        return tok.get_added_vocab()[token]

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def turn_ids(self, messages: Sequence[Message]) -> list[tuple[list[int], int]]:
        """Per message: (ids of `Role: content<|eot_id|>`, number of leading untrained tokens).

        Untrained: the whole turn for system/user; the `Assistant:` prefix for assistant turns.
        """
        check_messages(messages)
        ids = self._tokenize([render_message(m["role"], m["content"]) for m in messages])
        out = []
        for m, turn in zip(messages, ids):
            if m["role"] == "assistant":
                n = _common_prefix(turn, self._assistant_prefix)
                out.append((turn, min(n, len(turn) - 1)))  # the eot is always trained
            else:
                out.append((turn, len(turn)))
        return out

    def encode(
        self, messages: Sequence[Message], max_len: int, stats: EncodeStats | None = None
    ) -> tuple[list[int], list[int]] | None:
        """(input_ids, labels) of `[bos] + template(messages)`, at most `max_len` tokens.

        labels equal input_ids on assistant content and its closing `<|eot_id|>` and are -100
        elsewhere (BOS, system and user turns, the `Assistant:` prefix); they are not shifted.
        Every assistant turn is trained.

        Over-long conversations (rule):
          1. trailing non-assistant turns are removed (they would carry no trained token);
          2. whole trailing turns are dropped until the conversation fits, so it still ends
             with an assistant turn (whole user -> assistant exchanges are kept);
          3. if even the first exchange does not fit, the first assistant response is cut at a
             token boundary to fill max_len (its closing eot is cut too, so the model is never
             taught to stop there; labels only on the kept response tokens), provided the
             prompt before it leaves room for at least one response token;
          4. otherwise the conversation is dropped (returns None).
        A conversation with no assistant turn is dropped. `stats` counts each case.
        """
        check_messages(messages)
        stats = stats if stats is not None else EncodeStats()
        stats.seen += 1
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        if last < 0:
            stats.dropped_no_assistant += 1
            return None
        turns = self.turn_ids(messages[: last + 1])
        ends, total = [], 1  # running length after each turn, BOS included
        for turn, _ in turns:
            total += len(turn)
            ends.append(total)
        keep = max((i + 1 for i, m in enumerate(messages[: last + 1])
                    if m["role"] == "assistant" and ends[i] <= max_len), default=0)
        input_ids, labels = [self.bos_id], [IGNORE_INDEX]
        if keep:
            if keep < len(turns):
                stats.truncated_turns += 1
            for turn, n_prompt in turns[:keep]:
                input_ids += turn
                labels += [IGNORE_INDEX] * n_prompt + turn[n_prompt:]
        else:  # the first exchange alone is too long: cut its response, or drop
            first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
            for turn, _ in turns[:first]:
                input_ids += turn
            turn, n_prompt = turns[first]
            input_ids += turn[:n_prompt]
            room = max_len - len(input_ids)
            if room < 1:
                stats.dropped_too_long += 1
                return None
            stats.truncated_response += 1
            labels = [IGNORE_INDEX] * len(input_ids) + turn[n_prompt: n_prompt + room]
            input_ids += turn[n_prompt: n_prompt + room]
        stats.kept += 1
        stats.tokens += len(input_ids)
        stats.trained_tokens += sum(x != IGNORE_INDEX for x in labels)
        return input_ids, labels

    def encode_prompt(
        self, messages: Sequence[Message], strip_trailing_space: bool = False
    ) -> list[int]:
        """`[bos] + template(messages, add_generation_prompt=True)` for generation.

        strip_trailing_space: end at `Assistant:` rather than `Assistant: ` (see module doc).
        """
        ids = [self.bos_id]
        for turn, _ in self.turn_ids(messages):
            ids += turn
        tail = GENERATION_PROMPT.rstrip() if strip_trailing_space else GENERATION_PROMPT
        return ids + self._tokenize([tail])[0]


def encode_chat(
    tokenizer, messages: Sequence[Message], max_len: int, stats: EncodeStats | None = None
) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) of one conversation, or None if dropped; see `ChatEncoder.encode`.

    For many conversations build one `ChatEncoder` and reuse it.
    """
    return ChatEncoder(tokenizer).encode(messages, max_len, stats)


def encode_prompt(tokenizer, messages: Sequence[Message],
                  strip_trailing_space: bool = False) -> list[int]:
    """Prompt ids for generation; see `ChatEncoder.encode_prompt`."""
    return ChatEncoder(tokenizer).encode_prompt(messages, strip_trailing_space)


def check_messages(messages: Sequence[Message]) -> None:
    """DataError unless `messages` is a non-empty list of {role in ROLES, content: str}."""
    if not messages:
        raise DataError("empty conversation (no messages)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"message {i}: role must be one of {ROLES}, got {m!r:.80}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"message {i} ({m['role']}): content must be a string, "
                            f"got {type(m.get('content')).__name__}")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
