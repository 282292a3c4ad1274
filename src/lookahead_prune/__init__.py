"""lookahead-prune: lookahead pruning (LAP) for any PyTorch model."""

__version__ = "0.1.0"
