"""`bitnet-train data-preview`: compose a recipe's config and preview its pretraining stream
(bitnet_train.data.preview does the work; composing configs is the train package's, so the
command lives beside the other entry points, not in `data`)."""

from __future__ import annotations

import argparse
import logging

from bitnet_train.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    """`bitnet-train data-preview +recipe=NAME [key=value ...] [--rows N] [--stage S]`."""
    parser = argparse.ArgumentParser(
        prog="bitnet-train data-preview",
        description="Stream the first packed rows of a pretraining stage and report on them.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +recipe=NAME")
    parser.add_argument("--rows", type=int, default=64, help="packed rows to stream")
    parser.add_argument("--stage", type=int, default=1, choices=(1, 2))
    parser.add_argument("--show", type=int, default=2, help="rows to print decoded")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from bitnet_train.data.preview import format_preview, preview_stage
    from bitnet_train.data.tokenizer import load_tokenizer
    from bitnet_train.train.config import compose, to_train_config

    cfg = to_train_config(compose(args.overrides))
    if cfg.objective.name != "pretrain":
        raise ConfigError(f"data-preview shows pretraining streams; this config's objective is "
                          f"{cfg.objective.name!r}")
    tokenizer = load_tokenizer(cfg.tokenizer)
    p = preview_stage(cfg.data, tokenizer, stage=args.stage, rows=args.rows, rank=args.rank,
                      world_size=args.world_size)
    print(format_preview(p, tokenizer, cfg.data.mixture(args.stage), args.show))
    return 0
