"""The same experiment simulated and deployed on loopback SuperNodes: metrics, seconds and bytes per round.

    fedimb bench deploy                       # fedavg and cafedcl, each simulated and deployed (4 runs)
    fedimb bench deploy --flower-methods fedavg   # and fedavg deployed with Flower's process per message
    fedimb bench deploy --from-records        # rebuild docs/results/deploy.md, nothing run

experiments/quickstart.yaml (FMNIST-LT rho = 10, Dirichlet(0.5), 10 clients, LeNet) for
``--rounds`` rounds, seed 0, per method in ``--methods``:

- simulated: ``fedimb run`` on Ray with ``eval.federated=true``, so the federated metrics (the
  summed confusion matrices of the clients' local test splits) sit beside the central ones;
- deployed: the simulated split exported as site folders (``export_sites``), ``fedimb deploy
  init`` for site-0..site-9 at 127.0.0.1, a SuperLink with TLS and node authentication (its
  state in memory, or with ``--database`` in a database as COMMANDS.md starts it), the ten site
  keys registered, ten SuperNodes, then ``fedimb deploy run``; the server holds no data, so its
  metrics are the federated ones, from the same local test splits. Each site's ClientApp tasks
  fork from a preloaded process (``fedimb deploy superexec``, deploy init's default); the
  methods of ``--flower-methods`` are also deployed on a second set of SuperNodes that start
  Flower's own ``flwr-clientapp`` process per message (``deploy init --clientapp flower``).

Each run's records keep the seconds its whole command took and the CPU seconds of its
processes; the page sets final federated balanced accuracy, seconds per round (rounds 2 to the
last, start-up apart), CPU and payload bytes per round side by side, and checks the floors:
|Δ balanced accuracy| <= 1 point, and a deployed round costs at most 1.5 times a simulated one.
``docs/results/deploy/notes.md`` (hand-written) is inserted after the floors.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedimb.app.cli import guarded
from fedimb.app.pages import bench_parser, floors_section, floors_table, parse, records_of, save_records, table
from fedimb.report import read_records, run_of_record

DOC = "docs/results/deploy.md"
ROOT = Path(__file__).resolve().parent.parent
CONFIG = "experiments/quickstart.yaml"
BIN = Path(sys.executable).parent
SIDES = ("simulated", "deployed", "deployed, process per message")
MAX_POINTS = 1.0  # |Δ federated balanced accuracy| between the two sides, in points
MAX_RATIO = 1.5  # deployed seconds per round over simulated


def log(text: str) -> None:
    print(f"[deploy bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def method_overrides(method: str, rounds: int, extra: list[str]) -> list[str]:
    """The overrides both sides of one method run with."""
    # no round waits Flower's default hour for a reply that never comes
    return [f"name=deploy_{method}", f"federation.rounds={rounds}", f"strategy.name={method}",
            "eval.federated=true", "federation.round_timeout=900", *extra]


# Who a process is, from its name and command line: the first pattern found names its group (a ClientApp task
# forked warm keeps its fork server's command line and is named flwr-clientapp).
GROUPS = (("ClientApps", ("flwr-clientapp", "ClientAppActor")), ("ServerApp", ("flwr-serverapp",)),
          ("SuperLink", ("flower-superlink",)), ("SuperNodes", ("flower-supernode",)),
          ("SuperExecs", ("superexec", "clientapp_forkserver")),
          ("commands", ("bin/fedimb", "bin/flwr")), ("Ray", ("ray",)))


Process = tuple[int, int]  # pid, start time in clock ticks


def group_of(cmdline: bytes) -> str:
    """The group of :data:`GROUPS` a process belongs to (its name and command line), or ``other``."""
    return next((name for name, patterns in GROUPS if any(p.encode() in cmdline for p in patterns)), "other")


class CpuWatch:
    """CPU seconds of the processes carrying the environment entry ``marker``, sampled from /proc.

    A thread reads every such process's user + system time every ``every`` seconds; a process
    that existed at the start counts from what it had then. A process's last fraction of a
    sample is missed, and so is one that lives less than a sample.
    """

    def __init__(self, marker: str, every: float = 0.25) -> None:
        self.marker, self.every = marker.encode(), every
        self.tick = os.sysconf("SC_CLK_TCK")
        self.chosen: dict[Process, bool] = {}
        self.group: dict[Process, str] = {}
        self.first: dict[Process, float] = {}
        self.last: dict[Process, float] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> CpuWatch:
        self.sample(initial=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self.done.wait(self.every):
            self.sample()

    def _carries_marker(self, proc: Path, key: Process) -> bool:
        if key not in self.chosen:
            try:
                self.chosen[key] = self.marker in (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                return False
        return self.chosen[key]

    def sample(self, initial: bool = False) -> None:
        """Read the CPU time of every chosen process now."""
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                stat = (proc / "stat").read_text()
                fields = stat.rsplit(") ", 1)[-1].split()
                key = (int(proc.name), int(fields[19]))  # pid and start time: pids wrap around in a long run
                if not self._carries_marker(proc, key):
                    continue
                cmdline = (proc / "cmdline").read_bytes()  # read again: a new process may not have exec'd yet
            except OSError:
                continue
            seconds = (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime
            self.first.setdefault(key, seconds if initial else 0.0)
            self.last[key] = seconds
            if cmdline:  # a zombie's is empty: keep what it was
                self.group[key] = group_of(stat[stat.index("(") + 1: stat.rindex(")")].encode() + b"\0" + cmdline)

    def by_group(self) -> dict[str, dict[str, float]]:
        """Per group: its processes (``count``) and their CPU seconds since the start (``cpu_s``)."""
        out: dict[str, dict[str, float]] = {}
        for key, last in self.last.items():
            entry = out.setdefault(self.group.get(key, "other"), {"count": 0, "cpu_s": 0.0})
            entry["count"] += 1
            entry["cpu_s"] = round(entry["cpu_s"] + last - self.first[key], 2)
        return dict(sorted(out.items()))


def timed(cmd: list[str], marker: str, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` from the checkout (its output shown) and fail on a non-zero exit; return its wall
    seconds, the load before it, and the CPU seconds of the processes carrying ``marker`` by group."""
    log(" ".join(cmd))
    load = round(os.getloadavg()[0], 2)
    started = time.perf_counter()
    with CpuWatch(marker) as watch:
        done = subprocess.run(cmd, cwd=ROOT, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        from fedimb.app.simulation import RunError

        raise RunError(f"{' '.join(cmd[:3])} failed with exit code {done.returncode}; see the output above")
    return {"command_s": round(seconds, 2), "load_before": load, "cpu": watch.by_group()}


def simulate(method: str, overrides: list[str], out: Path) -> dict[str, Any]:
    """``fedimb run`` with federated evaluation beside the central one; the run's record."""
    run_dir = out / f"simulated-{method}"
    marker = f"FEDIMB_BENCH_RUN={run_dir.resolve()}"  # Ray's processes inherit it from the command
    env = {**os.environ, marker.split("=", 1)[0]: marker.split("=", 1)[1]}
    measured = timed([str(BIN / "fedimb"), "run", CONFIG, *overrides, "--out", str(run_dir)], marker, env)
    return records_of([run_dir], side="simulated", method=method, **measured)[0]


def side_of(record: dict[str, Any]) -> str:
    """The page's name for a record's side; a deployed record without ``clientapp`` predates the warm
    launcher and started Flower's process per message."""
    if record["side"] != "deployed":
        return record["side"]
    return "deployed" if record.get("clientapp") == "warm" else "deployed, process per message"


def deploy(methods: list[str], overrides: dict[str, list[str]], out: Path, database: bool,
           clientapp: str = "warm") -> list[dict[str, Any]]:
    """Export the split, ``deploy init --clientapp CLIENTAPP``, bring up the SuperLink and one SuperNode per
    site, run each method."""
    from fedimb.app.loopback import LoopbackDeployment, free_port
    from fedimb.config import load_config
    from fedimb.data.site_export import export_sites, site_folder_name

    cfg = load_config(ROOT / CONFIG, overrides[methods[0]])
    sites = out / "sites"
    if not sites.is_dir():
        export_sites(cfg, sites)
    out = out / clientapp
    names = ",".join(site_folder_name(i) for i in range(cfg.federation.num_clients))
    init = [str(BIN / "fedimb"), "deploy", "init", "--sites", names, "--host", "127.0.0.1", "--port", str(free_port()),
            "--data-root", str(sites.resolve()), "--clientapp", clientapp, "--out", str(out / "deploy")]
    log(" ".join(init))
    subprocess.run(init, cwd=ROOT, check=True)
    records = []
    with LoopbackDeployment(out / "deploy", out / "work") as fed:
        started = time.perf_counter()
        fed.start_superlink(database=database)
        fed.start_sites()
        up_s = round(time.perf_counter() - started, 2)
        log(f"SuperLink and {cfg.federation.num_clients} SuperNodes online after {up_s:.1f} s")
        for method in methods:
            runs = out / f"deployed-{method}"
            # every process of the deployment carries its FLWR_HOME: SuperLink, SuperNodes, their apps
            measured = timed([str(BIN / "fedimb"), "deploy", "run", CONFIG, *overrides[method], "--connection",
                              fed.plan.connection, "--flwr-home", fed.env["FLWR_HOME"], "--out", str(runs),
                              "--timeout", "7200"], f"FLWR_HOME={fed.env['FLWR_HOME']}", fed.env)
            run_dir = next(p for p in runs.iterdir() if (p / "summary.json").is_file())
            records += records_of([run_dir], side="deployed", method=method, deployment_up_s=up_s,
                                  superlink_database=database, clientapp=clientapp, **measured)
    return records


def _stop(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def machine() -> str:
    """Architecture, CPU model and core count of this machine."""
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), "")
    return f"{platform.machine()}, {model or platform.processor() or 'cpu'}, {os.cpu_count()} cores"


