"""fedimb against a plain Flower app as the federation grows and 100 clients take part in each round.

    fedimb bench scale                              # 100 / 1,000 / 10,000 / 100,000 clients, 3 rounds
    fedimb bench scale --clients 100 1000 --rounds 2
    fedimb bench scale --table-only                 # the page from the measurements taken so far, nothing run
    fedimb bench scale --from-records               # the page again from its records (docs/results/scale/)

``--config`` (experiments/quickstart.yaml: Fashion-MNIST, LeNet, 1 local epoch) with the data
kept whole and split evenly (``imbalance.factor=1 partition.name=iid``, before the positional
overrides, which may change them; past 60,000 clients ``partition.copies`` puts every sample in
more than one client's share), for each size N in ``--clients``: ``--per-round`` clients
train and as many evaluate in each of ``--rounds`` rounds (``federation.fraction`` and
``federation.fraction_evaluate`` = per-round / N), the server scores the test set before and
after each round. Two sides, each in a fresh process, as in ``benchmarks/overhead.py``: the
plain Flower app (``benchmarks/plain_flower_app.py``: Flower's FedAvg on ``run_simulation``,
N virtual SuperNodes) and ``fedimb run``. Per side: start-up (process start to the end of
round 0's evaluation), round 1 (Ray actors start and load their data in it), the later
rounds' seconds per round, the whole process, and the peak summed RSS (and PSS) of every
process of the run, Ray's workers included, sampled from /proc. A side that fails is kept
with its exit and the end of its log.

Floors (issue 20): at 10,000 clients fedimb's whole process and peak memory each at most 1.5x
the plain app's; at 100,000 fedimb finishes within this machine's memory.
``docs/results/scale/notes.md`` (hand-written, optional) is inserted after the floors.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from fedimb.app.bench import load_benchmark
from fedimb.app.cli import guarded
from fedimb.app.pages import bench_parser, floors_table, floors_verdict, parse, save_records, table
from fedimb.config import ConfigError, load_config

overhead = load_benchmark("overhead")  # the measuring: one process and its tree, its rounds

DOC = "docs/results/scale.md"
ROOT = Path(__file__).resolve().parent.parent
CONFIG = "experiments/quickstart.yaml"
SIDES = ("plain", "fedimb")
DATA = ["imbalance.factor=1", "partition.name=iid"]  # every sample kept, even shares: any size has data
MAX_RATIO = 1.5  # fedimb's whole process and peak memory over the plain app's, at FLOOR_CLIENTS
FLOOR_CLIENTS, BIG_CLIENTS = 10_000, 100_000
GB = 1024**3


TRAIN_SAMPLES = 60_000  # Fashion-MNIST's training set, kept whole (DATA)


def size_overrides(clients: int, per_round: int, rounds: int, extra: list[str]) -> list[str]:
    """The overrides of one federation size; past 60,000 clients every sample enters the split more than once (``partition.copies``)."""
    share = repr(min(1.0, per_round / clients))
    copies = -(-clients // TRAIN_SAMPLES)  # every client holds at least one sample
    return [*DATA, f"partition.copies={copies}", *extra, f"name=scale_{clients}", f"federation.num_clients={clients}",
            f"federation.fraction={share}", f"federation.fraction_evaluate={share}",
            f"federation.rounds={rounds}", "train.local_epochs=1", "eval.every=1", "eval.client_every=1"]


# --- the page ------------------------------------------------------------------------------------


def phases(r: dict[str, Any]) -> tuple[float | None, float | None]:
    """Seconds of round 1, and per round of the later rounds (None without them)."""
    ends = r.get("round_ends_s")
    if not ends or len(ends) < 2:
        return None, None
    later = (ends[-1] - ends[1]) / (len(ends) - 2) if len(ends) > 2 else None
    return ends[1] - ends[0], later


def side_row(r: dict[str, Any]) -> list[str]:
    fmt = overhead.fmt
    first, later = phases(r)
    status = "ok" if r["fixed_s"] is not None else f"failed (exit {r['exit_code']}): {failure_line(r)}"
    return [f"{r['clients']:,}", overhead.SIDE_NAMES[r["side"]], fmt(r["fixed_s"]), fmt(first), fmt(later, 2),
            fmt(r["process_s"]), f"{r['peak_rss_bytes'] / GB:.2f}", f"{r['peak_pss_bytes'] / GB:.2f}",
            str(r["peak_processes"]), f"{r['load_before']:.2f}", status]


def failure_line(r: dict[str, Any]) -> str:
    """The last informative line of a failed side's log, for the table."""
    lines = [line.strip() for line in r.get("log_tail", []) if line.strip()]
    return (lines[-1] if lines else "no output").replace("|", "/")[:160]


