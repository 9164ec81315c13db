"""Our model as an lm-evaluation-harness `LM`: it scores with our forward and generates with
`bitnet_train.eval.generation`, so the harness evaluates exactly the model we train.

`BitNetLM` follows lm-eval's own `hf` backend (`lm_eval.models.huggingface.HFLM`) wherever a
choice changes a number: the same tokenization (BOS added by the tokenizer unless the text
already starts with it; an empty context becomes the BOS prefix token), left truncation to the
model's length, requests sorted longest first and one-token continuations of a shared context
scored once (lm-eval's `Collator`), rolling windows for perplexity, the same stop sequences
(the task's `until` plus the decoded EOS) and post-processing of generations. The tests hold
its per-example log-likelihoods and accuracies equal to `hf`'s on the exported directory.

Differences that only save work: the log-softmax is taken, in fp32, over the continuation
positions only (the forward returns hidden states through `head_fn`), and generation is
batched with a KV cache. Generation stops at the tokenizer's EOS and at `<|eot_id|>` (what our
exported generation_config.json lists, and what `hf` therefore stops at too).
"""

from __future__ import annotations

import logging
from typing import Any

import jinja2
import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from bitnet_train.eval.generation import GenerationConfig, default_eos_ids, generate, left_pad
from bitnet_train.model import BitNetForCausalLM, frozen_ternary_weights

log = logging.getLogger(__name__)

Request = tuple[tuple[str, str] | None, list[int], list[int]]
"""((context, continuation) or None for rolling windows, context ids, continuation ids)."""


