"""Each adapter on a handcrafted record of its hub schema; bad records; gated-repo errors."""

from __future__ import annotations

import httpx
import pytest
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import GatedRepoError

from bitnet_train.data.adapters import (
    ADAPTERS,
    HUB_FORMATS,
    ChatSourceConfig,
    Pair,
    adapt,
    explain_load_error,
    load_source,
    resolve_adapter,
)
from bitnet_train.errors import ConfigError, DataError
from tests.data.chat_fixtures import write_jsonl

U, A, S = "user", "assistant", "system"


def msgs(*turns):
    return [{"role": r, "content": c} for r, c in turns]


SFT_CASES = {
    "wildchat": (  # allenai/WildChat-1M: extra per-turn keys are ignored
        {"conversation_hash": "ab12", "model": "gpt-4", "turn": 2, "language": "English",
         "conversation": [
             {"content": "Hi", "role": "user", "language": "English", "toxic": False,
              "redacted": False, "timestamp": None, "turn_identifier": 1},
             {"content": "Hello!", "role": "assistant", "language": "English", "toxic": False,
              "redacted": False, "timestamp": None, "turn_identifier": 1},
             {"content": "Bye", "role": "user", "language": "English", "toxic": False,
              "redacted": False, "timestamp": None, "turn_identifier": 2},
             {"content": "Goodbye.", "role": "assistant", "language": "English",
              "toxic": False, "redacted": False, "timestamp": None, "turn_identifier": 2}]},
        msgs((U, "Hi"), (A, "Hello!"), (U, "Bye"), (A, "Goodbye.")),
    ),
    "lmsys": (  # lmsys/lmsys-chat-1m
        {"conversation_id": "c1", "model": "vicuna-13b", "turn": 1, "language": "English",
         "conversation": [{"content": "What is 2+2?", "role": "user"},
                          {"content": "4", "role": "assistant"}],
         "openai_moderation": [], "redacted": False},
        msgs((U, "What is 2+2?"), (A, "4")),
    ),
    "sharegpt": (  # Open-Orca/SlimOrca
        {"conversations": [
            {"from": "system", "value": "You are an AI assistant.", "weight": None},
            {"from": "human", "value": "Translate 'chat'.", "weight": 0.0},
            {"from": "gpt", "value": "'chat' is 'cat'.", "weight": 1.0}]},
        msgs((S, "You are an AI assistant."), (U, "Translate 'chat'."), (A, "'chat' is 'cat'.")),
    ),
    "instruction": (  # WizardLMTeam/WizardLM_evol_instruct_70k
        {"instruction": "Name a prime.", "output": "7."},
        msgs((U, "Name a prime."), (A, "7.")),
    ),
    "messages": (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
         "id": 3},
        msgs((U, "a"), (A, "b")),
    ),
}
WIZARD_V2 = (  # WizardLMTeam/WizardLM_evol_instruct_V2_196k (the 143k JSON)
    {"idx": "alpaca_1", "conversations": [{"from": "human", "value": "Sort [3,1]."},
                                          {"from": "gpt", "value": "[1, 3]"}]},
    msgs((U, "Sort [3,1]."), (A, "[1, 3]")),
)

UF_PROMPT = "Which is larger, 3 or 5?"
PREF_CASES = {
    "ultrafeedback": (  # HuggingFaceH4/ultrafeedback_binarized
        {"prompt": UF_PROMPT, "prompt_id": "p0",
         "chosen": [{"content": UF_PROMPT, "role": "user"}, {"content": "5.", "role": "assistant"}],
         "rejected": [{"content": UF_PROMPT, "role": "user"},
                      {"content": "3.", "role": "assistant"}],
         "messages": [{"content": UF_PROMPT, "role": "user"},
                      {"content": "5.", "role": "assistant"}],
         "score_chosen": 9.0, "score_rejected": 2.0},
        Pair(msgs((U, UF_PROMPT)), "5.", "3."),
    ),
    "magpie_dpo": (  # Magpie-Align/Magpie-Llama-3.1-Pro-DPO-100K-v0.1
        {"uuid": "u1", "instruction": "Say hi.", "task_category": "Information seeking",
         "responses": ["Hi!", "hi", "Hello."], "rewards_armorm": [{"score": 0.2}],
         "chosen": [{"content": "Say hi.", "role": "user"},
                    {"content": "Hi!", "role": "assistant"}],
         "rejected": [{"content": "Say hi.", "role": "user"},
                      {"content": "hi", "role": "assistant"}]},
        Pair(msgs((U, "Say hi.")), "Hi!", "hi"),
    ),
    "pairs": (
        {"prompt": "Q?", "chosen": "Good.", "rejected": "Bad."},
        Pair(msgs((U, "Q?")), "Good.", "Bad."),
    ),
}


