"""The `make demo` pipeline: tiny model, CPU, pretrain -> SFT -> DPO -> export, in minutes.

Each stage composes its recipe (recipes/demo_*.yaml) exactly as `python train.py +recipe=...`
does and runs it through `bitnet_train.train.run`; the data is Python's own documentation,
written to local json files and read by the same loaders as the hub sets.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from bitnet_train.train.config import compose, to_train_config
from bitnet_train.train.run import RunResult, run

PROMPT = "The json module"
QUESTION = "What does `os.path.join` do?"


def prepare_demo_data(data_dir: Path) -> dict[str, Path]:
    """Corpus shards, tokenizer (with the 2B4T chat template), chat data and preference pairs."""
    from bitnet_train.data.chat import CHAT_TEMPLATE
    from bitnet_train.data.corpus import python_docs_documents, write_python_docs_corpus
    from bitnet_train.data.demo_data import write_demo_chat, write_demo_pairs
    from bitnet_train.data.tokenizer import train_demo_tokenizer

    data_dir.mkdir(parents=True, exist_ok=True)
    shards = write_python_docs_corpus(data_dir / "pretrain", num_shards=4)
    tokenizer = train_demo_tokenizer((text for _, text in python_docs_documents()),
                                     data_dir / "tokenizer", vocab_size=4096)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(data_dir / "tokenizer"))
    return {"shards": shards[0].parent, "tokenizer": data_dir / "tokenizer",
            "chat": write_demo_chat(data_dir), "pairs": write_demo_pairs(data_dir)}


def train_recipe(recipe: str, output_dir: Path, overrides: list[str] | None = None) -> RunResult:
    """Compose `+recipe=NAME` with overrides and run it to DIR/final."""
    cfg = to_train_config(compose([f"+recipe={recipe}", f"output_dir={output_dir}",
                                   *(overrides or [])]))
    return run(cfg)


def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def chat_reply(model, tokenizer, question: str, max_new_tokens: int = 40) -> str:
    """Greedy reply of our model to one user turn, rendered with the 2B4T template (batched
    KV-cache generation, bitnet_train.eval.generation)."""
    from bitnet_train.data.chat import encode_prompt
    from bitnet_train.eval.generation import GenerationConfig, generate

    ids = torch.tensor([encode_prompt(tokenizer, [{"role": "user", "content": question}])])
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    out = generate(model, ids, config=GenerationConfig(max_new_tokens, eos_token_ids=[eot]),
                   tokenizer=tokenizer)
    return out.texts[0].strip()


def run_demo(out: Path, steps_scale: float = 1.0) -> dict[str, float]:
    """Run every stage under `out` (recreated); returns the headline numbers."""
    from bitnet_train.export.gguf import export_gguf
    from bitnet_train.export.hf import export_hf
    from bitnet_train.io import load_model
    from bitnet_train.train.objectives.dpo import evaluate_preferences

    out = out.resolve()
    if out.exists():
        shutil.rmtree(out)
    os.environ["BITNET_DEMO_DIR"] = str(out)  # the demo recipes read their paths from it
    torch.manual_seed(0)
    numbers: dict[str, float] = {}

    print("== 1/5 data: Python's documentation -> jsonl shards, tokenizer, chat data, pairs")
    paths = prepare_demo_data(out / "data")
    n_chars = sum(p.stat().st_size for p in Path(paths["shards"]).glob("*.jsonl"))
    print(f"   corpus {n_chars / 1e6:.1f} MB in {paths['shards']}, tokenizer {paths['tokenizer']}")

    print("== 2/5 pretrain (recipe demo_pretrain)")
    pre = train_recipe("demo_pretrain", out / "pretrain",
                       [f"trainer.max_steps={_scaled(300, steps_scale)}",
                        f"schedule.warmup_steps={_scaled(20, steps_scale)}"])
    losses = [h.metrics["loss"] for h in pre.history]
    numbers.update(pretrain_first_loss=losses[0], pretrain_last_loss=losses[-1])
    print(f"   loss {losses[0]:.3f} (step 1) -> {losses[-1]:.3f} (step {len(losses)})")
    model, tokenizer = load_model(pre.final_dir)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    sample = model.generate(ids, 30)
    print(f"   sample: {tokenizer.decode(sample[0], skip_special_tokens=True)!r}")

    print("== 3/5 SFT (recipe demo_sft), loss summed over assistant tokens")
    # epoch-based stages: a steps_scale below 1 (tests) caps them at a number of steps
    cap = [] if steps_scale >= 1 else [f"trainer.max_steps={_scaled(100, steps_scale)}",
                                       "schedule.warmup_steps=1"]
    sft = train_recipe("demo_sft", out / "sft", cap)
    sft_losses = [h.metrics["loss"] for h in sft.history]
    numbers.update(sft_first_loss=sft_losses[0], sft_last_loss=sft_losses[-1])
    print(f"   assistant-token loss {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f} "
          f"over {len(sft_losses)} steps")
    sft_model, tokenizer = load_model(sft.final_dir)
    print(f"   User: {QUESTION}\n   Assistant: {chat_reply(sft_model, tokenizer, QUESTION)}")

    print("== 4/5 DPO (recipe demo_dpo), beta 0.1, frozen reference")
    held_out = to_train_config(compose([
        "+recipe=demo_dpo", f"data.sources.0.path={out / 'data' / 'pairs_heldout.jsonl'}"])).data
    before = evaluate_preferences(sft_model, sft_model, held_out, tokenizer, beta=0.1)
    dpo = train_recipe("demo_dpo", out / "dpo", cap)
    dpo_model, tokenizer = load_model(dpo.final_dir)
    after = evaluate_preferences(dpo_model, sft_model, held_out, tokenizer, beta=0.1)
    numbers.update(margin_before=before["margin"], margin_after=after["margin"],
                   accuracy_before=before["accuracy"], accuracy_after=after["accuracy"],
                   pref_accuracy_before=before["policy_accuracy"],
                   pref_accuracy_after=after["policy_accuracy"])
    print(f"   held-out reward margin {before['margin']:.3f} -> {after['margin']:.3f}; "
          f"reward accuracy {before['accuracy']:.0%} -> {after['accuracy']:.0%} "
          f"(before DPO the policy is the reference: margins 0)")
    print(f"   held-out pairs where log p(chosen) > log p(rejected): "
          f"{before['policy_accuracy']:.0%} -> {after['policy_accuracy']:.0%}")

    print("== 5/5 export")
    hf_dir = export_hf(dpo_model, tokenizer, out / "export" / "hf")
    gguf_path = export_gguf(dpo_model, tokenizer, out / "export" / "model-i2_s.gguf",
                            quant="i2_s" if dpo_model.config.hidden_act == "relu2" else "tq2_0")
    for f in sorted(Path(hf_dir).iterdir()) + [Path(gguf_path)]:
        if f.is_file():
            print(f"   {f.relative_to(out)}: {f.stat().st_size / 1024:.0f} KiB")
    ours = chat_reply(dpo_model, tokenizer, QUESTION)
    reply = transformers_reply(Path(hf_dir), QUESTION)
    print(f"   User: {QUESTION}\n   Assistant (our DPO model):          {ours}\n"
          f"   Assistant (transformers, {Path(hf_dir).relative_to(out)}, bf16): {reply}")
    return numbers


def transformers_reply(hf_dir: Path, question: str, max_new_tokens: int = 40) -> str:
    """Load an exported directory with transformers (packed ternary weights) and reply."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    # the packed checkpoint loads in its stored dtype (bf16), as users of the released model do
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    prompt = tok.bos_token + tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"))
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
