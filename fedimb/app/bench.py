"""``fedimb bench NAME [ARGS]``: run a benchmark of ``benchmarks/`` (``python -m benchmarks.NAME`` alike).

Two names are not benchmarks:

    fedimb bench index [--check]            write docs/results/README.md, the index of every page
    fedimb bench rebuild [--check] [PAGE]   rebuild pages from their records (--check: compare, write nothing)

:data:`PAGES` lists every page under docs/results/ with what it shows and, for a page a
benchmark writes, the benchmark; the command that made the page and its date come from the
page's records (see :mod:`fedimb.app.pages`).
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import importlib.util
import inspect
import io
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from fedimb.app.pages import Page, commands_text
from fedimb.config import ConfigError
from fedimb.records import atomic_write_text
from fedimb.report import read_records

ROOT = Path(__file__).resolve().parents[2]  # the checkout: benchmarks/ and docs/ sit beside fedimb/
RESULTS = Path("docs/results")


@dataclass(frozen=True)
class Listed:
    """A page of docs/results/ as the index lists it."""

    page: str  # under docs/results/
    shows: str
    benchmark: str | None = None  # the benchmark that writes it from its records
    made_by: str = ""  # how a page no benchmark writes was made
    files: tuple[str, ...] = ()  # its data, under docs/results/, when it has no records


PAGES = (
    Listed("niid_bench.md", "NIID-Bench FMNIST rows (FedAvg on Dirichlet 0.5, 2 or 3 classes per client and noise "
                            "feature skew; FedProx, SCAFFOLD and FedNova on Dirichlet 0.5 and 3 classes per client, "
                            "each paired per seed with FedAvg) against the published table", benchmark="niid_bench"),
    Listed("imbalance.md", "Imbalance-aware methods on FMNIST-LT (rho 20 and 100), the CAFedCL-style floors, "
                           "convergence, and the tuning on a validation split", benchmark="imbalance"),
    Listed("fal.md", "Federated active learning on FMNIST-LT: learning curves of nine samplers, reduced protocol "
                     "with 10 rounds per stage, and FairFAL's floors", benchmark="fal"),
    Listed("fal_r20.md", "The same with 20 rounds per stage", benchmark="fal"),
    Listed("synthetic.md", "The federated diffusion generator (cost, speed, recognisability per class) and what "
                           "its top-up buys fedavg and cafedcl on FMNIST-LT rho 100, 5 seeds", benchmark="synthetic"),
    Listed("synthetic_tuning.md", "The top-up's loss weight, cap and sampler per method, chosen on a validation "
                                  "split", benchmark="synthetic"),
    Listed("synthetic_local.md", "Generators trained by each client alone against the federated one",
           benchmark="synthetic"),
    Listed("synthetic_generator_probe.md", "What lifts the federated generator's recognisability: training knobs "
                                           "and samplers, probed in one process without Flower",
           made_by="`python benchmarks/generator_probe.py …`, one call per row group; the page quotes each call",
           files=("synthetic/generator_probe.jsonl", "synthetic/sampler_probe.jsonl",
                  "synthetic/sampler_bench_generators.jsonl", "synthetic/grid_probe_class_aware_s0.png")),
    Listed("faults.md", "Failing and hostile clients on the quick-start federation (fedavg and cafedcl, 20 rounds): "
                        "crashes, a NaN, a x100 and sign-flipping clients, with and without a robust rule (trimmed "
                        "mean, Multi-Krum); paired per-seed differences to clean and the floors", benchmark="faults"),
    Listed("domains.md", "Acquisition domains on the quick-start federation (7 / 2 / 1 clients clean, rotated 90°, "
                         "inverted; 20 rounds, 3 seeds): fedavg with no top-up, a class-only and a (class, domain) "
                         "synthetic top-up, the closed loop, cafedcl with the pair top-up; test-set balanced accuracy "
                         "per domain and worst domain, paired differences and the floors", benchmark="domains"),
    Listed("deploy.md", "The quick-start experiment (fedavg and cafedcl, 20 rounds) simulated and deployed on 10 "
                        "loopback SuperNodes with TLS and node authentication: final metrics, seconds, CPU and bytes "
                        "per round side by side, and why a deployed round costs more", benchmark="deploy"),
    Listed("overhead.md", "What fedimb costs against a plain Flower 1.42 app and a bare PyTorch loop doing the same "
                          "work (10 clients, 3 rounds x 1 epoch and 1 round x 10 epochs): whole process, fixed cost, "
                          "rounds, memory, ratios and the floors", benchmark="overhead"),
    Listed("scale.md", "100 to 100,000 clients at 100 per round against a plain Flower 1.42 app: start-up, seconds "
                       "per round, peak memory of the whole process tree, ratios and the floors", benchmark="scale"),
    Listed("quickstart/", "The quick-start federation the README shows: its config, rounds, summary, curves and "
                          "partition heatmap", made_by="`make demo` (`fedimb run experiments/quickstart.yaml --out "
                                                       "runs/quickstart`), files copied from runs/quickstart",
           files=("quickstart",)),
)


def load_benchmark(name: str) -> ModuleType:
    """The module ``benchmarks/NAME.py`` of this checkout."""
    path = ROOT / "benchmarks" / f"{name}.py"
    if name.startswith("_") or not path.is_file():
        known = sorted(p.stem for p in (ROOT / "benchmarks").glob("[!_]*.py"))
        raise ConfigError("bench", f"no benchmark {name!r}; known: {', '.join(known + ['index', 'rebuild'])}")
    module_name = f"benchmarks.{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def run_benchmark(name: str, argv: list[str]) -> int:
    """Run a benchmark's ``main`` with ``argv`` (as ``python -m benchmarks.NAME ARGV`` would)."""
    main = load_benchmark(name).main
    if inspect.signature(main).parameters:
        return main(argv)
    saved, sys.argv = sys.argv, [f"fedimb bench {name}", *argv]
    try:
        return main() or 0
    finally:
        sys.argv = saved


