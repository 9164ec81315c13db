"""`bitnet-export` / `scripts/export.py` and `bitnet-import` / `scripts/import.py`.

Export a model directory (`save_model` output such as a run's DIR/final, or any transformers
BitNet directory) to a deployment format:

    python scripts/export.py outputs/run/final --format hf --out exported/hf
    python scripts/export.py outputs/run/final --format hf-bf16 --out exported/hf-bf16
    python scripts/export.py outputs/run/final --format gguf --quant i2_s --out model.gguf
    python scripts/export.py outputs/run/final --format gpu --out exported/gpu

Print the bytes each format takes, from a config alone (no weights read):

    python scripts/export.py 2b4t --dry-run                 # every format
    python scripts/export.py mine --config-dir my_configs --dry-run   # my_configs/model/mine.yaml
    python scripts/export.py outputs/run/final --format gguf --quant tq1_0 --dry-run

Import released or exported weights as master weights to fine-tune (`model.init=DIR`):

    python scripts/import.py path/to/bitnet-b1.58-2B-4T --out checkpoints/2b4t-master
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf

from bitnet_train.errors import BitNetTrainError, ConfigError
from bitnet_train.export.gguf import export_gguf
from bitnet_train.export.gpu import export_gpu
from bitnet_train.export.hf import export_hf
from bitnet_train.export.size import (
    GGUF_QUANTS,
    all_size_reports,
    default_gguf_quant,
    format_reports,
    human_bytes,
    size_report,
)
from bitnet_train.io import load_model, read_config_dict, save_model
from bitnet_train.model.config import BitNetConfig
from bitnet_train.train.config import compose, config_dir

log = logging.getLogger("bitnet_train.export")

FORMATS = ("hf", "hf-bf16", "gguf", "gpu")
EMBEDDING_TYPES = ("f16", "f32", "q8_0")


def build_export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bitnet-export",
        description="Export a BitNet model to transformers (packed or bf16), GGUF (llama.cpp / "
                    "bitnet.cpp) or Microsoft's BitNet GPU kernel layout.",
    )
    p.add_argument("checkpoint",
                   help="model directory (config.json + model.safetensors, e.g. a run's "
                        "DIR/final); with --dry-run also a model config name (2b4t, tiny, ...) "
                        "or YAML file")
    p.add_argument("--format", choices=FORMATS,
                   help="hf: packed 2-bit, like microsoft/bitnet-b1.58-2B-4T; hf-bf16: master "
                        "weights, like -2B-4T-bf16; gguf: llama.cpp / bitnet.cpp; gpu: "
                        "microsoft/BitNet gpu/ kernel checkpoint")
    p.add_argument("--quant", choices=GGUF_QUANTS,
                   help="GGUF ternary type (default: i2_s for relu2 models, tq2_0 for silu)")
    p.add_argument("--embedding-type", choices=EMBEDDING_TYPES, default="f16",
                   help="GGUF embedding type (default f16)")
    p.add_argument("--out", type=Path, help="output directory (hf, hf-bf16, gpu) or file (gguf)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the bytes of ternary weights, scales, embeddings and the total "
                        "per format, computed from the config; write nothing")
    p.add_argument("--config-dir", action="append", default=[], type=Path,
                   help="with --dry-run: a config directory of your own, whose model/NAME.yaml "
                        "can then be named like a shipped one (repeatable)")
    return p


def _print_written(path: Path) -> None:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        print(f"  {f}  {human_bytes(f.stat().st_size)}")
    print(f"total {human_bytes(sum(f.stat().st_size for f in files))}")


def run_export(args: argparse.Namespace) -> Path:
    """Load `args.checkpoint` and write it in `args.format` to `args.out`."""
    model, tokenizer = load_model(args.checkpoint, dtype=torch.float32, device="cpu")
    if tokenizer is None:
        log.warning("no tokenizer files in %s: the export carries no tokenizer", args.checkpoint)
    if args.format in ("hf", "hf-bf16"):
        return export_hf(model, tokenizer, args.out, packed=args.format == "hf")
    if args.format == "gguf":
        quant = args.quant or default_gguf_quant(model.config)
        return export_gguf(model, tokenizer, args.out, quant, args.embedding_type)
    return export_gpu(model, args.out)


def run_dry_run(args: argparse.Namespace) -> None:
    config = resolve_config(args.checkpoint, config_dirs=args.config_dir)
    if args.format is None:
        rows = all_size_reports(config, args.embedding_type)
    else:
        rows = [size_report(config, args.format, args.quant, args.embedding_type)]
    print(format_reports(config, rows))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `bitnet-export`; returns the process exit status."""
    parser = build_export_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.quant and args.format not in (None, "gguf"):
        parser.error(f"--quant applies to --format gguf, not {args.format}")
    if not args.dry_run and (args.format is None or args.out is None):
        parser.error("--format and --out are required (or use --dry-run)")
    try:
        if args.dry_run:
            run_dry_run(args)
            return 0
        out = run_export(args)
    except BitNetTrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.format} to {out}")
    _print_written(out)
    return 0


