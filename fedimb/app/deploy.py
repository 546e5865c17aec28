"""``fedimb deploy init``: everything a SuperLink and its sites need to run fedimb securely.

Secure by default: a CA, a SuperLink certificate for ``--host`` (plus localhost, 127.0.0.1
and ::1), one node-authentication key pair per site, a ``flwr`` connection entry and a
``COMMANDS.md`` with the exact commands (SuperLink with TLS, ``--enable-supernode-auth`` and
``--database``; register each site; start each SuperNode with its ``data-path``, and beside it the
``fedimb deploy superexec`` that forks its ClientApp tasks warm). Without TLS
and node authentication only with ``--insecure``, which prints a warning. Nothing is printed
of a key or certificate but its path.

Layout of ``--out``, one folder per machine::

    ca/ca.crt ca/ca.key                       keep ca.key offline: it signs certificates
    superlink/ca.crt server.pem server.key    the SuperLink's machine (state.db is created there)
    sites/<site>/ca.crt <site>.key <site>.key.pub node-config.toml    each site's machine
    flwr/config.toml                          the connection entry for $FLWR_HOME/config.toml
    COMMANDS.md  deploy.json                  what to run; the same as data
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from fedimb.app.process import OFFLINE_ENV
from fedimb.config import ConfigError
from fedimb.protocol import NODE_DATA_PATH, NODE_PARTITION_ID

console = Console(stderr=True)
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
DEFAULT_PORT = 9093
DEFAULT_NODE_PORT = 9094  # flower-supernode's own default; site i gets this + i
DEFAULT_DATA_ROOT = "/data/fedimb"
DEFAULT_CONNECTION = "fedimb"
# every flwr process: offline, and no `uv sync` of the app's dependencies at a site
FLWR_ENV = {key: OFFLINE_ENV[key] for key in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK")} | {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
CLIENTAPP_LAUNCHERS = ("warm", "flower")
INSECURE_WARNING = ("warning: --insecure: no TLS and no node authentication. Anyone who can reach the "
                    "SuperLink can join the federation and read the model; use it on a closed test network only")


@dataclass(frozen=True)
class SitePlan:
    """One site: its name, SuperNode port, data path (on its machine) and files (relative to ``--out``)."""

    name: str
    port: int
    data_path: str
    ca: str | None
    private_key: str | None
    public_key: str | None
    node_config: str
    partition_id: int = 0  # the site's client id in the federation: its place in --sites


@dataclass(frozen=True)
class DeployPlan:
    """What ``deploy init`` writes; ``deploy.json`` holds it (paths relative to the output folder)."""

    host: str
    port: int
    connection: str
    insecure: bool
    sites: tuple[SitePlan, ...]
    ca: str | None = None
    server_cert: str | None = None
    server_key: str | None = None
    superlink_ca: str | None = None
    database: str = "superlink/state.db"
    flwr_config: str = "flwr/config.toml"
    # how a site starts its ClientApp processes: "warm" (fedimb deploy superexec beside a SuperNode with
    # --isolation process) or "flower" (the SuperNode's own SuperExec, a fresh process per message)
    clientapp: str = "warm"

    @property
    def address(self) -> str:
        """``host:port`` as SuperNodes and flwr dial it (IPv6 in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def read(cls, out: Path) -> DeployPlan:
        """The plan a ``deploy init`` wrote into ``out``."""
        raw = json.loads((Path(out) / "deploy.json").read_text())
        return cls(**{**raw, "sites": tuple(SitePlan(**s) for s in raw["sites"])})


# ---------------------------------------------------------------- checks (before any work)


def parse_sites(text: str) -> tuple[str, ...]:
    """``a,b,c`` → ``("a", "b", "c")``; names are file and TOML safe, unique, at least one."""
    names = tuple(s.strip() for s in text.split(","))
    bad = [n for n in names if not SITE_NAME.match(n)]
    if bad or not names:
        raise ConfigError("--sites", f"'{bad[0] if bad else text}' is not a site name: use letters, digits, "
                                     "'.', '_' or '-' (not first), up to 63 characters, comma-separated")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError("--sites", f"'{dupes[0]}' appears twice; site names must be unique")
    return names


def check_host(host: str) -> str:
    """A DNS name or an IP address, without scheme or port."""
    from fedimb.pki import is_ip

    if is_ip(host):
        return host
    labels = host.rstrip(".").split(".")
    if host and len(host) <= 253 and all(HOST_LABEL.match(label) for label in labels):
        return host
    raise ConfigError("--host", f"'{host}' is not a host name or IP address (give it without scheme or port, "
                                "e.g. superlink.example.org or 10.0.0.5)")


def check_port(field_name: str, port: int) -> int:
    """A TCP port number."""
    if not 1 <= port <= 65535:
        raise ConfigError(field_name, f"must be a port in 1..65535, got {port}")
    return port


def check_out(out: Path) -> None:
    """Refuse to write over an earlier deployment's keys."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("--out", f"{out} exists and is not an empty folder; keys are never overwritten, "
                                   "choose a new folder")


# ---------------------------------------------------------------- the plan and its files


def make_plan(sites: tuple[str, ...], host: str, port: int, node_port: int, data_root: str, connection: str,
              insecure: bool, clientapp: str = "warm") -> DeployPlan:
    """Where every file goes and which port every site uses."""
    site_plans = []
    for i, name in enumerate(sites):
        folder = f"sites/{name}"
        site_plans.append(SitePlan(
            name, node_port + i, f"{data_root.rstrip('/')}/{name}",
            None if insecure else f"{folder}/ca.crt", None if insecure else f"{folder}/{name}.key",
            None if insecure else f"{folder}/{name}.key.pub", f"{folder}/node-config.toml", partition_id=i))
    if insecure:
        return DeployPlan(host, port, connection, True, tuple(site_plans), clientapp=clientapp)
    return DeployPlan(host, port, connection, False, tuple(site_plans), ca="ca/ca.crt",
                      server_cert="superlink/server.pem", server_key="superlink/server.key",
                      superlink_ca="superlink/ca.crt", clientapp=clientapp)


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid TOML basic string


def node_config_pairs(site: SitePlan) -> list[str]:
    """A site's node config as TOML ``key=value`` pairs (the path is a quoted string)."""
    return [f"{NODE_PARTITION_ID}={site.partition_id}", f"{NODE_DATA_PATH}={_toml_string(site.data_path)}"]


def node_config_arg(site: SitePlan) -> str:
    """The ``--node-config`` value of a site: its pairs, space-separated."""
    return " ".join(node_config_pairs(site))


def flwr_connection(plan: DeployPlan, out: Path) -> str:
    """The ``[superlink.<connection>]`` entry for ``$FLWR_HOME/config.toml``."""
    lines = [f"[superlink.{plan.connection}]", f"address = {_toml_string(plan.address)}"]
    if plan.insecure:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {_toml_string(str(out / str(plan.ca)))}")
    return "\n".join(lines) + "\n"


def _write_keys(plan: DeployPlan, root: Path) -> None:
    from fedimb.pki import make_ca, make_node_key, make_server_cert, write_cert, write_node_key, write_rsa_key

    ca = make_ca()
    write_rsa_key(ca.key, root / "ca" / "ca.key")
    for ca_path in (plan.ca, plan.superlink_ca, *(s.ca for s in plan.sites)):
        write_cert(ca.cert, root / str(ca_path))
    key, cert = make_server_cert(ca, plan.host)
    write_rsa_key(key, root / str(plan.server_key))
    write_cert(cert, root / str(plan.server_cert))
    for site in plan.sites:
        write_node_key(make_node_key(), root / str(site.private_key), root / str(site.public_key))


def write_deployment(plan: DeployPlan, out: Path) -> None:
    """Write every file of ``plan`` into ``out`` (built beside it, then moved in whole)."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for folder in ("ca", "superlink", "flwr", *(f"sites/{s.name}" for s in plan.sites)):
            (tmp / folder).mkdir(parents=True, mode=0o700)
        if not plan.insecure:
            _write_keys(plan, tmp)
        for site in plan.sites:
            (tmp / site.node_config).write_text("\n".join(node_config_pairs(site)) + "\n")
        (tmp / plan.flwr_config).write_text(flwr_connection(plan, out))
        (tmp / "COMMANDS.md").write_text(commands_text(plan, out))
        (tmp / "deploy.json").write_text(json.dumps(asdict(plan), indent=1) + "\n")
        if out.exists():
            out.rmdir()  # checked empty before any work
        tmp.chmod(0o700)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def listen_host(host: str) -> str:
    """The SuperLink's ``--host``: loopback stays on loopback, anything else listens on every interface."""
    if host in ("localhost", "127.0.0.1", "::1"):
        return "::1" if host == "::1" else "127.0.0.1"
    return "::" if ":" in host else "0.0.0.0"


def superlink_command(plan: DeployPlan, out: Path) -> list[str]:
    """``flower-superlink`` with TLS, node authentication and a state database (or ``--insecure``)."""
    cmd = ["flower-superlink", "--host", listen_host(plan.host), "--port", str(plan.port)]
    if plan.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(out / str(plan.superlink_ca)), "--ssl-certfile",
                str(out / str(plan.server_cert)), "--ssl-keyfile", str(out / str(plan.server_key)),
                "--enable-supernode-auth"]
    return [*cmd, "--database", str(out / plan.database)]


