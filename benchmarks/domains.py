"""Acquisition domains on FMNIST-LT: what a (class, domain) top-up buys the worst domain.

    fedimb bench domains                       # every cell of the suite, seeds 0 1 2, seed by seed
    fedimb bench domains --table-only          # the page from the runs finished so far, nothing trained
    fedimb bench domains --from-records        # the page again from its records (docs/results/domains/)

Runs the cells of experiments/suites/domains_fmnist.yaml (the quick-start federation for 20 rounds,
7 / 2 / 1 clients in three acquisition domains) through the sweep runner, all cells of a seed before
the next seed, so a seed's first pair-generator run trains the generator its later runs reuse from
the cache, and an interrupted call leaves whole seeds (an interrupted run resumes from its checkpoint).

Every arm evaluates its rounds on a validation split and scores the test set once after its last
round (summary.json ``test``): the page's main table is that test scoring, per domain, worst domain
and tail recall; the paired per-seed differences between arms (mean ± std, *within noise* where
|mean| < std); the floors: the (class, domain) top-up raises worst-domain balanced accuracy over
fedavg by at least 5 points and over the class-only top-up by at least 2, each outside the seed
noise (mean − std of the paired differences >= 0); the closed loop against the static pair top-up,
whichever way it comes out; the generators; a sample grid of the seed-0 pair generator (one row per
class, a group of columns per domain); the validation split's figures and curves.
"""

from __future__ import annotations

import sys
from pathlib import Path
import numpy as np
import torch

from fedimb.app.cli import guarded
from fedimb.app.pages import (CallRecords, PageRun, add_option, bench_parser, command_line, floors_section, floors_table,
                              mean_std, paired_text, parse, store_runs, table)
from fedimb.app.sweep import choose, execute, failure, is_finished, plan_sweep
from fedimb.config import DomainsConfig, ExperimentConfig
from fedimb.metrics import DOMAIN_COLUMN_PREFIX, WORST_DOMAIN_COLUMN
from fedimb.records import save_figure

DOC = "docs/results/domains.md"
ROOT = Path(__file__).resolve().parent.parent
# the seed-0 sample grid of each pair generator, by synthetic.domain_weighting
GRIDS = {"size": "grid_pairs_s0.png", "balanced": "grid_pairs_balanced_s0.png"}
SAMPLES_PER_DOMAIN = 4
FMNIST_CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")
# (arm, against it, worst-domain points needed): the floors, each also outside the seed noise, for
# the (class, domain) top-up whose generator weighs every domain alike (fedavg_pair's, weighing by size, drew
# the rare negative device at recognisability 0.10 on seed 0; see the page's Reading), the class-only floor
# against both class-only arms: the and one whose generator had the same balanced training
FLOORS = (("fedavg_pair_balanced", "fedavg", 5.0), ("fedavg_pair_balanced", "fedavg_class", 2.0),
          ("fedavg_pair_balanced", "fedavg_class_balanced", 2.0))
# each closed loop against the static pair top-up from the same generator, reported whichever way it comes out
LOOPS = (("fedavg_pair_loop", "fedavg_pair"), ("fedavg_pair_balanced_loop", "fedavg_pair_balanced"))
COMPARISONS = (("fedavg_class", "fedavg"), ("fedavg_pair", "fedavg"), ("fedavg_pair", "fedavg_class"), LOOPS[0],
               ("cafedcl_pair", "fedavg_pair"), ("cafedcl_pair", "fedavg"),
               ("fedavg_pair_balanced", "fedavg"), ("fedavg_pair_balanced", "fedavg_class"),
               ("fedavg_pair_balanced", "fedavg_pair"), ("fedavg_pair_balanced", "fedavg_class_balanced"), LOOPS[1],
               ("cafedcl_pair_balanced", "fedavg_pair_balanced"), ("cafedcl_pair_balanced", "fedavg"))
