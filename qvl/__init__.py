"""qvl — the data side of Qwen-VL-style vision-language models."""

__version__ = "0.1.0"