def floors(by: dict[tuple[int, str], dict[str, Any]], memory: int) -> tuple[str, bool, list[str]]:
    """The floors table, whether every measured floor holds, and the floors these records cannot check."""
    ratio, rows, missing = overhead.ratio, [], []
    mine, plain = by.get((FLOOR_CLIENTS, "fedimb"), {}), by.get((FLOOR_CLIENTS, "plain"), {})
    for key, what in (("process_s", "whole process"), ("peak_rss_bytes", "peak RSS")):
        value = ratio(mine.get(key), plain.get(key)) if mine.get("fixed_s") and plain.get("fixed_s") else None
        if value is None:
            missing.append(f"{what} at {FLOOR_CLIENTS:,} clients")
        else:
            rows.append(([f"{FLOOR_CLIENTS:,}", f"{what}, fedimb ÷ plain Flower app"], value, "<=", MAX_RATIO))
    big = by.get((BIG_CLIENTS, "fedimb"))
    if big is None:
        missing.append(f"{BIG_CLIENTS:,} clients within memory")
    else:  # a failed run cannot hold, whatever its memory
        peak = big["peak_rss_bytes"] / GB if big["fixed_s"] is not None else float("inf")
        rows.append(([f"{BIG_CLIENTS:,}", f"finished, peak RSS (GiB) within this machine's {memory / GB:.1f}"],
                     peak, "<=", round(memory / GB, 1)))
    if not rows:
        return "", True, missing
    text, ok = floors_table(["clients", "floor", "measured", "needed", "holds"], rows, signed=False)
    return text, ok, missing