class BitNetLM(TemplateLM):
    """lm-eval `LM` over a BitNetForCausalLM and its tokenizer (one process).

    Args:
        model: our model, on the device to evaluate on, in the dtype to evaluate in.
        tokenizer: its transformers tokenizer (chat template included for chat evaluation).
        batch_size: sequences per forward (and per generation batch).
        max_length: context limit in tokens (default: the model's max_position_embeddings).
        max_gen_toks: default generation budget of generative tasks that set none.
        add_bos_token: force adding (True) or not adding (False) BOS; None: the tokenizer's
            default (LLaMA-3 tokenizers add it), as lm-eval's `hf` backend does.
    """

    backend = "causal"

    def __init__(self, model: BitNetForCausalLM, tokenizer, batch_size: int = 16,
                 max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, name: str = "bitnet") -> None:
        super().__init__()
        if tokenizer is None:
            raise ValueError("BitNetLM needs the model's tokenizer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = int(batch_size)
        self._max_length = int(max_length or model.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.name = name
        self.pad_token_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)

    # -- what the harness asks of a model --------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.model.embed_tokens.weight.dtype),
                "model_name": self.name}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        kw = _special_tokens_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(
                string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False  # the text carries its BOS (chat templates)
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _batch_encode(self, strings: list[str], left_truncate_len: int) -> list[list[int]]:
        """Contexts of one generation batch, with `hf`'s rule: BOS handling decided by the
        first string."""
        kw: dict[str, bool] = {}
        if has_bos_prefix(strings[0], getattr(self.tokenizer, "bos_token", None)):
            kw = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            kw = {"add_special_tokens": self.add_bos_token}
        return [self.tokenizer(s, **kw)["input_ids"][-left_truncate_len:] for s in strings]

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                      continue_final_message=not add_generation_prompt)
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kwargs)
        except jinja2.exceptions.TemplateError:
            log.warning("the chat template rejected the history; retrying without system turns")
            history = [m for m in chat_history if m["role"] != "system"]
            return self.tokenizer.apply_chat_template(history, **kwargs)

    # -- scoring ---------------------------------------------------------------------------
    def _continuation_logprobs(self, rows: list[list[int]], cont_lens: list[int]
                               ) -> list[torch.Tensor]:
        """Right-padded forward of `rows`; per row, log-softmax (fp32) at the positions that
        predict its last `cont_len` tokens -> (cont_len, vocab)."""
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        # causal attention: right padding never reaches the real positions, no mask needed
        hidden, weight = self.model(ids.to(self._device), head_fn=lambda h, w: (h, w))
        out = []
        for i, (r, n) in enumerate(zip(rows, cont_lens)):
            picked = hidden[i, len(r) - n:len(r)]  # (n, H)
            out.append(F.linear(picked, weight).float().log_softmax(-1))
        return out

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        res: list[tuple[float, bool]] = []
        re_ord = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                          group_by="contexts", group_fn=lambda r: r[-2] + r[-1][:-1])
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc="loglikelihood (bitnet)")
        with torch.inference_mode(), frozen_ternary_weights(self.model):
            for chunk in re_ord.get_batched(n=override_bs or self.batch_size):
                rows, conts = [], []
                for _, ctx, cont in chunk:
                    if not ctx or not cont or len(cont) > self.max_length:
                        raise ValueError("a loglikelihood request needs a non-empty context and "
                                         f"a continuation of 1..{self.max_length} tokens")
                    rows.append((ctx + cont)[-(self.max_length + 1):][:-1])
                    conts.append(cont)
                logprobs = self._continuation_logprobs(rows, [len(c) for c in conts])
                for (request_str, ctx, _), lp, cont in zip(chunk, logprobs, conts):
                    for req_str, cont_toks, lp_one in re_ord.get_cache(
                            req_str=request_str, cxt_toks=ctx, cont_toks=cont,
                            logits=lp[None]):
                        target = torch.tensor(cont_toks, dtype=torch.long,
                                              device=lp_one.device)[None]
                        scored = lp_one[:, -target.shape[1]:]  # (1, n, vocab)
                        greedy = bool((scored.argmax(-1) == target).all())
                        answer = (float(scored.gather(2, target[..., None]).sum()), greedy)
                        res.append(answer)
                        if req_str is not None:
                            self.cache_hook.add_partial("loglikelihood", req_str, answer)
                        pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[int, Request]] = []
        counts = []
        for i, (string,) in enumerate(req.args for req in requests):
            rolling = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows += [(i, (None, ctx, cont)) for ctx, cont in rolling]
            counts.append(len(rolling))
        scores = self._loglikelihood_tokens([w for _, w in windows], disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for (i, _), (logprob, _) in zip(windows, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # -- generation ------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        res: list[str] = []
        re_ords = Collator([req.args for req in requests],
                           sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                           group_by="gen_kwargs", group_fn=lambda r: r[1])
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc="generate_until (bitnet)")
        eos_text = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        eos_ids = default_eos_ids(self.tokenizer)
        for chunk in re_ords.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks={max_gen} leaves no room for a context in "
                                 f"{self.max_length} positions")
            ids, mask = left_pad(self._batch_encode(list(contexts), max_ctx), self.pad_token_id)
            config = GenerationConfig(
                max_new_tokens=max_gen, do_sample=bool(kwargs.get("do_sample", False)),
                temperature=float(kwargs.get("temperature", 0.0)) or 1.0,
                top_p=float(kwargs.get("top_p", 1.0) or 1.0), top_k=int(kwargs.get("top_k", 0)
                                                                      or 0),
                eos_token_ids=eos_ids, stop_strings=until, pad_token_id=self.pad_token_id)
            out = generate(self.model, ids.to(self._device), mask.to(self._device), config,
                           self.tokenizer)
            for context, tokens in zip(contexts, out.new_tokens):
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                text = postprocess_generated_text(text, stop=until, think_end_token=None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                pbar.update(1)
        pbar.close()
        return re_ords.get_original(res)


def _special_tokens_kwargs(add_special_tokens: bool | None, add_bos: bool | None) -> dict:
    if add_special_tokens is not None:
        return {"add_special_tokens": add_special_tokens}
    if add_bos is not None:
        return {"add_special_tokens": add_bos}
    return {}
