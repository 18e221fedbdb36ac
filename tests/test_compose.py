"""docker-compose.yml and deploy/Dockerfile: the containerised testnet runs the same run as `p2pnode testnet`.

No container engine runs on the development machines, so these tests read the files: the services and their
commands, the run settings each node ends up with (parsed by the real `p2pnode start` option parser, flags and
P2PNODE_* environment together) against `node_command`'s, and the two shell entrypoints, run here with a fake
`p2pnode`. `docker-compose config` validates the file where a compose client is installed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import fields
from pathlib import Path

import pytest
import typer
import yaml

from p2pnode.cli.app import app
from p2pnode.node.data import parse_class_set, parse_split
from p2pnode.node.settings import NodeSettings, RunSettings, TestnetSettings, build_settings, to_flags
from p2pnode.node.testnet import node_command

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
A_PEER_ID = "QmXfptdHU6hqG95JswxYVUH4bphcK8y18mhFcgUQFe6fCN"  # a well-formed peer id: --peers is parsed
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
RUN_ID = "compose"
NODES = [f"node{i}" for i in range(4)]
PAPER_SPLIT = ["0-1", "2-3", "4-6", "7-9"]
SHARED = "/shared"
ADDR_FILE = f"{SHARED}/bootstrap.addr"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def service(compose: dict, name: str) -> dict:
    return compose["services"][name]


def values_of(command: list[str], flag: str) -> list[str]:
    """Every value given to `flag` in an argument list (`--flag VALUE` or `--flag=VALUE`)."""
    found = []
    for i, arg in enumerate(command):
        if arg == flag and i + 1 < len(command):
            found.append(command[i + 1])
        elif arg.startswith(flag + "="):
            found.append(arg.split("=", 1)[1])
    return found


def one_value(command: list[str], flag: str) -> str:
    found = values_of(command, flag)
    assert len(found) == 1, f"{flag} should be given exactly once in {shlex.join(command)}, got {found}"
    return found[0]


def node_args(compose: dict, name: str) -> list[str]:
    command = service(compose, name)["command"]
    assert isinstance(command, list), f"{name}: give command as a list, not a shell string"
    return [str(a) for a in command]


def entrypoint_script(compose: dict, name: str) -> str:
    """The `sh -c` script of a service's entrypoint, with compose's `$$` escape turned into `$`."""
    entrypoint = service(compose, name)["entrypoint"]
    assert entrypoint[:2] == ["/bin/sh", "-c"], f"{name}: expected a /bin/sh -c entrypoint, got {entrypoint}"
    assert entrypoint[3:] == ["p2pnode"], f"{name}: the script's $0 should be p2pnode, then the command"
    return entrypoint[2].replace("$$", "$")


def parse_start(args: list[str], env: dict[str, str], monkeypatch) -> NodeSettings:
    """What `p2pnode start ARGS` would run with under `env`: the real option parser, then build_settings."""
    assert args[0] == "start", f"expected a `start` command, got {args[:1]}"
    for key in [k for k in os.environ if k.startswith("P2PNODE_") and k != "P2PNODE_TEST_SESSION"]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    start = typer.main.get_command(app).commands["start"]
    with start.make_context("start", list(args[1:])) as ctx:
        params = dict(ctx.params)
    values = {f.name: params[f.name] for f in fields(NodeSettings)}
    return build_settings(NodeSettings, values, params.get("config"))


def reference_settings() -> TestnetSettings:
    return TestnetSettings(run_id=RUN_ID).validate()


def reference_start_args(index: int) -> list[str]:
    """`node_command`'s arguments from `start` on (dropping `python -m p2pnode.cli.app`)."""
    command = node_command(reference_settings(), index, [f"/ip4/127.0.0.1/tcp/1/p2p/{A_PEER_ID}"], Path("/tmp/state"))
    return command[command.index("start") :]


def shared_run_settings(s: NodeSettings) -> dict:
    return {f.name: getattr(s, f.name) for f in fields(RunSettings)}


