"""The ``lap`` command: demo, train, prune, sweep, report."""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import DATASETS, DatasetError, load_dataset
from .engines import ENGINE_CHOICES
from .models import model_names
from .pipeline import RETRAIN_MODES, Protocol, new_model, train_dense
from .prune import prune
from .report import plot_accuracy, rows_to_csv, summarize, to_csv, to_markdown
from .scores import SCORES
from .store import RunStore, StoreError, config_hash
from .sweep import Sweep, levels_from, run_config, run_sweep
from .train import evaluate, pick_device

CSV_COLUMNS = [
    "model",
    "dataset",
    "method",
    "level",
    "keep",
    "seed",
    "test_acc_pruned",
    "test_acc_retrained",
    "train_acc_pruned",
    "train_acc_retrained",
    "retrain",
    "mode",
    "train_steps",
    "retrain_steps",
    "wall_time",
]
METHOD_HELP = f"comma-separated methods: {', '.join(sorted(SCORES))}, or e.g. lap-forward-seq"


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_protocol_args(p: argparse.ArgumentParser, *, train: int, retrain: int) -> None:
    g = p.add_argument_group("protocol")
    g.add_argument("--train-steps", type=int, default=train, help="steps of dense training")
    g.add_argument("--retrain-steps", type=int, default=retrain, help="steps of retraining")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: paper's)")
    g.add_argument("--batch-size", type=int, default=60)
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    g.add_argument("--schedule", default="constant", choices=["constant", "cosine", "step"])
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--activation", default="relu", choices=["relu", "sigmoid", "tanh"])
    g.add_argument("--retrain", default="finetune", choices=RETRAIN_MODES)
    g.add_argument("--rewind-step", type=int, default=0, help="step rewind-weights returns to")
    g.add_argument("--mode", default="oneshot", choices=["oneshot", "iterative"])
    g.add_argument("--p", type=float, default=None, help="conv keep factor per level")
    g.add_argument("--q", type=float, default=None, help="linear keep factor per level")
    g.add_argument("--no-bn", action="store_true", help="LAP without Eq. 9's batch-norm factors")
    g.add_argument("--graph", default="fx", choices=["fx", "sequential"])
    g.add_argument(
        "--scope", default="layer", choices=["layer", "global"],
        help="global: the level's overall fraction under one threshold (normalised scores)",
    )  # fmt: skip
    g.add_argument("--subset", type=int, default=None, help="use only n training examples")
    g.add_argument(
        "--exclude", default="",
        help="comma-separated layer names or globs left dense and, with --graph sequential, out "
        "of the chain (the official code's ResNet shortcuts: '*shortcut*')",
    )  # fmt: skip
    g.add_argument(
        "--eval-examples", type=int, default=None,
        help="measure accuracy on the first n test (and training) examples (default: all)",
    )  # fmt: skip
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: train under bfloat16 autocast (fast on recent GPUs)")  # fmt: skip
    g.add_argument("--channels-last", action="store_true",
                   help="NHWC memory layout for conv nets (cuDNN, oneDNN)")  # fmt: skip
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training step, once for all levels")  # fmt: skip
    g.add_argument("--data-dir", default=None, help="dataset folder (default: $LAP_DATA or cache)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    g.add_argument(
        "--engine", default="auto", choices=ENGINE_CHOICES,
        help="how pruned copies retrain together: sparse (MLPs on CPU: cost follows the "
        "surviving weights), vmap (GPU), sequential (one train() each, the reference); "
        "auto picks per model. Results are the same; never part of a run's key",
    )  # fmt: skip
    g.add_argument(
        "--batch-models", type=int, default=None,
        help="retrain at most this many pruned copies of a dense model together (default: "
        "all of them with the sparse engine, 16 with vmap on a GPU, else 1)",
    )  # fmt: skip


