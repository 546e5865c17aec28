"""Synthetic minority samples on FMNIST-LT: the federated generator and what its top-up buys.

    python benchmarks/synthetic.py --seeds 0 1 2 3 4                # generator + fedavg / +synthetic / cafedcl+synthetic
    python benchmarks/synthetic.py --seeds 0 --methods fedavg_syn   # the generator table only needs one synthetic run
    # the top-up's knobs, chosen on a validation split (docs/results/synthetic_tuning.md):
    python benchmarks/synthetic.py --suite experiments/suites/synthetic_tuning.yaml --seeds 0 1
        --methods fedavg fedavg_syn fedavg_syn_w0.5 fedavg_syn_w0.25 fedavg_syn_r0.5 fedavg_syn_w0.5_g2r0.7
        fedavg_syn_w0.5_g2.5r1 fedavg_syn_w0.5_g2.5r1_tail1.5 cafedcl_syn_w1 cafedcl_syn_w0.5
        cafedcl_syn_w0.5_g2.5r1 cafedcl_syn_w0.5_g2.5r1_tail1.5
        --out runs/sweeps/synthetic_tuning --doc docs/results/synthetic_tuning.md
        --records docs/results/synthetic_tuning/records
    # generators trained by each client alone against the federated one:
    python benchmarks/synthetic.py --seeds 0 1 2 --methods fedavg fedavg_syn fedavg_syn_local
        --doc docs/results/synthetic_local.md --records docs/results/synthetic_local/records

Runs the cells of experiments/suites/synthetic_fmnist.yaml (or --suite; FMNIST-LT rho = 100, dir_balance
alpha = 0.1, 10 clients; seeds outermost, finished runs reused). Each seed's generator is
trained once, federated, by its first synthetic run and reused from the cache by the others.
Prints and writes to docs/results/synthetic.md (or --doc):
  1. the generator per seed: parameters, federated rounds × local steps, training wall time,
     DDIM steps, guided sampling images/s, recognisability per class (a LeNet trained on the
     real balanced training set labels 100 generated samples per class);
  2. metrics on the evaluation split (the test set unless the suite says otherwise) per method
     (mean of each run's last 5 rounds, as benchmarks/imbalance.py),
     mean ± std over seeds, the deltas to fedavg and the issue's floors, and recall per class;
  3. the hand-written notes beside the page (docs/results/synthetic_notes.md for the default), if any.
The runs' text records are copied to docs/results/synthetic/records/ (or --records).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedimb.app.cli import guarded  # noqa: E402
from fedimb.records import copy_run_records, load_run  # noqa: E402
from fedimb.report import REPORT_METRICS as METRICS  # noqa: E402
from fedimb.report import collect_runs, last_rounds_mean  # noqa: E402
from fedimb.app.sweep import is_finished, plan_sweep  # noqa: E402

FLOORS = {"tail_recall": 5.0, "balanced_accuracy": 2.0}  # points over fedavg (the floors)


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
    lines = ["| seed | size | predicts | params | rounds × local steps × clients | training (min) | DDIM steps "
             "| guidance | images/s | mean recog. | min recog. | per class |", "|" + "---|" * 12]
    for (seed, guidance), rep in sorted(reports.items()):
        per_class = " ".join("–" if v is None else f"{v:.2f}" for v in rep["recognisability"])  # None: no client holds it
        lines.append(f"| {seed} | {synthetic_cfg.generator_size} | {synthetic_cfg.prediction} "
                     f"| {rep.get('generator_params', 0):,} "
                     f"| {synthetic_cfg.rounds} × {synthetic_cfg.local_steps} × {num_clients} "
                     f"| {rep['generator_training_s'] / 60:.1f} | {rep['ddim_steps']} | {guidance} "
                     f"| {rep['sampling_images_per_s']:.1f} | {rep['mean_recognisability']:.3f} "
                     f"| {rep['min_recognisability']:.3f} | {per_class} |")
    return "\n".join(lines)


# the generator floors on 2 cores: (summary key, scale, needed, True if it is a ceiling)
GENERATOR_FLOORS = {"training (min)": ("generator_training_s", 1 / 60, 20.0, True),
                    "images/s": ("sampling_images_per_s", 1.0, 20.0, False),
                    "mean recog.": ("mean_recognisability", 1.0, 0.7, False),
                    "min recog.": ("min_recognisability", 1.0, 0.4, False)}


def generator_floor_lines(reports: dict[tuple[int, str], dict]) -> tuple[str, bool]:
    """Markdown rows checking the issue's generator floors on every seed (and sampler, when methods differ).

    The floors are the federated generator's: rows of local generators are shown in the table, not checked.
    """
    reports = {key: rep for key, rep in reports.items() if not key[1].endswith(LOCAL_LABEL)}
    several = len({guidance for _, guidance in reports}) > 1
    lines, ok = ["| seed | floor | measured | needed | holds |", "|---|---|---|---|---|"], True
    for (seed, guidance), rep in sorted(reports.items()):
        row = f"{seed} (guidance {guidance})" if several else f"{seed}"
        for name, (key, scale, needed, ceiling) in GENERATOR_FLOORS.items():
            measured = rep[key] * scale
            holds = measured <= needed if ceiling else measured >= needed
            ok &= holds
            lines.append(f"| {row} | {name} | {measured:.2f} | {'<=' if ceiling else '>='} {needed:g} "
                         f"| {'yes' if holds else 'no'} |")
    return "\n".join(lines), ok


def floor_lines(finals: dict[str, list[dict]]) -> tuple[str, bool]:
    """Markdown rows checking the issue's floors (points over fedavg) for every synthetic method."""
    if "fedavg" not in finals or not finals["fedavg"]:
        return "(no fedavg runs: floors not checked)", False
    base = {m: 100 * np.mean([f[m] for f in finals["fedavg"]]) for m in FLOORS}
    lines, ok = ["| method | floor | measured | needed | holds |", "|---|---|---|---|---|"], True
    for label, runs in finals.items():
        if label == "fedavg" or not runs:
            continue
        for metric, needed in FLOORS.items():
            delta = 100 * np.mean([f[metric] for f in runs]) - base[metric]
            ok &= delta >= needed
            lines.append(f"| {label} (n = {len(runs)}) | {metric} over fedavg | {delta:+.2f} | >= {needed:g} "
                         f"| {'yes' if delta >= needed else 'no'} |")
    return "\n".join(lines), ok