def build_page(header: dict[str, Any], records: list[dict[str, Any]], folder: str, notes: str) -> tuple[str, str]:
    """The page's text and its floors table."""
    by = {(r["clients"], r["side"]): r for r in records}
    sizes = sorted({r["clients"] for r in records})
    rows = [side_row(by[(n, s)]) for n in sizes for s in SIDES if (n, s) in by]
    ratio, fmt = overhead.ratio, overhead.fmt
    ratio_rows = []
    for n in sizes:
        mine, plain = by.get((n, "fedimb")), by.get((n, "plain"))
        if mine and plain and mine["fixed_s"] is not None and plain["fixed_s"] is not None:
            ratio_rows.append([f"{n:,}", *(fmt(ratio(a, b), 2) for a, b in (
                (mine["fixed_s"], plain["fixed_s"]), (phases(mine)[1], phases(plain)[1]),
                (mine["process_s"], plain["process_s"]), (mine["peak_rss_bytes"], plain["peak_rss_bytes"])))])
    floor_text, ok, missing = floors(by, header["memory_bytes"])
    verdict = "no" if not ok else "not all measured" if missing else "yes"
    first = records[0]
    text = (
        f"# Scale: fedimb against a plain Flower app, {header['per_round']} clients a round\n\n"
        f"Command: `{header['command']}`  \nMachine: {header['machine']}; written {header['written']}.  \n"
        f"Records: [{folder}/records.jsonl.gz]({folder}/records.jsonl.gz) (`fedimb bench scale --from-records` "
        "rebuilds this page from them).\n\n"
        f"Work: `{header['config']}` with {' '.join(f'`{o}`' for o in header['overrides'])}, "
        f"{first['rounds']} round{'s' * (first['rounds'] != 1)} of 1 local epoch; in each round {header['per_round']} "
        "sampled clients train and as many score the new model on their local test split, and the server scores "
        "it on the test set (also before round 1). Both sides train on fedimb's split of the data; past 60,000 "
        "clients every training sample is split ⌈N / 60,000⌉ times (`partition.copies`), so each client holds one "
        "or more.\n\n"
        "- **plain Flower app**: `python -m benchmarks.plain_flower_app`, Flower's `FedAvg` with `fraction_train` "
        "and `fraction_evaluate` = per round ÷ clients on `run_simulation` with as many virtual SuperNodes.\n"
        "- **fedimb**: `fedimb run` with `federation.fraction` and `federation.fraction_evaluate` the same.\n\n"
        "Each side runs in a fresh process. Start-up: process start to the end of round 0's evaluation. Round 1: "
        "its seconds (Ray's client actors start and load their data in it). Later rounds: seconds per round after "
        "round 1. Whole process: start to exit. Peak RSS: the largest sum of resident set sizes over every process "
        f"of the run (Ray's included), sampled every {overhead.SAMPLE_S} s; PSS splits shared pages between the "
        "processes sharing them; processes: the most alive at once. Load before: the one-minute load average as the "
        "side started.\n\n## Measured\n\n"
        + table(["clients", "side", "start-up (s)", "round 1 (s)", "later rounds (s / round)", "whole process (s)",
                 "peak RSS (GiB)", "peak PSS (GiB)", "processes", "load before", "status"], rows)
        + "\n\n## Ratios\n\nfedimb ÷ plain Flower app (below 1: fedimb takes less).\n\n"
        + (table(["clients", "start-up", "later rounds", "whole process", "peak RSS"], ratio_rows)
           if ratio_rows else "No size where both sides finished.")
        + "\n\n## Floors\n\n" + (floor_text + "\n\n" if floor_text else "")
        + floors_verdict(missing, verdict, notes)
    )
    return text.rstrip("\n") + "\n", floor_text


def main(argv: list[str] | None = None) -> int:
    """Measure the chosen sizes and sides (unless --table-only / --from-records), then write the page."""
    parser = bench_parser("scale", __doc__, DOC)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--clients", nargs="+", type=int, default=[100, 1_000, 10_000, 100_000])
    parser.add_argument("--per-round", type=int, default=100, help="clients that train (and evaluate) each round")
    parser.add_argument("--rounds", type=int, default=3)
    overhead.add_side_arguments(parser, SIDES, "runs/bench/scale", timeout=7200)
    args, header, page = parse(parser, sys.argv[1:] if argv is None else argv)
    measurements = Path(args.out) / "measurements.jsonl"
    if not args.from_records:
        if args.rounds < 1 or args.per_round < 1 or min(args.clients) < 2:
            raise ConfigError("--rounds", "give at least 1 round, 1 client per round and 2 clients")
        if not args.table_only:
            stamp = Path(args.out).resolve() / time.strftime("%Y%m%d-%H%M%S")  # the sides run from the checkout
            for n in args.clients:
                overrides = size_overrides(n, args.per_round, args.rounds, args.overrides)
                overhead.check_same_work(load_config(ROOT / args.config, overrides))
                for side in args.sides:
                    record = overhead.run_side(side, args.config, overrides, stamp / f"{n}-{side}", args.timeout,
                                               name=f"{n}-{side}", clients=n, per_round=args.per_round)
                    overhead.append(measurements, record)
        records = [r for r in overhead.collected(measurements, ("clients", "side", "per_round", "rounds"))
                   if r["clients"] in args.clients and r["per_round"] == args.per_round and r["rounds"] == args.rounds]
        if not records:
            raise ConfigError("records", f"no measurement in {measurements}; {page.doc} is left as it is")
        header = {**header, **overhead.machine(), "config": args.config, "per_round": args.per_round,
                  "overrides": [*DATA, *args.overrides]}
        save_records(page, header, sorted(records, key=lambda r: (r["clients"], SIDES.index(r["side"]))))
    return overhead.write_measured_page(page, build_page)


if __name__ == "__main__":
    sys.exit(guarded(main))
