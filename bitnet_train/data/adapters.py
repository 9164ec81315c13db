"""Chat and preference data sources: where records come from, and how each becomes messages.

One adapter per record schema, registered by name; a source's adapter is its `format:`, or with
`format: auto` the one `HUB_FORMATS` names for its hub id (else one guessed from the first
record's keys). Schemas (checked against the hub dataset cards, 2026-11):

SFT (record -> list of {"role", "content"} messages, roles system | user | assistant)
- `wildchat`  allenai/WildChat-1M: `conversation` = [{role: user|assistant, content, language,
  timestamp, toxic, ...}]; extra keys ignored.
- `lmsys`     lmsys/lmsys-chat-1m: `conversation` = [{role: user|assistant, content}]. The repo is
  GATED: accept its terms on the hub, then set HF_TOKEN or run `huggingface-cli login`.
- `sharegpt`  `conversations` = [{from: system|human|gpt, value}]: Open-Orca/SlimOrca (whose
  turns also carry a `weight` we ignore) and WizardLMTeam/WizardLM_evol_instruct_V2_196k. That
  repo holds WizardLM_evol_instruct_V2_143k.json, 143k records, not the full 196k of its name
  (the other 53k were ShareGPT conversations it asks you to merge yourself).
- `instruction` {instruction, output[, input]}: WizardLMTeam/WizardLM_evol_instruct_70k (alpaca).
- `messages`  `messages` = [{role, content}] (our bundled demo data, TRL-style sets).

Preference (record -> Pair(prompt messages, chosen text, rejected text))
- `ultrafeedback` HuggingFaceH4/ultrafeedback_binarized (splits train_prefs / test_prefs):
  `prompt` str, `chosen` / `rejected` = full [{role, content}] lists whose last message is the
  assistant response; the prompt is taken from the lists (their shared leading messages).
- `magpie_dpo` Magpie-Align/Magpie-Llama-3.1-Pro-DPO-100K-v0.1 (and Magpie-Pro-DPO-100K-v0.1,
  MagpieLM-DPO-Data-v0.1): `instruction` str, `chosen` / `rejected` = [{role: user, content},
  {role: assistant, content}], plus generation metadata (`responses`, `rewards_armorm`, ...).
  The DPO sets carry no `conversations` field (Magpie's SFT sets do, ShareGPT style); if one is
  present it is read as the prompt.
- `pairs` {prompt, chosen, rejected}, each a string or a message list (the bundled demo pairs).
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitnet_train.data.bad_records import find_bad_record
from bitnet_train.data.chat import Message, check_messages
from bitnet_train.errors import ConfigError, DataError

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class ChatSourceConfig:
    """One chat or preference source of an SFT / DPO mixture (pretraining sources are
    `bitnet_train.data.config.SourceConfig`; the fields they share have the same names)."""

    name: str = ""
    """Label in logs and errors; defaults to `path`."""
    path: str = ""
    """Hub dataset id (e.g. allenai/WildChat-1M) or local .json/.jsonl/.parquet file, glob or
    directory; both load through `datasets.load_dataset`."""
    split: str = "train"
    """Split, with datasets' slicing (`train[:95%]`). Local files hold one split, `train`."""
    format: str = "auto"
    """Adapter name (see bitnet_train.data.adapters), or auto: by hub id, else by record keys."""
    weight: float = 1.0
    """Upsampling factor: each epoch holds round(weight * records kept) of this source's
    examples, whole copies plus a seeded subset (1.0 = each once, 0.5 = a fixed half)."""
    config_name: str | None = None
    """Hub dataset configuration (`load_dataset(path, name=...)`), if the dataset has several."""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.path
        if self.format != "auto" and self.format not in ADAPTERS:
            raise ConfigError(f"data source {self.name!r}: unknown format={self.format!r}; "
                              f"choose auto or one of {sorted(ADAPTERS)}")
        if self.weight <= 0:
            raise ConfigError(f"data source {self.name!r}: weight={self.weight} must be > 0 "
                              f"(remove the source to leave it out)")


