"""What the benchmarks' pages say about the runs they show (no run is trained)."""

from __future__ import annotations

from pathlib import Path

from fedimb.app.bench import load_benchmark
from fedimb.app.sweep import plan_sweep

ROOT = Path(__file__).resolve().parent.parent


def _synthetic_benchmark():
    return load_benchmark("synthetic")


def test_topup_knobs_name_what_differs_between_methods(tmp_path):
    bench = _synthetic_benchmark()
    runs, _ = plan_sweep(ROOT / "experiments/suites/synthetic_tuning.yaml", out=tmp_path, seeds=[0])
    by_label = {r.label: r for r in runs}

    def knobs(*labels: str) -> str:
        return bench.topup_knobs([by_label[label] for label in labels])

    assert knobs("fedavg") == "no synthetic run"
    assert knobs("fedavg", "fedavg_syn_w0.5") == "synthetic:real ≤ 1, loss weight 0.5"
    assert knobs("fedavg_syn", "fedavg_syn_r0.5") == (
        "synthetic:real cap and loss weight per method: fedavg_syn ≤ 1 / 1, fedavg_syn_r0.5 ≤ 0.5 / 1")
    with_sampler = knobs("fedavg_syn_w0.5", "fedavg_syn_w0.5_g2.5r1")
    assert "guidance per method" in with_sampler
    assert with_sampler.endswith("fedavg_syn_w0.5 ≤ 1 / 0.5 / 1.5, fedavg_syn_w0.5_g2.5r1 ≤ 1 / 0.5 / 2.5, rescale 1")
    assert knobs("fedavg_syn_w0.5_g2.5r1", "fedavg_syn_w0.5_g2.5r1_tail1.5").endswith(
        "fedavg_syn_w0.5_g2.5r1_tail1.5 ≤ 1 / 0.5 / 2.5, rescale 1; tail classes 1.5")


def test_generator_floors_are_checked_per_seed_and_sampler():
    bench = _synthetic_benchmark()
    report = {"generator_training_s": 900.0, "sampling_images_per_s": 90.0, "mean_recognisability": 0.8}
    one = {(4, "1.5"): {**report, "min_recognisability": 0.30}}
    lines, ok = bench.generator_floor_lines(one)
    assert not ok and "| 4 | min recog. | 0.30 | >= 0.4 | no |" in lines
    both = {**one, (4, "2.5, rescale 1"): {**report, "min_recognisability": 0.40}}
    lines, ok = bench.generator_floor_lines(both)
    assert not ok  # one sampler's pools still miss the floor
    assert "| 4 (guidance 2.5, rescale 1) | min recog. | 0.40 | >= 0.4 | yes |" in lines
    assert "| 4 (guidance 1.5) | min recog. | 0.30 | >= 0.4 | no |" in lines
    assert bench.generator_floor_lines({(4, "2.5, rescale 1"): both[(4, "2.5, rescale 1")]})[1]
    local = {(4, "2.5, rescale 1; local generators"): {**report, "min_recognisability": 0.10}}
    lines, ok = bench.generator_floor_lines({**local, (4, "2.5, rescale 1"): both[(4, "2.5, rescale 1")]})
    assert ok and "local" not in lines  # the floors are the federated generator's


def test_synthetic_floors_are_paired_per_seed_and_say_how_sure_they_are():
    bench = _synthetic_benchmark()

    def run(seed: int, bal: float, tail: float) -> dict:
        return {**dict.fromkeys(bench.METRICS, 0.5), "seed": seed, "balanced_accuracy": bal / 100,
                "tail_recall": tail / 100}

    # fedavg ran seeds 0-2, the synthetic method seeds 1-3: paired over seeds 1 and 2 only
    finals = {"fedavg": [run(0, 60, 50), run(1, 70, 60), run(2, 74, 70)],
              "fedavg_syn": [run(1, 74, 64), run(2, 76, 77), run(3, 50, 40)]}
    lines, ok = bench.floor_lines(finals)
    # balanced accuracy: +4, +2 -> +3.00 ± 1.00; tail recall: +4, +7 -> +5.50 ± 1.50 (0.5 over the floor of 5)
    assert "| fedavg_syn (n = 2) | balanced_accuracy over fedavg | +3.00 ± 1.00 | +3.00 | >= 2 | yes |" in lines
    assert "| fedavg_syn (n = 2) | tail_recall over fedavg | +5.50 ± 1.50 | +5.50 | >= 5 | yes |" in lines
    assert ok and lines.endswith("do not settle whether it holds: fedavg_syn, tail_recall over fedavg.")
    assert "+3.00 ± 1.00 | +5.50 ± 1.50 |" in bench.method_table(finals)