WHY = (
    "Why these domains: a domain shift tests the top-up only where fedavg, trained on what the federation holds, "
    "does badly. A probe, fedavg on this federation with every client clean (20 rounds, seed 0, `fedimb run "
    "experiments/quickstart.yaml federation.rounds=20 eval.client_every=0 "
    "'domains.names=[clean,gamma,contrast,blur,noise,invert,rotate]' 'domains.shares=[1,0,0,0,0,0,0]'`), scored "
    "the test set through every transform: clean 82.9, blur (σ 1) 81.7, gamma 2 78.7, sensor noise 0.2 78.6, "
    "contrast 0.5 76.1, negative 9.8, rotated 90° 4.8. A mostly clean model copes with the mild transforms, so the "
    "two other devices are the 90° rotation (20% of the clients) and the negative (10%, one client). With these "
    "shares (fedavg, seed 0, the validation split) the rare negative is the worst domain: clean 82.0, rotate 47.3, "
    "invert 38.1.")


# --- what the page reads of a run ------------------------------------------------------------------


def figures(run: PageRun, domains: list[str]) -> dict[str, dict[str, float]]:
    """The run's test scoring after its last round and its last validation row, in points (NaN where missing)."""
    keys = ["balanced_accuracy", *(f"{DOMAIN_COLUMN_PREFIX}{d}" for d in domains), WORST_DOMAIN_COLUMN, "tail_recall"]
    rows = run.run["rounds"]
    last = rows[-1] if rows else {}
    test = run.summary.get("test", {})
    return {split: {k: 100 * float(source.get(k, np.nan)) for k in keys}
            for split, source in (("test", test), ("validation", last))}


def paired(cells: dict[str, dict[int, dict]], arm: str, base: str, split: str,
           metric: str) -> tuple[list[int], np.ndarray]:
    """Seeds both arms have (with the metric), and the per-seed differences arm − base."""
    a, b = cells.get(arm, {}), cells.get(base, {})
    seeds = sorted(s for s in a if s in b and np.isfinite(a[s][split][metric]) and np.isfinite(b[s][split][metric]))
    return seeds, np.array([a[s][split][metric] - b[s][split][metric] for s in seeds])


# --- the page's pieces ------------------------------------------------------------------------------


def describe(cfg: ExperimentConfig) -> list[str]:
    """An arm's strategy, top-up and closed loop."""
    syn = cfg.synthetic
    topup = "none" if not syn.enabled else ("per (class, domain) pair" if syn.condition == "class_domain"
                                            else "per class")
    if syn.enabled and syn.domain_weighting == "balanced":
        topup += ", generator domain-balanced"
    loop = f"after round {loop_rounds(cfg)}" if syn.enabled and syn.closed_loop_every else "–"
    return [cfg.strategy.name, topup, loop]


def loop_rounds(cfg: ExperimentConfig) -> str:
    """The rounds after which the closed loop sends new pools (every K-th, none after the last)."""
    every, rounds = cfg.synthetic.closed_loop_every, cfg.federation.rounds
    return ", ".join(str(r) for r in range(every, rounds, every)) or "none"


def fedavg_by_domain(cells: dict[str, dict[int, dict]], domains: list[str]) -> str:
    """fedavg's test balanced accuracy per domain, mean over its seeds, in words."""
    runs = cells.get("fedavg", {})
    if not runs:
        return "No fedavg run in these records."
    means = [np.nanmean([r["test"][f"{DOMAIN_COLUMN_PREFIX}{d}"] for r in runs.values()]) for d in domains]
    return (f"fedavg here (test set, mean of {len(runs)} seed(s)): "
            + ", ".join(f"{d} {m:.2f}" for d, m in zip(domains, means)) + ".")


def results_table(cells: dict[str, dict[int, dict]], labels: list[str], domains: list[str], split: str) -> str:
    """One row per arm: seeds, balanced accuracy, each domain's, the worst domain's and tail recall (mean ± std)."""
    keys = ["balanced_accuracy", *(f"{DOMAIN_COLUMN_PREFIX}{d}" for d in domains), WORST_DOMAIN_COLUMN, "tail_recall"]
    rows = []
    for label in labels:
        runs = cells[label]
        row = [label, f"{len(runs)} ({', '.join(map(str, sorted(runs)))})"]
        for key in keys:
            values = [r[split][key] for r in runs.values() if np.isfinite(r[split][key])]
            row.append(mean_std(values) if values else "–")
        rows.append(row)
    return table(["arm", "seeds", "balanced acc.", *domains, "worst domain", "tail recall"], rows)