# --- services and commands ---------------------------------------------------------------------------------------


def test_compose_defines_a_bootstrap_service_and_four_node_services(compose):
    assert set(compose["services"]) == {"bootstrap", *NODES}


@pytest.mark.parametrize("index", range(4))
def test_each_node_runs_start_with_its_index_classes_node_count_and_run_id(compose, index):
    args = node_args(compose, f"node{index}")
    assert args[0] == "start"
    assert one_value(args, "--nodes") == "4"
    assert one_value(args, "--index") == str(index)
    assert one_value(args, "--run-id") == RUN_ID
    assert one_value(args, "--classes") == PAPER_SPLIT[index]
    assert parse_class_set(one_value(args, "--classes")) == parse_split(reference_settings().split)[index]


@pytest.mark.parametrize("index", range(4))
def test_node_run_settings_match_the_testnet_node_command(compose, index, monkeypatch):
    """Every shared run setting (model, data, split, topology, algorithm, epochs, lr, ...) that the compose
    node ends up with, from its flags and P2PNODE_* environment, equals what `node_command` passes."""
    name = f"node{index}"
    ours = parse_start(node_args(compose, name), service(compose, name).get("environment") or {}, monkeypatch)
    theirs = parse_start(reference_start_args(index), {}, monkeypatch)
    ours_run, theirs_run = shared_run_settings(ours), shared_run_settings(theirs)
    differing = {k: (ours_run[k], theirs_run[k]) for k in ours_run if ours_run[k] != theirs_run[k]}
    assert not differing, f"{name} differs from node_command (compose, testnet): {differing}"
    assert (ours.run_id, ours.index, ours.nodes) == (RUN_ID, index, 4)
    assert parse_class_set(ours.classes) == parse_class_set(theirs.classes)


def test_every_run_flag_of_the_testnet_is_covered_by_the_comparison():
    """The comparison above sees each flag that to_flags(TestnetSettings, RunSettings) passes to the nodes."""
    flags = {a[2:].removeprefix("no-").replace("-", "_") for a in to_flags(reference_settings()) if a.startswith("--")}
    assert flags, "to_flags produced no run flags"
    assert flags <= {f.name for f in fields(RunSettings)}
    assert {"model", "data", "split", "topology", "algorithm", "epochs", "lr", "nodes"} <= flags


def test_compose_environment_only_sets_known_run_settings(compose):
    run_fields = {f.name for f in fields(RunSettings)}
    for name in NODES:
        env = service(compose, name).get("environment") or {}
        unknown = [k for k in env if not k.startswith("P2PNODE_") or k[len("P2PNODE_") :].lower() not in run_fields]
        assert not unknown, f"{name}: environment sets what is not a run setting: {unknown}"
        assert all(isinstance(v, str) for v in env.values()), f"{name}: quote environment values (compose v1)"


@pytest.mark.parametrize("index", range(4))
def test_node_listens_on_all_interfaces_and_announces_its_service_name(compose, index):
    name = f"node{index}"
    args = node_args(compose, name)
    listen = re.fullmatch(r"/ip4/0\.0\.0\.0/tcp/(\d+)", one_value(args, "--listen"))
    announce = re.fullmatch(rf"/dns4/{name}/tcp/(\d+)", one_value(args, "--announce"))
    assert listen and announce, (
        f"{name}: listen {values_of(args, '--listen')}, announce {values_of(args, '--announce')}"
    )
    assert listen.group(1) == announce.group(1) == dockerfile_port()


def test_each_node_keeps_its_state_in_its_own_named_volume(compose):
    mounts = {}
    for name in NODES:
        assert one_value(node_args(compose, name), "--state-dir") == "/state"
        volumes = [v for v in service(compose, name)["volumes"] if v.split(":")[1] == "/state"]
        assert len(volumes) == 1, f"{name}: expected one volume at /state, got {volumes}"
        mounts[name] = volumes[0].split(":")[0]
    assert len(set(mounts.values())) == len(NODES), f"nodes share a state volume: {mounts}"
    assert set(mounts.values()) <= set(compose["volumes"]), "state volumes must be declared (named volumes)"


