"""selfrefine: a minimal PyTorch reimplementation of Self-Refine Instruction-Tuning (Ranaldi & Freitas, EMNLP 2024)."""

__version__ = "0.1.0"