# -- configs for --dry-run -------------------------------------------------------------------


def config_from_model_group(name: str, config_dirs: Sequence[str | Path] = ()) -> BitNetConfig:
    """BitNetConfig of the `model` group option `name` (`2b4t`, `tiny`, ...), composed by Hydra
    exactly as a run composes `model=NAME` (defaults lists, schema checks); `config_dirs` are a
    user's own config directories, searched after the shipped ones."""
    try:
        section = OmegaConf.to_object(compose([f"model={name}"], config_dirs=config_dirs).model)
    except HydraException as err:
        raise ConfigError(f"model config {name!r}: {err}") from err
    return section.architecture()


def config_from_yaml(file: str | Path) -> BitNetConfig:
    """BitNetConfig of a model YAML file: it is composed as an option of the `model` group of
    the config directory that holds it (`DIR/model/NAME.yaml`), so its defaults list may start
    from a shipped model (`defaults: [2b4t, _self_]`)."""
    file = Path(file).resolve()
    if not file.is_file():
        raise ConfigError(f"model config {file} does not exist")
    if file.parent.name != "model":
        raise ConfigError(
            f"{file}: a model YAML is read as an option of the `model` group, so it must sit in "
            "a directory named model/ (e.g. my_configs/model/mine.yaml), as it would for "
            "`bitnet-train --config-dir my_configs model=mine`"
        )
    return config_from_model_group(file.stem, config_dirs=[file.parent.parent])


def model_group_names(config_dirs: Sequence[str | Path] = ()) -> list[str]:
    """Names of the `model` group options: the shipped ones and those of `config_dirs`."""
    dirs = [config_dir(), *(Path(d) for d in config_dirs)]
    return sorted({p.stem for d in dirs for p in (d / "model").glob("*.yaml")})


def resolve_config(spec: str | Path, config_dirs: Sequence[str | Path] = ()) -> BitNetConfig:
    """The config that `spec` names: a directory with config.json, a model YAML file, or a
    `model` group option (`2b4t`, `tiny`, ..., or one in `config_dirs`)."""
    path = Path(spec)
    if path.is_dir():
        return BitNetConfig.from_hf_dict(read_config_dict(path), name=path.name)
    if path.suffix in (".yaml", ".yml"):
        return config_from_yaml(path)
    known = model_group_names(config_dirs)
    if str(spec) not in known:
        raise ConfigError(
            f"{spec!r} is neither a model directory (config.json), a model YAML file nor a model "
            f"config; known names: {', '.join(known)}"
        )
    return config_from_model_group(str(spec), config_dirs)


# -- import ----------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bitnet-import",
        description="Convert a transformers BitNet directory (packed microsoft/bitnet-b1.58-2B-4T "
                    "or bf16 master -2B-4T-bf16) or one of our GGUF files into master weights "
                    "(save_model layout) to fine-tune with model.init=OUT. Prefer the bf16 "
                    "master when you have it: a packed import reproduces the forward exactly, "
                    "but its latent weights sit on the quantization levels, not where training "
                    "left them.",
    )
    p.add_argument("source", help="transformers BitNet directory or .gguf file")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="dtype of the written master weights (default float32)")
    return p


def import_main(argv: list[str] | None = None) -> int:
    """Entry point of `scripts/import.py`; returns the process exit status."""
    args = build_import_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        model, tokenizer = load_model(args.source)
        out = save_model(model, args.out, tokenizer=tokenizer, dtype=DTYPES[args.dtype])
    except BitNetTrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote master weights of {args.source} to {out}")
    _print_written(out)
    return 0

