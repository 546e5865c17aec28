"""The faults benchmark's cells and the pieces of its page (nothing is trained)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedimb.app.bench import load_benchmark
from fedimb.app.pages import paired_text
from fedimb.app.sweep import choose, plan_sweep
from fedimb.config import load_config
from fedimb.faults import hostile_partitions

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "experiments/suites/faults_fmnist.yaml"


def test_the_cells_run_seed_by_seed_and_share_their_hostile_client(tmp_path):
    runs, _ = plan_sweep(SUITE, out=tmp_path)
    labels = list(dict.fromkeys(r.label for r in runs))
    ordered = choose(runs, labels, seeds_outermost=True)
    assert len(ordered) == 78 and [r.cfg.seed for r in ordered] == [0] * 26 + [1] * 26 + [2] * 26
    by_label = {r.label: r.cfg for r in runs if r.cfg.seed == 1}
    one = {hostile_partitions(by_label[f"fedavg_{case}"].faults, 10, 1) for case in ("crash10", "nan", "x100")}
    assert len(one) == 1 and len(next(iter(one))) == 1  # the NaN run can be set against that client's crash
    assert by_label["cafedcl_signflip_trimmed"].strategy.robust.trim == 0.2
    assert by_label["fedavg_signflip_multikrum"].strategy.robust.byzantine == 2
    assert by_label["fedavg_signflip_multikrum_dir"].strategy.robust.directions
    assert by_label["cafedcl_signflip_cosine"].strategy.robust.name == "cosine"


def test_the_drops_of_a_selection_rule_are_split_into_hostile_and_honest():
    from fedimb.app.pages import PageRun

    bench = load_benchmark("faults")
    cfg = load_config(SUITE.parent.parent / "quickstart.yaml", ["faults.fraction=0.2", "faults.sign_flip=1.0",
                                                                "strategy.robust.name=multikrum", "seed=2"])
    hostile = sorted(hostile_partitions(cfg.faults, 10, 2))  # [0, 6] on the page
    run = PageRun("fedavg_signflip_multikrum", cfg, {"rounds": [{"round": r} for r in range(4)]})
    dropped = ("round,node,partition,phase,reason\n"
               f"1,11,{hostile[0]},train,dropped by multikrum\n1,18,8,train,dropped by multikrum\n"
               f"2,11,{hostile[0]},train,dropped by multikrum\n2,17,{hostile[1]},train,dropped by multikrum\n")
    assert bench.dropped_counts(run, dropped) == (3, 6, 1)  # 3 of the 2 x 3 hostile replies, 1 honest
    assert bench.dropped_counts(run, None) is None  # not recorded
    cells = {0: {"dropped": (3, 6, 1)}, 1: {"dropped": None}}
    assert bench.dropped_cell(cells) == "s0: 3/6, 1; others not recorded"


def test_differences_say_within_noise_and_reasons_drop_numbers():
    bench = load_benchmark("faults")
    assert paired_text(np.array([0.5, -1.5])) == "-0.50 ± 1.00 (within noise)"
    assert paired_text(np.array([-2.0, -3.0])) == "-2.50 ± 0.50"
    assert paired_text(np.array([0.25])) == "+0.25" and paired_text(np.array([])) == "–"
    assert bench.short_reason("injected fault: crash at round 7") == "crash"
    assert bench.short_reason("rejected: weights: conv1.weight is not finite") == "rejected: not finite"
    assert bench.short_reason("no reply before the round timeout") == "no reply before the round timeout"


def test_a_run_is_stopped_only_by_a_round_with_too_few_valid_replies(tmp_path):
    bench = load_benchmark("faults")
    cfg = load_config(ROOT / "experiments/quickstart.yaml", ["federation.min_replies=0.5"])
    header = "round,node,partition,phase,reason\n"
    (tmp_path / "failures.csv").write_text(header + "".join(f"3,{p},{p},train,injected fault: crash at round 3\n"
                                                            for p in range(5)))
    assert bench.stopped_round(tmp_path, cfg) is None  # 5 of 10 replies are enough
    with (tmp_path / "failures.csv").open("a") as fh:
        fh.write("3,9,9,train,rejected: weights: fc.weight is not finite\n")
    assert bench.stopped_round(tmp_path, cfg) == 3
    (tmp_path / "summary.json").write_text("{}")
    assert bench.stopped_round(tmp_path, cfg) is None
