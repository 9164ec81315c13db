"""Our model as an lm-eval `LM` against lm-eval's own `hf` backend on the exported directory,
through the real harness on tiny tasks over local jsonl (tests/eval/tasks): the same prompts,
per-example log-likelihoods, perplexities, generations and scores."""

from __future__ import annotations

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from bitnet_train.eval.harness import BitNetLM
from bitnet_train.io import load_model
from tests.eval.conftest import TASKS

ATOL = 1e-4  # fp32 both sides, summed over a few tokens (measured: 1.5e-6)


@pytest.fixture(scope="module")
def backends(qa_model, tmp_path_factory):
    """(ours, lm-eval's hf backend) on the same exported directory (`--format hf-bf16`: latent
    weights in bf16, online ternary quantization), both loading it in fp32 on the CPU."""
    from lm_eval.models.huggingface import HFLM

    from bitnet_train.export.hf import export_hf

    trained, tokenizer = load_model(qa_model)
    exported = export_hf(trained, tokenizer, tmp_path_factory.mktemp("export") / "hf-bf16",
                         packed=False)
    model, tokenizer = load_model(exported)
    ours = BitNetLM(model, tokenizer, batch_size=4)
    with torch.compiler.set_stance("force_eager"):  # transformers compiles its quantizers
        theirs = HFLM(pretrained=str(exported), device="cpu", dtype="float32", batch_size=4)
    return ours, theirs


@pytest.fixture(scope="module")
def tasks():
    return TaskManager(include_path=str(TASKS), include_defaults=False)


def _evaluate(lm, tasks, names, **kw):
    with torch.compiler.set_stance("force_eager"):
        return simple_evaluate(model=lm, tasks=names, task_manager=tasks, log_samples=True,
                               bootstrap_iters=0, **kw)


def _loglikelihoods(samples):
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


@pytest.mark.parametrize("chat", [False, True])
def test_multiple_choice_matches_the_hf_backend(backends, tasks, chat):
    ours, theirs = backends
    a = _evaluate(ours, tasks, ["tiny_mc"], apply_chat_template=chat)
    b = _evaluate(theirs, tasks, ["tiny_mc"], apply_chat_template=chat)
    sa, sb = a["samples"]["tiny_mc"], b["samples"]["tiny_mc"]
    assert [s["arguments"] for s in sa] == [s["arguments"] for s in sb]  # same prompts
    la, lb = _loglikelihoods(sa), _loglikelihoods(sb)
    assert len(la) == 8 and all(len(x) == 3 for x in la)
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=ATOL, rtol=0)
    for metric in ("acc,none", "acc_norm,none"):
        assert a["results"]["tiny_mc"][metric] == b["results"]["tiny_mc"][metric]
    if not chat:  # the model learned these answers in plain Q/A form
        assert a["results"]["tiny_mc"]["acc,none"] >= 0.75


def test_rolling_loglikelihood_matches_the_hf_backend(backends, tasks):
    ours, theirs = backends
    a = _evaluate(ours, tasks, ["tiny_ppl"])
    b = _evaluate(theirs, tasks, ["tiny_ppl"])
    la = [float(s["filtered_resps"][0]) for s in a["samples"]["tiny_ppl"]]
    lb = [float(s["filtered_resps"][0]) for s in b["samples"]["tiny_ppl"]]
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=ATOL, rtol=0)
    assert a["results"]["tiny_ppl"]["word_perplexity,none"] == pytest.approx(
        b["results"]["tiny_ppl"]["word_perplexity,none"], rel=1e-4)


def test_generative_task_scores_exact_match_answers(backends, tasks):
    """The trained model answers the tiny questions; the harness cuts each generation at the
    task's stop strings and scores it by exact match, our generations equal hf's."""
    ours, theirs = backends
    a = _evaluate(ours, tasks, ["tiny_gen"])
    b = _evaluate(theirs, tasks, ["tiny_gen"])
    ga = [s["filtered_resps"][0] for s in a["samples"]["tiny_gen"]]
    gb = [s["filtered_resps"][0] for s in b["samples"]["tiny_gen"]]
    assert ga == gb
    targets = [s["target"] for s in a["samples"]["tiny_gen"]]
    right = sum(g.strip().lower() == t.strip().lower() for g, t in zip(ga, targets))
    assert right >= 6, list(zip(ga, targets))
    assert a["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(right / 8)
    assert b["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(right / 8)