# --- the page --------------------------------------------------------------------------------


def figures(record: dict[str, Any], where: Path) -> dict[str, Any]:
    """What the page shows of one run: final metrics, time, CPU and bytes."""
    run = run_of_record(record, where)
    rows = [r for r in run["rounds"] if r["round"] >= 1]
    first, last = rows[0], rows[-1]
    per_round = (last["wall_time_s"] - first["wall_time_s"]) / (last["round"] - first["round"])
    final = run["summary"]["final"]
    fed = "federated_" if record["side"] == "simulated" else ""  # a deployed server's main columns are federated
    setup = run["summary"].get("setup_bytes", {})
    return {
        **{key: 100 * final[f"{fed}{key}"] for key in ("balanced_accuracy", "accuracy", "macro_f1", "tail_recall")},
        "central": 100 * final["balanced_accuracy"] if fed else None,
        "client_std": 100 * final["client_accuracy_std"],
        "rounds": int(last["round"]),
        "per_round_s": per_round,
        "startup_s": record["command_s"] - last["round"] * per_round,
        "sent": sum(r["bytes_sent"] for r in rows) / len(rows),
        "received": sum(r["bytes_received"] for r in rows) / len(rows),
        "setup": setup.get("bytes_sent", 0) + setup.get("bytes_received", 0),
        "command_s": record["command_s"],
        "load_before": record["load_before"],
        "cpu": record["cpu"],
        "messages": messages(run["config"], int(last["round"])),
    }


