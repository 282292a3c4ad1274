"""The method grammar: ``lap-forward-seq`` and friends resolved into a :class:`MethodSpec`.

A method name is a registered score (:data:`~lookahead_prune.scores.SCORES`), optionally an
order (``forward``, ``backward``; ``base`` is the default) and optionally ``-seq`` (the
paper's budget split into :data:`SEQ_STEPS` rounds). A name is resolved once, at the edge
(``prune``, the CLI, a sweep), and travels as the spec; adding a score to the registry makes
all of its spellings valid here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .scores import SCORES, Score, score_function, score_spec

__all__ = ["ORDERS", "SEQ_STEPS", "MethodSpec", "canonical_method", "parse_method", "resolve"]

ORDERS = ("base", "forward", "backward")
SEQ_STEPS = 5  # the paper's -seq variants split the budget into five rounds


@dataclass(frozen=True)
class MethodSpec:
    """A method name resolved into score, order and number of steps."""

    score: str
    order: str
    steps: int

    @property
    def name(self) -> str:
        """The one canonical spelling (``lap``, ``lap-forward-seq``; steps other than 1 and 5
        have no name and show as ``-steps3``), so aliases share one run key."""
        name = self.score + ("" if self.order == "base" else f"-{self.order}")
        if self.steps == SEQ_STEPS:
            return name + "-seq"
        return name if self.steps == 1 else f"{name}-steps{self.steps}"

    @property
    def entry(self) -> Score:
        """The registered :class:`~lookahead_prune.scores.Score`: function and needs."""
        return score_spec(self.score)


def canonical_method(method: str | MethodSpec) -> str:
    """``LAP``, ``lap-base`` and ``Lap-Base`` all become ``lap``; unknown names raise."""
    return resolve(method).name


def parse_method(method: str, order: str | None = None, steps: int | None = None) -> MethodSpec:
    """Resolve shorthands like ``lap-forward-seq`` into (score ``lap``, order, 5 steps)."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, not {type(method).__name__}")
    parts = method.lower().split("-")
    cut = next((i for i in range(len(parts), 0, -1) if "-".join(parts[:i]) in SCORES), 1)
    base, rest = "-".join(parts[:cut]), parts[cut:]  # the longest registered name: lap-act
    implied_steps = None
    if rest and rest[-1] == "seq":
        implied_steps, rest = SEQ_STEPS, rest[:-1]
    implied_order = rest[0] if len(rest) == 1 and rest[0] in ORDERS else None
    if len(rest) > 1 or (rest and implied_order is None):
        score_function(method)  # raises the list of known methods
    score_function(base)
    for given, implied, what in ((order, implied_order, "order"), (steps, implied_steps, "steps")):
        if given is not None and implied is not None and given != implied:
            raise ValueError(f"method {method!r} implies {what}={implied!r}, but got {given!r}")
    order = order or implied_order or "base"
    steps = steps if steps is not None else (implied_steps or 1)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, not {steps!r}")
    return MethodSpec(base, order, steps)


def resolve(
    method: str | MethodSpec, order: str | None = None, steps: int | None = None
) -> MethodSpec:
    """A method name (see :func:`parse_method`) or an already resolved spec, as a
    :class:`MethodSpec`; with a spec, ``order`` and ``steps`` may only repeat its own."""
    if not isinstance(method, MethodSpec):
        return parse_method(method, order, steps)
    for given, own, what in ((order, method.order, "order"), (steps, method.steps, "steps")):
        if given is not None and given != own:
            raise ValueError(f"method {method.name!r} has {what}={own!r}, but got {given!r}")
    return method