def register_command(plan: DeployPlan, site: SitePlan, out: Path) -> list[str]:
    """``flwr supernode register`` of one site's public key."""
    return ["flwr", "supernode", "register", str(out / str(site.public_key)), plan.connection, "--name", site.name]


def supernode_command(plan: DeployPlan, site: SitePlan, out: Path) -> list[str]:
    """``flower-supernode`` of one site: the CA, its private key, its own port and its data path."""
    cmd = ["flower-supernode", "--superlink", plan.address]
    if plan.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(out / str(site.ca)), "--auth-supernode-private-key",
                str(out / str(site.private_key))]
    if plan.clientapp == "warm":
        cmd += ["--isolation", "process"]  # its SuperExec is superexec_command's, started beside it
    return [*cmd, "--port", str(site.port), "--node-config", node_config_arg(site)]


def superexec_command(node_port: int, parent_pid: int | None = None) -> list[str]:
    """``fedimb deploy superexec`` for a site whose SuperNode runs with ``--isolation process`` on
    ``node_port``: its ClientApp tasks fork from a preloaded process. It dials the SuperNode's Runtime API
    on loopback. ``parent_pid``: the SuperNode's, so that it exits with it."""
    cmd = ["fedimb", "deploy", "superexec", "--runtime-api-address", f"127.0.0.1:{node_port}", "--insecure"]
    return cmd + (["--parent-pid", str(parent_pid)] if parent_pid is not None else [])


