"""rlopt: study optimizers (SGD vs AdamW) in reinforcement learning of LLMs."""

__version__ = "0.1.0"