def comparison_table(cells: dict[str, dict[int, dict]], split: str) -> tuple[str, list[str]]:
    """Paired per-seed differences for each comparison; also the comparisons within noise."""
    rows, within = [], []
    for arm, base in COMPARISONS:
        seeds, worst = paired(cells, arm, base, split, WORST_DOMAIN_COLUMN)
        if not seeds:
            continue
        _, balanced = paired(cells, arm, base, split, "balanced_accuracy")
        _, tail = paired(cells, arm, base, split, "tail_recall")
        rows.append([f"{arm} − {base}", f"{len(seeds)}", paired_text(worst), " / ".join(f"{d:+.2f}" for d in worst),
                     paired_text(balanced), paired_text(tail)])
        if len(worst) > 1 and abs(worst.mean()) < worst.std():
            within.append(f"{arm} − {base} (worst domain)")
    header = ["comparison", "seeds", "Δ worst domain", "Δ worst domain per seed", "Δ balanced acc.", "Δ tail recall"]
    return table(header, rows), within


def floor_checks(cells: dict[str, dict[int, dict]]) -> tuple[str, bool]:
    """The issue's floors on the test scoring: the mean paired Δ of worst-domain balanced accuracy, and
    mean − std of those Δ (>= 0: outside the seed noise)."""
    checks, missing = [], []
    for arm, base, needed in FLOORS:
        seeds, diffs = paired(cells, arm, base, "test", WORST_DOMAIN_COLUMN)
        if len(seeds) < 2:
            missing.append(f"{arm} − {base} (needs 2 seeds of both, has {len(seeds)})")
            continue
        what = f"{arm} − {base} (n = {len(seeds)})"
        checks += [([what, "mean Δ worst-domain bal. acc."], float(diffs.mean()), ">=", needed),
                   ([what, "mean − std of Δ (outside the seed noise)"], float(diffs.mean() - diffs.std()), ">=", 0.0)]
    text, ok = floors_table(["comparison", "floor", "measured (points)", "needed", "holds"], checks) if checks \
        else ("", True)
    if missing:
        text += f"\n\nNot checked yet: {'; '.join(missing)}."
    return text.strip(), ok and not missing


def loop_text(cells: dict[str, dict[int, dict]]) -> str:
    """Each closed loop against the static (class, domain) top-up of its generator, in words, whichever way
    it comes out."""
    lines = []
    for arm, base in LOOPS:
        seeds, worst = paired(cells, arm, base, "test", WORST_DOMAIN_COLUMN)
        if not seeds:
            lines.append(f"No seed has both {arm} and {base} yet.")
            continue
        _, balanced = paired(cells, arm, base, "test", "balanced_accuracy")
        mean, std = float(worst.mean()), float(worst.std())
        way = ("within the seed noise" if len(seeds) > 1 and abs(mean) < std else
               "better than" if mean > 0 else "worse than" if mean < 0 else "level with")
        lines.append(f"{arm} − {base} on the test set, {len(seeds)} seed(s): worst-domain balanced accuracy "
                     f"{paired_text(worst)} points (per seed {' / '.join(f'{d:+.2f}' for d in worst)}), balanced "
                     f"accuracy {paired_text(balanced)}: the closed loop is {way}"
                     f"{' the static top-up' if way in ('better than', 'worse than', 'level with') else ''}.")
    return "\n\n".join(lines)


