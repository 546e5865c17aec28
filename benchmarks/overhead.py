"""What fedimb costs over a plain Flower app and a bare PyTorch loop doing the same work.

    fedimb bench overhead                        # both workloads, the three sides of each, one fresh process each
    fedimb bench overhead --workloads 3x1        # one workload (ROUNDSxLOCAL_EPOCHS)
    fedimb bench overhead --table-only           # the page from the measurements taken so far, nothing run
    fedimb bench overhead --from-records         # the page again from its records (docs/results/overhead/)

``--config`` (experiments/quickstart.yaml: Fashion-MNIST, exp long tail rho = 10, Dirichlet(0.5)
over 10 clients, all sampled, LeNet) for each workload ROUNDSxEPOCHS (default 3 rounds x 1
local epoch and 1 round x 10 local epochs), three ways, each in a fresh process:

- **bare**: ``python -m benchmarks.plain_torch``, the clients trained in turn in one loop;
- **plain**: ``python -m benchmarks.plain_flower_app``, a Flower 1.42 app as a user writes it
  (Flower's FedAvg, ``@app.train()`` / ``@app.evaluate()``, ``run_simulation`` on Ray);
- **fedimb**: ``fedimb run``.

All three train on fedimb's own split of the data and do the same work each round (train
every client from the global weights, FedAvg, every client scores the new model on its local
test split, the server scores it on the test set, as it also does before round 1). Each
side's whole process is timed from just before it starts to its exit; its fixed cost is the
time to the end of round 0's evaluation, its rounds the time from there to the end of the
last round's. Memory: the peak summed RSS (and PSS) of every process carrying the run's
environment marker, Ray's included, sampled from /proc. Every measurement is appended to
``--out``/measurements.jsonl as it ends; the page's records are the latest one of each
workload and side. Floors (issue 20): fixed cost at most 1.3x the plain app's; rounds at
least 1.9x the bare loop's throughput with 10 local epochs and 2x the plain app's with 1.
``docs/results/overhead/notes.md`` (hand-written, optional) is inserted after the floors.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from collections.abc import Callable
from typing import Any, Self

from fedimb.app.cli import guarded
from fedimb.app.pages import bench_parser, floors_table, floors_verdict, parse, save_records, table
from fedimb.config import ConfigError, ExperimentConfig, load_config
from fedimb.report import read_records

DOC = "docs/results/overhead.md"
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CONFIG = "experiments/quickstart.yaml"
SIDES = ("bare", "plain", "fedimb")
SIDE_NAMES = {"bare": "bare PyTorch loop", "plain": "plain Flower app", "fedimb": "fedimb"}
MARKER = "FEDIMB_BENCH_TREE"  # the environment entry that marks a measured run's processes
MAX_FIXED = 1.3  # fedimb's fixed cost over the plain app's
MIN_OVER_BARE = 1.9  # fedimb's rounds throughput over the bare loop's, 10 local epochs
MIN_OVER_PLAIN = 2.0  # fedimb's rounds throughput over the plain app's, 1 local epoch
SAMPLE_S = 0.25
MB = 1024 * 1024


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """Architecture, CPU model, cores and memory of this machine."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    mem = Path("/proc/meminfo").read_text().split()[1] if Path("/proc/meminfo").is_file() else "0"  # MemTotal, kB
    text = f"{platform.machine()}, {model or platform.processor() or 'cpu'}, {os.cpu_count()} cores"
    return {"machine": f"{text}, {int(mem) / MB:.1f} GiB", "cores": os.cpu_count(), "memory_bytes": int(mem) * 1024}


# --- measuring one process and its tree ----------------------------------------------------------


