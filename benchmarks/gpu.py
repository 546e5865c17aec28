"""fedimb on one GPU: LeNet clients sharing one card through fractional Ray GPUs, the CPU beside it.

    fedimb bench gpu                                  # on a machine with a CUDA GPU: 100 clients a round
    fedimb bench gpu --fractions 0.0625 0.125 --rounds 5
    fedimb bench gpu --table-only                     # the page from the measurements taken so far, nothing run
    fedimb bench gpu --from-records                   # the page again from its records (docs/results/gpu/)

``--config`` (experiments/quickstart.yaml: Fashion-MNIST-LT, LeNet, 1 local epoch) with
``--clients`` clients, all of them training in each of ``--rounds`` rounds, the server scoring
the test set before and after each round. One side per GPU fraction in ``--fractions``
(``simulation.num_gpus``: 1 / f clients share the card at once, each on the GPU Ray assigned it,
``simulation.device=cuda``) and one CPU side (``simulation.num_gpus=0``, ``simulation.device=cpu``),
each a fresh ``fedimb run`` measured as ``benchmarks/overhead.py`` measures a side (process tree,
rounds from ``rounds.csv``), while ``nvidia-smi`` is sampled for the card's utilisation and
memory. Per side: start-up, round 1 (Ray's actors start and load their data in it), rounds per
second after round 1, the card's mean utilisation over those rounds and its peak memory, the
clients each GPU id served (``clients_on_gpu_<id>``), test accuracy. A GPU side on a machine
whose CUDA PyTorch cannot use stops with one line before any work.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedimb.app.bench import load_benchmark
from fedimb.app.cli import guarded
from fedimb.app.gpus import GPU_COLUMN
from fedimb.app.pages import bench_parser, parse, save_records, table
from fedimb.config import ConfigError, load_config
from fedimb.records import read_rounds_csv

overhead = load_benchmark("overhead")  # the measuring: one process and its tree, its rounds
scale = load_benchmark("scale")  # round 1 and the later rounds of a side's record

DOC = "docs/results/gpu.md"
ROOT = Path(__file__).resolve().parent.parent
CONFIG = "experiments/quickstart.yaml"
SMI_QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-i", "0"]
SAMPLE_S = 0.5


class GpuWatch(overhead.PeriodicSampler):
    """Samples of (time, utilisation %, memory MiB) of GPU 0 from ``nvidia-smi`` while it runs."""

    def __init__(self, every: float = SAMPLE_S) -> None:
        super().__init__(every)
        self.samples: list[list[float]] = []

    def sample(self) -> None:
        """One ``nvidia-smi`` reading (none when it fails)."""
        try:
            out = subprocess.run(SMI_QUERY, capture_output=True, text=True, timeout=5, check=True).stdout
            util, memory = (float(v) for v in out.strip().splitlines()[0].split(","))
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return
        self.samples.append([round(time.time(), 3), util, memory])


def card_name() -> str:
    """The name of GPU 0 as ``nvidia-smi`` gives it, or "" without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.strip().splitlines()[0] if out.strip() else ""


def check_cuda(fractions: list[float]) -> None:
    """One line, before any work, when a GPU side is asked for and PyTorch cannot use CUDA here."""
    import torch

    if any(f <= 0 or f > 1 for f in fractions):
        raise ConfigError("--fractions", f"each GPU share must lie in (0, 1], not {fractions}")
    if fractions and not torch.cuda.is_available():
        raise ConfigError("--fractions", "the GPU sides need a CUDA GPU that PyTorch can use, and this machine has "
                                         "none: run on a GPU machine, or measure the CPU side alone with --fractions")


def side_overrides(clients: int, rounds: int, fraction: float, extra: list[str]) -> list[str]:
    """The overrides of one side: ``fraction`` of the card per client, or the CPU alone at 0."""
    device = ["simulation.device=cuda", f"simulation.num_gpus={fraction!r}"] if fraction else [
        "simulation.device=cpu", "simulation.num_gpus=0"]
    return [*extra, f"name=gpu_{fraction:g}", f"federation.num_clients={clients}", "federation.fraction=1.0",
            f"federation.rounds={rounds}", "eval.every=1", "eval.client_every=0", *device]


def replies_per_gpu_id(run: Path) -> dict[str, int]:
    """Train replies per GPU id over the run, from ``rounds.csv``'s ``clients_on_gpu_<id>`` columns."""
    served: dict[str, int] = {}
    for row in read_rounds_csv(run / "rounds.csv"):
        for key, value in row.items():
            if key.startswith(f"{GPU_COLUMN}_"):
                gpu = key[len(GPU_COLUMN) + 1:]
                served[gpu] = served.get(gpu, 0) + int(value)
    return served


def utilisation(record: dict[str, Any]) -> tuple[float | None, float | None]:
    """Mean utilisation (%) of the card over the rounds after round 1, and its peak memory (MiB)."""
    samples, ends = record.get("gpu_samples") or [], record.get("round_ends_s")
    if not samples or not ends or len(ends) < 3:
        return None, (max(s[2] for s in samples) if samples else None)
    start, stop = record["started"] + ends[1], record["started"] + ends[-1]
    inside = [s[1] for s in samples if start <= s[0] <= stop]
    return (sum(inside) / len(inside) if inside else None), max(s[2] for s in samples)


