"""Kept for old imports: the Ray backend is :mod:`lookahead_prune.backends.ray`."""

from .backends.ray import CRASH_ENV, RayBackend, RayOptions, require_ray

__all__ = ["CRASH_ENV", "RayBackend", "RayOptions", "require_ray"]
