"""tuner: config-driven fine-tuning of LLMs. See README.md."""

__version__ = "0.1.0"
