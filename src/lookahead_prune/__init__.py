"""lookahead-prune: lookahead pruning (LAP) for any PyTorch model.

>>> import lookahead_prune as lp
>>> scores = lp.compute_scores(model, method="lap")
>>> report = lp.prune(model, method="lap", keep=0.05)
>>> fast = lp.to_sparse(model)            # sparse layers where they pay, masks gone
>>> lp.save_sparse(model, "model.lap")   # only the surviving weights
"""

from .batchnorm import recalibrate_batchnorm
from .engines import ENGINES, train_many
from .graph import GraphError, LayerGraph, build_graph, neighbour_names, register_passthrough
from .prune import PruneReport, compute_masks, compute_scores, parse_method, prune
from .scores import SCORES
from .sparse import (
    FORMATS,
    SparseExportError,
    SparseFormat,
    SparseLinear,
    SparseReport,
    to_sparse,
)
from .sparse_files import load_sparse, save_sparse
from .train import TrainConfig, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "ENGINES",
    "FORMATS",
    "SCORES",
    "GraphError",
    "LayerGraph",
    "PruneReport",
    "SparseExportError",
    "SparseFormat",
    "SparseLinear",
    "SparseReport",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "build_graph",
    "compute_masks",
    "compute_scores",
    "load_sparse",
    "neighbour_names",
    "parse_method",
    "prune",
    "recalibrate_batchnorm",
    "register_passthrough",
    "save_sparse",
    "to_sparse",
    "train",
    "train_many",
]
