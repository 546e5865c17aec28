"""Bad input of every kind gives one line naming the field or the file, and exit code 2; never a traceback.

Property-based (hypothesis) over config files, overrides and dataset files, driving the CLI in
process with ``run --dry-run`` (checks everything a run checks, starts no Ray).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import re
import shutil
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedimb.app.cli import main
from fedimb.records import clear_run, holds_run

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
BASE = ["data.dataset=digits", "federation.num_clients=4", "partition.min_size=5"]
FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")


def cli(*argv: str) -> tuple[int, str]:
    """Exit code and stderr of ``fedimb argv`` run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue()


def assert_one_line_error(code: int, err: str, names: str | None = None) -> None:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    if code == 0:
        return
    assert code == 2, err
    assert len(" ".join(lines)) and len(lines) == 1 or err.count("config error:") == 1, err
    text = " ".join(line.strip() for line in lines)  # a long line may wrap on a narrow terminal
    assert text.startswith("config error: "), text
    if names is not None:
        assert names in text, text


def dry_run(tmp_path: Path, *argv: str) -> tuple[int, str]:
    return cli("run", *argv, "--out", str(tmp_path / "out"), "--dry-run")


# ---- the three files of the issue -------------------------------------------------------------

def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nfederation:\n  rounds: [1, 2\n")
    code, err = dry_run(tmp_path, str(path))
    assert_one_line_error(code, err, names=str(path))
    assert "YAML syntax error at line 4" in err


def test_empty_config_file_is_an_error_not_the_defaults(tmp_path):
    for text in ("", "\n\n", "# only a comment\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        code, err = dry_run(tmp_path, str(path))
        assert_one_line_error(code, err, names=f"{path} is empty")


def fmnist_copy(tmp_path: Path) -> Path:
    """Small valid Fashion-MNIST IDX files (a few images each), gzipped like the real ones."""
    root = tmp_path / "fmnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in FMNIST_FILES:
        count = 60 if name.startswith("train") else 20
        if "images" in name:
            header, data = bytes([0, 0, 8, 3]) + np.array([count, 28, 28], ">i4").tobytes(), rng.integers(0, 256, count * 784)
        else:
            header, data = bytes([0, 0, 8, 1]) + np.array([count], ">i4").tobytes(), np.arange(count) % 10
        with gzip.open(root / f"{name}.gz", "wb") as fh:
            fh.write(header + data.astype(np.uint8).tobytes())
    return root


def test_truncated_fashion_mnist_names_the_file(tmp_path):
    small = ["federation.num_clients=2", "partition.name=iid"]
    assert dry_run(tmp_path, "experiments/quickstart.yaml", f"data.root={fmnist_copy(tmp_path)}", *small)[0] == 0
    root = shutil.copytree(tmp_path / "fmnist", tmp_path / "truncated")  # another root: loaded datasets are cached
    target = root / "train-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    code, err = dry_run(tmp_path, "experiments/quickstart.yaml", f"data.root={root}", *small)
    assert_one_line_error(code, err, names="data.root")
    assert str(target) in err and "truncated or corrupt" in err


# ---- --out ------------------------------------------------------------------------------------

def test_out_holding_a_run_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    code, err = cli("run", "experiments/quickstart.yaml", *BASE, "--out", str(out))
    assert_one_line_error(code, err, names="--out")
    assert "already holds a run" in err and (out / "summary.json").is_file()
    assert cli("run", "experiments/quickstart.yaml", *BASE, "--out", str(out), "--overwrite", "--dry-run")[0] == 0
    assert (out / "summary.json").is_file()  # a dry run removes nothing
    code, err = cli("run", "--resume", str(out), "--overwrite")
    assert_one_line_error(code, err, names="--overwrite")
    (out / ".rounds.csv.abc.tmp").write_text("half")
    clear_run(out)
    assert not holds_run(out) and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ---- properties -------------------------------------------------------------------------------

KEYS = ["seed", "partition.name", "partition.alpha", "partition.min_size", "partition.classes_per_client",
        "federation.num_clients", "federation.rounds", "federation.fraction", "federation.min_replies",
        "federation.round_timeout", "federation.norm_factor", "federation.min_clients", "strategy.name",
        "strategy.params.proximal_mu", "strategy.robust.name", "strategy.robust.byzantine", "strategy.robust.trim",
        "strategy.robust.exclude_after", "strategy.robust.min_cosine", "synthetic.domain_weighting",
        "faults.crash", "faults.clients", "faults.fraction", "faults.leave_round", "train.lr", "train.batch_size",
        "train.local_epochs", "train.lr_decay_at", "train.loss.name", "model.name", "imbalance.factor",
        "imbalance.profile", "eval.every", "eval.split", "data.validation_fraction", "data.scaling",
        "simulation.num_cpus", "simulation.device", "active_learning.enabled", "synthetic.training", "bogus",
        "federation.bogus", "partition", "strategy.robust"]
VALUES = st.one_of(
    st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(string.ascii_letters + string.digits + "_-. ", max_size=10),
    st.lists(st.integers(-2, 12), max_size=3), st.sampled_from(["median", "krum", "dirichlet", "iid", "fedprox"]),
)


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, min_size=1, max_size=3))
def test_any_config_values_give_a_run_or_one_line(tmp_path, values):
    tree: dict = {"data": {"dataset": "digits"}, "federation": {"num_clients": 4}, "partition": {"min_size": 5}}
    for key, value in values.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[leaf] = value
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(tree))
    code, err = dry_run(tmp_path, str(path))
    assert_one_line_error(code, err)
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for k, v in values.items()]
    code, err = dry_run(tmp_path, "experiments/quickstart.yaml", *BASE, *overrides)
    assert_one_line_error(code, err)


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8"))))
def test_any_config_file_bytes_give_a_run_or_one_line_naming_it(tmp_path, content):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(content)
    code, err = dry_run(tmp_path, str(path), *BASE)
    assert_one_line_error(code, err)


@FUZZ
@given(st.lists(st.text(string.printable, max_size=20), min_size=1, max_size=3))
def test_any_override_text_gives_a_run_or_one_line(tmp_path, overrides):
    if any(o.startswith("-") for o in overrides):  # an option, not an override: argparse's own usage error
        return
    code, err = dry_run(tmp_path, "experiments/quickstart.yaml", *BASE, *overrides)
    assert_one_line_error(code, err)


@pytest.fixture(scope="module")
def valid_fmnist(tmp_path_factory) -> Path:
    return fmnist_copy(tmp_path_factory.mktemp("data"))


@FUZZ
@given(st.sampled_from(FMNIST_FILES), st.floats(0.0, 1.0), st.binary(max_size=16), st.integers(0, 10_000))
def test_damaged_dataset_files_name_the_file(tmp_path, valid_fmnist, name, cut, noise, where):
    root = Path(tempfile.mkdtemp(dir=tmp_path))  # a root of its own: loaded datasets are cached by root
    shutil.copytree(valid_fmnist, root, dirs_exist_ok=True)
    target = root / f"{name}.gz"
    raw = bytearray(target.read_bytes())
    raw = raw[: int(len(raw) * cut)]
    raw[min(where, len(raw)):min(where, len(raw)) + len(noise)] = noise
    target.write_bytes(bytes(raw))
    code, err = dry_run(tmp_path, "experiments/quickstart.yaml", f"data.root={root}", "federation.num_clients=2",
                        "partition.name=iid")
    assert_one_line_error(code, err, names=None)
    if code:
        assert re.search(r"config error: data\.(root|dataset)", err), err
