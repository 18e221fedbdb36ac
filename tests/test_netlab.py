"""The one-machine network lab (node/netlab.py, DESIGN.md §11): reachability, tbf shaping, nft loss, NAT,
and teardown that leaves nothing behind. Needs root and iproute2 (nftables for loss/NAT); skipped otherwise."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pnode.node.netlab import NetLab, _nft_drop_rule, list_netns, netlab_available, run_cmd

PY = sys.executable

TCP_ECHO_SERVER = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, peer = s.accept()
data = b""
while not data.endswith(b"\\n"):
    chunk = c.recv(4096)
    if not chunk:
        break
    data += chunk
c.sendall(data)
c.close()
print(peer[0], flush=True)
"""

TCP_ECHO_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.sendall(sys.argv[3].encode() + b"\\n")
reply = b""
while True:
    chunk = c.recv(4096)
    if not chunk:
        break
    reply += chunk
print(reply.decode().strip())
"""

TCP_SINK_SERVER = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
n = 0
while chunk := c.recv(1 << 16):
    n += len(chunk)
c.sendall(str(n).encode())
c.close()
"""

TCP_BULK_CLIENT = """
import socket, sys, time
size = int(sys.argv[3])
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
t0 = time.monotonic()
c.sendall(bytes(size))
c.shutdown(socket.SHUT_WR)
got = c.recv(64)
print(time.monotonic() - t0, got.decode())
"""

UDP_COUNTER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
seen = set()
s.settimeout(20)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        data = s.recv(64)
    except socket.timeout:
        break
    seen.add(int(data))
    s.settimeout(2)
print(len(seen), flush=True)
"""

UDP_SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(str(i).encode(), (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.002)
"""

CONNECT_PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("connected")
except OSError as exc:
    print("unreachable", type(exc).__name__)
"""


def require(*, nft: bool = False, tc: bool = False) -> None:
    ok, reason = netlab_available(nft=nft, tc=tc)
    if not ok:
        pytest.skip(f"network lab unavailable: {reason}")


def first_line(proc: subprocess.Popen[str], timeout: float = 15.0) -> str:
    """The first stdout line of a server (its port, printed once it listens), bounded in time."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no line from {proc.args} within {timeout} s")
    line = proc.stdout.readline().strip()
    assert line, f"{proc.args} exited without output: {proc.poll()}"
    return line


