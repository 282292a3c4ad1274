"""The method grammar, the spec that travels, and the one options object of prune()."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import warnings

import pytest
import torch
from torch import nn

import lookahead_prune as lp
from lookahead_prune.methods import MethodSpec, canonical_method, parse_method, resolve
from lookahead_prune.prune import Masks, PruneOptions
from lookahead_prune.scores import SCORES

from .test_graph import CumSum


@pytest.mark.parametrize("public", [lp.prune, lp.compute_masks])
def test_public_keywords_are_the_options_plus_order_and_steps(public):
    """prune and compute_masks take the PruneOptions fields (same defaults) as keywords, so
    a new option is one field plus its use, and the two cannot drift apart."""
    params = inspect.signature(public).parameters
    keywords = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    fields = {f.name: f.default for f in dataclasses.fields(PruneOptions)}
    assert keywords == {"order": None, "steps": None} | fields


def test_every_registered_score_parses_with_each_order_and_seq():
    for score in SCORES:
        for order in ("base", "forward", "backward"):
            for seq, steps in (("", 1), ("-seq", 5)):
                spec = parse_method(f"{score.upper()}-{order}{seq}")
                assert spec == MethodSpec(score, order, steps)
                assert parse_method(spec.name) == spec
                assert canonical_method(spec) == spec.name
                assert spec.entry is SCORES[score]


def test_a_spec_travels_as_it_is():
    spec = parse_method("lap-forward-seq")
    assert resolve(spec) is spec and resolve(spec, "forward", 5) is spec
    with pytest.raises(ValueError, match="order"):
        resolve(spec, order="backward")
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    by_name = lp.compute_masks(model, "lap-forward-seq", 0.3)
    by_spec = lp.compute_masks(model, spec, 0.3)
    assert by_spec.spec == by_name.spec == spec
    assert all(torch.equal(by_name.masks[n], by_spec.masks[n]) for n in by_name.masks)
    assert lp.prune(model, spec, 0.3).method == "lap"


def test_compute_masks_returns_what_it_approximated():
    model = CumSum()
    x = (torch.zeros(4, 4),)
    with pytest.warns(UserWarning, match="strict=False"):
        result = lp.compute_masks(model, "lap", 0.5, example_inputs=x, strict=False)
    assert isinstance(result, Masks) and isinstance(result, tuple) and len(result) == 2
    masks, spec = result
    assert set(masks) == {"a", "b"} and spec.score == "lap"
    assert {n for n, _ in result.approximated} == {"a", "b"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lp.prune(CumSum(), "lap", 0.5, example_inputs=x, strict=False)
    assert report.approximated == result.approximated
    again = pickle.loads(pickle.dumps(result))
    assert again.approximated == result.approximated and again.spec == spec
    # a score that never reads a neighbour traces nothing and approximates nothing
    assert lp.compute_masks(CumSum(), "mp", 0.5, strict=False).approximated == ()


def test_options_refuse_an_unknown_scope():
    with pytest.raises(ValueError, match="scope"):
        PruneOptions(scope="everything")
