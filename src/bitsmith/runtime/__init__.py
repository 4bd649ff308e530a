"""Quantized modules that keep the Hugging Face ``forward`` and ``generate`` working."""