def test_added_runs_replace_their_records_and_keep_the_others():
    from fedimb.app.pages import merged_records

    merged = merged_records(
        [{"name": "a", "group": "sweep", "v": 1}, {"name": "b", "group": "sweep", "v": 1},
         {"name": "a", "group": "tuning", "v": 1}],
        [{"name": "a", "group": "sweep", "v": 2}, {"name": "c", "group": "sweep", "v": 2}])
    assert [(r["name"], r["group"], r["v"]) for r in merged] == [
        ("a", "sweep", 2), ("b", "sweep", 1), ("a", "tuning", 1), ("c", "sweep", 2)]


def test_a_page_kept_over_added_calls_names_every_call(tmp_path):
    from fedimb.app.pages import Page, command_line, save_records

    page = Page(tmp_path / "page.md")
    first = {"command": "fedimb bench fal --seeds 0 1 2", "args": ["--seeds", "0", "1", "2"], "written": "w1"}
    save_records(page, first, [{"name": "random-s0"}])
    assert command_line(page.header()) == "Command: `fedimb bench fal --seeds 0 1 2`"
    for seeds in ("3", "4"):
        save_records(page, {"command": f"fedimb bench fal --add --seeds {seeds}", "args": [], "written": "w2"},
                     [{"name": f"random-s{seeds}"}], add=True)
    assert command_line(page.header()) == ("Commands: `fedimb bench fal --seeds 0 1 2`, then "
                                           "`fedimb bench fal --add --seeds 3`, then `fedimb bench fal --add --seeds 4`")
    save_records(page, first, [{"name": "random-s0"}])  # a call without --add starts the records again
    assert command_line(page.header()) == "Command: `fedimb bench fal --seeds 0 1 2`"


def test_a_call_keeps_each_finished_run_beside_the_earlier_records(tmp_path):
    from fedimb.app.pages import CallRecords, Page, command_line, save_records
    from fedimb.report import read_records

    def finished_run(name: str, value: int) -> Path:
        run_dir = tmp_path / "runs" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(f"seed: {value}\n")
        (run_dir / "summary.json").write_text(f'{{"v": {value}}}')
        return run_dir

    page = Page(tmp_path / "page.md")
    save_records(page, {"command": "first", "args": [], "written": "w"}, [{"name": "a-s0"}, {"name": "b-s0"}])
    call = CallRecords(page, {"command": "second --add", "args": [], "written": "w"}, add=True)
    call.keep([finished_run("b-s0", 1)])  # replaces the earlier b-s0 at once: a stop after it loses nothing
    assert [(r["name"], r.get("summary")) for r in read_records(page.records)[1]] == [("a-s0", None), ("b-s0", {"v": 1})]
    call.keep([finished_run("c-s0", 2)])
    call.keep([finished_run("b-s0", 3), finished_run("c-s0", 2)])  # the call's end: every run it finished
    header, records = read_records(page.records)
    assert [(r["name"], r.get("summary")) for r in records] == [("a-s0", None), ("b-s0", {"v": 3}), ("c-s0", {"v": 2})]
    assert command_line(header) == "Commands: `first`, then `second --add`"  # the call named once
    CallRecords(page, {"command": "third", "args": [], "written": "w"}).keep([finished_run("d-s0", 4)])
    assert [r["name"] for r in read_records(page.records)[1]] == ["d-s0"]  # without --add: this call's runs only