@pytest.mark.parametrize("name", sorted(SFT_CASES))
def test_sft_adapter_on_its_schema(name):
    record, expected = SFT_CASES[name]
    assert adapt(ADAPTERS[name], record, "src", 0) == expected


def test_wizardlm_v2_reads_as_sharegpt():
    assert HUB_FORMATS["WizardLMTeam/WizardLM_evol_instruct_V2_196k"] == "sharegpt"
    assert adapt(ADAPTERS["sharegpt"], WIZARD_V2[0], "wizard", 0) == WIZARD_V2[1]


def test_instruction_with_input_field():
    rec = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    assert adapt(ADAPTERS["instruction"], rec, "s", 0)[0]["content"] == "Add.\n\n2 and 3"


@pytest.mark.parametrize("name", sorted(PREF_CASES))
def test_preference_adapter_on_its_schema(name):
    record, expected = PREF_CASES[name]
    assert adapt(ADAPTERS[name], record, "src", 0) == expected


def test_pairs_with_message_lists_and_multi_turn_prompt():
    prompt = msgs((S, "Be kind."), (U, "Hi"), (A, "Hello"), (U, "Again?"))
    rec = {"prompt": prompt, "chosen": [*prompt, {"role": "assistant", "content": "Sure."}],
           "rejected": [{"role": "assistant", "content": "No."}]}
    assert adapt(ADAPTERS["pairs"], rec, "s", 0) == Pair(prompt, "Sure.", "No.")
    rec = {"instruction": "Hi", "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    assert adapt(ADAPTERS["magpie_dpo"], rec, "s", 0) == Pair(msgs((U, "Hi")), "a", "b")


@pytest.mark.parametrize("name, record, reason", [
    ("wildchat", {"conversation": [{"role": "user"}]}, "content"),
    ("lmsys", {"turn": 1}, "conversation"),
    ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, "bot"),
    ("messages", {"messages": [{"role": "tool", "content": "x"}]}, "role"),
    ("instruction", {"instruction": "x", "output": None}, "content"),
    ("ultrafeedback", {"chosen": [{"role": "user", "content": "q"}],
                       "rejected": [{"role": "user", "content": "q"}]}, "assistant"),
    ("pairs", {"prompt": "q", "chosen": [{"role": "user", "content": "other"},
                                         {"role": "assistant", "content": "a"}],
               "rejected": "b"}, "differ"),
    ("pairs", {"chosen": "a", "rejected": "b"}, "no prompt"),
])
def test_bad_record_names_source_and_row(name, record, reason):
    with pytest.raises(DataError, match=rf"'my-source', row 17:.*{reason}"):
        adapt(ADAPTERS[name], record, "my-source", 17)