@dataclass(frozen=True)
class Pair:
    """A preference pair: shared prompt messages, then two assistant responses."""

    prompt: list[Message]
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Adapter:
    name: str
    kind: str  # "sft" | "preference"
    fn: Callable[[dict[str, Any]], Any]


ADAPTERS: dict[str, Adapter] = {}

HUB_FORMATS: dict[str, str] = {
    "allenai/WildChat-1M": "wildchat",
    "allenai/WildChat": "wildchat",
    "allenai/WildChat-1M-Full": "wildchat",
    "lmsys/lmsys-chat-1m": "lmsys",
    "WizardLMTeam/WizardLM_evol_instruct_V2_196k": "sharegpt",
    "WizardLMTeam/WizardLM_evol_instruct_70k": "instruction",
    "Open-Orca/SlimOrca": "sharegpt",
    "Open-Orca/SlimOrca-Dedup": "sharegpt",
    "HuggingFaceH4/ultrafeedback_binarized": "ultrafeedback",
    "Magpie-Align/Magpie-Llama-3.1-Pro-DPO-100K-v0.1": "magpie_dpo",
    "Magpie-Align/Magpie-Pro-DPO-100K-v0.1": "magpie_dpo",
    "Magpie-Align/MagpieLM-DPO-Data-v0.1": "magpie_dpo",
}
"""Hub id -> adapter name, used by `format: auto`."""

GATED = {"lmsys/lmsys-chat-1m", "bigcode/starcoderdata"}


def register(name: str, kind: str):
    """Decorator: make `fn(record)` the adapter `name` for `kind` ("sft" or "preference")."""
    def wrap(fn):
        ADAPTERS[name] = Adapter(name, kind, fn)
        return fn
    return wrap


# -- SFT adapters ----------------------------------------------------------------------------

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}


def _role_content(turns: Any, field: str) -> list[Message]:
    if not isinstance(turns, list):
        raise DataError(f"`{field}` must be a list of turns, got {type(turns).__name__}")
    return [{"role": t["role"], "content": t["content"]} for t in turns]


@register("wildchat", "sft")
def wildchat(record: dict[str, Any]) -> list[Message]:
    """allenai/WildChat-1M: `conversation` = [{role, content, ...}]."""
    return _role_content(record["conversation"], "conversation")


@register("lmsys", "sft")
def lmsys(record: dict[str, Any]) -> list[Message]:
    """lmsys/lmsys-chat-1m: `conversation` = [{role, content}]."""
    return _role_content(record["conversation"], "conversation")


@register("messages", "sft")
def messages(record: dict[str, Any]) -> list[Message]:
    """`messages` = [{role, content}]."""
    return _role_content(record["messages"], "messages")


@register("sharegpt", "sft")
def sharegpt(record: dict[str, Any]) -> list[Message]:
    """`conversations` = [{from: system|human|gpt, value}] (SlimOrca, WizardLM V2)."""
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise DataError(f"`conversations` must be a list of turns, got {type(turns).__name__}")
    out = []
    for t in turns:
        if t["from"] not in SHAREGPT_ROLES:
            raise DataError(f"unknown speaker from={t['from']!r}; expected one of "
                            f"{sorted(SHAREGPT_ROLES)}")
        out.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return out


@register("instruction", "sft")
def instruction(record: dict[str, Any]) -> list[Message]:
    """{instruction, output[, input]} (WizardLM 70k, alpaca): one user -> assistant exchange."""
    prompt = record["instruction"]
    if record.get("input"):
        prompt = f"{prompt}\n\n{record['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


# -- preference adapters ---------------------------------------------------------------------

