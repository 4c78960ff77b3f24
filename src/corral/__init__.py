"""Corral: one OpenAI-compatible endpoint in front of a cluster of model servers."""

__version__ = "0.1.0"
