"""Synthetic minority samples on FMNIST-LT: the federated generator and what its top-up buys.

    fedimb bench synthetic --seeds 0 1 2 3 4                # generator + fedavg / +synthetic / cafedcl+synthetic
    fedimb bench synthetic --seeds 0 --methods fedavg_syn   # the generator table only needs one synthetic run
    # the top-up's knobs, chosen on a validation split (docs/results/synthetic_tuning.md):
    fedimb bench synthetic --suite experiments/suites/synthetic_tuning.yaml --seeds 0 1
        --methods fedavg fedavg_syn fedavg_syn_w0.5 fedavg_syn_w0.25 fedavg_syn_r0.5 fedavg_syn_w0.5_g2r0.7
        fedavg_syn_w0.5_g2.5r1 fedavg_syn_w0.5_g2.5r1_tail1.5 cafedcl_syn_w1 cafedcl_syn_w0.5
        cafedcl_syn_w0.5_g2.5r1 cafedcl_syn_w0.5_g2.5r1_tail1.5
        --out runs/sweeps/synthetic_tuning --doc docs/results/synthetic_tuning.md
    # generators trained by each client alone against the federated one:
    fedimb bench synthetic --seeds 0 1 2 --methods fedavg fedavg_syn fedavg_syn_local --doc docs/results/synthetic_local.md
    fedimb bench synthetic --from-records [--doc PAGE]      # a page again from its records, nothing trained
    fedimb bench synthetic --add --seeds 0 1 2 3 4 --methods cafedcl_syn   # rerun one method beside the others

Runs the cells of experiments/suites/synthetic_fmnist.yaml (or --suite; FMNIST-LT rho = 100, dir_balance
alpha = 0.1, 10 clients) through the sweep runner, seeds outermost, finished runs reused. Each
seed's generator is trained once, federated, by its first synthetic run and reused from the cache
by the others. Prints and writes to docs/results/synthetic.md (or --doc):
  1. the generator per seed: parameters, federated rounds × local steps, training wall time,
     DDIM steps, guided sampling images/s, recognisability per class (a LeNet trained on the
     real balanced training set labels 100 generated samples per class);
  2. metrics on the evaluation split (the test set unless the suite says otherwise) per method
     (mean of each run's last 5 rounds, as the imbalance benchmark),
     mean ± std over seeds, the deltas to fedavg and the floors, and recall per class;
  3. the hand-written notes beside the page (docs/results/synthetic/notes.md for the default), if any.
The runs' records and each seed's sample grid go beside the page (docs/results/synthetic/).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from fedimb.app.cli import guarded
from fedimb.app.pages import (CallRecords, PageRun, add_option, bench_parser, by_label, command_line, floors_section,
                              floors_table, margin_note, margin_within_noise, mean_std, noise_note, paired_by_seed,
                              paired_text, parse, store_runs, table)
from fedimb.app.sweep import PlannedRun, choose, execute, failure, plan_sweep
from fedimb.report import REPORT_METRICS as METRICS
from fedimb.report import collect_runs, last_rounds_mean

DOC = "docs/results/synthetic.md"
ROOT = Path(__file__).resolve().parent.parent
FLOORS = {"tail_recall": 5.0, "balanced_accuracy": 2.0}  # points over fedavg


def _sampler_text(scale: float, rescale: float) -> str:
    return f"{scale:g}" + (f", rescale {rescale:g}" if rescale else "")


def _guidance(synthetic_cfg) -> str:
    text = _sampler_text(synthetic_cfg.guidance_scale, synthetic_cfg.guidance_rescale)
    tail_scale, tail_rescale = synthetic_cfg.tail_guidance_scale, synthetic_cfg.tail_guidance_rescale
    if tail_scale is None and tail_rescale is None:
        return text
    tail = _sampler_text(synthetic_cfg.guidance_scale if tail_scale is None else tail_scale,
                         synthetic_cfg.guidance_rescale if tail_rescale is None else tail_rescale)
    return f"{text}; tail classes {tail}"


LOCAL_LABEL = "; local generators"


def _generator_label(synthetic_cfg) -> str:
    """What a generator row stands for: the sampler, and whether the clients trained generators of their own."""
    return _guidance(synthetic_cfg) + (LOCAL_LABEL if synthetic_cfg.training == "local" else "")


def generator_table(reports: dict[tuple[int, str], dict], synthetic_cfg, num_clients: int) -> str:
    """One row per seed and sampler: cost, speed and recognisability of the seed's federated generator."""
    rows = []
    for (seed, guidance), rep in sorted(reports.items()):
        per_class = " ".join("–" if v is None else f"{v:.2f}" for v in rep["recognisability"])  # None: no client holds it
        rows.append([f"{seed}", f"{synthetic_cfg.generator_size}", f"{synthetic_cfg.prediction}",
                     f"{rep.get('generator_params', 0):,}",
                     f"{synthetic_cfg.rounds} × {synthetic_cfg.local_steps} × {num_clients}",
                     f"{rep['generator_training_s'] / 60:.1f}", f"{rep['ddim_steps']}", f"{guidance}",
                     f"{rep['sampling_images_per_s']:.1f}", f"{rep['mean_recognisability']:.3f}",
                     f"{rep['min_recognisability']:.3f}", per_class])
    return table(["seed", "size", "predicts", "params", "rounds × local steps × clients", "training (min)",
                  "DDIM steps", "guidance", "images/s", "mean recog.", "min recog.", "per class"], rows)