def generator_table(runs: list[PageRun]) -> str:
    """One row per seed and generator: its conditioning, cost and recognisability (overall and per domain)."""
    seen, rows = set(), []
    for run in runs:
        rep, syn = run.summary.get("synthetic"), run.cfg.synthetic
        if not rep or (run.seed, syn.condition, syn.domain_weighting) in seen:
            continue
        seen.add((run.seed, syn.condition, syn.domain_weighting))
        per_domain = rep.get("recognisability_per_domain", {})
        domains = ", ".join(f"{d} {np.nanmean(np.array(v, dtype=float)):.2f}" for d, v in per_domain.items()) or "–"
        rows.append([f"{run.seed}", ("(class, domain)" if syn.condition == "class_domain" else "class")
                     + (", domain-balanced" if syn.domain_weighting == "balanced" else ""),
                     f"{rep.get('generator_params', 0):,}",
                     f"{syn.rounds} × {syn.local_steps} × {run.cfg.federation.num_clients}",
                     f"{rep['generator_training_s'] / 60:.1f}", f"{rep['mean_recognisability']:.3f}",
                     f"{rep['min_recognisability']:.3f}", domains,
                     f"{sum(rep['synthetic_per_client']):,}"])
    rows.sort(key=lambda row: (int(row[0]), row[1] != "class", row[1]))
    return table(["seed", "conditioned on", "params", "rounds × local steps × clients", "training (min)",
                  "mean recog.", "min recog.", "mean recog. per domain", "synthetic samples (all clients)"], rows)


def draw_grid(runs: list[PageRun], path: Path, weighting: str) -> bool:
    """The seed-0 pair generator trained with ``weighting``, sampled per (class, domain) with the runs'
    sampler: one row per class, SAMPLES_PER_DOMAIN columns per domain. False when no seed-0 run has that
    generator on this machine."""
    from fedimb.synthetic.generator import Generator
    from fedimb.synthetic.quality import sample_grid

    run = next((r for r in runs if r.seed == 0 and r.cfg.synthetic.condition == "class_domain"
                and r.cfg.synthetic.domain_weighting == weighting
                and Generator.is_saved(r.summary.get("synthetic", {}).get("generator_dir", "/nonexistent"))), None)
    if run is None:
        return False
    syn = run.cfg.synthetic
    generator = Generator.from_pretrained(run.summary["synthetic"]["generator_dir"])
    classes = torch.arange(generator.num_classes).repeat_interleave(len(generator.domains) * SAMPLES_PER_DOMAIN)
    domains = torch.arange(len(generator.domains)).repeat_interleave(SAMPLES_PER_DOMAIN).repeat(generator.num_classes)
    images = generator.sample(generator.condition_ids(classes, domains), guidance_scale=syn.guidance_scale,
                              num_inference_steps=syn.ddim_steps, seed=run.seed, guidance_rescale=syn.guidance_rescale)
    names = list(FMNIST_CLASSES) if run.cfg.data.dataset == "fmnist" else None
    columns = [d if j == 0 else "" for d in generator.domains for j in range(SAMPLES_PER_DOMAIN)]
    sample_grid(images, classes, generator.num_classes, path, per_class=len(columns), class_names=names,
                column_names=columns)
    return True


