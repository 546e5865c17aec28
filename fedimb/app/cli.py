"""``fedimb run [--resume RUN_DIR] | sweep | report | partition | bench | deploy init``.

Bad input exits with code 2 and one line naming the field; a failed run exits with 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from fedimb.config import ConfigError, load_config
from fedimb.records import clear_run, holds_run

console = Console(stderr=True)
EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1


def _cmd_run(args: argparse.Namespace) -> int:
    from fedimb.app.simulation import check_before_run, default_run_dir, run_experiment

    if args.resume:
        if args.overwrite:
            raise ConfigError("--overwrite", "cannot go with --resume: one continues a run, the other starts it over")
        return _resume(args)
    if args.config is None:
        raise ConfigError("config", "give a config YAML, or --resume RUN_DIR")
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.out) if args.out else default_run_dir(cfg)
    _check_out(run_dir, args.overwrite)
    check_before_run(cfg)  # bad input stops here, before anything is printed or written
    if args.dry_run:
        console.print(f"config ok: {cfg.strategy.name} on {cfg.data.dataset} → {run_dir} (dry run: nothing written)",
                      highlight=False, soft_wrap=True)
        return 0
    if args.overwrite:
        clear_run(run_dir)
    console.print(f"[bold]fedimb run[/]: {cfg.strategy.name} on {cfg.data.dataset} "
                  f"({cfg.partition.name}, {cfg.federation.num_clients} clients, "
                  f"{cfg.federation.rounds} rounds) → {run_dir}", highlight=False, soft_wrap=True)
    summary = run_experiment(cfg, run_dir, checked=True)
    print_summary(summary)
    console.print(f"records: {run_dir}", highlight=False)
    return 0


def _check_out(run_dir: Path, overwrite: bool) -> None:
    """A run directory that already holds a run is only reused when asked to (--overwrite or --resume)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("--out", f"{run_dir} is a file, not a directory")
    if holds_run(run_dir) and not overwrite:
        raise ConfigError("--out", f"{run_dir} already holds a run; continue it with fedimb run --resume {run_dir}, "
                                   "or start it over with --overwrite")


def _resume(args: argparse.Namespace) -> int:
    """``fedimb run --resume RUN_DIR``: continue a run from its checkpoint with its own config.yaml."""
    from fedimb.app.simulation import check_before_run, run_experiment
    from fedimb.checkpoint import ResumeError, plan_resume
    from strategies import strategy_spec

    if args.config or args.overrides or args.out:
        # a changed config would not continue the run that the checkpoint belongs to
        raise ResumeError("takes only the run directory; its config.yaml is the config")
    run_dir = Path(args.resume)
    plan = plan_resume(run_dir, lambda cfg: strategy_spec(cfg.strategy.name).keeps_client_state)
    if plan.finished is not None:
        accuracy = plan.finished.get("final", {}).get("accuracy")
        shown = f"{accuracy:.4f}" if isinstance(accuracy, (int, float)) else "n/a"
        console.print(f"run finished: {run_dir} (final accuracy {shown}); nothing to do", highlight=False)
        return 0
    check_before_run(plan.cfg)
    start = "from the start (no checkpoint)" if plan.done_round is None else f"after round {plan.done_round}"
    console.print(f"[bold]fedimb run --resume[/]: {plan.cfg.strategy.name} on {plan.cfg.data.dataset}, "
                  f"{start} of {plan.cfg.federation.rounds} → {run_dir}", highlight=False, soft_wrap=True)
    summary = run_experiment(plan.cfg, run_dir, checked=True, resume=True)
    print_summary(summary)
    console.print(f"records: {run_dir}", highlight=False)
    return 0


def summary_title(summary: dict) -> str:
    """What the final metrics of a run were scored on."""
    if summary.get("evaluation") == "federated":
        return "final metrics (the clients' local test splits, pooled)"
    if "test" in summary:
        return "final metrics (validation split; test set: the test_ rows)"
    return "final metrics (balanced test set)"


def print_summary(summary: dict) -> None:
    """The results table of one run."""
    from rich.table import Table

    final, best = summary["final"], summary["best"]
    table = Table(title=summary_title(summary))
    for col in ("metric", "final", "best"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "tail_recall", "head_recall"):
        if key in final:
            table.add_row(key, f"{final[key]:.4f}", f"{best[key]:.4f}" if key in best else "")
    for key in ("client_accuracy_mean", "client_accuracy_std", "worst_client_accuracy"):
        if key in final:
            table.add_row(key, f"{final[key]:.4f}", "")
    test = summary.get("test", {})  # eval.split=validation: the last round's model on the test set
    for key in ("accuracy", "balanced_accuracy", "tail_recall", "worst_domain_balanced_accuracy"):
        if key in test:
            table.add_row(f"test_{key}", f"{test[key]:.4f}", "")
    table.add_row("wall time (s)", f"{summary['wall_time_s']:.1f}", "")
    Console().print(table)