def method_table(finals: dict[str, list[dict]]) -> str:
    """Mean ± std over seeds of the metrics, in percent, plus deltas to fedavg."""
    lines = ["| method | seeds | " + " | ".join(METRICS) + " | Δ bal. acc. | Δ tail recall |", "|" + "---|" * (len(METRICS) + 4)]
    base = {m: 100 * np.mean([f[m] for f in finals.get("fedavg", [])]) for m in METRICS} if "fedavg" in finals else None
    for label, runs in finals.items():
        cells = []
        for metric in METRICS:
            values = 100 * np.array([f[metric] for f in runs])
            cells.append(f"{values.mean():.2f} ± {values.std():.2f}" if len(values) > 1 else f"{values.mean():.2f}")
        deltas = ["", ""]
        if base is not None and label != "fedavg":
            deltas = [f"{100 * np.mean([f[m] for f in runs]) - base[m]:+.2f}" for m in ("balanced_accuracy", "tail_recall")]
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + f" | {deltas[0]} | {deltas[1]} |")
    return "\n".join(lines)


def per_class_table(run_dirs: dict[str, list[Path]], last_rounds: int) -> str:
    """Recall of every class per method (mean over seeds of each run's last-rounds mean), in percent."""
    rows: dict[str, np.ndarray] = {}
    for label, dirs in run_dirs.items():
        per_run = []
        for run_dir in dirs:
            rounds = load_run(run_dir)["rounds"]
            names = sorted((k for k in rounds[-1] if k.startswith("per_class_recall_")),
                           key=lambda k: int(k.rsplit("_", 1)[1])) if rounds else []
            per_run.append([last_rounds_mean(rounds, k, max(last_rounds, 1)) for k in names])
        if per_run:
            rows[label] = 100 * np.mean(np.array(per_run, dtype=float), axis=0)
    if not rows:
        return "(no runs)"
    classes = len(next(iter(rows.values())))
    lines = ["| method | " + " | ".join(str(c) for c in range(classes)) + " |", "|" + "---|" * (classes + 1)]
    lines += [f"| {label} | " + " | ".join(f"{v:.1f}" for v in values) + " |" for label, values in rows.items()]
    return "\n".join(lines)


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


