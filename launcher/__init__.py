"""Supervised fine-tuning of chat LLMs: Hydra config, packed SFT workers on DeepSpeed, merge to HF weights."""

__version__ = "0.1.0"