def _as_messages(value: Any, field: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return _role_content(value, field)


def _response(value: Any, field: str) -> tuple[list[Message] | None, str]:
    """(leading prompt messages or None, response text) of a chosen/rejected field."""
    if isinstance(value, str):
        return None, value
    msgs = _role_content(value, field)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise DataError(f"`{field}` must end with an assistant message")
    return msgs[:-1], msgs[-1]["content"]


def _same_turns(a: list[Message], b: list[Message]) -> bool:
    key = lambda ms: [(m["role"], m["content"].strip()) for m in ms]
    return key(a) == key(b)


def pair_from(prompt: Any, chosen: Any, rejected: Any) -> Pair:
    """A Pair from a prompt (str, messages or None) and two responses (str or messages).

    Message-list responses may repeat the prompt before the assistant message; their leading
    messages must then agree with each other and with `prompt` (whitespace-trimmed, as the
    template trims).
    """
    c_prefix, c_text = _response(chosen, "chosen")
    r_prefix, r_text = _response(rejected, "rejected")
    prompt_msgs = _as_messages(prompt, "prompt") if prompt is not None else None
    for prefix, field in ((c_prefix, "chosen"), (r_prefix, "rejected")):
        if not prefix:
            continue
        if prompt_msgs is None:
            prompt_msgs = prefix
        elif not _same_turns(prefix, prompt_msgs):
            raise DataError(f"the prompt turns of `{field}` differ from the pair's prompt")
    if not prompt_msgs:
        raise DataError("no prompt: give `prompt`, or chosen/rejected lists with the prompt turns")
    return Pair(prompt_msgs, c_text, r_text)


@register("ultrafeedback", "preference")
def ultrafeedback(record: dict[str, Any]) -> Pair:
    """HuggingFaceH4/ultrafeedback_binarized: chosen/rejected = [user, assistant] lists."""
    return pair_from(None, record["chosen"], record["rejected"])


@register("magpie_dpo", "preference")
def magpie_dpo(record: dict[str, Any]) -> Pair:
    """Magpie DPO sets: `instruction` + chosen/rejected [user, assistant] lists."""
    prompt = None
    if record.get("conversations"):
        prompt = sharegpt({"conversations": record["conversations"]})
    elif not isinstance(record["chosen"], list) or len(record["chosen"]) < 2:
        prompt = record["instruction"]
    return pair_from(prompt, record["chosen"], record["rejected"])


@register("pairs", "preference")
def pairs(record: dict[str, Any]) -> Pair:
    """{prompt, chosen, rejected}: strings or message lists."""
    return pair_from(record.get("prompt"), record["chosen"], record["rejected"])


# -- choosing and applying adapters ----------------------------------------------------------

def guess_format(record: dict[str, Any], kind: str) -> str | None:
    """The adapter a record's keys suggest, or None."""
    keys = set(record)
    if kind == "preference":
        return "pairs" if {"chosen", "rejected"} <= keys else None
    for key, name in (("messages", "messages"), ("conversations", "sharegpt"),
                      ("conversation", "lmsys")):
        if key in keys:
            return name
    return "instruction" if {"instruction", "output"} <= keys else None


def resolve_adapter(source: ChatSourceConfig, kind: str, first_record: dict | None) -> Adapter:
    """The adapter of `source`: its format, else by hub id, else guessed from `first_record`."""
    name = source.format
    if name == "auto":
        name = HUB_FORMATS.get(source.path) or (
            guess_format(first_record, kind) if first_record is not None else None)
        if name is None:
            raise ConfigError(
                f"data source {source.name!r}: cannot tell its format from the hub id or the "
                f"record keys {sorted(first_record or {})}; set format to one of "
                f"{adapter_names(kind)}"
            )
    adapter = ADAPTERS.get(name)
    if adapter is None or adapter.kind != kind:
        raise ConfigError(f"data source {source.name!r}: format={name!r} is not a {kind} "
                          f"format; choose one of {adapter_names(kind)} or auto")
    return adapter


def adapter_names(kind: str) -> list[str]:
    return sorted(n for n, a in ADAPTERS.items() if a.kind == kind)


def adapt(adapter: Adapter, record: dict[str, Any], source: str, index: int) -> Any:
    """`adapter(record)`, validated; DataError naming `source` and row `index` if unreadable."""
    try:
        out = adapter.fn(record)
        if adapter.kind == "sft":
            check_messages(out)
        else:
            check_messages(out.prompt)
            if not isinstance(out.chosen, str) or not isinstance(out.rejected, str):
                raise DataError("chosen and rejected responses must be strings")
        return out
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise DataError(
            f"data source {source!r}, row {index}: cannot read the record as format "
            f"{adapter.name!r} ({what}). Fix the data, choose another format, or set "
            f"on_bad_record: skip to skip and count such records"
        ) from e


# -- loading ---------------------------------------------------------------------------------

def local_files(path: str) -> tuple[str, list[str]] | None:
    """(datasets builder, files) if `path` is a local file, glob or directory; else None."""
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(path))
    elif Path(path).is_dir():
        files = sorted(str(p) for p in Path(path).iterdir() if p.suffix in LOCAL_BUILDERS)
    elif Path(path).is_file():
        files = [path]
    else:
        return None
    builders = {LOCAL_BUILDERS.get(Path(f).suffix) for f in files}
    if not files or len(builders) != 1 or None in builders:
        raise ConfigError(f"data path {path!r}: expected .json/.jsonl/.parquet files of one "
                          f"kind, found {[Path(f).name for f in files][:5]}")
    return builders.pop(), files