def _cmd_partition(args: argparse.Namespace) -> int:
    from fedimb.data import build_federated_data, format_partition_table, partition_stats, plot_partition
    from fedimb.data.domains import feature_skew_report

    cfg = load_config(args.config, args.overrides)
    if args.export:
        from fedimb.data.site_export import check_export_dir

        check_export_dir(Path(args.export), cfg.federation.num_clients)  # refused before any work
    data = build_federated_data(cfg)
    stats = feature_skew_report(partition_stats(data.counts), cfg)
    print(format_partition_table(stats))
    if "domains" in stats:
        print("domains: " + ", ".join(f"{name} x{count}" for name, count in stats["domains"].items())
              + " (clients " + ", ".join(f"{c['id']}:{c['domain']}" for c in stats["clients"]) + ")")
    out = Path(args.out or (Path(args.export) / "partition.png" if args.export else f"partition-{cfg.name}.png"))
    if args.export:
        from fedimb.data.site_export import export_sites

        for site in export_sites(cfg, Path(args.export), data):
            console.print(f"site {site.partition_id}: {site.path} ({site.train_samples} train, "
                          f"{site.test_samples} test)", highlight=False)
    plot_partition(data.counts, out, title=f"{cfg.data.dataset}: {cfg.partition.name}")
    console.print(f"heatmap: {out}", highlight=False)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fedimb.app.sweep import run_sweep

    out = run_sweep(Path(args.suite), args.overrides, Path(args.out) if args.out else None,
                    dry_run=args.dry_run, seeds=args.seeds, only=args.only)
    console.print(f"results: {out}", highlight=False)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fedimb.report import find_run_dirs, write_report

    run_dirs = [d for root in args.dirs for d in find_run_dirs(Path(root))]
    if not run_dirs:
        raise ConfigError("dirs", "no run directory (with summary.json) found under " + ", ".join(args.dirs))
    if args.last_rounds < 0:
        raise ConfigError("--last-rounds", f"must be >= 0 (0 = final round), got {args.last_rounds}")
    out = write_report(run_dirs, Path(args.out), last_rounds=args.last_rounds)
    print((out / "results.md").read_text() if out.is_dir() else Path(out).read_text())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from fedimb.app.bench import bench

    return bench(args.name, args.args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fedimb`` command."""
    parser = argparse.ArgumentParser(prog="fedimb", description="Federated learning on imbalanced, non-IID data.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one federation")
    run.add_argument("config", nargs="?")
    run.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    run.add_argument("--out", help="run directory (default runs/<name>/<strategy>-...)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its last checkpoint (no config or overrides)")
    run.add_argument("--overwrite", action="store_true",
                     help="start over in an --out directory that already holds a run (its run files are removed)")
    run.add_argument("--dry-run", action="store_true", help="check the config, the data and --out, then stop")
    run.set_defaults(func=_cmd_run)
    part = sub.add_parser("partition", help="show a partition's class counts and statistics")
    part.add_argument("config")
    part.add_argument("overrides", nargs="*")
    part.add_argument("--out", help="heatmap PNG path")
    part.add_argument("--export", metavar="DIR",
                      help="write each client's data as a site folder DIR/site-<i> (site.npz: train + local test)")
    part.set_defaults(func=_cmd_partition)
    sweep = sub.add_parser("sweep", help="run a grid of experiments and tabulate them")
    sweep.add_argument("suite")
    sweep.add_argument("overrides", nargs="*", help="overrides applied to every run")
    sweep.add_argument("--out", help="sweep directory (default: the suite's out)")
    sweep.add_argument("--dry-run", action="store_true", help="validate and list the runs only")
    sweep.add_argument("--seeds", nargs="+", type=int, help="seeds to run (replaces the suite's)")
    sweep.add_argument("--only", nargs="+", help="shell patterns on cell labels, e.g. 'lt100_dirbal0.1_*'")
    sweep.set_defaults(func=_cmd_sweep)
    report = sub.add_parser("report", help="tables and plots from existing run directories")
    report.add_argument("dirs", nargs="+")
    report.add_argument("--out", default="report")
    report.add_argument("--last-rounds", type=int, default=0, metavar="K",
                        help="average each run's last K logged rounds instead of taking its final round")
    report.set_defaults(func=_cmd_report)
    bench = sub.add_parser("bench", help="run a benchmark of benchmarks/ and write its results page",
                           description="fedimb bench NAME [ARGS]: a benchmark of benchmarks/ (fedimb bench NAME --help); "
                                       "fedimb bench index: docs/results/README.md; fedimb bench rebuild [--check]: "
                                       "every results page again from its records")
    bench.add_argument("name", help="niid_bench, imbalance, fal, synthetic, ...; or index, rebuild")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    bench.set_defaults(func=_cmd_bench)
    from fedimb.app.deploy import add_deploy_parser

    add_deploy_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    return guarded(lambda: handler(args))


def guarded(command: Callable[[], int]) -> int:
    """Run ``command``; bad input or a failed run becomes one red line and an exit code, not a traceback.

    The benchmark scripts exit through it too (``sys.exit(guarded(main))``).
    """
    from fedimb.checkpoint import ResumeError
    from fedimb.app.simulation import RunError

    try:
        return command()
    except (ConfigError, ResumeError) as exc:
        console.print(f"[red]{exc}[/]", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT
    except RunError as exc:
        console.print(f"[red]{exc}[/]", highlight=False, soft_wrap=True)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()