# the generator floors on 2 cores: (summary key, scale, needed, True if it is a ceiling)
GENERATOR_FLOORS = {"training (min)": ("generator_training_s", 1 / 60, 20.0, True),
                    "images/s": ("sampling_images_per_s", 1.0, 20.0, False),
                    "mean recog.": ("mean_recognisability", 1.0, 0.7, False),
                    "min recog.": ("min_recognisability", 1.0, 0.4, False)}


def generator_floor_lines(reports: dict[tuple[int, str], dict]) -> tuple[str, bool]:
    """Markdown rows checking the generator floors on every seed (and sampler, when methods differ).

    The floors are the federated generator's: rows of local generators are shown in the table, not checked.
    """
    reports = {key: rep for key, rep in reports.items() if not key[1].endswith(LOCAL_LABEL)}
    several = len({guidance for _, guidance in reports}) > 1
    checks = []
    for (seed, guidance), rep in sorted(reports.items()):
        row = f"{seed} (guidance {guidance})" if several else f"{seed}"
        for name, (key, scale, needed, ceiling) in GENERATOR_FLOORS.items():
            checks.append(([row, name], rep[key] * scale, "<=" if ceiling else ">=", needed))
    return floors_table(["seed", "floor", "measured", "needed", "holds"], checks, signed=False)


def paired(finals: dict[str, list[dict]], ours: str, other: str, metric: str) -> np.ndarray:
    """Per-seed differences ours − other of ``metric``, in points, over the seeds both ran."""
    by = {label: {int(f["seed"]): 100 * float(f[metric]) for f in finals[label]} for label in (ours, other)}
    return paired_by_seed(by[ours], by[other])


def floor_lines(finals: dict[str, list[dict]]) -> tuple[str, bool]:
    """Markdown rows checking the floors (points over fedavg) for every synthetic method, each measured by the
    mean of its per-seed paired differences (the seeds both ran), with a note where they are within noise."""
    if "fedavg" not in finals or not finals["fedavg"]:
        return "(no fedavg runs: floors not checked)", False
    checks, within, thin = [], [], []
    for label, runs in finals.items():
        if label == "fedavg" or not runs:
            continue
        for metric, needed in FLOORS.items():
            diffs, name = paired(finals, label, "fedavg", metric), f"{label}, {metric} over fedavg"
            text = paired_text(diffs)
            checks.append(([f"{label} (n = {len(diffs)})", f"{metric} over fedavg", text],
                           float(diffs.mean()) if len(diffs) else float("nan"), ">=", needed))
            if "within noise" in text:
                within.append(name)
            elif margin_within_noise(diffs, needed):
                thin.append(name)
    text, ok = floors_table(["method", "floor", "paired per seed (mean ± std)", "measured", "needed", "holds"], checks)
    return text + noise_note(within) + margin_note(thin), ok


