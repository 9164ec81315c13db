"""Evaluation: held-out loss in every stage, generation, the lm-evaluation-harness suites.

- `generation`: batched decoding with a KV cache (greedy, sampled, stop strings, EOS).
- `heldout`: held-out loss / preference metrics while training (the trainer's evaluator).
- `harness`: our model as an lm-evaluation-harness `LM`.
- `suites`: task suites from `configs/eval/` run through lm-eval's Python API, with the 2B4T
  report's numbers beside ours; `samples` writes HumanEval+ and MT-bench answers for their own
  scorers, and MATH-500's solutions scored by `math_answers` (the MATH answer normalization).

Nothing here trains, or reaches into the trainer: the trainer calls an evaluator it is given.
lm-eval is imported only by `harness` and `suites`.
"""

from bitnet_train.eval.generation import GenerationConfig, GenerationOutput, generate, generate_text

__all__ = ["GenerationConfig", "GenerationOutput", "generate", "generate_text"]