def _shell(cmd: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in cmd)


def commands_text(plan: DeployPlan, out: Path) -> str:
    """``COMMANDS.md``: the exact commands, in order, with absolute paths under ``out``."""
    env = " ".join(f"{k}={v}" for k, v in FLWR_ENV.items())
    home = '"${FLWR_HOME:-$HOME/.flwr}"'
    security = ("**INSECURE**: no TLS, no node authentication (closed test networks only)" if plan.insecure
                else "TLS (the CA in `ca/`) and node authentication (one key per site)")
    parts = [
        f"# fedimb deployment: SuperLink at {plan.address}, sites {', '.join(s.name for s in plan.sites)}\n",
        f"Written by `fedimb deploy init`; {security}. Paths are where this folder is now: copy `superlink/` "
        "to the SuperLink's machine and `sites/<site>/` to each site's machine and adjust them there. "
        "`ca/ca.key` signs certificates: keep it offline, no machine needs it.\n",
        f"Every flwr process, on every machine (offline machines need the last one):\n\n```bash\nexport {env}\n```\n",
        f"## 1. SuperLink (on {plan.host})\n\n```bash\n{_shell(superlink_command(plan, out))}\n```\n",
        "`--database` keeps the SuperLink's state across restarts. A rehearsal with every SuperNode on "
        "the SuperLink's machine should leave it out: starved of CPU, its SQLite state gave up on a lock "
        "and lost a site's reply in 3 of 4 loaded runs (docs/deploy.md).\n\n"
        "Ready when `/health` answers: "
        + (f"`curl http://{plan.address}/health`" if plan.insecure
           else f"`curl --cacert {shlex.quote(str(out / str(plan.ca)))} https://{plan.address}/health`") + ".\n",
        f"## 2. The flwr connection `{plan.connection}` (where runs are submitted)\n\n```bash\n"
        f"mkdir -p {home} && cat {shlex.quote(str(out / plan.flwr_config))} >> {home}/config.toml\n```\n",
    ]
    if not plan.insecure:
        registers = "\n".join(_shell(register_command(plan, s, out)) for s in plan.sites)
        parts.append(f"## 3. Register each site's public key (once)\n\n```bash\n{registers}\n"
                     f"flwr supernode list {plan.connection}\n```\n")
    warm = plan.clientapp == "warm"
    nodes = "\n".join(f"# {s.name}\n{_shell(supernode_command(plan, s, out))}"
                      + (f" &\n{_shell(superexec_command(s.port))}" if warm else "") for s in plan.sites)
    parts += [
        f"## {3 if plan.insecure else 4}. One SuperNode per site (on the site's machine)\n\n```bash\n{nodes}\n```\n",
        ("Beside each SuperNode (started with `--isolation process`), `fedimb deploy superexec` serves its "
         "ClientApp tasks: Flower's SuperExec whose task processes are forked from one that has already imported "
         "Flower's runtime, numpy and torch, instead of a fresh `flwr-clientapp` process per message (each task "
         "still loads the ClientApp from the submitted app). It talks to its SuperNode on loopback only. "
         "`fedimb deploy init --clientapp flower` writes the SuperNodes without it, Flower's default.\n"
         if warm else "Each SuperNode starts Flower's own SuperExec: a new `flwr-clientapp` process per "
         "message (`fedimb deploy init --clientapp warm`, the default, forks them from a preloaded process).\n"),
        "`data-path` is the site's data as it is (a `.npz` with `x`/`y` and optionally `x_test`/`y_test`, a "
        "`datasets` `save_to_disk` folder, or an image folder `<class>/<image>` or `train/` + `test/`; see "
        "`fedimb/data/sites.py`). `fedimb partition CONFIG --export DIR` writes a simulated split as such "
        "folders, to rehearse on exactly that split.\n",
        f"## {4 if plan.insecure else 5}. Run and watch (from the fedimb repository)\n\n```bash\n"
        f"fedimb deploy run experiments/quickstart.yaml --connection {plan.connection} --out /abs/path/runs/deploy\n"
        f"flwr log RUN_ID {plan.connection} --show   # the ServerApp's log, if it failed\n```\n",
        "`fedimb deploy run` submits the experiment (key=value overrides after the YAML), follows it and exits "
        "0 only when its status is `finished:completed` (`flwr run --stream` exits 0 on a failed run too). "
        "The run directory is written on the SuperLink's machine under `--out`.\n",
    ]
    return "\n".join(parts)


