"""Bundled demo chat and preference data, generated from Python's own documentation.

No hub, real English: each example asks what a standard-library function or class does and
answers with the first sentence of its docstring (`json.dumps` -> "Serialize ``obj`` to a JSON
formatted ``str``."). About 1,500 documented names give:

- `write_demo_chat(out_dir)`: about 3,000 `messages` records (two phrasings per name; some with a
  system turn, some with a follow-up question about another name: multi-turn).
- `write_demo_pairs(out_dir)`: one `{prompt, chosen, rejected}` record per name. chosen is the
  correct summary; rejected is systematically worse, in equal shares: another name's summary
  (wrong), an unhelpful refusal ("I am not sure."), or the right summary's words shuffled. The
  names are split 90/10: `pairs.jsonl` for training, `pairs_heldout.jsonl` about names never
  seen in training pairs, so a learned preference can be checked for generalisation.

Both are read by the same loaders as hub sets (formats `messages` and `pairs`). Output is
deterministic for a given Python version (docstrings change between releases) and takes well
under a second.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

MODULES = (
    "abc argparse array ast base64 binascii bisect builtins bz2 calendar cmath codecs colorsys "
    "configparser contextlib copy csv dataclasses datetime decimal difflib dis email.utils enum "
    "filecmp fnmatch fractions functools gettext glob graphlib gzip hashlib heapq hmac html "
    "http.client http.cookies importlib inspect io ipaddress itertools json keyword linecache "
    "locale logging lzma math mimetypes numbers operator os os.path pathlib pickle platform "
    "plistlib pprint queue quopri random re reprlib sched secrets selectors shlex shutil "
    "signal socket stat statistics string struct subprocess sys sysconfig tarfile tempfile "
    "textwrap threading time timeit tokenize traceback types typing unicodedata urllib.parse "
    "urllib.request uuid warnings wave weakref xml.etree.ElementTree zipfile zlib zoneinfo"
).split()
BUILTIN_TYPES = (str, bytes, list, dict, set, int, float, tuple)

QUESTIONS = (
    "What does `{name}` do?",
    "What is `{name}` for?",
    "Explain `{name}` in one sentence.",
    "In Python, what does {name} do?",
    "Can you tell me what `{name}` does?",
    "Briefly, what is {name}?",
)
FOLLOW_UPS = ("And `{name}`?", "What about `{name}`?", "Thanks. And what does `{name}` do?")
SYSTEM_PROMPTS = (
    "You are a helpful assistant that explains the Python standard library.",
    "Answer in one short sentence.",
    "You are a concise Python expert.",
)
REFUSALS = ("I am not sure.", "I don't know.", "Sorry, I cannot help with that.",
            "That is hard to say.", "Please check the documentation.")

CHAT_FILE, PAIRS_FILE, HELDOUT_PAIRS_FILE = "chat.jsonl", "pairs.jsonl", "pairs_heldout.jsonl"
HELDOUT_FRACTION = 0.1


def first_sentence(doc: str) -> str | None:
    """The docstring's first sentence if it reads as plain English, else None."""
    para = " ".join(doc.split("\n\n")[0].split())
    sentence = re.split(r"(?<=\.)\s+", para)[0]
    ok = (20 <= len(sentence) <= 200 and sentence.isascii() and sentence[0].isupper()
          and sentence.endswith(".") and not sentence.endswith(("e.g.", "i.e.", "etc."))
          and "(" not in sentence.split()[0])  # C docstrings open with a signature
    return sentence if ok else None


def _members(prefix: str, obj: object) -> Iterable[tuple[str, object]]:
    for name in sorted(dir(obj)):
        if not name.startswith("_"):
            yield f"{prefix}.{name}", getattr(obj, name, None)


def stdlib_summaries() -> list[tuple[str, str]]:
    """(qualified name, one-sentence summary) for documented stdlib callables, sorted by name.

    A summary shared by several names (re-exports, aliases) is kept once, under the first.
    """
    found: dict[str, str] = {}
    seen_text: set[str] = set()
    candidates: list[tuple[str, object]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod in MODULES:
            try:
                candidates += _members(mod, importlib.import_module(mod))
            except ImportError:  # platform-specific modules
                continue
        for t in BUILTIN_TYPES:
            candidates += _members(t.__name__, t)
    for qualname, obj in sorted(candidates, key=lambda c: c[0]):
        if not callable(obj):
            continue
        doc = inspect.getdoc(obj)
        text = first_sentence(doc) if doc else None
        if text and text not in seen_text and qualname not in found:
            found[qualname] = text
            seen_text.add(text)
    return sorted(found.items())


def _write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def chat_records(seed: int = 0) -> list[dict]:
    """`{"messages": [...]}` records: two phrasings per name, ~20% with a system turn, ~25%
    multi-turn (a follow-up about another name)."""
    rng = random.Random(seed)
    items = stdlib_summaries()
    records = []
    for _ in range(2):
        for name, summary in items:
            msgs = []
            if rng.random() < 0.2:
                msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            msgs += [{"role": "user", "content": rng.choice(QUESTIONS).format(name=name)},
                     {"role": "assistant", "content": summary}]
            if rng.random() < 0.25:
                other, other_summary = rng.choice(items)
                msgs += [{"role": "user", "content": rng.choice(FOLLOW_UPS).format(name=other)},
                         {"role": "assistant", "content": other_summary}]
            records.append({"messages": msgs})
    return records


def _shuffled_words(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(10):
        rng.shuffle(words)
        if " ".join(words) != text:
            break
    return " ".join(words)


def pair_records(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training, held-out) `{prompt, chosen, rejected}` records; held-out names are disjoint."""
    rng = random.Random(seed)
    items = stdlib_summaries()
    order = list(range(len(items)))
    rng.shuffle(order)
    n_heldout = max(1, int(len(items) * HELDOUT_FRACTION))
    heldout = set(order[:n_heldout])
    train, test = [], []
    for i, (name, summary) in enumerate(items):
        kind = i % 3  # equal shares of the three kinds of worse answer
        if kind == 0:
            rejected = items[(i + rng.randrange(1, len(items))) % len(items)][1]
        elif kind == 1:
            rejected = rng.choice(REFUSALS)
        else:
            rejected = _shuffled_words(summary, rng)
        record = {"prompt": rng.choice(QUESTIONS).format(name=name), "chosen": summary,
                  "rejected": rejected}
        (test if i in heldout else train).append(record)
    return train, test


def write_demo_chat(out_dir: str | Path, seed: int = 0) -> Path:
    """Write OUT_DIR/chat.jsonl (`messages` records); returns its path."""
    return _write_jsonl(Path(out_dir) / CHAT_FILE, chat_records(seed))


def write_demo_pairs(out_dir: str | Path, seed: int = 0) -> Path:
    """Write OUT_DIR/pairs.jsonl and OUT_DIR/pairs_heldout.jsonl (`{prompt, chosen, rejected}`
    records, held-out names disjoint); returns the training file's path."""
    train, test = pair_records(seed)
    _write_jsonl(Path(out_dir) / HELDOUT_PAIRS_FILE, test)
    return _write_jsonl(Path(out_dir) / PAIRS_FILE, train)