def rounds_per_s(record: dict[str, Any]) -> float | None:
    """Rounds per second after round 1 (None without them)."""
    later = scale.phases(record)[1]
    return 1.0 / later if later else None


def side_name(record: dict[str, Any]) -> str:
    """The side as the page names it."""
    return f"GPU, {record['fraction']:g} of the card per client" if record["fraction"] else "CPU"


def build_page(header: dict[str, Any], records: list[dict[str, Any]], folder: str, notes: str) -> tuple[str, str]:
    """The page's text and its comparison table."""
    fmt = overhead.fmt
    cpu = next((r for r in records if not r["fraction"] and r["fixed_s"] is not None), None)
    cpu_speed = rounds_per_s(cpu) if cpu else None
    rows = []
    for r in records:
        first, _ = scale.phases(r)
        util, memory = utilisation(r)
        speed = rounds_per_s(r)
        over_cpu = overhead.ratio(speed, cpu_speed) if r is not cpu else None
        served = ", ".join(f"{gpu}: {n}" for gpu, n in sorted(r.get("clients_per_gpu", {}).items())) or "–"
        status = "ok" if r["fixed_s"] is not None else f"failed (exit {r['exit_code']}): {scale.failure_line(r)}"
        rows.append([side_name(r), fmt(r["fixed_s"]), fmt(first), fmt(speed, 3), fmt(over_cpu, 2), fmt(util),
                     fmt(memory, 0), served, fmt(None if r["accuracy"] is None else 100 * r["accuracy"], 2), status])
    comparison = table(["side", "start-up (s)", "round 1 (s)", "rounds / s after round 1", "÷ CPU side",
                        "GPU util. (%)", "GPU memory peak (MiB)", "train replies per GPU id", "test acc. (%)",
                        "status"], rows)
    text = (
        f"# fedimb on one GPU: {header['clients']} LeNet clients a round\n\n"
        f"Command: `{header['command']}`  \nMachine: {header['machine']}; card: {header['card'] or 'none'}; "
        f"written {header['written']}.  \nRecords: [{folder}/records.jsonl.gz]({folder}/records.jsonl.gz) "
        "(`fedimb bench gpu --from-records` rebuilds this page from them).\n\n"
        f"Work: `{header['config']}` with {header['clients']} clients, all training every round, "
        f"{records[0]['rounds']} rounds of {records[0]['local_epochs']} local epoch(s); the server scores the test "
        "set before and after each round. Each side is a fresh `fedimb run`; a GPU side gives each client that "
        "fraction of the card (`simulation.num_gpus`) and trains it on the GPU Ray assigned (`simulation.device="
        "cuda`), the CPU side runs the same clients on the CPU cores. GPU utilisation: the mean of `nvidia-smi` "
        f"samples every {SAMPLE_S} s over the rounds after round 1.\n\n{comparison}\n\n" + (notes or "")
    )
    return text.rstrip("\n") + "\n", comparison


def main(argv: list[str] | None = None) -> int:
    """Measure the GPU sides and the CPU side (unless --table-only / --from-records), then write the page."""
    parser = bench_parser("gpu", __doc__, DOC)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--clients", type=int, default=100, help="clients, all of them training each round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fractions", nargs="*", type=float, default=[0.0625],
                        help="GPU share per client of each GPU side (none: the CPU side alone)")
    parser.add_argument("--no-cpu", action="store_true", help="measure the GPU sides only")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one side may run")
    parser.add_argument("--out", default="runs/bench/gpu", help="measurements.jsonl and the sides' run directories")
    parser.add_argument("--table-only", action="store_true", help="run nothing: the page from the measurements so far")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every side")
    args, header, page = parse(parser, sys.argv[1:] if argv is None else argv)
    measurements = Path(args.out) / "measurements.jsonl"
    if not args.from_records:
        sides = [*args.fractions, *([] if args.no_cpu else [0.0])]
        if args.rounds < 3 or args.clients < 1 or not sides:
            raise ConfigError("--rounds", "give at least 3 rounds (round 1 starts the actors), 1 client and 1 side")
        if not args.table_only:
            check_cuda(args.fractions)
            for fraction in sides:
                load_config(ROOT / args.config, side_overrides(args.clients, args.rounds, fraction, args.overrides))
            stamp = Path(args.out).resolve() / time.strftime("%Y%m%d-%H%M%S")
            for fraction in sides:
                where = stamp / f"gpu-{fraction:g}"
                with GpuWatch() as watch:
                    record = overhead.run_side("fedimb", args.config,
                                               side_overrides(args.clients, args.rounds, fraction, args.overrides),
                                               where, args.timeout, name=f"gpu-{fraction:g}", fraction=fraction,
                                               clients=args.clients)
                record.update(gpu_samples=watch.samples, clients_per_gpu=replies_per_gpu_id(where / "run"))
                overhead.append(measurements, record)
        records = [r for r in overhead.collected(measurements, ("fraction", "clients", "rounds"))
                   if r["clients"] == args.clients and r["rounds"] == args.rounds]
        if not records:
            raise ConfigError("records", f"no measurement in {measurements}; {page.doc} is left as it is")
        header = {**header, **overhead.machine(), "config": args.config, "clients": args.clients, "card": card_name()}
        save_records(page, header, sorted(records, key=lambda r: -r["fraction"] if r["fraction"] else 1.0))
    return overhead.write_measured_page(page, build_page)


if __name__ == "__main__":
    sys.exit(guarded(main))