class PeriodicSampler:
    """Calls :meth:`sample` every ``every`` seconds on a thread, from entering a ``with`` block to leaving it."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def _loop(self) -> None:
        while not self.done.wait(self.every):
            self.sample()

    def sample(self) -> None:
        """Take one sample."""
        raise NotImplementedError


class TreeWatch(PeriodicSampler):
    """Peak summed RSS and PSS of the processes whose environment holds ``MARKER=token``, from /proc.

    Ray's processes inherit the environment of the process that starts Ray, so they are found
    even where they are not its children. A process living less than a sample is missed.
    """

    def __init__(self, token: str, every: float = SAMPLE_S) -> None:
        super().__init__(every)
        self.entry = f"{MARKER}={token}".encode()
        self.marked: dict[tuple[int, str], bool] = {}
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self.live: set[int] = set()

    def _is_marked(self, proc: Path) -> bool:
        try:
            key = (int(proc.name), (proc / "stat").read_text().rsplit(") ", 1)[-1].split()[19])  # pid, start time
            if key not in self.marked:
                self.marked[key] = self.entry in (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            return False
        return self.marked[key]

    def sample(self) -> None:
        rss = pss = 0
        live = set()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or not self._is_marked(proc):
                continue
            try:
                fields = dict(line.split(":", 1) for line in (proc / "smaps_rollup").read_text().splitlines()[1:])
            except (OSError, ValueError):
                continue
            rss += int(fields.get("Rss", "0 kB").split()[0]) * 1024
            pss += int(fields.get("Pss", "0 kB").split()[0]) * 1024
            live.add(int(proc.name))
        self.live = live
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, len(live))

    def stop_left_over(self) -> None:
        """SIGKILL the marked processes still alive (a killed run's Ray processes), by pid."""
        self.sample()
        for pid in self.live:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def child_env(token: str) -> dict[str, str]:
    """The environment a measured side runs in: offline, the checkout importable (Ray workers included)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_USAGE_STATS_ENABLED": "0", MARKER: token}


def measure(cmd: list[str], log_path: Path, timeout: float) -> dict[str, Any]:
    """Run ``cmd`` from the checkout (output to ``log_path``); its exit, seconds and peak tree memory."""
    token = uuid.uuid4().hex
    log(shlex.join(cmd))
    load = round(os.getloadavg()[0], 2)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out, TreeWatch(token) as watch:
        started = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(token), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code: int | str = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = "timeout"
        finally:
            if proc.poll() is None:  # timed out, or this script was interrupted
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            ended = time.time()
            watch.stop_left_over()
    record = {"command": shlex.join(cmd), "exit_code": code, "started": round(started, 3),
              "process_s": round(ended - started, 3), "load_before": load, "peak_rss_bytes": watch.peak_rss,
              "peak_pss_bytes": watch.peak_pss, "peak_processes": watch.peak_processes}
    if code != 0:
        record["log_tail"] = log_path.read_text(errors="replace").splitlines()[-15:]
        log(f"exit {code}; see {log_path}")
    return record


# --- the three sides -----------------------------------------------------------------------------


def check_same_work(cfg: ExperimentConfig) -> None:
    """The plain sides do FedAvg with cross-entropy and both evaluations every round: so must the config."""
    plain = (cfg.strategy.name == "fedavg" and cfg.train.loss.name == "ce" and not cfg.train.lr_decay_at
             and cfg.eval.every == 1 and cfg.eval.client_every in (0, 1) and cfg.eval.split == "test"
             and not cfg.active_learning.enabled and not cfg.synthetic.enabled and cfg.model.name == "lenet")
    if not plain:
        raise ConfigError("overrides", "the plain sides train LeNet with FedAvg and cross-entropy, no lr decay, and "
                                       "evaluate every round (eval.every=1, eval.client_every 0 or 1): keep to that")


def side_command(side: str, config: str, overrides: list[str], cfg: ExperimentConfig, where: Path) -> list[str]:
    """The command of one side; it writes its timings (or run directory) under ``where``."""
    if side == "fedimb":
        return [str(BIN / "fedimb"), "run", config, *overrides, "--out", str(where / "run")]
    fed, train = cfg.federation, cfg.train
    cmd = [sys.executable, "-m", f"benchmarks.{'plain_torch' if side == 'bare' else 'plain_flower_app'}",
           "--data-config", config, *(f"--data-override={o}" for o in overrides),
           "--rounds", str(fed.rounds), "--local-epochs", str(train.local_epochs), "--lr", f"{train.lr:g}",
           "--momentum", f"{train.momentum:g}", "--weight-decay", f"{train.weight_decay:g}",
           "--batch-size", str(train.batch_size), "--eval-batch-size", str(cfg.eval.batch_size),
           "--seed", str(cfg.seed), "--timings", str(where / "timings.json")]
    if side == "plain":
        evaluate = fed.fraction_evaluate if cfg.eval.client_every else 0.0
        cmd += ["--num-clients", str(fed.num_clients), "--fraction", repr(fed.fraction),
                "--fraction-evaluate", repr(evaluate), "--num-cpus", f"{cfg.simulation.num_cpus:g}"]
    return cmd


def round_ends(side: str, where: Path) -> tuple[list[list[float]], dict[str, Any]]:
    """[round, time.time() its evaluation ended, test accuracy] per round, 0 first; and what else the side told.

    fedimb's ``rounds.csv`` gives seconds since its recorder started, which writes ``config.yaml``
    as it starts: that file's modification time anchors them.
    """
    if side != "fedimb":
        timings = json.loads((where / "timings.json").read_text())
        return timings.pop("rounds"), timings
    run = where / "run"
    anchor = (run / "config.yaml").stat().st_mtime
    rows = list(csv.DictReader(io.StringIO((run / "rounds.csv").read_text())))
    return [[int(r["round"]), anchor + float(r["wall_time_s"]), float(r.get("accuracy") or "nan")] for r in rows], {}


def run_side(side: str, config: str, overrides: list[str], where: Path, timeout: float,
             **fields: Any) -> dict[str, Any]:
    """Measure one side; its record: ``fields``, the process and its phases (None where it failed)."""
    cfg = load_config(ROOT / config, overrides)
    record = {**fields, "side": side, "rounds": cfg.federation.rounds, "local_epochs": cfg.train.local_epochs,
              "num_clients": cfg.federation.num_clients,
              **measure(side_command(side, config, overrides, cfg, where), where / "log.txt", timeout)}
    ends, told = ([], {}) if record["exit_code"] != 0 else round_ends(side, where)
    record.update(told)
    zero = next((t for r, t, _ in ends if r == 0), None)
    if zero is None or ends[-1][0] != cfg.federation.rounds:
        return {**record, "round_ends_s": None, "fixed_s": None, "rounds_s": None, "end_s": None, "accuracy": None}
    start, exit_at = record["started"], record["started"] + record["process_s"]
    return {**record, "round_ends_s": [round(t - start, 3) for _, t, _ in ends], "fixed_s": round(zero - start, 3),
            "rounds_s": round(ends[-1][1] - zero, 3), "end_s": round(exit_at - ends[-1][1], 3),
            "accuracy": ends[-1][2]}


def collected(path: Path, key: tuple[str, ...]) -> list[dict[str, Any]]:
    """The measurements in ``path``, the latest of each ``key`` (in order of first appearance)."""
    latest: dict[tuple, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                latest[tuple(entry[k] for k in key)] = entry
    return list(latest.values())


def append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")


# --- the page ------------------------------------------------------------------------------------


def parse_workload(text: str) -> tuple[int, int]:
    try:
        rounds, epochs = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError("--workloads", f"{text!r} is not ROUNDSxLOCAL_EPOCHS, e.g. 3x1") from None
    return rounds, epochs


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def side_row(r: dict[str, Any]) -> list[str]:
    failed = r["fixed_s"] is None
    status = f"failed (exit {r['exit_code']})" if failed else "ok"
    per_round = None if failed else r["rounds_s"] / r["rounds"]
    return [SIDE_NAMES[r["side"]], fmt(r["process_s"]), fmt(r["fixed_s"]), fmt(r["rounds_s"]), fmt(per_round),
            fmt(r["end_s"]), f"{r['peak_rss_bytes'] / MB:,.0f}", f"{r['peak_pss_bytes'] / MB:,.0f}",
            fmt(None if failed else 100 * r["accuracy"], 2), f"{r['load_before']:.2f}", status]


def floors(by: dict[tuple[str, str], dict[str, Any]], workloads: list[str]) -> tuple[str, bool, list[str]]:
    """The floors table, whether every measured floor holds, and the floors these records cannot check."""
    checks: dict[str, list] = {"fixed cost": [], "throughput with 10 local epochs": [],
                               "throughput with 1 local epoch": []}
    for w in workloads:
        mine = by.get((w, "fedimb"), {})
        fixed = ratio(mine.get("fixed_s"), by.get((w, "plain"), {}).get("fixed_s"))
        if fixed is not None:
            checks["fixed cost"].append(([w, "fixed cost, fedimb ÷ plain Flower app"], fixed, "<=", MAX_FIXED))
        epochs = parse_workload(w)[1]
        for other, floor, wanted in (("bare", MIN_OVER_BARE, 10), ("plain", MIN_OVER_PLAIN, 1)):
            speed = ratio(by.get((w, other), {}).get("rounds_s"), mine.get("rounds_s"))
            if epochs == wanted and speed is not None:
                kind = f"throughput with {wanted} local epoch{'s' * (wanted != 1)}"
                checks[kind].append(([w, f"rounds' throughput, fedimb ÷ {SIDE_NAMES[other]}"], speed, ">=", floor))
    missing = [kind for kind, rows in checks.items() if not rows]
    rows = [row for kind_rows in checks.values() for row in kind_rows]
    if not rows:
        return "", True, missing
    text, ok = floors_table(["workload", "floor", "measured", "needed", "holds"], rows, signed=False)
    return text, ok, missing


def build_page(header: dict[str, Any], records: list[dict[str, Any]], folder: str, notes: str) -> tuple[str, str]:
    """The page's text and its floors table."""
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    by = {(r["workload"], r["side"]): r for r in records}
    first = records[0]
    sections, ratio_rows = [], []
    for w in workloads:
        rows = [side_row(by[(w, s)]) for s in SIDES if (w, s) in by]
        rounds, epochs = parse_workload(w)
        title = f"{rounds} round{'s' * (rounds != 1)} x {epochs} local epoch{'s' * (epochs != 1)}"
        sections.append(f"## {title}\n\n" + table(
            ["side", "whole process (s)", "fixed cost (s)", "rounds (s)", "s / round", "end (s)", "peak RSS (MB)",
             "peak PSS (MB)", "test acc. (%)", "load before", "status"], rows))
        for key, what in (("process_s", "whole process"), ("fixed_s", "fixed cost"), ("rounds_s", "rounds")):
            mine = by.get((w, "fedimb"), {}).get(key)
            ratio_rows.append([w, what, *(fmt(ratio(mine, by.get((w, s), {}).get(key)), 2) for s in ("plain", "bare"))])
    floor_text, ok, missing = floors(by, workloads)
    threads = next((r["torch_threads"] for r in records if r["side"] == "bare" and "torch_threads" in r), None)
    verdict = "no" if not ok else "not all measured" if missing else "yes"
    cores = header.get("cores")
    given = " with " + " ".join(f"`{o}`" for o in header["overrides"]) if header.get("overrides") else ""
    text = (
        "# Overhead: fedimb against a plain Flower app and a bare PyTorch loop\n\n"
        f"Command: `{header['command']}`  \nMachine: {header['machine']}; written {header['written']}.  \n"
        f"Records: [{folder}/records.jsonl.gz]({folder}/records.jsonl.gz) (`fedimb bench overhead --from-records` "
        "rebuilds this page from them).\n\n"
        f"Work: `{header.get('config', CONFIG)}`{given} "
        f"({first['num_clients']} clients, all of them every round), the same arrays on every side (fedimb's own load, "
        "long tail and partition). Every round each client trains from the global weights (SGD with momentum, the "
        "config's learning rate and batch size), the weights are averaged by sample count (FedAvg), every client "
        "scores the new model on its local test split and the server scores it on the test set, as it also does "
        "before round 1.\n\n"
        f"- **{SIDE_NAMES['bare']}**: `python -m benchmarks.plain_torch`, one process, the clients one after the "
        f"other, PyTorch's default threads ({threads if threads is not None else '–'}).\n"
        f"- **{SIDE_NAMES['plain']}**: `python -m benchmarks.plain_flower_app`, as a user writes it: a Message-API "
        "ServerApp running Flower's `FedAvg` with a central `evaluate_fn`, a ClientApp with `@app.train()` and "
        "`@app.evaluate()`, `run_simulation` on Ray with Flower's default Ray settings and the config's "
        "`simulation.num_cpus` per client; model and loops are the bare side's.\n"
        f"- **{SIDE_NAMES['fedimb']}**: `fedimb run` with the config.\n\n"
        "Each side runs in a fresh process. Whole process: from just before it starts to its exit. Fixed cost: "
        "from the start to the end of round 0's evaluation (interpreter, imports, data, Ray, the apps; round 1 "
        "starts next). Rounds: from there to the end of the last round's evaluation (on Ray, round 1 also starts the "
        "client processes, which load their data). End: from there to the exit. "
        "Peak RSS: the largest sum of resident set sizes over every process of the run (Ray's included), sampled "
        f"every {SAMPLE_S} s; PSS splits shared pages between the processes sharing them. Load before: the "
        f"one-minute load average as the side started (the machine has {cores} cores; a busy machine slows every "
        "side).\n\n" + "\n\n".join(sections)
        + "\n\n## Ratios\n\nSeconds of fedimb ÷ seconds of the other side (below 1: fedimb takes less).\n\n"
        + table(["workload", "measure", "fedimb ÷ plain Flower app", "fedimb ÷ bare loop"], ratio_rows)
        + "\n\n## Floors\n\nThroughput of the rounds: the other side's rounds seconds ÷ fedimb's (the same rounds "
        "either side).\n\n" + (floor_text + "\n\n" if floor_text else "")
        + floors_verdict(missing, verdict, notes)
    )
    return text.rstrip("\n") + "\n", floor_text


def add_side_arguments(parser: argparse.ArgumentParser, sides: tuple[str, ...], out: str, timeout: float) -> None:
    """The options every measuring benchmark takes: sides, timeout, output folder, --table-only, overrides."""
    parser.add_argument("--sides", nargs="+", choices=sides, default=list(sides))
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds one side may run")
    parser.add_argument("--out", default=out,
                        help="measurements.jsonl and, per call, a timestamped folder of run directories and logs")
    parser.add_argument("--table-only", action="store_true", help="run nothing: the page from the measurements so far")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every side")


def write_measured_page(page: Any, build: Callable[..., tuple[str, str]]) -> int:
    """Write the page ``build`` makes from the page's records; print its floors; exit code 0."""
    header, records = read_records(page.records)
    text, floor_text = build(header, records, page.folder.name, page.notes())
    print(f"{floor_text}\nwrote {page.write(text)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Measure the chosen workloads and sides (unless --table-only / --from-records), then write the page."""
    parser = bench_parser("overhead", __doc__, DOC)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--workloads", nargs="+", default=["3x1", "1x10"], help="ROUNDSxLOCAL_EPOCHS each")
    add_side_arguments(parser, SIDES, "runs/bench/overhead", timeout=3600)
    args, header, page = parse(parser, sys.argv[1:] if argv is None else argv)
    measurements = Path(args.out) / "measurements.jsonl"
    if not args.from_records:
        workloads = [(w, *parse_workload(w)) for w in args.workloads]
        if not args.table_only:
            for w, rounds, epochs in workloads:
                overrides = [*args.overrides, f"federation.rounds={rounds}", f"train.local_epochs={epochs}"]
                check_same_work(load_config(ROOT / args.config, overrides))
            stamp = Path(args.out).resolve() / time.strftime("%Y%m%d-%H%M%S")  # the sides run from the checkout
            for w, rounds, epochs in workloads:
                overrides = [*args.overrides, f"name=overhead_{w}", f"federation.rounds={rounds}",
                             f"train.local_epochs={epochs}"]
                for side in args.sides:
                    record = run_side(side, args.config, overrides, stamp / f"{w}-{side}", args.timeout,
                                      name=f"{w}-{side}", workload=w)
                    append(measurements, record)
        chosen = {w for w, _, _ in workloads}
        records = [r for r in collected(measurements, ("workload", "side")) if r["workload"] in chosen]
        if not records:
            raise ConfigError("records", f"no measurement in {measurements}; {page.doc} is left as it is")
        header = {**header, **machine(), "config": args.config, "overrides": list(args.overrides)}
        save_records(page, header, records)
    return write_measured_page(page, build_page)


if __name__ == "__main__":
    sys.exit(guarded(main))