def messages(config: dict[str, Any], rounds: int) -> int:
    """Messages the server sends a run's clients: the hello, then a train and an evaluate message
    per round to every client (all sampled, client-side evaluation every round, as here)."""
    fed, every = config["federation"], config["eval"]["client_every"]
    assert fed["fraction"] == fed["fraction_evaluate"] == 1.0 and every == 1, "a run that samples fewer clients"
    return fed["num_clients"] * (1 + 2 * rounds)


def rows_of(method: str, side: str, f: dict[str, Any], groups: list[str]) -> tuple[list[str], ...]:
    """One run's row in the metrics, the time-and-bytes and the CPU tables."""
    central = "n/a (no data on the server)" if f["central"] is None else f"{f['central']:.2f}"
    cpu, rounds = f["cpu"], f["rounds"]
    apps = cpu.get("ClientApps", {"count": 0, "cpu_s": 0.0})["cpu_s"]
    total = sum(g["cpu_s"] for g in cpu.values())
    return ([method, side, *(f"{f[k]:.2f}" for k in ("balanced_accuracy", "accuracy", "macro_f1", "tail_recall")),
             central, f"{f['client_std']:.2f}"],
            [method, side, f"{f['per_round_s']:.2f}", f"{f['startup_s']:.1f}", f"{f['command_s']:.1f}",
             f"{f['sent']:,.0f}", f"{f['received']:,.0f}", f"{f['setup']:,}"],
            [method, side, f"{total / rounds:.1f}",
             *(f"{cpu[g]['cpu_s'] / rounds:.1f}" if g in cpu else "" for g in groups),
             f"{f['messages']}", f"{apps / f['messages']:.2f}", f"{f['load_before']:.2f}"])


