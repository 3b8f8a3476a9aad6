"""ftune: config-driven fine-tuning of language models, every method behind one CLI."""

__version__ = "0.1.0"
