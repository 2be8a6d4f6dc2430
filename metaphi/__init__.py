"""metaphi: meta-learning on PyTorch, with parameters as data."""
__version__ = "0.1.0"
