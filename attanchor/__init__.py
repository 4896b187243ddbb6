"""attanchor: fine-tune LLaVA-style VLMs with attention anchoring (see README.md)."""

__version__ = "0.1.0"
