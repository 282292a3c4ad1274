"""Activation functions by name, so a model's nonlinearity is a plain string option."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


def check_activation(name: str) -> str:
    """Return ``name`` if it is a known activation, else raise ``ValueError`` listing them."""
    if name not in ACTIVATIONS:
        known = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"unknown activation {name!r}; known activations: {known}")
    return name


def make_activation(name: str) -> nn.Module:
    """Build a fresh (not in-place) activation module, one per use so each has its own name."""
    return ACTIVATIONS[check_activation(name)]()