# ---------------------------------------------------------------- CLI


def deploy_init(args: argparse.Namespace) -> int:
    """``fedimb deploy init``: check every argument, then write the deployment folder."""
    sites = parse_sites(args.sites)
    host = check_host(args.host)
    port = check_port("--port", args.port)
    node_port = check_port("--node-port", args.node_port)
    check_port("--node-port", node_port + len(sites) - 1)
    if not SITE_NAME.match(args.connection):
        raise ConfigError("--connection", f"'{args.connection}' is not a connection name: letters, digits, '.', "
                                          "'_' or '-'")
    if not args.data_root.startswith("/"):
        raise ConfigError("--data-root", f"must be an absolute path (on the sites' machines), got '{args.data_root}'")
    out = Path(args.out)
    check_out(out)
    if args.insecure:
        console.print(f"[yellow]{INSECURE_WARNING}[/]", highlight=False, soft_wrap=True)
    plan = make_plan(sites, host, port, node_port, args.data_root, args.connection, args.insecure, args.clientapp)
    write_deployment(plan, out)
    out = out.resolve()
    console.print(f"deployment for {len(sites)} site{'s' if len(sites) > 1 else ''} → {out} "
                  f"(SuperLink {plan.address}, {'INSECURE' if plan.insecure else 'TLS + node authentication'})",
                  highlight=False, soft_wrap=True)
    console.print(f"commands: {out / 'COMMANDS.md'}", highlight=False, soft_wrap=True)
    return 0