def gone(pid: int) -> bool:
    """Not running: no /proc entry, or a zombie nobody reaped yet."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status


def bulk_seconds(rate: str | None, size: int) -> float:
    """Seconds to push ``size`` bytes over TCP from host b to host a in a lab shaped at ``rate``."""
    with NetLab(prefix="p2ptrate", rate=rate) as lab:
        a, b = lab.add_host("a"), lab.add_host("b")
        sink = a.popen([PY, "-c", TCP_SINK_SERVER, a.address], stdout=subprocess.PIPE, text=True)
        port = first_line(sink)
        out = b.run([PY, "-c", TCP_BULK_CLIENT, a.address, port, str(size)], timeout=60).stdout.split()
        assert int(out[1]) == size, f"server received {out[1]} of {size} bytes"
        return float(out[0])


def test_nft_drop_rule_uses_per_mille_for_fractional_percent() -> None:
    assert _nft_drop_rule(30) == "numgen random mod 100 < 30 drop"
    assert _nft_drop_rule(0.5) == "numgen random mod 1000 < 5 drop"
    assert _nft_drop_rule(2.25) == "numgen random mod 10000 < 225 drop"


def test_lab_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        NetLab(prefix="has-dash")
    with pytest.raises(ValueError):
        NetLab(rate="fast")
    with pytest.raises(ValueError):
        NetLab(loss=100)
    with pytest.raises(ValueError):
        NetLab(subnet="8.8.8.0/24")  # never a public network


@pytest.mark.timeout(60)
def test_two_hosts_reach_each_other_over_tcp_on_lab_addresses_only() -> None:
    require()
    with NetLab(prefix="p2ptreach") as lab:
        a, b = lab.add_host("a"), lab.add_host("b")
        assert a.address != b.address and a.netns != b.netns
        # the lab's addresses exist only inside its namespaces, not in the namespace running the tests
        assert a.address not in run_cmd(["ip", "-o", "addr"]).stdout
        server = a.popen([PY, "-c", TCP_ECHO_SERVER, a.address], stdout=subprocess.PIPE, text=True)
        port = first_line(server)
        reply = b.run([PY, "-c", TCP_ECHO_CLIENT, a.address, port, "hello-from-b"], timeout=20).stdout.strip()
        assert reply == "hello-from-b"
        peer, _ = server.communicate(timeout=10)
        assert peer.strip() == b.address  # the server saw b's lab address: a direct path over the switch


@pytest.mark.timeout(120)
def test_tbf_rate_limits_tcp_throughput() -> None:
    require(tc=True)
    size = 2_000_000  # 16 Mbit: about 2 s at 8 mbit, milliseconds unshaped
    unshaped = bulk_seconds(None, size)
    shaped = bulk_seconds("8mbit", size)
    assert shaped >= 1.0, f"2 MB at 8 mbit took only {shaped:.2f} s: tbf did not shape"
    assert shaped <= 20.0, f"2 MB at 8 mbit took {shaped:.2f} s: far slower than the rate"
    assert unshaped < shaped / 3, f"unshaped {unshaped:.2f} s vs shaped {shaped:.2f} s"


@pytest.mark.timeout(120)
def test_nft_loss_drops_about_the_configured_share_of_udp_datagrams() -> None:
    require(nft=True)
    sent = 500
    with NetLab(prefix="p2ptloss", loss=30) as lab:
        a, b = lab.add_host("a"), lab.add_host("b")
        counter = a.popen([PY, "-c", UDP_COUNTER, a.address], stdout=subprocess.PIPE, text=True)
        port = first_line(counter)
        b.run([PY, "-c", UDP_SENDER, a.address, port, str(sent)], timeout=30)
        received = int(counter.communicate(timeout=40)[0].strip())
    missing = (sent - received) / sent
    # binomial(500, 0.3): 150 +- 10 missing; the bounds are ~10 standard deviations away
    assert 0.10 <= missing <= 0.50, f"{received}/{sent} datagrams arrived ({missing:.0%} missing), expected ~30%"


@pytest.mark.timeout(60)
def test_host_behind_nat_dials_out_as_the_router_and_cannot_be_dialed() -> None:
    require(nft=True)
    with NetLab(prefix="p2ptnat") as lab:
        public = lab.add_host("pub")
        router = lab.add_nat_router("r")
        inside = lab.add_host("home", behind=router)
        assert inside.behind is router and inside.address != router.address
        server = public.popen([PY, "-c", TCP_ECHO_SERVER, public.address], stdout=subprocess.PIPE, text=True)
        port = first_line(server)
        reply = inside.run([PY, "-c", TCP_ECHO_CLIENT, public.address, port, "out"], timeout=20).stdout.strip()
        assert reply == "out"
        peer, _ = server.communicate(timeout=10)
        assert peer.strip() == router.address  # masqueraded: the public host sees the router, not the host
        inner = inside.popen([PY, "-c", TCP_ECHO_SERVER, inside.address], stdout=subprocess.PIPE, text=True)
        inner_port = first_line(inner)
        probe = public.run([PY, "-c", CONNECT_PROBE, inside.address, inner_port], timeout=20).stdout
        assert probe.startswith("unreachable"), probe


@pytest.mark.timeout(60)
def test_teardown_removes_namespaces_and_kills_process_groups_even_when_body_raises() -> None:
    require()
    spawner = (
        "import subprocess, os, time; c = subprocess.Popen(['sleep', '60']); "
        "print(os.getpid(), c.pid, flush=True); time.sleep(60)"
    )
    with pytest.raises(RuntimeError, match="boom"), NetLab(prefix="p2ptdown") as lab:
        a = lab.add_host("a")
        lab.add_host("b")
        router = lab.add_nat_router("r") if netlab_available(nft=True)[0] else None
        if router is not None:
            lab.add_host("c", behind=router)
        ours = [n for n in list_netns() if n.startswith(lab.tag)]
        assert len(ours) >= 3  # switch + two hosts (+ router and the host behind it)
        proc = a.popen([PY, "-c", spawner], stdout=subprocess.PIPE, text=True)
        pids = [int(p) for p in first_line(proc).split()]
        assert not any(gone(p) for p in pids)
        raise RuntimeError("boom")
    assert [n for n in list_netns() if n.startswith(lab.netns_prefix)] == []
    deadline = time.monotonic() + 5
    while not all(gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(p) for p in pids), f"processes {pids} survived teardown"
    assert proc.returncode is not None  # the wrapper was reaped too


@pytest.mark.timeout(60)
def test_entry_removes_stale_namespaces_of_dead_owners_only() -> None:
    require()
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=10)
    stale = f"p2pnlab-p2ptstale-{dead.pid}-abcdef-x"
    live = f"p2pnlab-p2ptstale-{os.getpid()}-abcdef-y"  # a parallel lab whose owner still runs
    other = f"p2pnlab-p2ptother-{dead.pid}-abcdef-z"  # another prefix: not ours to judge
    for name in (stale, live, other):
        run_cmd(["ip", "netns", "add", name])
    try:
        with NetLab(prefix="p2ptstale"):
            names = list_netns()
            assert stale not in names
            assert live in names and other in names
    finally:
        for name in (stale, live, other):
            run_cmd(["ip", "netns", "delete", name], check=False)
