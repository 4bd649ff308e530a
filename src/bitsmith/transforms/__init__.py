"""Orthogonal transforms used as rotations before quantization (Hadamard and random orthogonal)."""