def _protocol(args: argparse.Namespace, model: str, dataset: str, seed: int) -> Protocol:
    return Protocol(
        model=model,
        dataset=dataset,
        seed=seed,
        activation=args.activation,
        train_steps=args.train_steps,
        retrain_steps=args.retrain_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        retrain=args.retrain,
        rewind_step=args.rewind_step,
        mode=args.mode,
        p=args.p,
        q=args.q,
        bn=not args.no_bn,
        graph=args.graph,
        subset=args.subset,
        scope=args.scope,
        exclude=tuple(_split(args.exclude)),
        eval_examples=args.eval_examples,
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
        engine=args.engine,
    )


PROTOCOL_FIELDS = [f.name for f in fields(Protocol) if f.name != "seed"]


def protocol_groups(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """Rows grouped by everything in their protocol but the seed: one table per group."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        key = tuple(repr(r.get(name)) for name in PROTOCOL_FIELDS)
        groups.setdefault(key, []).append(r)
    return groups


def _title(rows: list[dict[str, Any]], metric: str) -> str:
    r = rows[0]
    return (
        f"{r['model']} ({r.get('activation')}) on {r['dataset']}, {r.get('mode')} pruning, "
        f"{r.get('retrain')} retraining, {r.get('train_steps')}+{r.get('retrain_steps')} steps: "
        f"test error (%), {metric}"
    )


def _print_tables(rows: list[dict[str, Any]], metric: str) -> None:
    for group in protocol_groups(rows).values():
        summary = summarize(group, metric=metric)
        print(to_markdown(summary, title=_title(group, metric)))
        print()


def cmd_demo(args: argparse.Namespace) -> int:
    """Train the FCN on bundled MNIST, prune with MP and LAP at several levels, retrain, report."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.subset = None
    protocol = _protocol(args, "fcn", "mnist", 0)
    levels = levels_from(args.levels)
    methods = _split(args.methods)
    sweep = Sweep(protocol, ["fcn"], ["mnist"], methods, levels, list(range(args.seeds)))
    db = out / "demo.sqlite"
    start = time.perf_counter()
    stats = run_sweep(
        sweep, db, data_dir=args.data_dir, device=args.device, batch_models=args.batch_models
    )
    with RunStore(db) as store:
        rows = [r for r in store.runs(model="fcn", dataset="mnist") if r["key"] in _keys(sweep)]
    print()
    for metric in ("test_acc_pruned", "test_acc_retrained"):
        _print_tables(rows, metric)
    plot = out / "demo.png"
    plot_accuracy(rows, plot, title="FCN on MNIST: MP vs LAP")
    print(f"{stats.done} runs done, {stats.skipped} already in {db}; plot: {plot}")
    print(f"wall time {time.perf_counter() - start:.1f}s")
    return 0


def _keys(sweep: Sweep) -> set[str]:
    return {
        config_hash(run_config(p, m, lv, sweep.levels))
        for p in sweep.protocols()
        for m in sweep.methods
        for lv in sweep.levels
    }


def _as_list(value: Any) -> list[Any]:
    """A TOML value that may be a list, one scalar, or a comma-separated string."""
    if isinstance(value, str):
        return _split(value)
    return list(value) if isinstance(value, list | tuple) else [value]


def _changed_sweep_flags(args: argparse.Namespace) -> list[str]:
    """Sweep flags given on the command line with a non-default value."""
    defaults = vars(build_parser().parse_args(["sweep"]))
    ignore = {"config", "func", "command", "quiet"}
    return [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
            if k not in ignore and defaults.get(k) != v]  # fmt: skip


def _load_toml(path: str) -> dict[str, Any]:
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run a grid of (model, dataset, seed, method, level) into the results database."""
    if args.config:
        cfg = _load_toml(args.config)
        known = {f.name for f in fields(Protocol)} | {
            "models", "datasets", "methods", "levels", "seeds", "db", "data_dir", "device",
        }  # fmt: skip
        unknown = set(cfg) - known
        if unknown:
            raise SystemExit(
                f"{args.config}: unknown keys {sorted(unknown)}; known {sorted(known)}"
            )
        missing = [k for k in ("methods", "levels") if k not in cfg]
        if missing:
            raise SystemExit(f"{args.config}: missing keys {missing}")
        overridden = _changed_sweep_flags(args)
        if overridden:
            raise SystemExit(
                f"lap sweep: {args.config} describes the sweep; put {overridden} in the file "
                "instead of passing them as flags"
            )
        proto_fields = {k: v for k, v in cfg.items() if k in {f.name for f in fields(Protocol)}}
        template = Protocol(**({"model": "fcn", "dataset": "mnist"} | proto_fields))
        sweep = Sweep(
            template,
            _as_list(cfg.get("models", [template.model])),
            _as_list(cfg.get("datasets", [template.dataset])),
            _as_list(cfg["methods"]),
            levels_from(cfg["levels"]),
            [int(v) for v in _as_list(cfg.get("seeds", [0]))],
        )
        db = cfg.get("db", args.db)
        data_dir, device = cfg.get("data_dir", args.data_dir), cfg.get("device", args.device)
    else:
        if not (args.model and args.methods and args.levels):
            raise SystemExit("lap sweep: give --model, --methods and --levels (or a TOML file)")
        template = _protocol(args, "fcn", "mnist", 0)
        sweep = Sweep(
            template,
            _split(args.model),
            _split(args.dataset),
            _split(args.methods),
            levels_from(args.levels),
            [int(s) for s in _split(args.seeds)],
        )
        db, data_dir, device = args.db, args.data_dir, args.device
    stats = run_sweep(
        sweep,
        db,
        data_dir=data_dir,
        device=device,
        progress=not args.quiet,
        batch_models=args.batch_models,
    )
    print(
        f"{stats.done} runs done, {stats.skipped} already stored, "
        f"{stats.dense_trained} dense models trained, {stats.wall_time:.1f}s -> {db}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print stored runs as the paper's tables (markdown) or CSV; optionally plot them."""
    if not Path(args.db).exists():
        raise SystemExit(f"no results database at {args.db}")
    filters = {k: getattr(args, k) for k in ("model", "dataset") if getattr(args, k)}
    with RunStore(args.db) as store:
        rows = store.runs(**filters)
    if not rows:
        raise SystemExit(f"{args.db} holds no runs matching {filters or 'anything'}")
    if args.format == "csv":
        sys.stdout.write(rows_to_csv(rows, CSV_COLUMNS))
    elif args.format == "summary-csv":
        for group in protocol_groups(rows).values():
            sys.stdout.write(to_csv(summarize(group, metric=args.metric)))
    else:
        _print_tables(rows, args.metric)
    if args.plot:
        groups = list(protocol_groups(rows).values())
        plot = Path(args.plot)
        for i, group in enumerate(groups):
            path = plot if len(groups) == 1 else plot.with_name(f"{plot.stem}-{i}{plot.suffix}")
            plot_accuracy(group, path, title=_title(group, "test accuracy"))
            print(f"plot written to {path}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train one dense model and save it (state dict, weights_only-safe)."""
    data = load_dataset(
        args.dataset, args.data_dir, device=pick_device(args.device), subset=args.subset
    )
    protocol = _protocol(args, args.model, args.dataset, args.seed)
    dense = train_dense(protocol, data, progress=True)
    save_checkpoint(args.out, asdict(dense) | {"protocol": protocol.dense_config()})
    print(f"test accuracy {100 * dense.test_acc:.2f}%, saved to {args.out}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a saved model (from ``lap train``) and print the per-layer table and accuracy."""
    state = load_checkpoint(args.checkpoint)
    proto_cfg = state.get("protocol", {})
    protocol = Protocol(
        model=proto_cfg.get("model", args.model),
        dataset=proto_cfg.get("dataset", args.dataset),
        activation=proto_cfg.get("activation", "relu"),
    )
    data = load_dataset(protocol.dataset, args.data_dir, device=pick_device(args.device))
    model = new_model(protocol, data)
    model.load_state_dict(state["state"])
    model.to(data.train_x.device)
    report = prune(model, args.method, args.keep, scope=args.scope, graph=args.graph)
    print(report.table())
    metrics = evaluate(model, data.test_x, data.test_y)
    print(f"test accuracy after pruning (no retraining): {100 * metrics.accuracy:.2f}%")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lap``."""
    parser = argparse.ArgumentParser(
        prog="lap",
        description="Lookahead pruning (LAP) and the train -> prune -> retrain pipeline.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    demo.add_argument("--out", default="demo-out", help="folder for the database and plot")
    demo.add_argument("--methods", default="mp,lap", help=METHOD_HELP)
    demo.add_argument("--levels", default="2,4,6,8,10", help='levels, e.g. "2,4" or "4-10"')
    demo.add_argument("--seeds", type=int, default=1, help="number of seeds")
    _add_protocol_args(demo, train=3000, retrain=1000)
    demo.set_defaults(func=cmd_demo)

    sw = sub.add_parser("sweep", help=cmd_sweep.__doc__, description=cmd_sweep.__doc__)
    sw.add_argument("config", nargs="?", help="a TOML file describing the sweep")
    sw.add_argument("--model", help=f"comma-separated: {', '.join(model_names())}")
    sw.add_argument("--dataset", default="mnist", help=f"comma-separated: {', '.join(DATASETS)}")
    sw.add_argument("--methods", help=METHOD_HELP)
    sw.add_argument("--levels", help='levels, e.g. "2,4" or "4-10"')
    sw.add_argument("--seeds", default="0", help="comma-separated seeds")
    sw.add_argument("--db", default="results.sqlite", help="results database (SQLite)")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_protocol_args(sw, train=50_000, retrain=50_000)
    sw.set_defaults(func=cmd_sweep)

    rp = sub.add_parser("report", help=cmd_report.__doc__, description=cmd_report.__doc__)
    rp.add_argument("--db", default="results.sqlite")
    rp.add_argument("--format", default="markdown", choices=["markdown", "csv", "summary-csv"])
    metrics = ["test_acc_retrained", "test_acc_pruned", "train_acc_retrained"]
    rp.add_argument("--metric", default="test_acc_retrained", choices=metrics)
    rp.add_argument("--model")
    rp.add_argument("--dataset")
    rp.add_argument("--plot", help="write a plot (.png or .svg)")
    rp.set_defaults(func=cmd_report)

    tr = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    tr.add_argument("--model", default="fcn", choices=model_names())
    tr.add_argument("--dataset", default="mnist", choices=DATASETS)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", default="dense.pt")
    _add_protocol_args(tr, train=50_000, retrain=0)
    tr.set_defaults(func=cmd_train)

    pr = sub.add_parser("prune", help=cmd_prune.__doc__, description=cmd_prune.__doc__)
    pr.add_argument("checkpoint", help="a checkpoint written by lap train")
    pr.add_argument("--method", default="lap", help=METHOD_HELP)
    pr.add_argument("--keep", type=float, default=0.05, help="fraction of weights to keep")
    pr.add_argument("--scope", default="layer", choices=["layer", "global"])
    pr.add_argument("--graph", default="fx", choices=["fx", "sequential"])
    pr.add_argument("--model", default="fcn", choices=model_names())
    pr.add_argument("--dataset", default="mnist", choices=DATASETS)
    pr.add_argument("--data-dir", default=None)
    pr.add_argument("--device", default=None)
    pr.set_defaults(func=cmd_prune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lap``; errors the user can fix are printed without a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, DatasetError, FileNotFoundError, StoreError, CheckpointError) as exc:
        print(f"lap {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
