"""camelid: one toolkit for LLaMA-family chat models."""

__version__ = "0.1.0"