def _data_date(listed: Listed, results: Path) -> str:
    """The day the page's data was written: its records' header, else the last commit of its files."""
    if listed.benchmark:
        return read_records(Page(results / listed.page).records)[0]["written"][:10]
    paths = [str(results / f) for f in listed.files] or [str(results / listed.page)]
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", *paths], capture_output=True, text=True,
                             cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out = ""
    return out or "unknown"


def _title(path: Path, listed: Listed) -> str:
    if path.is_file():
        return path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
    return "run directory"


def index_text(results: Path = RESULTS) -> str:
    """docs/results/README.md: every page, what it shows, how it was made and rebuilt, and its date."""
    lines = [
        "# Results",
        "",
        "Every page in this folder: what it shows, the command that made it, how to rebuild it without",
        "training, and the day its data was written. This file is written by `fedimb bench index` from",
        "the list in `fedimb/app/bench.py`; `fedimb bench rebuild --check` rebuilds every page from its",
        "records and names any file that comes out different.",
        "",
        "A page `NAME.md` keeps what it is built from in the folder `NAME/`: `records.jsonl.gz` (each run's",
        "config, rounds and summary, after a header line with the command that made the page),",
        "`notes.md` (the hand-written reading the page inserts) and its images. `fedimb report",
        "NAME/records.jsonl.gz` tabulates those runs as a sweep's report would.",
    ]
    for listed in PAGES:
        path = results / listed.page
        if listed.benchmark and not Page(path).records.is_file():  # listed before its first runs finished
            lines += ["", f"## {listed.page}: not written yet", "", f"{listed.shows}.", "",
                      f"- made by: `fedimb bench {listed.benchmark}` (its runs are under way)"]
            continue
        link = listed.page if path.is_file() else f"{listed.page.rstrip('/')}/"
        lines += ["", f"## [{link}]({link}): {_title(path, listed)}", "",
                  f"{listed.shows}. Data of {_data_date(listed, results)}.", ""]
        if listed.benchmark:
            page = Page(path)
            doc = "" if load_benchmark(listed.benchmark).DOC == str(RESULTS / listed.page) else f" --doc {RESULTS / listed.page}"
            lines += [f"- made by: {commands_text(read_records(page.records)[0])}",
                      f"- rebuilt from its records: `fedimb bench {listed.benchmark} --from-records{doc}`",
                      f"- beside it, in `{page.folder.name}/`: " + ", ".join(sorted(p.name for p in page.folder.iterdir()))]
        else:
            lines += [f"- made by: {listed.made_by}",
                      f"- its data: {', '.join(f'[{f}]({f})' for f in listed.files)}"]
    return "\n".join(lines) + "\n"