FLOWER_SIDE = (
    "- **deployed, process per message**: the same with `deploy init --clientapp flower`, a second set of ten "
    "SuperNodes that start Flower's own SuperExec, which starts a new `flwr-clientapp` process for every message.\n")
INTRO = (
    "- **simulated**: `fedimb run CONFIG ... eval.federated=true`, Flower's simulation engine on Ray "
    "(1 CPU per virtual client, so two clients at a time on two cores); the server holds the test set and "
    "also records the federated metrics.\n"
    "- **deployed**: the simulated split written as one folder per site (`export_sites`: each partition's "
    "training samples and exactly the local test split the simulated client evaluates on), `fedimb deploy "
    "init` for site-0 … site-9 at 127.0.0.1, a SuperLink with TLS and node authentication ({state}), the "
    "ten keys registered and ten SuperNodes started (online after {up:.1f} s, once for both methods), then "
    "`fedimb deploy run CONFIG ...`. The server holds no data: its metrics are the federated ones. Each site's "
    "ClientApp tasks fork from a process that imported Flower's runtime, numpy and torch once (`fedimb deploy "
    "superexec` beside a SuperNode with `--isolation process`, `deploy init`'s default).\n{flower}\n"
    "Both sides run with `eval.federated=true federation.round_timeout=900` (no round waits Flower's "
    "default hour) and evaluate the same way: federated metrics are those of the "
    "summed confusion matrices of the sites' local test splits, in percent.\n\n"
)