def test_bootstrap_has_a_fixed_identity_port_and_the_run_id_of_the_nodes(compose):
    args = [str(a) for a in service(compose, "bootstrap")["command"]]
    assert args[0] == "bootstrap"
    assert one_value(args, "--identity") == "/state/bootstrap.key"
    assert one_value(args, "--listen") == f"/ip4/0.0.0.0/tcp/{dockerfile_port()}"
    assert one_value(args, "--announce") == f"/dns4/bootstrap/tcp/{dockerfile_port()}"
    assert one_value(args, "--run-id") == RUN_ID
    volumes = service(compose, "bootstrap")["volumes"]
    assert any(v.split(":")[1] == "/state" for v in volumes), "the bootstrap key must live in a volume"


def test_nodes_wait_for_the_bootstrap_and_read_its_address_from_the_shared_volume(compose):
    shared = [v.split(":")[0] for v in service(compose, "bootstrap")["volumes"] if v.split(":")[1] == SHARED]
    assert len(shared) == 1, "the bootstrap must mount the shared address volume read-write"
    for name in NODES:
        node = service(compose, name)
        assert "bootstrap" in node["depends_on"]
        assert f"{shared[0]}:{SHARED}:ro" in node["volumes"], f"{name}: mount {shared[0]} read-only at {SHARED}"
        assert ADDR_FILE in entrypoint_script(compose, name)
    assert ADDR_FILE in entrypoint_script(compose, "bootstrap")


def test_nodes_are_restarted_only_after_a_failure_and_the_bootstrap_stays_up(compose):
    for name in NODES:
        assert str(service(compose, name)["restart"]).startswith("on-failure")
    assert service(compose, "bootstrap")["restart"] in ("unless-stopped", "always")


# --- the shell entrypoints, run here with a fake p2pnode ---------------------------------------------------------


def fake_p2pnode(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir()
    exe = bin_dir / "p2pnode"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)