def write_index(results: Path = RESULTS, check: bool = False) -> int:
    """Write (or with ``check`` compare) ``results/README.md``; 1 when a check finds it out of date."""
    text, path = index_text(results), results / "README.md"
    if check:
        same = path.is_file() and path.read_text(encoding="utf-8") == text
        print(f"{path}: {'up to date' if same else 'out of date (fedimb bench index rewrites it)'}")
        return 0 if same else 1
    atomic_write_text(path, text)
    print(f"wrote {path}")
    return 0


def rebuild(names: list[str], results: Path = RESULTS, check: bool = False) -> int:
    """Rebuild pages from their records (all pages a benchmark writes, or ``names``).

    With ``check`` each page is rebuilt in a scratch copy of its files and compared byte for byte
    with the page as it is; returns 1 when any file differs (and names it).
    """
    listed = [p for p in PAGES if p.benchmark and (not names or p.page in names or p.page.removesuffix(".md") in names)]
    if names and len(listed) < len(names):
        raise ConfigError("rebuild", f"pages are {', '.join(p.page for p in PAGES if p.benchmark)}")
    pending = [p for p in listed if not Page(results / p.page).records.is_file()]  # no records yet: nothing to rebuild
    for entry in pending:
        print(f"{results / entry.page}: not written yet")
    listed = [p for p in listed if p not in pending]
    differ: list[str] = []
    for entry in listed:
        page = Page(results / entry.page)
        with tempfile.TemporaryDirectory() as tmp:
            target = Page(Path(tmp) / entry.page) if check else page
            if check:
                shutil.copytree(page.folder, target.folder)
                shutil.copyfile(page.doc, target.doc)
            with contextlib.redirect_stdout(io.StringIO()):  # the tables are the page's; only the verdict is printed
                code = run_benchmark(entry.benchmark, ["--from-records", "--doc", str(target.doc)])
            if code:
                return code
            if check:
                files = [target.doc, *sorted(p for p in target.folder.rglob("*") if p.is_file())]
                changed = [str(page.doc.parent / f.relative_to(tmp)) for f in files
                           if not filecmp.cmp(f, page.doc.parent / f.relative_to(tmp), shallow=False)]
                differ += changed
                print(f"{page.doc}: {'differs: ' + ', '.join(changed) if changed else 'identical'}")
            else:
                print(f"rebuilt {page.doc}")
    return 1 if differ else 0


def bench(name: str, argv: list[str]) -> int:
    """``fedimb bench NAME ARGV``."""
    if name in ("index", "rebuild"):
        parser = argparse.ArgumentParser(prog=f"fedimb bench {name}")
        parser.add_argument("--check", action="store_true", help="compare with the files as they are, write nothing")
        if name == "rebuild":
            parser.add_argument("pages", nargs="*", help="pages under docs/results (default: every page a benchmark writes)")
        args = parser.parse_args(argv)
        return write_index(check=args.check) if name == "index" else rebuild(args.pages, check=args.check)
    return run_benchmark(name, argv)