def build_page(records: list[dict[str, Any]], where: Path, header: dict[str, Any], notes: str) -> tuple[str, str]:
    """The page's text and its floors table (printed)."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    got = {(r["method"], side_of(r)): figures(r, where) for r in records}
    used = {g for f in got.values() for g, entry in f["cpu"].items() if entry["cpu_s"] > 0}
    groups = [g for g, _ in GROUPS if g in used] + sorted(used - {g for g, _ in GROUPS})
    metrics, costs, cpu, checks = [], [], [], []
    for method in methods:
        for side in (side for side in SIDES if (method, side) in got):
            for rows, row in zip((metrics, costs, cpu), rows_of(method, side, got[(method, side)], groups)):
                rows.append(row)
        # the floors are the default deployment's: warm ClientApps when this call ran them
        sim, dep = got[(method, "simulated")], got.get((method, "deployed"), got.get((method, SIDES[2])))
        checks += [([method, "federated balanced accuracy: deployed − simulated, absolute (points)"],
                    abs(dep["balanced_accuracy"] - sim["balanced_accuracy"]), "<=", MAX_POINTS),
                   ([method, "deployed ÷ simulated seconds per round"], dep["per_round_s"] / sim["per_round_s"],
                    "<=", MAX_RATIO)]
    floor_text, ok = floors_table(["method", "floor", "measured", "needed", "holds"], checks, signed=False)
    rounds = got[(methods[0], "simulated")]["rounds"]
    deployed = next(r for r in records if r["side"] == "deployed")
    warm_vs_flower = [f"{method} {got[(method, SIDES[2])]['per_round_s'] / got[(method, 'deployed')]['per_round_s']:.1f}×"
                      for method in methods if (method, "deployed") in got and (method, SIDES[2]) in got]
    up = deployed["deployment_up_s"]
    flower = FLOWER_SIDE if any(side == SIDES[2] for _, side in got) else ""
    state = ("its state in a database, as COMMANDS.md starts it" if deployed["superlink_database"]
             else "its state in memory: COMMANDS.md's `--database` lost site replies under this load, see below")
    text = (
        "# Simulated and deployed: the same experiment both ways\n\n"
        f"Command: `{header['command']}`  \n"
        f"Machine: {header['machine']}; written {header['written']}.  \n"
        f"Experiment: `{CONFIG}` (Fashion-MNIST, global exp long tail rho = 10, Dirichlet(0.5) over 10 clients, "
        f"all sampled, LeNet, 1 local epoch) for {rounds} rounds, seed 0: one seed, so each figure is one run "
        "and no spread is given.\n\n" + INTRO.format(up=up, state=state, flower=flower)
        + f"## Final metrics (round {rounds})\n\n"
        + table(["method", "run", "federated balanced acc.", "federated acc.", "federated macro-F1",
                 "federated tail recall", "central balanced acc.", "client acc. std"], metrics)
        + "\n\n## Time and bytes\n\n"
        f"Seconds per round: (wall time after round {rounds} − after round 1) / {rounds - 1}, the rounds' own "
        f"time. Start-up: the whole command's seconds less {rounds} such rounds (process and Ray start, building "
        "and submitting the app, the hello phase, the end of the run). Bytes: payload of the messages the "
        "server sends and receives (records, without the transport's framing), mean per round; set-up is the "
        "hello phase's, both directions.\n\n"
        + table(["method", "run", "s / round", "start-up (s)", "whole command (s)", "bytes sent / round",
                 "bytes received / round", "set-up bytes"], costs)
        + (f"\n\nA round deployed with a process per message took, over one with warm ClientApps: "
           f"{', '.join(warm_vs_flower)}." if warm_vs_flower else "")
        + "\n\n## CPU\n\n"
        f"CPU seconds (user + system) per round (whole run ÷ {rounds}) of every process of the run, sampled "
        "from /proc every 0.25 s, by group: simulated, the `fedimb run` command (which is also the server) and "
        "its Ray processes, the clients being Ray actors that live through the run; deployed, every process of "
        "the deployment during the command: the SuperLink, the SuperNodes, the SuperExecs that start apps (with "
        "their fork servers), the ServerApp, one ClientApp process per message a site receives (forked warm, or a "
        "new `flwr-clientapp`), and the `fedimb deploy run` / `flwr` "
        "commands. Messages to clients: the hello, then a train and an evaluate message per round to each of "
        "the 10 clients. Load before: the machine's one-minute load average as the run started (it lags: the run "
        "before it still counts for a minute or so).\n\n"
        + table(["method", "run", "all", *groups, "messages to clients", "ClientApp CPU s / message",
                 "load before"], cpu)
        + f"\n\n{floors_section(floor_text, ok)}"
        + (notes if notes else "")
    )
    return text.rstrip("\n") + "\n", floor_text


def main(argv: list[str] | None = None) -> int:
    """Run both sides of every method (unless --from-records), then write the page."""
    parser = bench_parser("deploy", __doc__, DOC)
    parser.add_argument("--methods", nargs="+", default=["fedavg", "cafedcl"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--flower-methods", nargs="*", default=[],
                        help="methods also deployed with Flower's own SuperExec (a new ClientApp process per message), "
                             "for comparison")
    parser.add_argument("--database", action="store_true",
                        help="the SuperLink keeps its state in a database, as COMMANDS.md starts it (default: in "
                             "memory; under this load its SQLite state lost site replies, see the page)")
    parser.add_argument("--out", default="runs/bench/deploy",
                        help="scratch folder; each call writes a new timestamped folder under it")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args, header, page = parse(parser, sys.argv[1:] if argv is None else argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: seconds per round leave round 1 out")
    unknown = sorted(set(args.flower_methods) - set(args.methods))
    if unknown:
        parser.error(f"--flower-methods {' '.join(unknown)}: not among --methods {' '.join(args.methods)}")
    if not args.from_records:
        signal.signal(signal.SIGTERM, _stop)  # so the deployment's processes are stopped on the way out
        out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
        overrides = {m: method_overrides(m, args.rounds, args.overrides) for m in args.methods}
        simulated = [simulate(m, overrides[m], out) for m in args.methods]
        deployed = deploy(args.methods, overrides, out, args.database)
        if args.flower_methods:
            deployed += deploy(args.flower_methods, overrides, out, args.database, clientapp="flower")
        header = {**header, "machine": machine()}
        save_records(page, header, [r for m in args.methods for r in simulated + deployed if r["method"] == m])
    header, records = read_records(page.records)
    text, floor_text = build_page(records, page.records, header, page.notes())
    print(f"{floor_text}\nwrote {page.write(text)}")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