def main() -> int:
    """Run the chosen methods and seeds, print the tables and write the page."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["fedavg", "fedavg_syn", "cafedcl_syn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--suite", default="experiments/suites/synthetic_fmnist.yaml",
                        help="the sweep whose cells --methods names (default: the test-set comparison)")
    parser.add_argument("--out", default="runs/sweeps/synthetic_fmnist")
    parser.add_argument("--doc", default="docs/results/synthetic.md")
    parser.add_argument("--last-rounds", type=int, default=5, metavar="K",
                        help="average each run's last K rounds (0: final round only), as benchmarks/imbalance.py")
    parser.add_argument("--records", default="docs/results/synthetic/records",
                        help="where the runs' text records are copied (committed)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from fedimb.app.simulation import run_experiment

    runs, _ = plan_sweep(ROOT / args.suite, args.overrides, Path(args.out),
                         seeds=args.seeds)
    chosen = sorted((r for r in runs if r.label in args.methods),
                    key=lambda r: (r.cfg.seed, args.methods.index(r.label)))
    if not chosen:
        known = sorted({r.label for r in runs})
        print(f"--methods: none of {' '.join(args.methods)} is a cell of the suite; choose from {', '.join(known)}",
              file=sys.stderr)
        return 2
    finals: dict[str, list[dict]] = {label: [] for label in args.methods}
    reports: dict[tuple[int, str], dict] = {}  # (seed, sampler and where trained): the quality report of its pools
    grid_seeds: set[int] = set()
    doc = Path(args.doc)
    grids = doc.with_suffix("")  # beside the page and named after it: a probe's --doc keeps its own images
    grids.mkdir(parents=True, exist_ok=True)
    for run in chosen:
        if not is_finished(run):
            print(f"running {run.run_dir.name}", flush=True)
            run_experiment(run.cfg, run.run_dir)
        summary = json.loads((run.run_dir / "summary.json").read_text())
        key = (run.cfg.seed, _generator_label(run.cfg.synthetic))
        if "synthetic" in summary and key not in reports:
            grid = run.run_dir / "synthetic_grid.png"  # none from local generators: their images stay on the clients
            if grid.is_file() and run.cfg.seed not in grid_seeds:  # one grid per seed: its first sampler's
                shutil.copyfile(grid, grids / f"grid_s{run.cfg.seed}.png")
                grid_seeds.add(run.cfg.seed)
            reports[key] = summary["synthetic"]
    # metrics as benchmarks/imbalance.py reads them: the mean of each run's last K rounds
    rows = collect_runs([r.run_dir for r in chosen], last_rounds=args.last_rounds)
    for run, row in zip(chosen, rows, strict=True):
        finals[run.label].append(row)
    copy_run_records([r.run_dir for r in chosen], args.records)
    syn_cfg, fed, train = chosen[0].cfg.synthetic, chosen[0].cfg.federation, chosen[0].cfg.train
    gen = generator_table(reports, syn_cfg, fed.num_clients)
    methods = method_table({k: v for k, v in finals.items() if v})
    classes = per_class_table({label: [r.run_dir for r in chosen if r.label == label] for label in args.methods},
                              args.last_rounds)
    split = "test set" if chosen[0].cfg.eval.split == "test" else f"{chosen[0].cfg.eval.split} split"
    decay = "".join(f", lr × {train.lr_decay_factor:g} after round {int(at * fed.rounds)}" for at in train.lr_decay_at)
    window = (f"mean of each run's last {args.last_rounds} rounds" if args.last_rounds > 0 else "final round")
    generator_floors, generator_ok = generator_floor_lines(reports)
    classifier_floors, classifier_ok = floor_lines(finals)
    floors_text, floors_ok = f"{generator_floors}\n\n{classifier_floors}", generator_ok and classifier_ok
    setting = (f"FMNIST-LT rho=100, dir_balance alpha=0.1, {fed.num_clients} clients, {chosen[0].cfg.model.name}, "
               f"{fed.rounds} rounds × {train.local_epochs} local epochs (lr {train.lr:g}{decay}); "
               f"top-up policy {syn_cfg.policy}, to the client's largest class, " + topup_knobs(chosen))
    print(setting)
    print(gen)
    print(methods)
    print(floors_text)
    print(classes)
    images = "\n".join(f"![generated samples, seed {s}]({grids.name}/grid_s{s}.png)"
                       for s in sorted(grid_seeds))
    title_split = "" if split == "test set" else f" ({split})"
    notes_file = doc.with_name(doc.stem + "_notes.md")
    notes = notes_file.read_text() if notes_file.is_file() else ""
    doc.write_text(
        f"# Synthetic minority samples on FMNIST-LT{title_split}\n\n"
        f"Command: `python benchmarks/synthetic.py {' '.join(sys.argv[1:])}`"
        f"  \nWritten {time.strftime('%Y-%m-%d %H:%M')}. Setting: {setting}.\n\n## The federated generator\n\n"
        "Training wall time covers the whole federated generator phase (Flower rounds included) on "
        "this machine; images/s is guided DDIM sampling of 100 images per class in the server process. "
        f"Recognisability: the share of a class's generated samples that a LeNet trained on the real "
        f"balanced training set assigns to that class.\n\n{gen}\n\n{images}\n\n"
        f"## Classifier federation ({window}, {split}, %)\n\n{methods}\n\n## Floors\n\n{floors_text}\n\n"
        f"All floors hold: {'yes' if floors_ok else 'no'}.\n\n## Recall per class ({window}, {split}, %)\n\n"
        f"{classes}\n\n{notes}")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
