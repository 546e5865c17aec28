"""A site's own data (fedimb/data/sites.py): each format, the experiment's classes and shapes, the export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedimb.config import load_config
from fedimb.data import build_federated_data
from fedimb.data.datasets import Normalisation
from fedimb.data.local_testset import local_test_indices
from fedimb.data.site_export import export_sites
from fedimb.data.sites import SiteDataError, SiteSpec, class_counts, load_site, node_site, site_domain, site_spec

# 3 classes of 8x8 grey images; raw scale 0..16 (as sklearn digits), standardised around 8 ± 4
SPEC = SiteSpec(3, (1, 8, 8), Normalisation("standard", 16.0, (8.0,), (4.0,)))
RGB_SPEC = SiteSpec(2, (3, 4, 4), Normalisation("unit", 255.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), ("cat", "dog"))


def _expected(pixels_255: np.ndarray) -> np.ndarray:
    """What SPEC makes of 8-bit pixels: onto 0..16, then (raw - 8) / 4."""
    return ((pixels_255.astype(np.float64) * (16 / 255)).astype(np.float32) - 8) / 4


def _grey(rng: np.random.Generator, n: int, size: int = 8) -> np.ndarray:
    return rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)


def test_npz_site_with_local_test_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, x_test = _grey(rng, 7), _grey(rng, 3)
    y, y_test = np.array([0, 1, 2, 2, 1, 0, 0]), np.array([2, 2, 0])
    np.savez(tmp_path / "hospital.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    splits = load_site(tmp_path / "hospital.npz", SPEC)
    assert splits.name == "hospital" and splits.num_classes == 3 and splits.input_shape == (1, 8, 8)
    np.testing.assert_array_equal(splits.train_y, y)
    np.testing.assert_array_equal(splits.test_y, y_test)
    np.testing.assert_allclose(splits.train_x[:, 0], _expected(x), rtol=0, atol=1e-6)
    np.testing.assert_allclose(splits.test_x[:, 0], _expected(x_test), rtol=0, atol=1e-6)
    # a folder holding one npz is the same site, named after the folder
    folder = tmp_path / "site-b"
    folder.mkdir()
    raw = x // 16  # 0..15: stored on the dataset's own scale
    np.savez(folder / "data.npz", x=raw[:, None], y=y, pixel_max=16.0)
    again = load_site(folder, SPEC)
    assert again.name == "site-b" and again.test_x.shape == (0, 1, 8, 8)
    np.testing.assert_array_equal(again.train_x[:, 0], (raw.astype(np.float32) - 8) / 4)


def test_image_folder_site_train_and_test(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    site = tmp_path / "clinic"
    written: dict[tuple[str, int], list[np.ndarray]] = {}
    for split, label, count in (("train", 0, 2), ("train", 2, 3), ("test", 1, 2)):
        (site / split / str(label)).mkdir(parents=True)
        for k, img in enumerate(_grey(rng, count)):
            Image.fromarray(img, mode="L").save(site / split / str(label) / f"{k}.png")
            written.setdefault((split, label), []).append(img)
    splits = load_site(site, SPEC)
    np.testing.assert_array_equal(splits.train_y, [0, 0, 2, 2, 2])
    np.testing.assert_array_equal(splits.test_y, [1, 1])
    train_pixels = np.stack(written[("train", 0)] + written[("train", 2)])
    np.testing.assert_allclose(splits.train_x[:, 0], _expected(train_pixels), rtol=0, atol=1e-6)


def test_image_folder_site_colour_jpeg_by_class_name(tmp_path: Path) -> None:
    site = tmp_path / "farm"
    for name in ("cat", "1"):  # by class name and by index
        (site / name).mkdir(parents=True)
        Image.fromarray(np.full((4, 4, 3), 200, dtype=np.uint8), mode="RGB").save(site / name / "a.jpg")
    splits = load_site(site, RGB_SPEC)
    np.testing.assert_array_equal(splits.train_y, [1, 0])  # folders sorted: "1" before "cat"
    assert splits.train_x.shape == (2, 3, 4, 4) and len(splits.test_y) == 0
    assert abs(float(splits.train_x.mean()) - 200 / 255) < 0.02  # JPEG is lossy; unit scale keeps [0, 1]


def test_hugging_face_save_to_disk_site(tmp_path: Path) -> None:
    import datasets

    rng = np.random.default_rng(2)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    x, x_test = _grey(rng, 5), _grey(rng, 2)
    parts = {
        "train": datasets.Dataset.from_dict(
            {"image": [Image.fromarray(i, mode="L") for i in x], "label": [2, 0, 1, 1, 0]}, features=features),
        "test": datasets.Dataset.from_dict(
            {"image": [Image.fromarray(i, mode="L") for i in x_test], "label": [1, 2]}, features=features),
    }
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "lab"))
    splits = load_site(tmp_path / "lab", SPEC)
    np.testing.assert_array_equal(splits.train_y, [2, 0, 1, 1, 0])
    np.testing.assert_array_equal(splits.test_y, [1, 2])
    np.testing.assert_allclose(splits.train_x[:, 0], _expected(x), rtol=0, atol=1e-6)
    np.testing.assert_allclose(splits.test_x[:, 0], _expected(x_test), rtol=0, atol=1e-6)
    parts["train"].save_to_disk(str(tmp_path / "plain"))  # a Dataset alone: training data, no test split
    plain = load_site(tmp_path / "plain", SPEC)
    assert len(plain.train_y) == 5 and len(plain.test_y) == 0


def _error(path: Path, spec: SiteSpec = SPEC) -> str:
    with pytest.raises(SiteDataError) as info:
        load_site(path, spec)
    text = str(info.value)
    assert "\n" not in text and text.startswith("config error: data-path: site '")
    return text


def test_labels_outside_the_experiments_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "a.npz", x=_grey(rng, 3), y=np.array([0, 3, 1]))
    text = _error(tmp_path / "a.npz")
    assert "site 'a'" in text and str(tmp_path / "a.npz") in text and "label 3" in text and "0..2" in text
    np.savez(tmp_path / "b.npz", x=_grey(rng, 2), y=np.array([0, 1]), x_test=_grey(rng, 1), y_test=np.array([-1]))
    assert "[y_test]" in _error(tmp_path / "b.npz")
    (tmp_path / "c" / "7").mkdir(parents=True)  # a class folder past the classes
    Image.fromarray(_grey(rng, 1)[0], mode="L").save(tmp_path / "c" / "7" / "x.png")
    text = _error(tmp_path / "c")
    assert "site 'c'" in text and str(tmp_path / "c" / "7") in text and "0..2" in text


def test_hugging_face_label_outside_classes(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(np.zeros((8, 8), np.uint8), mode="L")] * 2,
                                     "label": [0, 5]}, features=datasets.Features(
                                         {"image": datasets.Image(), "label": datasets.Value("int64")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    text = _error(tmp_path / "hf")
    assert "site 'hf'" in text and "label 5" in text and str(tmp_path / "hf") in text


def test_images_that_do_not_fit_the_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    (tmp_path / "big" / "0").mkdir(parents=True)
    Image.fromarray(_grey(rng, 1, size=28)[0], mode="L").save(tmp_path / "big" / "0" / "big.png")
    text = _error(tmp_path / "big")
    assert str(tmp_path / "big" / "0" / "big.png") in text and "28x28" in text and "8x8" in text
    (tmp_path / "rgb" / "0").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8), mode="RGB").save(tmp_path / "rgb" / "0" / "c.png")
    text = _error(tmp_path / "rgb")
    assert "site 'rgb'" in text and "c.png" in text and "3 channels" in text and "takes 1" in text
    np.savez(tmp_path / "shape.npz", x=_grey(rng, 2, size=28), y=np.array([0, 1]))
    text = _error(tmp_path / "shape.npz")
    assert "(28, 28)" in text and "(1, 8, 8)" in text and "shape.npz" in text
    np.savez(tmp_path / "unit.npz", x=np.full((1, 8, 8), 300.0), y=np.array([0]))
    assert "above pixel_max 255" in _error(tmp_path / "unit.npz")


def test_site_error_exits_2_through_the_cli_guard(tmp_path: Path) -> None:
    from fedimb.app.cli import EXIT_BAD_INPUT, guarded

    np.savez(tmp_path / "a.npz", x=np.zeros((1, 8, 8)), y=np.array([9]))
    assert guarded(lambda: load_site(tmp_path / "a.npz", SPEC) and 0) == EXIT_BAD_INPUT


def test_node_site_from_the_node_config_and_a_shipped_spec(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "a.npz", x=_grey(rng, 4), y=np.array([2, 2, 0, 1]))
    assert node_site({"partition-id": 0}, SPEC) is None  # simulation: no data-path
    shipped = SiteSpec.from_json(SPEC.to_json())
    assert shipped == SPEC and SiteSpec.from_json(RGB_SPEC.to_json()) == RGB_SPEC
    first = node_site({"data-path": str(tmp_path / "a.npz")}, SPEC)
    assert first is not None and node_site({"data-path": str(tmp_path / "a.npz")}, shipped) is first  # read once
    np.testing.assert_array_equal(class_counts(first.train_y, 3), [1, 1, 2])
    digits = site_spec(load_config(None, ["data.dataset=digits"]).data)
    assert (digits.num_classes, digits.input_shape, digits.normalisation.top) == (10, (1, 8, 8), 16.0)


DIGITS_SPLIT = ["name=export", "data.dataset=digits", "partition.name=dirichlet", "partition.alpha=0.5",
                "partition.min_size=5", "federation.num_clients=3", "imbalance.factor=10", "seed=3"]


@pytest.mark.parametrize("scaling", ["standard", "unit"])
def test_exported_site_holds_exactly_its_simulation_partition(tmp_path: Path, scaling: str) -> None:
    cfg = load_config(None, [*DIGITS_SPLIT, f"data.scaling={scaling}"])
    data = build_federated_data(cfg)
    written = export_sites(cfg, tmp_path / "sites")
    spec = site_spec(cfg.data)
    assert [s.partition_id for s in written] == [0, 1, 2]
    for pid, idx in enumerate(data.client_indices):
        site = load_site(tmp_path / "sites" / f"site-{pid}", spec)
        np.testing.assert_array_equal(site.train_x, data.splits.train_x[idx])  # bit for bit
        np.testing.assert_array_equal(site.train_y, data.splits.train_y[idx])
        test_idx = local_test_indices(data.splits.test_y, data.counts[pid], 3, cfg.seed, pid)
        np.testing.assert_array_equal(site.test_x, data.splits.test_x[test_idx])
        np.testing.assert_array_equal(site.test_y, data.splits.test_y[test_idx])
    assert len({len(s.train_y) for s in (load_site(w.path, spec) for w in written)}) > 1  # non-IID sizes differ


def test_a_site_names_its_domain_in_its_node_config_or_its_exported_site_json(tmp_path: Path) -> None:
    from fedimb.config import ConfigError

    cfg = load_config(None, [*DIGITS_SPLIT, "domains.names=[clean,invert]", "domains.shares=[0.67,0.33]"])
    export_sites(cfg, tmp_path / "sites")
    exported = {site_domain({"data-path": str(tmp_path / "sites" / f"site-{pid}")}) for pid in range(3)}
    assert exported == {"clean", "invert"}  # from each site.json, as the simulation assigned them
    assert site_domain({"data-path": str(tmp_path / "sites" / "site-0" / "site.npz"), "domain": "scanner-b"}) == "scanner-b"
    assert site_domain({"partition-id": 0}) is None and site_domain({"data-path": str(tmp_path / "x.npz")}) is None
    with pytest.raises(ConfigError) as err:
        site_domain({"domain": "scanner b/2"})  # it becomes part of a column name
    assert err.value.field_name == "domain" and "'scanner b/2' is not a domain name" in str(err.value)


def test_partition_export_cli(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text("name: export\n")
    cmd = [sys.executable, "-m", "fedimb.app.cli", "partition", str(tmp_path / "cfg.yaml"), *DIGITS_SPLIT,
           "--export", str(tmp_path / "sites")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "sites").iterdir()) == ["partition.png", "site-0", "site-1", "site-2"]
    assert (tmp_path / "sites" / "site-1" / "site.npz").is_file() and (tmp_path / "sites" / "site-1" / "site.json").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # never overwrites a site
    assert again.returncode == 2 and "site-0 already exists" in again.stderr and "Traceback" not in again.stderr


def test_a_site_reads_the_dataset_for_its_spec_once_per_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SuperNode starts a process per message: the spec comes back from the node state."""
    from flwr.app import RecordDict

    import clients.app as client

    computed = []
    monkeypatch.setattr(client, "site_spec", lambda data: computed.append(data) or site_spec(data))
    cfg = load_config(None, ["data.dataset=digits"])
    state = RecordDict()
    first = client._site_spec(cfg, state)
    again = client._site_spec(cfg, RecordDict(dict(state.items())))  # the next message's process
    assert computed == [cfg.data] and again == first == site_spec(cfg.data)