def run_entrypoint(compose: dict, name: str, tmp_path: Path, fake_body: str, args: list[str]) -> subprocess.Popen:
    if shutil.which("sh") is None or shutil.which("paste") is None:
        pytest.skip("needs a POSIX sh and paste")
    shared = tmp_path / "shared"
    shared.mkdir(exist_ok=True)
    fake_p2pnode(tmp_path / "bin", fake_body)
    script = entrypoint_script(compose, name).replace(SHARED, str(shared)).replace("/state", str(tmp_path))
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PNODE_") or k == "P2PNODE_TEST_SESSION"}
    env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"
    return subprocess.Popen(
        ["/bin/sh", "-c", script, "p2pnode", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@contextlib.contextmanager
def ended(proc: subprocess.Popen):
    try:
        yield proc
    finally:  # the whole group, always: a child may outlive its shell wrapper
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(5)


def test_node_entrypoint_waits_for_the_bootstrap_address_then_passes_it_as_peers(compose, tmp_path):
    body = 'echo "peers=$P2PNODE_PEERS"\necho "args=$*"\n'
    with ended(run_entrypoint(compose, "node0", tmp_path, body, ["start", "--index", "0"])) as proc:
        time.sleep(1.5)
        assert proc.poll() is None, "the node started before the bootstrap address was there"
        (tmp_path / "shared" / "bootstrap.addr").write_text(
            "/dns4/bootstrap/tcp/1/p2p/QmA\n/ip4/10.0.0.2/tcp/1/p2p/QmA\n"
        )
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "peers=/dns4/bootstrap/tcp/1/p2p/QmA,/ip4/10.0.0.2/tcp/1/p2p/QmA\n" in out
    assert "args=start --index 0\n" in out


def test_p2pnode_start_reads_comma_separated_peers_from_the_environment(monkeypatch):
    peers = f"/dns4/bootstrap/tcp/1/p2p/{A_PEER_ID},/ip4/10.0.0.2/tcp/1/p2p/{A_PEER_ID}"
    settings = parse_start(["start", "--nodes", "4", "--index", "0"], {"P2PNODE_PEERS": peers}, monkeypatch)
    assert settings.peers == peers.split(",")


def test_bootstrap_entrypoint_publishes_the_printed_address_and_removes_it_on_stop(compose, tmp_path):
    addr = tmp_path / "shared" / "bootstrap.addr"
    addr.parent.mkdir()
    addr.write_text("/dns4/bootstrap/tcp/1/p2p/QmStaleFromAnOldRun\n")
    body = (
        'echo "$*" > "$(dirname "$0")/args"\n'
        "trap 'exit 0' TERM\n"
        "sleep 0.5\n"
        "echo /dns4/bootstrap/tcp/31337/p2p/QmFresh\n"
        "while :; do sleep 0.1; done\n"
    )
    with ended(run_entrypoint(compose, "bootstrap", tmp_path, body, ["bootstrap", "--run-id", RUN_ID])) as proc:
        assert wait_for(lambda: addr.exists() and "QmFresh" in addr.read_text(), 15), "no address published"
        assert addr.read_text() == "/dns4/bootstrap/tcp/31337/p2p/QmFresh\n"
        assert (tmp_path / "bin" / "args").read_text() == f"bootstrap --run-id {RUN_ID}\n"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert not addr.exists(), "the address file should go away with the bootstrap peer"


def test_bootstrap_entrypoint_fails_with_p2pnode_exit_code_when_it_prints_no_address(compose, tmp_path):
    with ended(run_entrypoint(compose, "bootstrap", tmp_path, "echo boom >&2\nexit 3\n", ["bootstrap"])) as proc:
        proc.communicate(timeout=15)
    assert proc.returncode == 3
    assert not (tmp_path / "shared" / "bootstrap.addr").exists()


# --- Dockerfile and build context --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def dockerfile_port() -> str:
    args = [v for k, v in dockerfile_instructions() if k == "ARG" and v.startswith("P2P_PORT=")]
    assert len(args) == 1, "deploy/Dockerfile should declare ARG P2P_PORT=<port>"
    return args[0].split("=", 1)[1]


def test_dockerfile_installs_the_locked_torch_and_runs_p2pnode_as_a_non_root_user():
    instructions = dockerfile_instructions()
    kinds = [k for k, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    run = " ".join(v for k, v in instructions if k == "RUN")
    lock = dict(line.split("==") for line in (ROOT / "requirements.lock").read_text().split() if "==" in line)
    assert f"torch=={lock['torch']}" in run and f"torchvision=={lock['torchvision']}" in run
    assert "-r /tmp/requirements.txt" in run and "--no-deps" in run
    users = [v for k, v in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")
    assert ("ENTRYPOINT", '["p2pnode"]') in instructions
    assert any(k == "VOLUME" and "/state" in v for k, v in instructions)
    assert ("EXPOSE", "${P2P_PORT}/tcp") in instructions
    assert any(k == "ARG" and v.startswith("TORCH_INDEX_URL=") for k, v in instructions)


def test_docker_build_context_leaves_out_the_venv_git_and_results():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", "results"} <= ignored


# --- validation by a compose client, where one is installed -----------------------------------------------------


def compose_client() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_docker_compose_config_accepts_the_file():
    client = compose_client()
    if client is None:
        docker = shutil.which("docker")
        version = subprocess.run([docker, "--version"], capture_output=True, text=True).stdout.strip() if docker else ""
        pytest.skip(f"no docker-compose and no `docker compose` plugin on PATH ({version or 'no docker CLI'})")
    done = subprocess.run(
        [*client, "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, f"{shlex.join(client)} config rejected docker-compose.yml:\n{done.stderr}"