def plot_curves(cells: dict[str, dict[int, dict]], labels: list[str], path: Path) -> Path:
    """Validation balanced accuracy and worst-domain balanced accuracy per round, mean over seeds, per arm."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (metric, title) in zip(axes, [("balanced_accuracy", "balanced accuracy (validation, pooled domains)"),
                                          (WORST_DOMAIN_COLUMN, "worst-domain balanced accuracy (validation)")]):
        for label in labels:
            curves: dict[int, list[float]] = {}
            for run in cells[label].values():
                for row in run["rounds"]:
                    curves.setdefault(int(row["round"]), []).append(100 * row.get(metric, np.nan))
            x = sorted(curves)
            ax.plot(x, [np.nanmean(curves[r]) for r in x], label=f"{label} (n={len(cells[label])})")
        ax.set(title=title, xlabel="round", ylabel="%")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)


def strengths(dom: DomainsConfig) -> str:
    """The strengths of the transforms in use, in words."""
    knobs = {"gamma": f"gamma {dom.gamma:g}", "contrast": f"contrast factor {dom.contrast:g}",
             "blur": f"blur σ {dom.blur_sigma:g} px", "noise": f"sensor noise std {dom.noise_std:g}",
             "rotate": f"rotation {dom.rotation:g}°"}
    return ", ".join(knobs[name] for name in dom.names if name in knobs) or "no strength to set"


def setting_text(cfg: ExperimentConfig, loop: ExperimentConfig | None, seed_minutes: float, suite: str) -> str:
    """The federation, domains, evaluation and generator knobs as the runs' configs have them."""
    fed, train, syn, dom = cfg.federation, cfg.train, cfg.synthetic, cfg.domains
    shares = " / ".join(f"{name} {share:g}" for name, share in zip(dom.names, dom.shares))
    loop_text = (f" Closed loop (every {loop.synthetic.closed_loop_every} rounds): after round {loop_rounds(loop)} "
                 "the validation errors per class and per domain set each client's next pool (targets proportional to "
                 "the errors, the same total and cap)." if loop is not None else "")
    return (
        f"`experiments/quickstart.yaml` (Fashion-MNIST, exp long tail rho = {cfg.imbalance.factor:g}, "
        f"Dirichlet({cfg.partition.alpha:g}) over {fed.num_clients} clients, all sampled, {cfg.model.name}) for "
        f"{fed.rounds} rounds × {train.local_epochs} local epoch (SGD lr {train.lr:g}, momentum {train.momentum:g}, "
        f"batch {train.batch_size}). Acquisition domains, shares of the clients: {shares} (exact counts, which "
        f"clients from the seed); {strengths(dom)}. Suite: `{suite}`, "
        "all arms of a seed before the next seed, the same seeds for every arm (paired).  \n"
        f"Evaluation: every arm holds out {cfg.data.validation_fraction:g} of each training class as a validation "
        "split (so all arms train on the same data) and scores its rounds there, since the closed loop reads those "
        "errors and the test set must never steer training; after the last round every run scores the balanced test "
        "set once, in every domain (summary.json `test`). The main tables are that test scoring; the validation "
        "split's final round and curves are at the end. Balanced accuracy pools the domains; worst domain = the "
        "lowest per-domain balanced accuracy; tail recall = mean recall of the rarest third of classes by training "
        "count, pooled over the domains.  \n"
        f"Generators: diffusion, size {syn.generator_size}, {syn.prediction}, Min-SNR {syn.snr_gamma:g}, trained by "
        f"FedAvg over {syn.rounds} rounds × {syn.local_steps} local steps (lr {syn.lr:g}): the synthetic page's "
        f"knobs with {syn.rounds} rounds instead of 50, so that a seed's first five arms fit in about an hour on 2 cores "
        f"(they took {seed_minutes:.0f} min per seed here: the runs' wall times, generator training included). Per seed one "
        "class-conditional generator (class-only top-up) and one conditioned on (class, domain) pairs (and the "
        "pair generator trained domain-balanced, for its own arm), cached by what made them and shared by the arms "
        "that use each. Top-up: each client up to its largest class "
        f"(pair top-up: every (class, domain) pair it lacks that some client holds, other devices included), "
        f"synthetic:real ≤ {syn.max_ratio:g}, a synthetic sample weighs {syn.loss_weight:g}; DDIM {syn.ddim_steps} "
        f"steps, guidance {syn.guidance_scale:g}" + (f", rescale {syn.guidance_rescale:g}" if syn.guidance_rescale else "")
        + f".{loop_text} cafedcl (defaults, head inference) takes the static (class, domain) top-up, chosen before any run, "
        "not on results.")


