"""Run keys: the canonical JSON of a configuration and its hash, and the code version.

A run's key is the first 16 hex digits of sha256 over its configuration as canonical JSON
(sorted keys, no whitespace, floats rounded to 12 significant digits), so key order, tuple
vs list and float noise never split one configuration into two keys.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import numbers
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["canonical_json", "code_version", "config_hash", "hash_text"]

_FLOAT_DIGITS = 12


def canonical_value(value: Any, where: str = "config") -> Any:
    """Return *value* as plain JSON types with floats rounded, or raise a clear error."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        x = float(value)
        if not math.isfinite(x):
            raise ValueError(f"{where} holds a non-finite float ({x}); it cannot be hashed")
        x = float(f"{x:.{_FLOAT_DIGITS}g}")
        return 0.0 if x == 0 else x
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a non-string key {k!r}; use str keys")
            out[k] = canonical_value(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, list | tuple):
        return [canonical_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"{where} holds a {type(value).__name__} ({value!r}); "
        "only str, int, float, bool, None, lists and str-keyed mappings are allowed"
    )


def canonical_json(config: Mapping[str, Any]) -> str:
    """Serialize *config* canonically: sorted keys, no whitespace, rounded floats."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    return json.dumps(canonical_value(config), sort_keys=True, separators=(",", ":"))


def config_hash(config: Mapping[str, Any]) -> str:
    """Return the run key: first 16 hex digits of sha256 over the canonical JSON of *config*.

    Key order, whitespace, tuple-vs-list and float noise beyond 12 significant digits
    do not change the hash; int 1 and float 1.0 do.
    """
    return hash_text(canonical_json(config))


def hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Return ``git describe --always --dirty`` of this package's checkout, else ``__version__``.

    Recorded with every run so results can be traced to the code that made them.
    """
    from lookahead_prune import __version__

    pkg_dir = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(pkg_dir), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout.strip()

    try:
        # Only trust the repository if it actually tracks this package (an installed
        # copy inside some unrelated repository must not report that repository).
        git("ls-files", "--error-unmatch", "__init__.py")
        described = git("describe", "--always", "--dirty")
    except (OSError, subprocess.SubprocessError):
        return __version__
    return described or __version__