def test_paired_text_says_within_noise():
    from fedimb.app.pages import noise_note, paired_text

    assert paired_text([0.5, -1.5]) == "-0.50 ± 1.00 (within noise)"
    assert noise_note([]) == "" and "tail share" in noise_note(["tail share"])


def test_fal_floors_are_measured_on_the_seeds_both_samplers_ran():
    fal = load_benchmark("fal")
    # fairfal and entropy ran seeds 0-4, random seeds 0-2 only: random's comparison uses seeds 0-2
    curves = {"fairfal": [[70.0], [72.0], [71.0], [60.0], [60.0]], "random": [[68.0], [69.0], [70.0]],
              "entropy": [[69.0], [71.0], [70.0], [61.0], [59.0]]}
    tails = {"fairfal": [0.12, 0.10, 0.11, 0.13, 0.12], "random": [0.06, 0.06, 0.06],
             "entropy": [0.11, 0.11, 0.11, 0.11, 0.11]}
    seeds = {"fairfal": [0, 1, 2, 3, 4], "random": [0, 1, 2], "entropy": [0, 1, 2, 3, 4]}
    text, ok = fal.floors(curves, tails, seeds)
    # over random, seeds 0-2: +2, +3, +1 (unpaired means over 5 and 3 seeds would give 66.6 - 69.0 < 0)
    assert "| accuracy at the last share over random | +2.00 ± 0.82 | +2.00 | > 0 | yes |" in text
    # over entropy, seeds 0-4: +1, +1, +1, -1, +1 -> +0.60 ± 0.80, within noise
    assert "| accuracy at the last share over entropy | +0.60 ± 0.80 (within noise) | +0.60 | > 0 | yes |" in text
    assert "| tail share of queries over entropy | +0.60 ± 1.02 (within noise) | +0.60 | > 0 | yes |" in text
    assert ok


def test_fal_page_lists_fairfal_first_then_the_suites_samplers():
    fal = load_benchmark("fal")
    assert fal.sampler_order(["kafal", "random", "fairfal", "entropy"]) == ["fairfal", "random", "entropy", "kafal"]


def test_niid_bench_rows_give_the_lead_over_fedavg_paired_per_seed():
    bench = load_benchmark("niid_bench")

    def rec(label: str, seed: int, best: float) -> dict:
        return {"label": label, "seed": seed, "best_accuracy": best, "wall_time_per_round_s": 25.0}

    records = [rec("c3_fedavg", 0, 0.80), rec("c3_fedavg", 1, 0.82),
               rec("c3_fedprox", 0, 0.81), rec("c3_fedprox", 1, 0.84), rec("c3_fedprox", 2, 0.83)]
    rows = {line.split(" | ")[1]: line.split(" | ") for line in
            bench.comparison(records, ["c3_fedavg", "c3_fedprox"]).splitlines()[2:]}
    # fedprox: seeds 0-2 at 81 / 84 / 83, mean 82.67, std 1.25; published 82.99 ± 0.48
    # paired over the seeds fedavg ran: +1, +2 -> +1.50 ± 0.50
    assert rows["fedprox"][3:7] == ["82.67 ± 1.25", "81.00 / 84.00 / 83.00", "82.99 ± 0.48", "-0.32"]
    assert rows["fedprox"][7:11] == ["yes", "yes", "+1.50 ± 0.50 (seeds 0, 1)", "+0.56"]
    # fedavg: 81 ± 1 against 82.43 ± 1.52: Δ −1.43, inside the band and the spreads (1.52 + 1.00)
    assert rows["fedavg"][6:11] == ["-1.43", "yes", "yes", "–", "–"]
    one_seed = bench.comparison([rec("c3_fedavg", 0, 0.80), rec("c3_fedprox", 0, 0.78)], ["c3_fedprox"])
    assert "| -2.00 (seed 0) |" in one_seed and "| no | no |" in one_seed  # −4.99: out of both