def test_format_resolution():
    first = {"messages": []}
    lmsys = ChatSourceConfig(path="lmsys/lmsys-chat-1m")
    orca = ChatSourceConfig(path="Open-Orca/SlimOrca")
    assert resolve_adapter(lmsys, "sft", None).name == "lmsys"
    assert resolve_adapter(orca, "sft", None).name == "sharegpt"
    assert resolve_adapter(ChatSourceConfig(path="HuggingFaceH4/ultrafeedback_binarized"),
                           "preference", None).name == "ultrafeedback"
    assert resolve_adapter(ChatSourceConfig(path="x.jsonl"), "sft", first).name == "messages"
    assert resolve_adapter(ChatSourceConfig(path="x.jsonl", format="sharegpt"), "sft",
                           first).name == "sharegpt"  # explicit override wins
    assert resolve_adapter(ChatSourceConfig(path="p.jsonl"), "preference",
                           {"prompt": "", "chosen": "", "rejected": ""}).name == "pairs"
    with pytest.raises(ConfigError, match="set format"):
        resolve_adapter(ChatSourceConfig(path="x.jsonl"), "sft", {"text": "raw"})
    with pytest.raises(ConfigError, match="not a sft format"):
        resolve_adapter(ChatSourceConfig(path="x.jsonl", format="pairs"), "sft", first)
    with pytest.raises(ConfigError, match="weight"):
        ChatSourceConfig(path="x", weight=0)
    with pytest.raises(ConfigError, match="unknown format"):
        ChatSourceConfig(path="x", format="alpaca")


def _gated_error(status: int) -> DatasetNotFoundError:
    """What datasets.load_dataset raises for a gated repo: DatasetNotFoundError from hub's
    GatedRepoError (datasets/load.py)."""
    url = "https://huggingface.co/api/datasets/lmsys/lmsys-chat-1m/revision/main"
    response = httpx.Response(status, request=httpx.Request("GET", url))
    try:
        try:
            raise GatedRepoError("Access to dataset lmsys/lmsys-chat-1m is restricted.",
                                 response=response)
        except GatedRepoError as e:
            raise DatasetNotFoundError(
                "Dataset 'lmsys/lmsys-chat-1m' is a gated dataset on the Hub.") from e
    except DatasetNotFoundError as e:
        return e


@pytest.mark.parametrize("status", [401, 403])
def test_gated_dataset_error_says_how_to_get_access(status):
    err = explain_load_error("lmsys/lmsys-chat-1m", _gated_error(status))
    assert isinstance(err, DataError)
    text = str(err)
    for needed in ("lmsys/lmsys-chat-1m", "gated", "https://huggingface.co/datasets/lmsys/"
                   "lmsys-chat-1m", "HF_TOKEN", "huggingface-cli login"):
        assert needed in text
    # the bare hub exception (no datasets wrapper) is recognised too
    bare = _gated_error(status).__cause__
    assert "HF_TOKEN" in str(explain_load_error("lmsys/lmsys-chat-1m", bare))


def test_other_load_errors_name_the_source():
    err = explain_load_error("someone/missing", FileNotFoundError("no such dataset"))
    assert "someone/missing" in str(err) and "HF_TOKEN" not in str(err)


def test_load_source_local_jsonl_and_missing_path(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [SFT_CASES["messages"][0]] * 3)
    ds = load_source(ChatSourceConfig(path=path), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 3 and ds[0]["messages"][1]["content"] == "b"
    sliced = load_source(ChatSourceConfig(path=path, split="train[:2]"),
                         cache_dir=str(tmp_path / "cache"))
    assert len(sliced) == 2
    with pytest.raises(ConfigError, match="one split"):
        load_source(ChatSourceConfig(path=path, split="test"))
    with pytest.raises(DataError, match="no/such/dataset"):  # offline in tests: a hub id fails
        load_source(ChatSourceConfig(path="no/such/dataset"), cache_dir=str(tmp_path / "cache"))


def test_pretraining_and_chat_sources_name_shared_fields_alike():
    """Both source schemas spell the fields they share the same way (a hub config is
    `config_name` in both, as `load_dataset(path, name=...)`)."""
    from dataclasses import fields

    from bitnet_train.data.config import SourceConfig

    shared = {"name", "path", "split", "weight", "config_name"}
    assert shared <= {f.name for f in fields(SourceConfig)}
    assert shared <= {f.name for f in fields(ChatSourceConfig)}
    assert ChatSourceConfig(path="allenai/WildChat-1M", config_name="x").config_name == "x"
