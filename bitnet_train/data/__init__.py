"""Data: tokenizers, pretraining streams, chat templates and SFT/DPO datasets."""
