"""bitnet-train: train native 1.58-bit language models, from pretraining to packed export."""

from bitnet_train.model import BitNetConfig, BitNetForCausalLM, build_model, model_size

__version__ = "0.1.0"


def load_model(path, **kwargs):
    """Load (model, tokenizer or None) from a transformers-layout directory. See bitnet_train.io."""
    from bitnet_train.io import load_model as _load

    return _load(path, **kwargs)


def save_model(model, path, tokenizer=None, **kwargs):
    """Write a model (and tokenizer) in transformers' layout. See bitnet_train.io."""
    from bitnet_train.io import save_model as _save

    return _save(model, path, tokenizer=tokenizer, **kwargs)


__all__ = [
    "BitNetConfig",
    "BitNetForCausalLM",
    "build_model",
    "load_model",
    "model_size",
    "save_model",
]