def deploy_superexec(args: argparse.Namespace) -> int:
    """``fedimb deploy superexec ARGS``: Flower's SuperExec with warm ClientApp processes; runs until stopped."""
    from fedimb.app.warm_superexec import main

    main(list(args.args))
    return 0


def add_deploy_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``deploy init``, ``deploy superexec`` and ``deploy run`` under the ``fedimb`` command's subparsers."""
    deploy = sub.add_parser("deploy", help="prepare a SuperLink/SuperNode deployment (certificates, keys, commands)")
    actions = deploy.add_subparsers(dest="deploy_command", required=True)
    init = actions.add_parser("init", help="a CA, the SuperLink certificate, site keys, the flwr connection and "
                                           "COMMANDS.md")
    init.add_argument("--sites", required=True, help="comma-separated site names, e.g. a,b,c")
    init.add_argument("--host", required=True, help="the SuperLink's DNS name or IP address, as sites dial it")
    init.add_argument("--out", required=True, help="a new (or empty) folder")
    init.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"SuperLink port (default {DEFAULT_PORT})")
    init.add_argument("--node-port", type=int, default=DEFAULT_NODE_PORT,
                      help=f"site i's SuperNode runs its local API on this + i (default {DEFAULT_NODE_PORT})")
    init.add_argument("--data-root", default=DEFAULT_DATA_ROOT,
                      help=f"site s reads its data from DATA_ROOT/s on its machine (default {DEFAULT_DATA_ROOT})")
    init.add_argument("--connection", default=DEFAULT_CONNECTION,
                      help=f"name of the flwr connection entry (default {DEFAULT_CONNECTION})")
    init.add_argument("--insecure", action="store_true",
                      help="no TLS and no node authentication (prints a warning; closed test networks only)")
    init.add_argument("--clientapp", choices=CLIENTAPP_LAUNCHERS, default="warm",
                      help="warm (default): each site's ClientApp tasks fork from a preloaded process (fedimb deploy "
                           "superexec); flower: the SuperNode's own SuperExec, a new process per message")
    init.set_defaults(func=deploy_init)
    superexec = actions.add_parser(
        "superexec", help="a site's SuperExec whose ClientApp tasks fork from a preloaded process (flower-superexec's "
                          "arguments)", add_help=False, prefix_chars="+")  # every --option is flower-superexec's
    superexec.add_argument("args", nargs=argparse.REMAINDER, help="flower-superexec's arguments")
    superexec.set_defaults(func=deploy_superexec)

    from fedimb.app.deploy_run import add_run_parser  # it imports this module

    add_run_parser(actions)
