"""``fedimb deploy init`` and the deployment it describes, run on loopback (fedimb/app/loopback.py)."""

from __future__ import annotations

import csv
import ipaddress
import json
import os
import signal
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedimb.config import load_config
from fedimb.app.deploy_run import FlwrCli, summary_written
from fedimb.app.loopback import BIN, LoopbackDeployment, free_port

ROOT = Path(__file__).resolve().parent.parent
PRIVATE_FILES = ["ca/ca.key", "superlink/server.key", "sites/a/a.key", "sites/b/b.key", "sites/c/c.key"]


def deploy_init(*args: str) -> subprocess.CompletedProcess[str]:
    """``fedimb deploy init ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "fedimb.app.cli", "deploy", "init", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("host", ["10.1.2.3", "superlink.example.org"])
def test_deploy_init_writes_keys_certificates_and_commands(tmp_path: Path, host: str) -> None:
    out = tmp_path / "dep"
    done = deploy_init("--sites", "a,b,c", "--host", host, "--port", "9443", "--out", str(out),
                       "--data-root", "/srv/data")
    assert done.returncode == 0, done.stderr
    for rel in PRIVATE_FILES:
        assert stat.S_IMODE((out / rel).stat().st_mode) == 0o600, rel
        secret_lines = [line for line in (out / rel).read_text().splitlines() if len(line) > 20]
        assert secret_lines and not any(line in done.stdout + done.stderr for line in secret_lines)
    assert "PRIVATE KEY" not in done.stdout + done.stderr and "CERTIFICATE" not in done.stdout + done.stderr

    ca = x509.load_pem_x509_certificate((out / "ca/ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "superlink/server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    wanted_host = ipaddress.ip_address(host) if host[0].isdigit() else host
    assert wanted_host in sans.get_values_for_type(x509.IPAddress) + sans.get_values_for_type(x509.DNSName)
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")} <= set(sans.get_values_for_type(x509.IPAddress))
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    server_key = load_pem_private_key((out / "superlink/server.key").read_bytes(), None)
    assert server_key.public_key().public_numbers() == server.public_key().public_numbers()
    for site in "abc":
        assert (out / f"sites/{site}/ca.crt").read_bytes() == (out / "ca/ca.crt").read_bytes()
        private = load_ssh_private_key((out / f"sites/{site}/{site}.key").read_bytes(), None)
        public = load_ssh_public_key((out / f"sites/{site}/{site}.key.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        assert public.public_numbers() == private.public_key().public_numbers()
    for i, site in enumerate("abc"):
        assert tomllib.loads((out / f"sites/{site}/node-config.toml").read_text()) == {
            "partition-id": i, "data-path": f"/srv/data/{site}"}

    conn = tomllib.loads((out / "flwr/config.toml").read_text())["superlink"]["fedimb"]
    assert conn == {"address": f"{host}:9443", "root-certificates": str(out.resolve() / "ca/ca.crt")}
    commands = (out / "COMMANDS.md").read_text()
    superlink = next(line for line in commands.splitlines() if line.startswith("flower-superlink"))
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth", "--database",
                 "--port 9443"):
        assert flag in superlink
    # TLS everywhere a site talks over the network; a site's SuperExec dials its own SuperNode on loopback,
    # as Flower's own SuperExec does
    insecure = [line for line in commands.splitlines() if "--insecure" in line]
    assert len(insecure) == 3 and all(line.startswith("fedimb deploy superexec --runtime-api-address 127.0.0.1:")
                                      for line in insecure)
    for i, site in enumerate("abc"):
        assert f"flwr supernode register {out.resolve()}/sites/{site}/{site}.key.pub fedimb --name {site}" in commands
        node = next(line for line in commands.splitlines() if f"sites/{site}/{site}.key " in line)
        assert node.startswith(f"flower-supernode --superlink {host}:9443 --root-certificates ")
        assert f"--isolation process --port {9094 + i} --node-config 'partition-id={i} data-path=\"/srv/data/{site}\"'" in node
        lines = commands.splitlines()
        assert lines[lines.index(node) + 1] == f"fedimb deploy superexec --runtime-api-address 127.0.0.1:{9094 + i} --insecure"
    plan = json.loads((out / "deploy.json").read_text())
    assert [s["name"] for s in plan["sites"]] == ["a", "b", "c"] and not plan["insecure"]


@pytest.mark.parametrize(("args", "field", "words"), [
    (["--sites", "a,b,a"], "--sites", "'a' appears twice"),
    (["--sites", "a,b c"], "--sites", "'b c' is not a site name"),
    (["--sites", "a", "--host", "https://x.org:9093"], "--host", "without scheme or port"),
    (["--sites", "a", "--port", "70000"], "--port", "1..65535"),
    (["--sites", "a", "--data-root", "data"], "--data-root", "absolute path"),
])
def test_deploy_init_bad_input_exits_2_with_one_line(tmp_path: Path, args: list[str], field: str, words: str) -> None:
    base = {"--host": "127.0.0.1", "--out": str(tmp_path / "dep")}
    given = dict(zip(args[::2], args[1::2]))
    done = deploy_init(*args, *[x for k, v in base.items() if k not in given for x in (k, v)])
    assert done.returncode == 2
    assert done.stderr.strip() == done.stderr.strip().splitlines()[0]  # one line
    assert f"config error: {field}: " in done.stderr and words in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "dep").exists() and not list(tmp_path.iterdir())


def test_deploy_init_never_overwrites_a_folder(tmp_path: Path) -> None:
    (tmp_path / "dep").mkdir()
    (tmp_path / "dep" / "old.key").write_text("keep me")
    done = deploy_init("--sites", "a", "--host", "127.0.0.1", "--out", str(tmp_path / "dep"))
    assert done.returncode == 2 and "config error: --out: " in done.stderr
    assert sorted(p.name for p in (tmp_path / "dep").iterdir()) == ["old.key"]


def test_deploy_init_insecure_only_when_asked_and_with_a_warning(tmp_path: Path) -> None:
    out = tmp_path / "dep"
    done = deploy_init("--sites", "a,b", "--host", "127.0.0.1", "--out", str(out), "--insecure")
    assert done.returncode == 0 and "warning: --insecure" in done.stderr
    assert not [p for p in out.rglob("*") if p.suffix in (".key", ".crt", ".pem", ".pub")]
    commands = (out / "COMMANDS.md").read_text()
    # SuperLink + 2 nodes, and each node's SuperExec on loopback
    assert "--enable-supernode-auth" not in commands and commands.count("--insecure") == 5
    assert commands.count("fedimb deploy superexec --runtime-api-address 127.0.0.1:") == 2
    assert tomllib.loads((out / "flwr/config.toml").read_text())["superlink"]["fedimb"]["insecure"] is True


# ---------------------------------------------------------------- real SuperLink / SuperNodes (loopback)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackDeployment]:
    """A SuperLink with TLS and node authentication; sites a and c registered, b not."""
    tmp = tmp_path_factory.mktemp("secured")
    done = deploy_init("--sites", "a,b,c", "--host", "localhost", "--port", str(free_port()), "--out",
                       str(tmp / "dep"))
    assert done.returncode == 0, done.stderr
    with LoopbackDeployment(tmp / "dep", tmp / "work") as fed:
        fed.start_superlink()
        for site in ("a", "c"):
            reg = fed.register(site)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        yield fed
    assert fed.leftovers() == []


@pytest.mark.slow
def test_supernode_with_an_unregistered_key_is_refused(secured: LoopbackDeployment) -> None:
    registered = secured.start_supernode("a", free_port())
    stranger = secured.start_supernode("b", free_port(), extra=("--max-retries", "0"))
    assert stranger.proc.wait(timeout=180) != 0
    assert "Exit Code: 305" in stranger.output() and "Failed to activate SuperNode" in stranger.output()
    nodes = secured.wait_online(1)  # the registered key is let in by the same SuperLink
    assert registered.proc.poll() is None and len(nodes) == 2  # a and c registered, b never listed


@pytest.mark.slow
def test_supernode_without_the_ca_cannot_connect(secured: LoopbackDeployment) -> None:
    online_before = sum(n.get("status") == "online" for n in secured.supernodes())
    # c's key is registered: only the missing CA can keep it out
    node = secured.start_supernode("c", free_port(), root_certificates=False, extra=("--max-retries", "0"))
    assert node.proc.wait(timeout=180) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in node.output() and "Exit Code: 305" in node.output()
    assert sum(n.get("status") == "online" for n in secured.supernodes()) == online_before


EXPERIMENT = ["name=deploy-digits", "data.dataset=digits", "federation.num_clients=3", "federation.rounds=2",
              "model.name=mlp", "partition.name=dirichlet", "partition.alpha=1.0", "strategy.name=cafedcl",
              "train.lr=0.05"]


def _write_sites(root: Path) -> None:
    """The simulated split of EXPERIMENT as three sites, one per format: npz, image folder, save_to_disk."""
    import datasets
    from PIL import Image

    from fedimb.data.site_export import export_sites

    export_sites(load_config(None, EXPERIMENT), root / "export")
    for i, name in enumerate("abc"):
        npz = np.load(root / f"export/site-{i}/site.npz")
        to_8bit = 255.0 / float(npz["pixel_max"])
        images = {split: (npz[f"x{suffix}"] * to_8bit).round().astype(np.uint8)[:, 0]
                  for split, suffix in (("train", ""), ("test", "_test"))}
        labels = {"train": npz["y"], "test": npz["y_test"]}
        site = root / "sites" / name
        if name == "a":
            site.mkdir(parents=True)
            np.savez(site / "site.npz", x=images["train"], y=labels["train"], x_test=images["test"],
                     y_test=labels["test"])
        elif name == "b":
            for split in ("train", "test"):
                for k, (image, label) in enumerate(zip(images[split], labels[split])):
                    folder = site / split / str(int(label))
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(image, mode="L").save(folder / f"{k}.png")
        else:
            features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
            datasets.DatasetDict({split: datasets.Dataset.from_dict(
                {"image": [Image.fromarray(im, mode="L") for im in images[split]],
                 "label": [int(v) for v in labels[split]]}, features=features) for split in ("train", "test")}
            ).save_to_disk(str(site))


def _rows(runs: Path) -> list[dict[str, str]]:
    found = list(runs.glob("*/rounds.csv"))
    return list(csv.DictReader(found[0].open())) if found else []


def _wait_for_round(runs: Path, round_: int, run: subprocess.Popen, timeout: float = 400.0) -> None:
    deadline = time.time() + timeout
    while not any(int(r["round"]) >= round_ for r in _rows(runs)):
        assert run.poll() is None, f"the run ended before round {round_}: {run.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"no round {round_} after {timeout}s"
        time.sleep(1)


# a round may finish with 2 of the 3 sites, and waits at most 20 s for one that is gone (a site's
# SuperExec forks each ClientApp warm: a round's phase takes a few seconds on a busy machine)
DROPOUT = ["federation.rounds=4", "federation.min_replies=2", "federation.round_timeout=20"]


@pytest.mark.slow
@pytest.mark.serial
def test_fedimb_app_runs_on_three_secured_sites_with_their_own_data(tmp_path: Path) -> None:
    """cafedcl on three sites (npz, image folder, save_to_disk), the server holding no data; site c
    is killed after round 1, the others finish its rounds, and c rejoins for the last ones."""
    _write_sites(tmp_path)
    done = deploy_init("--sites", "a,b,c", "--host", "127.0.0.1", "--port", str(free_port()), "--out",
                       str(tmp_path / "dep"), "--data-root", str(tmp_path / "sites"))
    assert done.returncode == 0, done.stderr
    runs = tmp_path / "runs"
    with LoopbackDeployment(tmp_path / "dep", tmp_path / "work") as fed:
        fed.start_superlink()
        nodes = dict(zip("abc", fed.start_sites()))  # registered, on deploy init's node config
        run = subprocess.Popen(
            [str(BIN / "fedimb"), "deploy", "run", str(ROOT / "experiments/quickstart.yaml"), *EXPERIMENT, *DROPOUT,
             "--connection", fed.plan.connection, "--flwr-home", fed.env["FLWR_HOME"], "--out", str(runs),
             "--timeout", "900"], env=fed.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_round(runs, 1, run)
        os.killpg(nodes["c"].proc.pid, signal.SIGKILL)  # site c is gone, its SuperExec with it
        _wait_for_round(runs, 2, run)
        fed.start_supernode("c", free_port())  # the same key: the site comes back
        _, err = run.communicate(timeout=900)
        assert run.returncode == 0 and "finished:completed" in err, err[-3000:]
    assert fed.leftovers() == []
    logs = fed.work / "logs"
    # deploy init's default: each site's SuperExec forked its ClientApp tasks warm; none started flwr-clientapp
    assert all("Starting Flower SuperExec" in (logs / f"superexec-{site}.log").read_text() for site in "abc")
    assert not [p.name for p in logs.glob("*.log") if "Start `flwr-clientapp` process" in p.read_text()]
    run_dir = next(runs.iterdir())
    rounds = _rows(runs)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [int(r["round"]) for r in rounds] == [1, 2, 3, 4] and summary["evaluation"] == "federated"
    assert summary["final"]["balanced_accuracy"] > 0.3  # 10 classes: chance is 0.1
    failures = [int(r["failures"]) for r in rounds]
    assert failures[1] > 0 and failures[-1] == 0  # c missed round 2 and was back by round 4
    with (run_dir / "failures.csv").open() as fh:
        assert {row["partition"] for row in csv.DictReader(fh)} == {"2"}  # site c, and only c, named
    partition = json.loads((run_dir / "partition.json").read_text())
    assert partition["num_clients"] == 3  # the class counts the sites reported


class _ScriptedLink(FlwrCli):
    """A SuperLink whose run is running at the first ``flwr ls`` and finished at every later one;
    its ServerApp writes summary.json just after that first poll."""

    def __init__(self, summary: Path) -> None:
        super().__init__("fedimb")
        self.summary, self.poll_times = summary, []

    def run_status(self, run_id: int) -> dict:
        self.poll_times.append(time.time())
        if len(self.poll_times) == 1:
            self.summary.parent.mkdir(parents=True)
            self.summary.write_text("{}")
            return {"run-id": run_id, "status": "running"}
        return {"run-id": run_id, "status": "finished:completed"}


def test_deploy_run_polls_at_once_when_the_summary_appears(tmp_path: Path) -> None:
    """With polls 60 s apart and a 30 s timeout the second poll would come at the deadline; the
    summary.json under --out brings it forward to the next second."""
    out, since = tmp_path / "out", time.time()
    assert not summary_written(out, "deploy-digits", since)()
    link = _ScriptedLink(out / f"deploy-digits-{int(since)}" / "summary.json")
    entry = link.wait_finished(7, timeout=30, poll_s=60, ended=summary_written(out, "deploy-digits", since))
    assert entry["status"] == "finished:completed" and len(link.poll_times) == 2
    assert link.poll_times[1] - link.poll_times[0] < 15  # not at the deadline
    assert not summary_written(out, "other-name", since)()
    assert not summary_written(out, "deploy-digits", time.time() + 60)()  # a summary older than the run
