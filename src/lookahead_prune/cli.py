"""The ``lap`` command: demo, train, prune, export, sweep, report, clean."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from . import __version__
from .backends import BACKENDS, run_sweep
from .batchnorm import recalibrate_batchnorm
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import DATASETS, DatasetError, load_dataset
from .graph import GRAPH_MODES
from .masks import parse_nm
from .model_files import load_masked_model
from .models import model_names
from .pipeline import for_retrain, new_model, train_dense
from .protocol import RETRAIN_HELP, Protocol
from .prune import parse_method, prune
from .report import (
    CSV_COLUMNS,
    check_plot_path,
    plot_accuracy,
    print_tables,
    protocol_groups,
    reportable,
    rows_to_csv,
    summary_csv,
    table_title,
)
from .scores import SCORES
from .sparse import SparseExportError, copy_pruned
from .store import RunStore, StoreError
from .sweep import (
    STEP_FIELDS,
    Sweep,
    SweepFileError,
    levels_from,
    protocol_lines,
    read_sweep_file,
    seeds_from,
    sweep_from_table,
    template,
)
from .train import evaluate, pick_device
from .workdir import clean_checkpoints

METHOD_HELP = f"comma-separated methods: {', '.join(sorted(SCORES))}, or e.g. lap-forward-seq"


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help that shows every option's default and keeps descriptions as written."""


def _doc(func: Any) -> str:
    """A command's docstring as plain help text (no reST markup)."""
    return (func.__doc__ or "").replace("``", "`")


PAPER_STEPS_HELP = "None: the paper's for each model, e.g. FCN 50k + 50k, Conv-6 30k + 20k"


def add_protocol_args(
    g: Any, *, group: str | None = None, only: Sequence[str] = (),
    defaults: dict[str, Any] | None = None, overrides: dict[str, dict[str, Any]] | None = None,
) -> None:  # fmt: skip
    """Add the flag of every :class:`Protocol` field of ``group`` (or those named in ``only``)
    as its metadata declares it (:func:`~lookahead_prune.protocol.option`): help, choices, the
    field's default unless ``defaults`` gives the command's, ``overrides`` per field."""
    defaults, overrides = defaults or {}, overrides or {}
    for f in fields(Protocol):
        meta = f.metadata
        if (f.name not in only) if only else (group is None or meta.get("group") != group):
            continue
        default = defaults.get(f.name, f.default)
        help_text = meta["help"]
        if f.name in STEP_FIELDS and default is None:
            help_text += f" ({PAPER_STEPS_HELP})"
        kwargs: dict[str, Any] = {"default": default, "help": help_text + meta.get("help_more", "")}
        kind = str(f.type)
        if kind == "bool":  # a switch away from the default
            kwargs.update(action="store_true", default=False)
        elif kind == "bool | None":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("tuple"):  # comma-separated on the command line
            kwargs["default"] = ",".join(default)
        elif kind.startswith(("int", "float")):
            kwargs["type"] = int if kind.startswith("int") else float
        for key in ("choices", "metavar"):
            if key in meta:
                kwargs[key] = list(meta[key]) if key == "choices" else meta[key]
        kwargs.update(overrides.get(f.name, {}))
        g.add_argument(meta.get("flag", "--" + f.name.replace("_", "-")), **kwargs)


def _add_training_args(p: argparse.ArgumentParser, *, train: int | None) -> None:
    """Options of dense training: every command that trains takes these."""
    g = p.add_argument_group("training")
    add_protocol_args(g, group="training", defaults={"train_steps": train})
    _add_data_args(p)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and device")
    g.add_argument("--data-dir", default=None, help="dataset folder (None: $LAP_DATA or cache)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (None: cuda if present)")


