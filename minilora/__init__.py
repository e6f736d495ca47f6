"""minilora: fine-tuning by hand, a tiny GPT in pure NumPy (or CuPy)."""

__version__ = "0.1.0"
