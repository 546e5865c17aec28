"""The results pages rebuild from their committed records, byte for byte (nothing is trained)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedimb.app.bench import PAGES, index_text, rebuild, run_benchmark
from fedimb.app.pages import CallRecords, Page, store_runs
from fedimb.app.sweep import choose, plan_sweep
from fedimb.config import ConfigError
from fedimb.records import RunRecorder, load_run
from fedimb.report import collect_runs, read_records, record_of_run, run_of_record, write_records

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs/results"


def _copy_page(name: str, dest: Path) -> Page:
    page = Page(RESULTS / name)
    shutil.copytree(page.folder, dest / page.folder.name)
    shutil.copyfile(page.doc, dest / page.doc.name)
    return Page(dest / page.doc.name)


def test_niid_bench_page_rebuilds_from_its_records(tmp_path, capsys):
    copy = _copy_page("niid_bench.md", tmp_path)
    copy.doc.write_text("stale")
    assert run_benchmark("niid_bench", ["--from-records", "--doc", str(copy.doc)]) == 0
    assert copy.doc.read_bytes() == (RESULTS / "niid_bench.md").read_bytes()
    assert "| c2 | fedavg | 3 |" in capsys.readouterr().out


def test_every_page_rebuilds_byte_for_byte(capsys):
    assert rebuild([], results=RESULTS, check=True) == 0, capsys.readouterr().out


def test_index_lists_every_page_and_is_up_to_date():
    listed = {p.page for p in PAGES}
    pages = {p.name for p in RESULTS.glob("*.md")} - {"README.md"}
    assert pages <= listed
    folders = {p.name for p in RESULTS.iterdir() if p.is_dir()}
    assert folders <= {Path(p).with_suffix("").name for p in listed} | {"synthetic"}
    assert (RESULTS / "README.md").read_text() == index_text(RESULTS)


def test_records_only_takes_the_page(tmp_path):
    copy = _copy_page("niid_bench.md", tmp_path)
    with pytest.raises(ConfigError, match="takes only --doc"):
        run_benchmark("niid_bench", ["--from-records", "--doc", str(copy.doc), "--cells", "c2_fedavg"])
    with pytest.raises(ConfigError, match="no records beside the page"):
        run_benchmark("niid_bench", ["--from-records", "--doc", str(tmp_path / "other.md")])


def _fake_run(run_dir: Path, seed: int) -> Path:
    rec = RunRecorder(run_dir)
    rec.write_config(f"seed: {seed}\npartition:\n  name: iid\nstrategy:\n  name: fedavg\n")
    for r, acc in enumerate([0.3, 0.5, float("nan"), 0.6], start=1):
        rec.log_round(r, {"accuracy": acc, "per_class_recall": [acc, 1 - acc]})
    rec.write_summary({"seed": seed})
    return rec.run_dir


def test_a_records_file_reads_as_its_run_directories(tmp_path):
    runs = [_fake_run(tmp_path / "runs" / f"fedavg-s{seed}", seed) for seed in (0, 1)]
    path = write_records(tmp_path / "records.jsonl.gz", {"command": "x"}, [record_of_run(d) for d in runs])
    assert path.read_bytes() == write_records(tmp_path / "again.jsonl.gz", {"command": "x"},
                                              [record_of_run(d) for d in runs]).read_bytes()
    header, records = read_records(path)
    assert header == {"command": "x"} and [r["name"] for r in records] == ["fedavg-s0", "fedavg-s1"]
    for record, run_dir in zip(records, runs):
        loaded = run_of_record(record, path)
        assert loaded["run_dir"] == str(path / run_dir.name)
        assert {k: loaded[k] for k in ("config", "summary")} == {k: v for k, v in load_run(run_dir).items() if k != "rounds"}
        assert repr(loaded["rounds"]) == repr(load_run(run_dir)["rounds"])  # NaN included
    # fedimb report reads the file as it reads the directories
    def rows(sources: list[Path]) -> str:
        return repr([{k: v for k, v in row.items() if k != "run_dir"} for row in collect_runs(sources, last_rounds=2)])

    assert rows([path]) == rows(runs)


def test_a_page_keeps_its_records_when_no_run_finished(tmp_path):
    copy = _copy_page("niid_bench.md", tmp_path)
    before = copy.records.read_bytes()
    with pytest.raises(ConfigError, match="none of the 3 chosen runs has finished"):
        store_runs(CallRecords(copy, {"command": "x"}), [], [], 3)
    assert copy.records.read_bytes() == before


def test_cells_are_chosen_seed_by_seed_or_in_plan_order(tmp_path):
    runs, _ = plan_sweep(ROOT / "experiments/suites/synthetic_fmnist.yaml", out=tmp_path, seeds=[0, 1])
    outermost = choose(runs, ["fedavg_syn", "fedavg"], seeds_outermost=True)
    assert [r.run_dir.name for r in outermost] == ["fedavg_syn-s0", "fedavg-s0", "fedavg_syn-s1", "fedavg-s1"]
    assert [r.run_dir.name for r in choose(runs, ["fedavg_syn", "fedavg"])] == [
        "fedavg-s0", "fedavg-s1", "fedavg_syn-s0", "fedavg_syn-s1"]
    with pytest.raises(ConfigError, match="--methods: unknown cells nope"):
        choose(runs, ["fedavg", "nope"], field="methods")