def method_table(finals: dict[str, list[dict]]) -> str:
    """Mean ± std over seeds of the metrics, in percent, plus the per-seed paired differences to fedavg."""
    rows = []
    for label, runs in finals.items():
        cells = [mean_std(100 * np.array([f[metric] for f in runs])) for metric in METRICS]
        deltas = ["", ""]
        if finals.get("fedavg") and label != "fedavg":
            deltas = [paired_text(paired(finals, label, "fedavg", m)) for m in ("balanced_accuracy", "tail_recall")]
        rows.append([label, f"{len(runs)}", *cells, *deltas])
    return table(["method", "seeds", *METRICS, "Δ bal. acc. (paired per seed)", "Δ tail recall (paired per seed)"],
                 rows)


def per_class_table(runs: dict[str, list[PageRun]], last_rounds: int) -> str:
    """Recall of every class per method (mean over seeds of each run's last-rounds mean), in percent."""
    rows: dict[str, np.ndarray] = {}
    for label, members in runs.items():
        per_run = []
        for member in members:
            rounds = member.run["rounds"]
            names = sorted((k for k in rounds[-1] if k.startswith("per_class_recall_")),
                           key=lambda k: int(k.rsplit("_", 1)[1])) if rounds else []
            per_run.append([last_rounds_mean(rounds, k, max(last_rounds, 1)) for k in names])
        if per_run:
            rows[label] = 100 * np.mean(np.array(per_run, dtype=float), axis=0)
    if not rows:
        return "(no runs)"
    classes = len(next(iter(rows.values())))
    return table(["method", *(str(c) for c in range(classes))],
                 [[label, *(f"{v:.1f}" for v in values)] for label, values in rows.items()])


def topup_knobs(runs: list) -> str:
    """The synthetic:real cap and loss weight of the synthetic runs: one pair, or each method's (and its sampler)."""
    knobs = {r.label: (r.cfg.synthetic.max_ratio, r.cfg.synthetic.loss_weight, _guidance(r.cfg.synthetic))
             for r in runs if r.cfg.synthetic.enabled}
    if len(set(knobs.values())) <= 1:
        cap, weight, _ = next(iter(knobs.values()), (None, None, None))
        return "no synthetic run" if cap is None else f"synthetic:real ≤ {cap:g}, loss weight {weight:g}"
    samplers_differ = len({guidance for _, _, guidance in knobs.values()}) > 1
    return (f"synthetic:real cap{', loss weight and guidance' if samplers_differ else ' and loss weight'} per method: "
            + ", ".join(f"{label} ≤ {cap:g} / {weight:g}" + (f" / {guidance}" if samplers_differ else "")
                        for label, (cap, weight, guidance) in knobs.items()))