def _add_pruning_args(
    p: argparse.ArgumentParser, *, retrain: int | None, several: bool = False
) -> None:
    """Options of pruning and retraining: what sweeps and the demo take beyond training."""
    g = p.add_argument_group("pruning and retraining")
    overrides = {}
    if several:  # every mode for every run: no choices, a comma-separated list
        help_text = (RETRAIN_HELP + "; comma-separated: every mode for every run, from one "
                     "dense model, in one group")  # fmt: skip
        overrides["retrain"] = {"choices": None, "help": help_text}
    add_protocol_args(g, group="pruning", defaults={"retrain_steps": retrain},
                      overrides=overrides)  # fmt: skip
    if several:
        g.add_argument("--dense-snapshots", default="",
                       help="further comma-separated steps at which dense models keep their "
                       "weights, for later weight-rewinding sweeps over them")  # fmt: skip
    g.add_argument(
        "--batch-models", type=int, default=None,
        help="retrain at most this many pruned copies of a dense model together (None: all "
        "of them with the sparse engine, 16 with vmap on a GPU, else 1)",
    )  # fmt: skip


def _protocol_values(
    args: argparse.Namespace, model: str, dataset: str, seed: int
) -> dict[str, Any]:
    """The protocol fields the command-line options give; options a command lacks are left out."""
    given = vars(args)
    values: dict[str, Any] = {"model": model, "dataset": dataset, "seed": seed}
    for f in fields(Protocol):
        if f.name in values:
            continue
        if f.name == "bn" and "no_bn" in given:
            values["bn"] = not given["no_bn"]
        elif f.name == "exclude" and "exclude" in given:
            values["exclude"] = tuple(_split(given["exclude"]))
        elif f.name in given:
            values[f.name] = given[f.name]
    return values


def _protocol(args: argparse.Namespace, model: str, dataset: str, seed: int) -> Protocol:
    """The protocol the command-line options describe; options a command lacks keep defaults."""
    return Protocol(**_protocol_values(args, model, dataset, seed))


def _keep(text: str) -> float | str:
    """``--keep``: a fraction (``0.05``) or an N:M pattern (``2:4``)."""
    try:
        if ":" in text:
            parse_nm(text)
            return text
        return float(text)
    except ValueError as err:
        why = str(err) if ":" in text else f"not a number: {text!r}"
        raise argparse.ArgumentTypeError(why) from None


