"""alpaca-ray: make an instruction-following model from a base LLM, the way Stanford Alpaca did, on Ray."""

__version__ = "0.1.0"