def copy_grids(runs: list[PlannedRun], folder: Path) -> None:
    """Each seed's sample grid from its first run that drew one (local generators' images stay on the clients)."""
    folder.mkdir(parents=True, exist_ok=True)
    seeds: set[int] = set()
    for run in runs:
        grid = run.run_dir / "synthetic_grid.png"
        if grid.is_file() and run.cfg.seed not in seeds:
            shutil.copyfile(grid, folder / f"grid_s{run.cfg.seed}.png")
            seeds.add(run.cfg.seed)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen methods and seeds, print the tables and write the page."""
    parser = bench_parser("synthetic", __doc__, DOC)
    parser.add_argument("--methods", nargs="+", default=["fedavg", "fedavg_syn", "cafedcl_syn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--suite", default="experiments/suites/synthetic_fmnist.yaml",
                        help="the sweep whose cells --methods names (default: the test-set comparison)")
    parser.add_argument("--out", default="runs/sweeps/synthetic_fmnist")
    parser.add_argument("--last-rounds", type=int, default=5, metavar="K",
                        help="average each run's last K rounds (0: final round only), as the imbalance benchmark")
    add_option(parser)
    parser.add_argument("overrides", nargs="*")
    args, header, page = parse(parser, sys.argv[1:] if argv is None else argv)

    failed: list[str] = []
    if not args.from_records:
        records = CallRecords(page, header, args.add)
        planned, sweep_dir = plan_sweep(ROOT / args.suite, args.overrides, Path(args.out), seeds=args.seeds)
        chosen = choose(planned, args.methods, seeds_outermost=True, field="methods")
        finished, failed = execute(chosen, sweep_dir, on_finished=lambda run: records.keep([run.run_dir]))
        copy_grids(finished, page.folder)
        store_runs(records, [r.run_dir for r in finished], failed, len(chosen))
    header = page.header()
    runs = page.runs()
    # added runs sit beside earlier calls' methods, so the page shows every method it holds
    methods_shown = list(dict.fromkeys(r.label for r in runs)) if args.add else args.methods
    reports: dict[tuple[int, str], dict] = {}  # (seed, sampler and where trained): the quality report of its pools
    for run in runs:
        key = (run.seed, _generator_label(run.cfg.synthetic))
        if "synthetic" in run.summary and key not in reports:
            reports[key] = run.summary["synthetic"]
    # one grid per seed with a federated generator, copied beside the page when its run drew it
    grid_seeds = sorted({run.seed for run in runs if "synthetic" in run.summary and run.cfg.synthetic.training != "local"
                         and (page.folder / f"grid_s{run.seed}.png").is_file()})
    # metrics as the imbalance benchmark reads them: the mean of each run's last K rounds
    rows = collect_runs([r.run for r in runs], last_rounds=args.last_rounds)
    finals: dict[str, list[dict]] = {label: [] for label in methods_shown}
    for run, row in zip(runs, rows, strict=True):
        finals[run.label].append(row)
    first = runs[0].cfg
    # the generator's knobs as a run that trained one saw them (a run without the block does not use them)
    syn_cfg = next((r.cfg.synthetic for r in runs if r.cfg.synthetic.enabled), first.synthetic)
    fed, train = first.federation, first.train
    gen = generator_table(reports, syn_cfg, fed.num_clients)
    methods = method_table({k: v for k, v in finals.items() if v})
    classes = per_class_table(by_label(runs, methods_shown), args.last_rounds)
    split = "test set" if first.eval.split == "test" else f"{first.eval.split} split"
    decay = "".join(f", lr × {train.lr_decay_factor:g} after round {int(at * fed.rounds)}" for at in train.lr_decay_at)
    window = (f"mean of each run's last {args.last_rounds} rounds" if args.last_rounds > 0 else "final round")
    generator_floors, generator_ok = generator_floor_lines(reports)
    classifier_floors, classifier_ok = floor_lines(finals)
    floors_text, floors_ok = f"{generator_floors}\n\n{classifier_floors}", generator_ok and classifier_ok
    setting = (f"FMNIST-LT rho=100, dir_balance alpha=0.1, {fed.num_clients} clients, {first.model.name}, "
               f"{fed.rounds} rounds × {train.local_epochs} local epochs (lr {train.lr:g}{decay}); "
               f"top-up policy {syn_cfg.policy}, to the client's largest class, " + topup_knobs(runs))
    print(setting)
    print(gen)
    print(methods)
    print(floors_text)
    print(classes)
    images = "\n".join(f"![generated samples, seed {s}]({page.folder.name}/grid_s{s}.png)" for s in grid_seeds)
    title_split = "" if split == "test set" else f" ({split})"
    page.write(
        f"# Synthetic minority samples on FMNIST-LT{title_split}\n\n"
        f"{command_line(header)}"
        f"  \nWritten {header['written']}. Setting: {setting}.\n\n## The federated generator\n\n"
        "Training wall time covers the whole federated generator phase (Flower rounds included) on "
        "this machine; images/s is guided DDIM sampling of 100 images per class in the server process. "
        f"Recognisability: the share of a class's generated samples that a LeNet trained on the real "
        f"balanced training set assigns to that class.\n\n{gen}\n\n{images}\n\n"
        f"## Classifier federation ({window}, {split}, %)\n\n{methods}\n\n{floors_section(floors_text, floors_ok)}"
        f"## Recall per class ({window}, {split}, %)\n\n"
        f"{classes}\n\n{page.notes()}")
    if failed:
        raise failure(failed, len(chosen), page.doc, "the page")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