def load_source(source: ChatSourceConfig, cache_dir: str | None = None):
    """The source's records as a (non-streaming) `datasets.Dataset`."""
    import datasets

    local = local_files(source.path)
    try:
        if local is not None:
            if not source.split.startswith("train"):
                raise ConfigError(f"data source {source.name!r}: local files hold one split, "
                                  f"'train' (slices like train[:90%] work); got {source.split!r}")
            builder, files = local
            return datasets.load_dataset(builder, data_files=files, split=source.split,
                                         cache_dir=cache_dir)
        return datasets.load_dataset(source.path, name=source.config_name, split=source.split,
                                     cache_dir=cache_dir)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised as DataError naming the source
        bad = find_bad_record(*local) if local is not None else None
        if bad is not None:
            raise DataError(f"data source {source.name!r}: {bad.where()}: {bad.reason}. Fix or "
                            "remove that record (or the file), then rerun") from e
        raise explain_load_error(source.path, e) from e


def gated_error(path: str, exc: BaseException) -> DataError | None:
    """A DataError saying how to get access if `exc` (from `load_dataset(path)`) means the
    dataset is gated, else None. datasets raises DatasetNotFoundError from huggingface_hub's
    GatedRepoError (lmsys/lmsys-chat-1m, bigcode/starcoderdata)."""
    from huggingface_hub.errors import GatedRepoError

    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    gated = any(isinstance(e, GatedRepoError) or "gated" in str(e).lower() for e in chain)
    if gated or (path in GATED and any("401" in str(e) or "403" in str(e) for e in chain)):
        return DataError(
            f"dataset {path} is gated on the Hugging Face Hub. Accept its terms at "
            f"https://huggingface.co/datasets/{path} with your account, then give a token: "
            f"`export HF_TOKEN=hf_...` or `huggingface-cli login` (`hf auth login`). "
            f"[{type(exc).__name__}: {exc}]"
        )
    return None


def explain_load_error(path: str, exc: BaseException) -> DataError:
    """A DataError saying what to do about a failed `load_dataset(path)`."""
    gated = gated_error(path, exc)
    if gated is not None:
        return gated
    return DataError(f"cannot load data source {path!r}: {type(exc).__name__}: {exc}. Check the "
                     f"hub id / local path, the split, and network access (HF_HUB_OFFLINE)")