def cmd_demo(args: argparse.Namespace) -> int:
    """Train the FCN on bundled MNIST, prune with MP and LAP at several levels, retrain, report."""
    out = Path(args.out)
    mode, args.retrain = args.retrain, "finetune"  # rewind-weights, lottery: T - k steps
    protocol = for_retrain(_protocol(args, "fcn", "mnist", 0), mode)
    sweep = Sweep(
        protocol, ["fcn"], ["mnist"], _split(args.methods), levels_from(args.levels),
        seeds_from(args.seeds),
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    db = out / "demo.sqlite"
    start = time.perf_counter()
    stats = run_sweep(
        sweep, db, data_dir=args.data_dir, device=args.device, batch_models=args.batch_models,
        progress=not args.quiet,
    )  # fmt: skip
    with RunStore(db) as store:
        rows = [r for r in store.runs(model="fcn", dataset="mnist") if r["key"] in sweep.run_keys()]
    print()
    for metric in ("test_acc_pruned", "test_acc_retrained"):
        print_tables(rows, metric)
    if protocol.bn_recalibrate:
        print_tables(rows, "test_acc_recalibrated")
    plot = out / "demo.png"
    plot_accuracy(rows, plot, title="FCN on MNIST: MP vs LAP")
    print(f"{stats.done} runs done, {stats.skipped} already in {db}; plot: {plot}")
    print(f"wall time {time.perf_counter() - start:.1f}s")
    return 0


def _changed_sweep_flags(args: argparse.Namespace) -> list[str]:
    """Sweep flags given on the command line with a non-default value."""
    defaults = vars(build_parser().parse_args(["sweep"]))
    ignore = {"config", "func", "command", "quiet"}
    return [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
            if k not in ignore and defaults.get(k) != v]  # fmt: skip


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run a grid of (model, dataset, seed, method, level) into the results database."""
    if args.config:
        try:
            cfg = read_sweep_file(args.config)
        except SweepFileError as error:
            raise SystemExit(str(error)) from None
        overridden = _changed_sweep_flags(args)
        if overridden:
            raise SystemExit(
                f"lap sweep: {args.config} describes the sweep; put {overridden} in the file "
                "instead of passing them as flags"
            )
        sweep, settings = sweep_from_table(cfg)
        db = settings.get("db", args.db)
        data_dir = settings.get("data_dir", args.data_dir)
        device = settings.get("device", args.device)
        cluster = {k: settings.get(k, getattr(args, k)) for k in
                   ("backend", "address", "cpus_per_task", "gpus_per_task", "storage")}  # fmt: skip
    else:
        if not (args.model and args.methods and args.levels):
            raise SystemExit("lap sweep: give --model, --methods and --levels (or a TOML file)")
        retrains = _split(args.retrain)
        args.retrain = "finetune"  # the template: --retrain-steps is the budget t
        models = _split(args.model)
        protocol, paper = template(_protocol_values(args, "fcn", "mnist", 0), models)
        snapshots = (
            seeds_from(args.dense_snapshots, "--dense-snapshots") if args.dense_snapshots else []
        )
        sweep = Sweep(
            protocol,
            models,
            _split(args.dataset),
            _split(args.methods),
            levels_from(args.levels),
            seeds_from(args.seeds),
            paper_steps=paper,
            retrains=retrains,
            snapshots=snapshots,
        )
        db, data_dir, device = args.db, args.data_dir, args.device
        cluster = {k: getattr(args, k) for k in
                   ("backend", "address", "cpus_per_task", "gpus_per_task", "storage")}  # fmt: skip
    ray_options = None
    if cluster["backend"] == "ray":
        from .backends.ray import RayOptions, require_ray

        require_ray()  # one line on how to install it, before anything runs
        ray_options = RayOptions(**{k: v for k, v in cluster.items() if k != "backend"})
    for line in protocol_lines(sweep):  # also under --quiet: logs should say what ran
        print(line)
    stats = run_sweep(
        sweep,
        db,
        data_dir=data_dir,
        device=device,
        progress=not args.quiet,
        batch_models=args.batch_models,
        backend=cluster["backend"],
        ray_options=ray_options,
    )
    for config, jobs, why in stats.failed:
        print(f"lap sweep: failed: {config} {jobs}: {why}", file=sys.stderr)
    print(
        f"{stats.done} runs done, {stats.skipped} already stored, "
        f"{stats.dense_trained} dense models trained, {stats.wall_time:.1f}s -> {db}"
    )
    return 1 if stats.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print stored runs as the paper's tables (markdown) or CSV; optionally plot them."""
    if not Path(args.db).exists():
        raise FileNotFoundError(f"no results database at {args.db}")
    if args.plot:
        check_plot_path(args.plot)  # before printing anything
    filters = {k: getattr(args, k) for k in ("model", "dataset") if getattr(args, k)}
    with RunStore(args.db, read_only=True) as store:  # reads only: read-only mounts work
        rows, damaged = store.scan(**filters)
    for problem in damaged:
        print(f"lap report: skipped a run: {problem}", file=sys.stderr)
    if not rows:
        raise ValueError(f"{args.db} holds no runs matching {filters or 'anything'}")
    if args.format == "csv":
        sys.stdout.write(rows_to_csv(rows, CSV_COLUMNS))
    elif args.format == "summary-csv":
        sys.stdout.write(summary_csv(rows, args.metric, args.by))
    else:
        print_tables(rows, args.metric, args.by)
    if args.plot:
        good, _ = reportable(rows, "test_acc_retrained")
        groups = list(protocol_groups(good).values())
        plot = Path(args.plot)
        for i, group in enumerate(groups):
            path = plot if len(groups) == 1 else plot.with_name(f"{plot.stem}-{i}{plot.suffix}")
            recal = all(r.get("test_acc_recalibrated") is not None for r in group)
            metrics = ("test_acc_pruned",) + ("test_acc_recalibrated",) * recal
            plot_accuracy(group, path, metrics=(*metrics, "test_acc_retrained"),
                          title=table_title(group, "test accuracy"))  # fmt: skip
            if not args.quiet:
                print(f"plot written to {path}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train one dense model and save it (state dict, weights_only-safe)."""
    protocol = _protocol(args, args.model, args.dataset, args.seed)
    data = load_dataset(
        args.dataset, args.data_dir, device=pick_device(args.device), subset=args.subset
    )
    dense = train_dense(protocol, data, progress=not args.quiet)
    save_checkpoint(args.out, asdict(dense) | {"protocol": protocol.dense_config()})
    print(f"test accuracy {100 * dense.test_acc:.2f}%, saved to {args.out}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a model saved by `lap train`, print the per-layer table and accuracy; `--out`
    saves the pruned model (weight_orig + weight_mask, loadable with weights_only=True)."""
    parse_method(args.method)  # a typo fails before the checkpoint is read
    state = load_checkpoint(args.checkpoint, cache=False)
    if "state" not in state:
        raise ValueError(f"{args.checkpoint} holds no model state; is it from `lap train`?")
    saved = state.get("protocol", {})
    for flag, key in (("model", "model"), ("dataset", "dataset")):
        given, stored = getattr(args, flag), saved.get(key)
        if given is not None and stored is not None and given != stored:
            raise ValueError(
                f"--{flag} {given} contradicts the checkpoint, which holds a {key} {stored!r}"
            )
    protocol = Protocol(
        model=saved.get("model") or args.model or "fcn",
        dataset=saved.get("dataset") or args.dataset or "mnist",
        activation=saved.get("activation", "relu"),
    )
    if parse_method(args.method).score == "lamp" and args.scope == "layer":
        print(
            "lap prune: note: LAMP ranks like MP within a layer; it differs only with "
            "--scope global",
            file=sys.stderr,
        )
    data = load_dataset(protocol.dataset, args.data_dir, device=pick_device(args.device))
    model = new_model(protocol, data)
    model.load_state_dict(state["state"])
    model.to(data.train_x.device)
    report = prune(
        model, args.method, args.keep, scope=args.scope, graph=args.graph,
        data=data.train_x[: args.score_examples],
    )  # fmt: skip
    print(report.table())
    metrics = evaluate(model, data.test_x, data.test_y)
    print(f"test accuracy after pruning (no retraining): {100 * metrics.accuracy:.2f}%")
    if args.bn_recalibrate:
        if not recalibrate_batchnorm(model, data.train_x, batches=args.bn_recalibrate):
            raise ValueError(f"--bn-recalibrate: {protocol.model} has no batch norm")
        metrics = evaluate(model, data.test_x, data.test_y)
        print(
            f"test accuracy after recalibrating batch norm on {args.bn_recalibrate} batches: "
            f"{100 * metrics.accuracy:.2f}%"
        )
    if args.out:
        pruned = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_checkpoint(args.out, {"state": pruned, "protocol": saved or protocol.dense_config(),
                                   "method": args.method, "keep": report.keep,
                                   "test_acc": metrics.accuracy})  # fmt: skip
        print(f"pruned model saved to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a pruned model (from `lap prune --out`) for inference: `--format sparse` writes
    only the surviving weights (load with lookahead_prune.load_sparse; sparse layers where
    they are faster), `--format dense` folds the masks into plain weights (a state dict any
    PyTorch code loads). Prints file sizes and latency before and after."""
    import io

    import torch

    from .sparse import fold_masks, latency, to_sparse
    from .sparse_files import load_sparse, save_sparse

    model, saved, shape = load_masked_model(args.checkpoint, args.model, args.dataset)
    batch = int(saved.get("batch_size") or 60)
    dense = fold_masks(copy_pruned(model))
    buffer = io.BytesIO()
    torch.save(dense.state_dict(), buffer)
    dense_bytes = buffer.tell()
    out = Path(args.out)
    if args.format == "sparse":
        report = to_sparse(model, batch=batch).sparse_report
        save_sparse(model, out, batch=batch)
        after = load_sparse(out)
        print(report.table())
    else:
        save_checkpoint(out, dense.state_dict())
        after = copy_pruned(dense)
        after.load_state_dict(torch.load(out, weights_only=True))
    before_bytes = Path(args.checkpoint).stat().st_size
    after_bytes = out.stat().st_size
    print(f"size: {before_bytes / 1e3:.1f} kB ({args.checkpoint}) -> {after_bytes / 1e3:.1f} kB "
          f"({out}, {args.format}); dense state dict {dense_bytes / 1e3:.1f} kB, "
          f"the export is {100 * after_bytes / dense_bytes:.1f}% of it")  # fmt: skip
    torch.set_num_threads(args.threads) if args.threads else None
    for b in sorted({1, batch}):
        x = torch.randn(b, *shape)
        with torch.inference_mode():
            diff = float((model(x) - after(x)).abs().max())
        t = latency({"before": model, "after": after}, x, repeats=args.repeats)
        ratio = t["before"] / t["after"]
        print(f"latency at batch {b} ({torch.get_num_threads()} thread(s)): masked "
              f"{1e3 * t['before']:.3f} ms -> {args.format} {1e3 * t['after']:.3f} ms "
              f"({ratio:.2f}x faster); outputs differ by at most {diff:.1e}")  # fmt: skip
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    """Delete checkpoints beside a results database that no resume needs (iterative levels
    whose next level is stored, stale temporaries; dense models with --dense)."""
    removed = clean_checkpoints(
        args.db, args.workdir, dense=args.dense, dry_run=args.dry_run, log=print
    )
    size = sum(_size(p) for p in removed) if args.dry_run else None
    for path in removed:
        print(("would remove " if args.dry_run else "removed ") + str(path))
    tail = f" ({size / 1e6:.1f} MB)" if size is not None else ""
    print(f"{len(removed)} file(s){tail}")
    return 0


def _size(path: Path) -> int:
    """A file's size; 0 when it went (renamed, removed) since it was listed."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lap``."""
    parser = argparse.ArgumentParser(
        prog="lap",
        description="Lookahead pruning (LAP) and the train -> prune -> retrain pipeline.",
        formatter_class=_Help,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=_doc(func), description=_doc(func), formatter_class=_Help)
        p.add_argument("--quiet", action="store_true", help="no progress output")
        p.set_defaults(func=func)
        return p

    demo = command("demo", cmd_demo)
    demo.add_argument("--out", default="demo-out", help="folder for the database and plot")
    demo.add_argument("--methods", default="mp,lap", help=METHOD_HELP)
    demo.add_argument("--levels", default="2,4,6,8,10", help='levels, e.g. "2,4" or "4-10"')
    demo.add_argument("--seeds", default="0", help='seeds, e.g. "0" or "0,1,2" or "0-4"')
    _add_training_args(demo, train=3000)
    _add_pruning_args(demo, retrain=1000)

    sw = command("sweep", cmd_sweep)
    sw.add_argument("config", nargs="?", help="a TOML file describing the sweep "
                    "(keys: examples/sweep.toml)")  # fmt: skip
    sw.add_argument("--model", help=f"comma-separated: {', '.join(model_names())}")
    sw.add_argument("--dataset", default="mnist", help=f"comma-separated: {', '.join(DATASETS)}")
    sw.add_argument("--methods", help=METHOD_HELP)
    sw.add_argument("--levels", help='levels, e.g. "2,4" or "4-10"')
    sw.add_argument("--seeds", default="0", help='seeds, e.g. "0" or "0,1,2" or "0-4"')
    sw.add_argument("--db", default="results.sqlite", help="results database (SQLite)")
    g = sw.add_argument_group("cluster (--backend ray)")
    g.add_argument(
        "--backend", default="local", choices=list(BACKENDS),
        help="run here, or as tasks on a Ray cluster (pip install 'lookahead-prune[ray]')",
    )  # fmt: skip
    g.add_argument(
        "--address", default=None,
        help="Ray cluster address ('auto': the running one; None: start a local Ray)",
    )  # fmt: skip
    g.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs each Ray task asks for")
    g.add_argument("--gpus-per-task", type=float, default=0.0, help="GPUs each Ray task asks for")
    g.add_argument("--storage", default=None,
                   help="folder every node can read and write, for checkpoints (None: Ray's "
                   "object store, with dense models also kept beside the database)")  # fmt: skip
    _add_training_args(sw, train=None)
    _add_pruning_args(sw, retrain=None, several=True)

    rp = command("report", cmd_report)
    rp.add_argument("--db", default="results.sqlite", help="results database to read")
    rp.add_argument(
        "--format", default="markdown", choices=["markdown", "csv", "summary-csv"],
        help="paper-style tables, one CSV row per run, or one per table cell",
    )  # fmt: skip
    metrics = ["test_acc_retrained", "test_acc_pruned", "test_acc_recalibrated",
               "train_acc_retrained"]  # fmt: skip
    rp.add_argument("--metric", default="test_acc_retrained", choices=metrics,
                    help="what the tables show (as error)")  # fmt: skip
    rp.add_argument(
        "--by", default="method", choices=["method", "retrain"],
        help="rows of a table: methods (one table per protocol), or retraining modes (one "
        "table per protocol but its retraining and per method; gains vs fine-tuning)",
    )  # fmt: skip
    rp.add_argument("--model", help="only runs of this model")
    rp.add_argument("--dataset", help="only runs on this dataset")
    rp.add_argument("--plot", help="also write accuracy plots (.png, .svg or .pdf)")

    tr = command("train", cmd_train)
    tr.add_argument("--model", default="fcn", choices=model_names(), help="architecture")
    tr.add_argument("--dataset", default="mnist", choices=DATASETS, help="dataset")
    tr.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed")
    tr.add_argument("--out", default="dense.pt", help="checkpoint to write")
    _add_training_args(tr, train=50_000)

    pr = command("prune", cmd_prune)
    pr.add_argument("checkpoint", help="a checkpoint written by lap train")
    pr.add_argument(
        "--method", default="lap",
        help=f"one method: {', '.join(sorted(SCORES))}, or e.g. lap-forward-seq",
    )  # fmt: skip
    pr.add_argument("--keep", type=_keep, default=0.05,
                    help="fraction of weights to keep, or N:M (e.g. 2:4: the best 2 of every 4 "
                    "consecutive input weights)")  # fmt: skip
    pr.add_argument("--scope", default="layer", choices=["layer", "global"],
                    help="keep per layer, or overall under one threshold")  # fmt: skip
    pr.add_argument("--graph", default="fx", choices=GRAPH_MODES,
                    help="neighbours from the traced graph (fx; torch.export where fx cannot "
                    "follow), torch.export only, or module order")  # fmt: skip
    pr.add_argument("--model", default=None, choices=model_names(),
                    help="architecture, for checkpoints that do not record it")  # fmt: skip
    pr.add_argument("--dataset", default=None, choices=DATASETS,
                    help="test data, for checkpoints that do not record it")  # fmt: skip
    add_protocol_args(pr, only=("bn_recalibrate", "score_examples"))
    pr.add_argument("--out", default=None, help="save the pruned model here")
    _add_data_args(pr)

    ex = command("export", cmd_export)
    ex.add_argument("checkpoint", help="a checkpoint written by lap prune --out")
    ex.add_argument("--out", required=True, help="file to write")
    ex.add_argument("--format", default="sparse", choices=["sparse", "dense"],
                    help="sparse: surviving weights only (lookahead_prune.load_sparse); "
                    "dense: masks folded into a plain state dict")  # fmt: skip
    ex.add_argument("--model", default=None, choices=model_names(),
                    help="architecture, for checkpoints that do not record it")  # fmt: skip
    ex.add_argument("--dataset", default=None, choices=DATASETS,
                    help="input shape, for checkpoints that do not record it")  # fmt: skip
    ex.add_argument("--repeats", type=int, default=15, help="latency repeats (medians)")
    ex.add_argument("--threads", type=int, default=0,
                    help="torch threads while measuring latency (0: torch's default)")  # fmt: skip

    cl = command("clean", cmd_clean)
    cl.add_argument("--db", default="results.sqlite", help="results database of the sweep")
    cl.add_argument("--workdir", default=None, help="checkpoint folder (None: <db>-checkpoints)")
    cl.add_argument("--dense", action="store_true", help="also remove dense models")
    cl.add_argument("--dry-run", action="store_true", help="list, do not delete")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lap``; errors the user can fix are printed without a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, DatasetError, FileNotFoundError, StoreError, CheckpointError,
            SparseExportError) as exc:  # fmt: skip
        print(f"lap {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
