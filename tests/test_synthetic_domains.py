"""A generator conditioned on (class, domain), the top-up of missing pairs and the closed-loop top-up (issue 21)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedimb.config import load_config, to_yaml
from fedimb.synthetic.allocation import (condition_counts, condition_weights, error_weights, errors_from_row,
                                         plan_topups, topup_targets)
from fedimb.synthetic.generator import EMBEDDING_KEY, Generator
from fedimb.synthetic.topup import sample_pool, topup_counts
from tests.conftest import DIGITS_SMALL, assert_quick_start_refused

SYN = ["synthetic.enabled=true", "synthetic.rounds=1", "synthetic.local_steps=5", "synthetic.quality_per_class=4",
       "synthetic.ddim_steps=4", "imbalance.factor=10", "partition.name=dir_balance", "partition.alpha=0.3",
       "federation.num_clients=3", "federation.rounds=1", "eval.client_every=0"]
PAIRS = ["domains.names=[clean,invert]", "domains.shares=[0.67,0.33]", "synthetic.condition=class_domain"]
VALIDATION = ["eval.split=validation", "data.validation_fraction=0.2"]  # the closed loop never reads the test set


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add overhead on a shared machine
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- the (class, domain) generator


def pair_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8×8 images of 2 classes in 2 domains. Class 0 is bright on the left, class 1 on the right (dark
    -0.5, bright 1.5); domain 1 is their negative 1.5 - x (dark 0.0, bright 2.0): its class 0 is bright
    on the right, like a clean class 1, but the whole image is brighter (mean 1.0 against 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    classes, domains = torch.arange(n) % 2, (torch.arange(n) // 2) % 2
    images = -0.5 + 0.1 * torch.randn((n, 1, 8, 8), generator=gen)
    images[classes == 0, :, :, :4] += 2.0
    images[classes == 1, :, :, 4:] += 2.0
    images[domains == 1] = 1.5 - images[domains == 1]
    return images, classes, domains


def test_pair_ids_and_metadata_survive_save_and_load(tmp_path):
    generator = Generator.build("cpu", (1, 8, 8), num_classes=3, domains=("clean", "invert"), data_range=(-1.0, 2.0))
    assert generator.unet.config.num_class_embeds == 3 * 2 + 1 and generator.null_class == 6
    assert generator.num_classes == 3 and generator.num_conditions == 6
    # id = domain * C + class
    assert generator.condition_ids(torch.tensor([0, 2, 1]), torch.tensor([0, 1, 1])).tolist() == [0, 5, 4]
    assert generator.condition_ids(torch.tensor([0, 2]), 1).tolist() == [3, 5]
    with pytest.raises(ValueError, match="pass a domain"):
        generator.condition_ids(torch.tensor([0]))
    with pytest.raises(ValueError, match="domain indices"):
        generator.condition_ids(torch.tensor([0]), 2)
    generator.save_pretrained(tmp_path / "gen")
    assert json.loads((tmp_path / "gen" / "generator_config.json").read_text())["domains"] == ["clean", "invert"]
    loaded = Generator.from_pretrained(tmp_path / "gen")
    assert loaded.meta == generator.meta and loaded.domains == ("clean", "invert") and loaded.num_classes == 3
    plain = Generator.build("cpu", (1, 8, 8), num_classes=3)
    assert plain.domains == () and plain.num_conditions == plain.num_classes == 3 and plain.null_class == 3
    assert plain.condition_ids(torch.tensor([2, 0])).tolist() == [2, 0]
    with pytest.raises(ValueError, match="class alone"):
        plain.condition_ids(torch.tensor([0]), 0)


def test_a_pool_feeds_the_unet_the_pair_ids_and_keeps_the_classes():
    cfg = load_config(None, ["synthetic.ddim_steps=2", "synthetic.guidance_scale=2"])
    generator = Generator.build("cpu", (1, 8, 8), num_classes=2, domains=("clean", "invert"), data_range=(-1.0, 2.0))
    seen: list[torch.Tensor] = []
    hook = generator.unet.class_embedding.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        # one (class 0, clean), two (class 1, invert): pair ids 0 and 3, null id 4 for guidance
        x, y = sample_pool(generator, np.array([1, 0, 0, 2]), cfg.synthetic, seed=0)
    finally:
        hook.remove()
    assert y.tolist() == [0, 1, 1] and x.shape == (3, 1, 8, 8)
    assert len(seen) == 2 and all(ids.tolist() == [0, 3, 3, 4, 4, 4] for ids in seen)


@pytest.fixture(scope="module")
def pair_generator(tmp_path_factory) -> Generator:
    """The "cpu" generator trained for a few steps on the four (class, domain) pairs, saved and loaded back."""
    generator = Generator.build("cpu", (1, 8, 8), num_classes=2, domains=("clean", "invert"))
    images, classes, domains = pair_images(128)
    generator.train(images, generator.condition_ids(classes, domains), steps=400, batch_size=32)
    folder = generator.save_pretrained(tmp_path_factory.mktemp("pairs") / "gen")
    return Generator.from_pretrained(folder)


@pytest.mark.parametrize("cls, domain", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_the_loaded_generator_samples_the_asked_class_and_domain(pair_generator, cls, domain):
    ids = pair_generator.condition_ids(torch.full((16,), cls), domain)
    out = pair_generator.sample(ids, guidance_scale=2.0, num_inference_steps=10, seed=cls + 2 * domain)
    left_minus_right = out[..., :4].mean((1, 2, 3)) - out[..., 4:].mean((1, 2, 3))
    # bright side: left for (0, clean) and (1, invert), right for the other two
    bright_left = (cls == 0) == (domain == 0)
    assert ((left_minus_right > 0) == bright_left).float().mean() >= 0.9
    # the domain shows in the level: clean images average 0.5, inverted ones 1.0
    assert ((out.mean((1, 2, 3)) > 0.75) == (domain == 1)).float().mean() >= 0.9


# ---------------------------------------------------------------- the (class, domain) top-up by hand


def test_pair_topup_fills_the_missing_pairs_that_were_learned():
    # client 0 (domain 0) holds classes 0, 1; client 1 (domain 1) holds classes 1, 2
    counts, domains = np.array([[10, 4, 0], [0, 6, 8]]), np.array([0, 1])
    assert condition_counts(counts, domains, 2).tolist() == [[10, 4, 0, 0, 0, 0], [0, 0, 0, 0, 6, 8]]
    # pairs nobody holds (class 2 in domain 0, class 0 in domain 1) were never learned: not topped up.
    # Client 0, target 10: (1, d0) 6; (1, d1) 10, (2, d1) 10. Client 1, target 8: (0, d0) 8, (1, d0) 8; (1, d1) 2.
    assert plan_topups(counts, domains, 2, 0, max_ratio=10).tolist() == [[0, 6, 0, 0, 10, 10], [8, 8, 0, 0, 2, 0]]
    # capped at max_ratio x real (14 each): needs scaled by 14/26 and 14/18, the remainders by largest fraction
    assert plan_topups(counts, domains, 2, 0, max_ratio=1).tolist() == [[0, 3, 0, 0, 6, 5], [6, 6, 0, 0, 2, 0]]
    # a fixed target: 12 per pair
    assert plan_topups(counts, domains, 2, 12, max_ratio=10).tolist() == [[2, 8, 0, 0, 12, 12], [12, 12, 0, 0, 6, 4]]
    # a class-conditional generator: the usual top-up of each client's classes
    plain = plan_topups(counts, None, 0, 0, max_ratio=1)
    assert plain.tolist() == [topup_counts(c, 0, 1).tolist() for c in counts]


# ---------------------------------------------------------------- the closed loop's allocation by hand


def test_error_weights_are_proportional_and_keep_the_total():
    assert error_weights([0.1, 0.4, 0.1]).tolist() == pytest.approx([0.5, 2.0, 0.5])
    assert error_weights([0.0, 0.0]).tolist() == [1.0, 1.0]  # nothing wrong: the static top-up
    assert error_weights([0.2, float("nan"), 0.4]).tolist() == pytest.approx([2 / 3, 1.0, 4 / 3])  # unscored: the mean
    # a pair's weight is its class's times its domain's
    assert condition_weights([0.1, 0.3], [0.2, 0.6]).tolist() == pytest.approx([0.25, 0.75, 0.75, 2.25])


def test_the_closed_loop_raises_the_target_of_a_class_whose_error_rises():
    counts = np.array([[20, 10, 10]])
    before = condition_weights([0.2, 0.2, 0.2])
    after = condition_weights([0.1, 0.5, 0.2])  # class 1's error rose, class 0's fell
    assert topup_targets(counts[0], 0, before).tolist() == [20, 20, 20]  # equal errors: the static target
    assert topup_targets(counts[0], 0, after).tolist() == [8, 38, 15]  # 20 x (0.375, 1.875, 0.75)
    assert plan_topups(counts, None, 0, 0, 10, before).tolist() == [[0, 10, 10]]
    assert plan_topups(counts, None, 0, 0, 10, after).tolist() == [[0, 28, 5]]
    # within the usual cap: max_ratio 0.5 of 40 real samples
    assert plan_topups(counts, None, 0, 0, 0.5, after).tolist() == [[0, 17, 3]]


def test_errors_come_from_the_logged_row():
    row = {"round": 2, "per_class_recall": [0.9, 0.6], "balanced_accuracy_domain_clean": 0.8,
           "balanced_accuracy_domain_invert": 0.4}
    class_errors, domain_errors = errors_from_row(row, ("clean", "invert"))
    assert class_errors.tolist() == pytest.approx([0.1, 0.4]) and domain_errors.tolist() == pytest.approx([0.2, 0.6])
    assert errors_from_row(row, ())[1] is None  # a class generator reads the class errors only
    assert errors_from_row({"round": 2}, ()) is None  # no evaluation that round


def test_closed_loop_plans_every_k_th_round_but_the_last():
    from fedimb.app.closed_loop import ClosedLoop
    from fedimb.app.synthetic import static_needs

    cfg = load_config(None, DIGITS_SMALL + PAIRS + VALIDATION + ["synthetic.closed_loop_every=2", "federation.rounds=5"])
    counts = np.array([[30, 5, 0], [0, 10, 10], [8, 8, 8], [1, 2, 3]])
    loop = ClosedLoop(None, cfg, {}, counts, "", None)  # planning needs neither a grid nor a generator
    assert [r for r in range(6) if loop.due(r)] == [2, 4]
    rows = [{"round": 2, "per_class_recall": [0.9, 0.5, 0.8], "balanced_accuracy_domain_clean": 0.9,
             "balanced_accuracy_domain_invert": 0.5}]
    needs = loop.plan(2, rows)
    weights = condition_weights(1 - np.array([0.9, 0.5, 0.8]), 1 - np.array([0.9, 0.5]))  # the row's, as computed
    assert needs.tolist() == static_needs(cfg, counts, weights).tolist()
    assert loop.records == [{"round": 2, "class_error": pytest.approx([0.1, 0.5, 0.2]),
                             "domain_error": pytest.approx([0.1, 0.5]),
                             "synthetic_per_client": needs.sum(axis=1).tolist()}]
    assert loop.plan(4, rows) is None and len(loop.records) == 1  # round 4 logged nothing: pools stay


# ---------------------------------------------------------------- the clients' side


def _message(content: RecordDict, kind: str) -> Message:
    return Message(content=content, dst_node_id=7, message_type=kind)


def _context(pid: int) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": pid, "num-partitions": 3}, state=RecordDict(),
                   run_config={})


def test_a_client_trains_pair_rows_of_its_domain_and_samples_the_sent_pairs():
    from clients.app import topup, train_generator_round
    from clients.synthetic import load_pool
    from fedimb import protocol
    from fedimb.data import build_federated_data
    from fedimb.data.domains import client_domains
    from fedimb.synthetic.topup import topup_seed

    cfg = load_config(None, DIGITS_SMALL + SYN + PAIRS + ["synthetic.policy=client_sample"])
    data = build_federated_data(cfg)
    pid = client_domains(cfg).index("invert")  # domain 1: its rows are 10..19
    generator = Generator.build("cpu", data.splits.input_shape, 10, seed=0, data_range=(-1.0, 5.0),
                                domains=("clean", "invert"))
    config = {protocol.EXPERIMENT_CONFIG: to_yaml(cfg), protocol.GENERATOR_RANGE: [-1.0, 5.0]}
    content = RecordDict({protocol.ARRAYS: ArrayRecord(generator.state_dict()),
                          protocol.CONFIG: ConfigRecord({**config, protocol.SERVER_ROUND: 1})})
    seen: list[torch.Tensor] = []
    # the label ids the UNet's table is asked for while this client trains (a real forward hook)
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(args[0]) if isinstance(module, torch.nn.Embedding) else None)
    try:
        reply = train_generator_round(_message(content, protocol.GENERATOR_TRAIN), _context(pid)).content
    finally:
        hook.remove()
    assert reply[protocol.ARRAYS][EMBEDDING_KEY].numpy().shape[0] == 21  # 10 classes x 2 domains + null
    held = np.flatnonzero(data.counts[pid])
    # its classes as pairs with its own domain (ids 10 + class), and the null id of classifier-free guidance
    assert set(torch.cat(seen).tolist()) == {10 + int(c) for c in held} | {20}
    # the closed loop's top-up after round 3: the pairs the server sent, sampled with its own seed
    need = np.zeros(20, dtype=np.int64)
    need[[2, 13]] = [3, 2]
    content = RecordDict({protocol.GENERATOR: ArrayRecord(generator.state_dict()),
                          protocol.CONFIG: ConfigRecord({**config, protocol.SERVER_ROUND: 3,
                                                         protocol.TOPUP_COUNTS: need.tolist()})})
    context = _context(pid)
    topup(_message(content, protocol.TOPUP), context)
    x, y = load_pool(context.state, torch.device("cpu"))
    assert y.tolist() == [2, 2, 2, 3, 3]
    expected, _ = sample_pool(generator, need, cfg.synthetic, seed=topup_seed(cfg.seed, pid, 3))
    assert torch.allclose(x, expected, atol=1e-5)


# ---------------------------------------------------------------- bad config: one line, exit code 2


@pytest.mark.parametrize("args, field", [
    (["synthetic.condition=device"], "synthetic.condition"),
    (["synthetic.condition=class_domain"], "synthetic.condition"),  # no domains
    (["domains.names=[clean,invert]", "synthetic.condition=class_domain", "synthetic.training=local",
      "synthetic.policy=client_sample"], "synthetic.condition"),
    (["synthetic.closed_loop_every=-1"], "synthetic.closed_loop_every"),
    (["synthetic.domain_weighting=even"], "synthetic.domain_weighting"),
    (["synthetic.domain_weighting=balanced"], "synthetic.domain_weighting"),  # no domains
    (["synthetic.closed_loop_every=2"], "synthetic.closed_loop_every"),  # eval.split=test: errors from the test set
    (["synthetic.closed_loop_every=3", "eval.every=2", *VALIDATION], "synthetic.closed_loop_every"),
    (["synthetic.closed_loop_every=2", "synthetic.training=local", "synthetic.policy=client_sample"],
     "synthetic.closed_loop_every"),
    (["synthetic.closed_loop_every=2", "active_learning.enabled=true"], "synthetic.closed_loop_every"),
])
def test_bad_synthetic_config_is_one_line_exit_2(args, field, tmp_path, capsys):
    assert_quick_start_refused(args, field, tmp_path / "run", capsys)


def test_unknown_condition_names_the_allowed_values():
    from fedimb.config import ConfigError

    with pytest.raises(ConfigError, match="synthetic.condition.*class, class_domain"):
        load_config(None, ["synthetic.condition=device"])


def test_domain_balanced_weights_give_each_domain_an_equal_share():
    from strategies.generator import domain_balanced_weights

    # domain 0: 100 + 300 samples share 1/3 by size (1/12, 1/4); domains 1 and 2: one client each, 1/3
    weights = domain_balanced_weights(np.array([100, 300, 50, 50]), np.array([0, 0, 1, 2]))
    np.testing.assert_allclose(weights, [1 / 12, 1 / 4, 1 / 3, 1 / 3])
    # a round without domain 2: the two domains present share the weight
    np.testing.assert_allclose(domain_balanced_weights(np.array([100, 300, 50]), np.array([0, 0, 1])),
                               [1 / 8, 3 / 8, 1 / 2])


# ---------------------------------------------------------------- one real federation


@pytest.mark.slow
def test_a_pair_generator_federation_with_a_closed_loop(tmp_path):
    from fedimb.app.simulation import run_experiment
    from fedimb.app.synthetic import static_needs
    from fedimb.data import build_federated_data

    cfg = load_config(None, DIGITS_SMALL + SYN + PAIRS + VALIDATION + ["synthetic.closed_loop_every=1", "federation.rounds=2",
                                                          "synthetic.domain_weighting=balanced",
                                                          f"synthetic.cache_dir={tmp_path / 'cache'}"])
    whole = run_experiment(cfg, tmp_path / "run")
    summary = whole["synthetic"]
    # scored on the validation split, the run scores the test set once more after its last round
    assert {"balanced_accuracy_domain_invert", "worst_domain_balanced_accuracy"} <= whole["test"].keys()
    counts = build_federated_data(cfg).counts
    assert summary["synthetic_per_client"] == static_needs(cfg, counts).sum(axis=1).tolist()
    assert summary["generator_domains"] == ["clean", "invert"]
    assert set(summary["recognisability_per_domain"]) == {"clean", "invert"}
    [loop] = summary["closed_loop"]  # after round 1; none after the last
    assert loop["round"] == 1 and len(loop["class_error"]) == 10 and len(loop["domain_error"]) == 2
    with open(tmp_path / "run" / "rounds.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if int(r["round"]) == 1)
    # the errors it read are round 1's as logged
    assert loop["domain_error"] == pytest.approx([1 - float(row[f"balanced_accuracy_domain_{d}"])
                                                  for d in ("clean", "invert")], abs=1e-6)
    weights = condition_weights(loop["class_error"], loop["domain_error"])
    assert loop["synthetic_per_client"] == static_needs(cfg, counts, weights).sum(axis=1).tolist()
    saved = Generator.from_pretrained(next((tmp_path / "cache").rglob("generator")))
    assert saved.domains == ("clean", "invert") and saved.num_conditions == 20
    assert any((tmp_path / "cache").rglob("pool-loop1-*-c0.pt"))


def test_knobs_left_at_their_defaults_keep_the_generator_cache_keys_of_earlier_runs():
    from fedimb.app.synthetic import cache_key
    from fedimb.config import load_config

    # the key the quick-start generator had before partition.noise_sigma, domains.* and synthetic.condition
    cfg = load_config("experiments/quickstart.yaml", ["synthetic.enabled=true"])
    assert cache_key(cfg) == "c76112333422c796"
    assert cache_key(load_config("experiments/quickstart.yaml", ["synthetic.enabled=true",
                                                                 "partition.noise_sigma=0.1"])) != "c76112333422c796"
