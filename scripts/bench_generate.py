"""Decoding throughput at the 2B4T shape: our batched KV-cache generation against transformers'
`generate` on the same weights, batch 1 and 64 (one GPU).

    python scripts/bench_generate.py                                   # 2b4t, random weights
    python scripts/bench_generate.py --checkpoint microsoft/bitnet-b1.58-2B-4T-bf16
    python scripts/bench_generate.py --layers 8 --batches 1,16,64 --new-tokens 256

Variants, each greedy, prompt of `--prompt-len` random tokens, exactly `--new-tokens` new tokens
(no EOS), bf16 weights:
    ours            bitnet_train.eval.generate, reference BitLinear (ternary weights quantized
                    once per call), SDPA, static KV cache
    ours-triton     the same with the fused Triton decoder layers (int8 products)
    hf-online       transformers BitNetForCausalLM from our bf16 master dir (AutoBitLinear,
                    online quantization: the weights are re-quantized at every forward)
    hf-packed       transformers on the packed export (`--format hf`, what the released
                    microsoft/bitnet-b1.58-2B-4T is): uint8 weights unpacked at every forward
Timing: CUDA-synchronised wall clock of the whole generate call after one warm-up, the median of
`--repeats`; tokens/s = batch x new tokens / time (prefill included). Also records how many of
the first 32 greedy tokens of batch row 0 agree between ours and each transformers variant
(bf16: near-ties of random weights may flip late tokens). Writes JSON (--out).

Needs CUDA for real numbers (`--device cpu --model tiny` smoke-tests the script).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up: kernels, allocator, caches
    times, out = [], None
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def build(args):
    from bitnet_train.io import load_model, save_model
    from bitnet_train.model import BitNetConfig, build_model
    from bitnet_train.train.config import compose

    if args.checkpoint:
        from bitnet_train.eval.suites import resolve_checkpoint

        model, _ = load_model(resolve_checkpoint(args.checkpoint), dtype=torch.bfloat16)
    else:
        section = compose([f"model={args.model}"]).model
        fields = {k: section[k] for k in BitNetConfig.__dataclass_fields__ if k in section}
        if args.layers:
            fields["num_hidden_layers"] = args.layers
        model = build_model(BitNetConfig(**fields), seed=0).to(torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    save_model(model, tmp / "master")
    return model.eval(), tmp


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="2b4t", help="configs/model group (random weights)")
    parser.add_argument("--checkpoint", default=None, help="a model dir or hub id instead")
    parser.add_argument("--layers", type=int, default=0, help="cut the model to N layers")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="ours,ours-triton,hf-online,hf-packed")
    parser.add_argument("--out", default="bench_generate.json")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script only")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA device (--device cpu runs a smoke test)", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM

    from bitnet_train.eval.generation import GenerationConfig, generate
    from bitnet_train.export.hf import export_hf
    from bitnet_train.kernels.modules import apply_kernels

    dev = torch.device(args.device)
    model, tmp = build(args)
    model.to(dev)
    variants = args.variants.split(",")
    fused = None
    if "ours-triton" in variants:
        fused = copy.deepcopy(model)
        apply_kernels(fused)
    hf = {}
    if "hf-online" in variants:
        hf["hf-online"] = tmp / "master"
    if "hf-packed" in variants:
        hf["hf-packed"] = export_hf(model, None, tmp / "packed")
    results = []
    config = GenerationConfig(max_new_tokens=args.new_tokens)
    for batch in [int(b) for b in args.batches.split(",")]:
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(10, model.config.vocab_size, (batch, args.prompt_len),
                            generator=gen).to(dev)
        mask = torch.ones_like(ids)
        row: dict[str, object] = {"batch": batch, "prompt_len": args.prompt_len,
                                  "new_tokens": args.new_tokens}
        tokens = {}
        for name in variants:
            if name in ("ours", "ours-triton"):
                m = fused if name == "ours-triton" else model
                secs, out = timed(lambda m=m, ids=ids, mask=mask: generate(m, ids, mask, config),
                                  args.repeats)
                tokens[name] = out.sequences[0, args.prompt_len:args.prompt_len + 32].tolist()
            else:
                peer = AutoModelForCausalLM.from_pretrained(hf[name], dtype=torch.bfloat16).to(dev)
                peer.eval()

                def run_peer(peer=peer, ids=ids, mask=mask):
                    with torch.inference_mode():
                        return peer.generate(ids, attention_mask=mask, do_sample=False,
                                             max_new_tokens=args.new_tokens,
                                             min_new_tokens=args.new_tokens, pad_token_id=0)

                secs, out = timed(run_peer, args.repeats)
                tokens[name] = out[0, args.prompt_len:args.prompt_len + 32].tolist()
                del peer
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            row[f"{name}_tokens_per_s"] = batch * args.new_tokens / secs
            print(f"batch {batch:3d} {name:12s} {batch * args.new_tokens / secs:10.1f} tokens/s "
                  f"({secs:.2f} s)", flush=True)
        for name in tokens:
            if name.startswith("hf"):
                agree = sum(a == b for a, b in zip(tokens["ours"], tokens[name]))
                row[f"greedy_agreement_ours_vs_{name}"] = f"{agree}/{len(tokens['ours'])}"
        results.append(row)
    Path(args.out).write_text(json.dumps({"model": args.checkpoint or args.model,
                                          "layers": args.layers or model.config.num_hidden_layers,
                                          "device": torch.cuda.get_device_name()
                                          if dev.type == "cuda" else "cpu",
                                          "results": results}, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