def main(argv: list[str] | None = None) -> int:
    """Run the chosen cells and seeds (unless --table-only / --from-records), then write the page."""
    parser = bench_parser("domains", __doc__, DOC)
    parser.add_argument("--cells", nargs="+", help="cell labels of the suite (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--suite", default="experiments/suites/domains_fmnist.yaml")
    parser.add_argument("--out", default="runs/sweeps/domains_fmnist")
    parser.add_argument("--table-only", action="store_true", help="train nothing: the page from the finished runs")
    add_option(parser)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args, header, page = parse(parser, sys.argv[1:] if argv is None else argv)

    failed: list[str] = []
    if not args.from_records:
        records = CallRecords(page, header, args.add)
        planned, sweep_dir = plan_sweep(ROOT / args.suite, args.overrides, Path(args.out), seeds=args.seeds)
        chosen = choose(planned, args.cells or list(dict.fromkeys(r.label for r in planned)), seeds_outermost=True)
        if args.table_only:
            finished = [r for r in chosen if is_finished(r)]
        else:
            finished, failed = execute(chosen, sweep_dir, resume=True,
                                       on_finished=lambda run: records.keep([run.run_dir]))
        store_runs(records, [r.run_dir for r in finished], failed, len(chosen))
    header = page.header()
    runs = page.runs()
    for weighting, name in GRIDS.items():
        if not args.from_records and draw_grid(runs, page.folder / name, weighting):
            print(f"wrote {page.folder / name}")
    first = runs[0].cfg
    domains = list(first.domains.names)
    labels = list(dict.fromkeys(r.label for r in runs))
    cells: dict[str, dict[int, dict]] = {label: {} for label in labels}
    configs: dict[str, ExperimentConfig] = {}
    for run in runs:
        cells[run.label][run.seed] = {**figures(run, domains), "rounds": run.run["rounds"],
                                      "minutes": run.summary.get("wall_time_s", np.nan) / 60}
        configs.setdefault(run.label, run.cfg)
    seeds = sorted({r.seed for r in runs})
    per_seed = [sum(cells[label][seed]["minutes"] for label in labels if seed in cells[label]) for seed in seeds]
    arms = table(["arm", "strategy", "top-up", "closed loop", "wall time per run (min)"],
                 [[label, *describe(configs[label]), mean_std([c["minutes"] for c in cells[label].values()], 1)]
                  for label in labels])
    test, validation = (results_table(cells, labels, domains, split) for split in ("test", "validation"))
    differences, within = comparison_table(cells, "test")
    floor_text, ok = floor_checks(cells)
    loop = next((c for c in configs.values() if c.synthetic.enabled and c.synthetic.closed_loop_every), None)
    plot_curves(cells, labels, page.folder / "curves.png")
    grid = "\n\n".join(f"![samples of the seed-0 (class, domain) generator, {weighting} weighting]"
                       f"({page.folder.name}/{name})" for weighting, name in GRIDS.items()
                       if (page.folder / name).is_file()) or "(no seed-0 pair generator in these records)"
    noise = (f"Within noise (|mean| < std of the paired differences): {'; '.join(within)}.\n\n" if within else "")
    print(test)
    print(differences)
    print(floor_text)
    page.write(
        "# Acquisition domains on FMNIST-LT: the (class, domain) top-up\n\n"
        f"{command_line(header)}  \nMachine: {header['machine']}; written {header['written']}.  \n"
        f"Setting: {setting_text(first, loop, float(np.mean(per_seed)), args.suite)}  \n"
        f"Seeds: {', '.join(map(str, seeds))}; each row says which seeds it has. Figures in percent, mean ± std "
        "(population) over seeds; a paired difference is per seed, the arm minus the other arm of the same seed, "
        "*within noise* where |mean| < std.\n\n"
        f"{WHY} {fedavg_by_domain(cells, domains)}\n\n## Arms\n\n{arms}\n\n"
        f"## Test set after the last round (%)\n\n{test}\n\n"
        f"## Paired differences (test set, points)\n\n{differences}\n\n{noise}"
        f"{floors_section(floor_text, ok)}"
        f"## The closed loop against the static top-up\n\n{loop_text(cells)}\n\n"
        f"## Generators\n\nTraining wall time covers the whole federated generator phase on this machine (a "
        "generator reused from the cache shows the time it took when trained). Recognisability: the share of a "
        "class's samples that a LeNet trained on the real training set (each image in one domain) calls that "
        f"class; per domain for the pair generator.\n\n{generator_table(runs)}\n\n"
        f"One row per class, {SAMPLES_PER_DOMAIN} samples per domain, the runs' sampler:\n\n{grid}\n\n"
        f"## Validation split, final round (%)\n\n{validation}\n\n"
        f"![validation curves]({page.folder.name}/curves.png)\n\n"
        f"{page.notes()}")
    print(f"wrote {page.doc}")
    if failed:
        raise failure(failed, len(chosen), page.doc, "the page")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
