"""A network laboratory on one machine (DESIGN.md §11): namespaced hosts on a private switch.

Every host is a network namespace wired by a veth pair to a bridge inside a switch namespace the lab
creates. Addresses come from a private /24 that exists only inside the lab's namespaces; no interface is
ever created in the caller's namespace, so nothing the lab does can reach any other address. Optional
per-host shaping (``tc ... tbf``) and random packet loss (``nftables`` ``numgen``; ``netem`` is not in
this kernel), and NAT routers (``nft`` masquerade) for hosts behind them.

    with NetLab(prefix="p2pt", rate="50mbit", loss=0.0) as lab:
        a, b = lab.add_host("a"), lab.add_host("b")
        server = a.popen([sys.executable, "-m", "http.server", "--bind", a.address, "8000"])
        b.run(["curl", f"http://{a.address}:8000/"])

Teardown (``close``, also on exceptions) kills every process group started through ``Host.popen``, then
anything still running inside the lab's namespaces, and deletes the namespaces (their veths and bridges
go with them). Namespace names are ``p2pnlab-<prefix>-<owner pid>-<random>-<host>``; on entry a lab
deletes leftovers of its own prefix whose owner process is gone and which no process holds. Every
subprocess call is bounded by a timeout. Needs root, iproute2, and ``nft`` when ``loss > 0`` or for NAT.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

MARKER = "p2pnlab"  # every namespace this module creates starts with "p2pnlab-"
DEFAULT_SUBNET_BASE = "10.213"  # the lab's /24 is 10.213.X.0/24, X random per lab
NAT_LAN_BASE = "172.16"  # router k's private side is 172.16.k.0/24
HOST_OFFSET = 10  # first host address in a /24 is .10
CMD_TIMEOUT_S = 15.0
KILL_GRACE_S = 3.0

_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,20}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_]{1,16}$")
_RATE_RE = re.compile(r"^\d+(?:\.\d+)?(?:[kmgt]?bit|[kmgt]?bps)$", re.IGNORECASE)


def exited_unreaped(proc: subprocess.Popen[Any]) -> bool:
    """Whether `proc` has exited, without reaping it: its pid stays reserved, so its process group can
    still be signalled without hitting someone else's."""
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # already reaped elsewhere
        return True
    return info is not None


class NetLabError(RuntimeError):
    """A lab command failed, or the lab could not be torn down completely."""


def run_cmd(
    argv: Sequence[str], *, timeout: float = CMD_TIMEOUT_S, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short administrative command with a timeout; NetLabError with its stderr on failure."""
    try:
        stdin = subprocess.DEVNULL if input is None else None  # `input` makes its own pipe
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, input=input, stdin=stdin, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise NetLabError(f"timed out after {timeout:.0f} s: {' '.join(argv)}") from exc
    except OSError as exc:
        raise NetLabError(f"cannot run {argv[0]}: {exc}") from exc
    if check and done.returncode != 0:
        raise NetLabError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def valid_rate(rate: str) -> bool:
    """Whether ``rate`` is a tc rate (``50mbit``, ``1gbit``, ``800kbit``)."""
    return bool(_RATE_RE.match(rate))


def list_netns(*, timeout: float = CMD_TIMEOUT_S) -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = run_cmd(["ip", "netns", "list"], timeout=timeout).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(netns: str, *, timeout: float = CMD_TIMEOUT_S) -> list[int]:
    """Processes whose network namespace is ``netns`` (``ip netns pids``)."""
    out = run_cmd(["ip", "netns", "pids", netns], timeout=timeout, check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def _pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _nft_drop_rule(loss: float) -> str:
    """``numgen`` drop rule for ``loss`` percent: per hundred when whole, else per mille or finer."""
    for modulus in (100, 1000, 10_000, 100_000, 1_000_000):
        threshold = loss * modulus / 100.0
        if abs(threshold - round(threshold)) < 1e-6:
            break
    return f"numgen random mod {modulus} < {round(threshold)} drop"


def netlab_available(*, nft: bool = False, tc: bool = False) -> tuple[bool, str]:
    """Whether this process can build a lab (root, ``ip``, ``ip netns add`` works), and why not.

    ``nft=True`` also requires a working ``nft`` inside a namespace (needed for loss and NAT), ``tc=True``
    a working ``tbf`` qdisc (needed for ``rate``).
    """
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return False, "not root: creating network namespaces needs root"
    for tool, wanted in (("ip", True), ("nft", nft), ("tc", tc)):
        if wanted and shutil.which(tool) is None:
            return False, f"`{tool}` not found (apt-get install {'nftables' if tool == 'nft' else 'iproute2'})"
    probe = f"{MARKER}-probe-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        run_cmd(["ip", "netns", "add", probe])
    except NetLabError as exc:
        return False, f"`ip netns add` does not work here: {exc}"
    try:
        run_cmd(["ip", "-n", probe, "link", "set", "lo", "up"])
        if nft:
            run_cmd(["ip", "netns", "exec", probe, "nft", "add", "table", "inet", "probe"])
        if tc:
            tbf = ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1mbit", "burst", "32kbit"]
            run_cmd(["ip", "netns", "exec", probe, *tbf, "latency", "50ms"])
    except NetLabError as exc:
        return False, str(exc)
    finally:
        with contextlib.suppress(NetLabError):
            run_cmd(["ip", "netns", "delete", probe])
    return True, "ok"


class Host:
    """One namespaced host of a NetLab. Made by ``NetLab.add_host`` / ``NetLab.add_nat_router``.

    ``address`` is its address on the lab switch (for a host behind NAT: on the router's private side;
    ``gateway`` is then the router). A router also has ``lan_address`` and ``lan_subnet``.
    """

    def __init__(
        self,
        lab: NetLab,
        name: str,
        netns: str,
        address: str,
        *,
        interface: str = "eth0",
        gateway: str | None = None,
        lan_address: str | None = None,
        lan_subnet: str | None = None,
    ) -> None:
        self._lab = lab
        self.name = name
        self.netns = netns
        self.address = address
        self.interface = interface
        self.gateway = gateway
        self.lan_address = lan_address
        self.lan_subnet = lan_subnet
        self.behind: Host | None = None  # the NAT router in front of this host, if any

    def __repr__(self) -> str:
        return f"Host({self.name!r}, netns={self.netns!r}, address={self.address!r})"

    @property
    def exec_prefix(self) -> list[str]:
        """argv prefix that runs a command inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns]

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in this host, in its own session and process group; ended at lab teardown.

        Keyword arguments go to ``subprocess.Popen`` (``start_new_session`` is always True). To end it
        early use ``NetLab.kill(proc)``, which signals the process group, not just the ``ip`` wrapper.
        """
        if kw.get("start_new_session") is False or "process_group" in kw:
            raise ValueError("Host.popen always starts a new session; do not pass start_new_session/process_group")
        kw["start_new_session"] = True
        self._lab._check_open()
        proc: subprocess.Popen[Any] = subprocess.Popen([*self.exec_prefix, *argv], **kw)
        self._lab._procs.append(proc)
        log.debug("%s: started pid %d: %s", self.name, proc.pid, " ".join(argv))
        return proc

    def run(
        self, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in this host to completion (text output captured), killing its group on timeout.

        Raises ``subprocess.TimeoutExpired`` on timeout, ``subprocess.CalledProcessError`` when ``check``
        and the exit status is not 0.
        """
        stdin = subprocess.PIPE if input is not None else subprocess.DEVNULL
        proc = self.popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            self._lab.kill(proc)
            out, err = proc.communicate(timeout=KILL_GRACE_S)
            raise subprocess.TimeoutExpired(proc.args, timeout, output=out, stderr=err) from None
        finally:
            if proc.returncode is not None:
                self._lab.kill(proc)  # any children it left in its group; then forget it
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            done.check_returncode()
        return done


class NetLab:
    """Namespaced hosts on one private switch; a context manager that tears everything down on exit.

    ``rate`` (a tc rate such as ``"50mbit"``) shapes every host's egress with a tbf qdisc; ``loss``
    (percent, fractions allowed) drops that share of the packets arriving at every host (nftables input
    hook; loopback exempt), so a request and its answer each see it. NAT routers are neither shaped
    nor lossy. ``subnet`` picks the lab's /24 (default ``10.213.X.0/24`` with X random).
    """

    def __init__(
        self,
        prefix: str = "p2pt",
        rate: str | None = None,
        loss: float = 0.0,
        *,
        subnet: str | None = None,
        cmd_timeout: float = CMD_TIMEOUT_S,
        kill_grace: float = KILL_GRACE_S,
    ) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix must match {_PREFIX_RE.pattern} (no '-'), got {prefix!r}")
        if rate is not None and not valid_rate(rate):
            raise ValueError(f"rate must be a tc rate like '50mbit' or '1gbit', got {rate!r}")
        if not 0.0 <= loss < 100.0:
            raise ValueError(f"loss is a percentage in [0, 100), got {loss}")
        if subnet is None:
            subnet = f"{DEFAULT_SUBNET_BASE}.{secrets.randbelow(256)}.0/24"
        net = ipaddress.IPv4Network(subnet)
        if net.prefixlen != 24 or not net.is_private:
            raise ValueError(f"subnet must be a private /24, got {subnet}")
        self.prefix = prefix
        self.rate = rate
        self.loss = float(loss)
        self.subnet = str(net)
        self.cmd_timeout = cmd_timeout
        self.kill_grace = kill_grace
        self.netns_prefix = f"{MARKER}-{prefix}-"  # every namespace of every lab with this prefix
        self.tag = f"{self.netns_prefix}{os.getpid()}-{secrets.token_hex(3)}"  # this lab's namespaces
        self.switch_netns = f"{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        self._net = net
        self._namespaces: list[str] = []  # created, in creation order
        self._procs: list[subprocess.Popen[Any]] = []
        self._ports = 0  # switch ports used
        self._routers: dict[str, int] = {}  # router name -> hosts behind it so far
        self._started = False
        self._closed = False

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> NetLab:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # never mask the body's exception
            log.exception("netlab %s: teardown after %s failed", self.tag, exc_type.__name__ if exc_type else "?")

    def start(self) -> None:
        """Remove stale namespaces of this prefix, then create the switch (bridge ``br0``)."""
        if self._started:
            raise NetLabError("lab already started")
        self._started = True
        try:
            self.cleanup_stale()
            self._add_netns(self.switch_netns)
            self._ip("-n", self.switch_netns, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.switch_netns, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise
        log.info("netlab %s: switch up, subnet %s, rate %s, loss %g%%", self.tag, self.subnet, self.rate, self.loss)

    def cleanup_stale(self) -> list[str]:
        """Delete namespaces named ``p2pnlab-<this prefix>-<pid>-...`` whose owner pid is gone and that no
        process holds; return their names. Others (live owner, or processes inside) are left alone."""
        removed = []
        for name in list_netns(timeout=self.cmd_timeout):
            if not name.startswith(self.netns_prefix) or name.startswith(self.tag):
                continue
            owner = name[len(self.netns_prefix) :].split("-", 1)[0]
            if not owner.isdigit() or _pid_alive(int(owner)):
                continue
            holders = netns_pids(name, timeout=self.cmd_timeout)
            if holders:
                log.warning("netlab: stale namespace %s still holds pids %s; left alone", name, holders)
                continue
            if run_cmd(["ip", "netns", "delete", name], timeout=self.cmd_timeout, check=False).returncode == 0:
                removed.append(name)
        if removed:
            log.info("netlab: removed %d stale namespaces: %s", len(removed), ", ".join(removed))
        return removed

    def kill(self, proc: subprocess.Popen[Any]) -> None:
        """End a process started by ``Host.popen``: SIGTERM its group, SIGKILL after the grace period.

        The group is signalled while the leader is still unreaped (its pid cannot be reused then); a
        process the caller already reaped is only forgotten (the namespace sweep at teardown ends any
        group members left)."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.kill_grace
            while time.monotonic() < deadline and not exited_unreaped(proc):
                time.sleep(0.02)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=self.kill_grace)
            except subprocess.TimeoutExpired:
                log.warning("netlab %s: pid %d did not die after SIGKILL", self.tag, proc.pid)
                return
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def close(self) -> None:
        """Kill every process started here and delete every namespace; idempotent, best effort to the end.

        Raises NetLabError (after trying everything) if some namespace could not be deleted."""
        if self._closed:
            return
        self._closed = True
        for proc in list(self._procs):
            try:
                self.kill(proc)
            except Exception:
                log.exception("netlab %s: could not kill pid %d", self.tag, proc.pid)
        failed = []
        for netns in reversed(self._namespaces):  # hosts, then routers, then the switch
            try:
                self._sweep(netns)
                run_cmd(["ip", "netns", "delete", netns], timeout=self.cmd_timeout)
            except NetLabError as exc:
                if netns in list_netns(timeout=self.cmd_timeout):
                    failed.append(f"{netns}: {exc}")
        self._namespaces.clear()
        if failed:
            raise NetLabError("netlab teardown left namespaces: " + "; ".join(failed))
        log.info("netlab %s: torn down", self.tag)

    def _sweep(self, netns: str) -> None:
        """SIGKILL whatever still runs inside one of our namespaces (only our commands can be there)."""
        deadline = time.monotonic() + self.kill_grace
        while pids := netns_pids(netns, timeout=self.cmd_timeout):
            if time.monotonic() > deadline:
                log.warning("netlab %s: pids %s survive in %s", self.tag, pids, netns)
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    # ----------------------------------------------------------------- building

    def add_host(self, name: str, *, behind: Host | None = None) -> Host:
        """A new host on the switch (or, with ``behind=router``, on that NAT router's private side).

        Gets its own namespace, ``lo`` up, ``eth0`` with the next free address, the lab's shaping and loss.
        A host behind NAT has a default route via its router; the switch has no route to it.
        """
        netns = self._new_host_netns(name)
        if behind is None:
            address = self._next_switch_address()
            self._wire(self.switch_netns, netns, address, self._net.prefixlen)
            host = Host(self, name, netns, address)
        else:
            if behind.name not in self._routers or self.hosts.get(behind.name) is not behind:
                raise ValueError(f"{behind!r} is not a NAT router of this lab")
            if behind.lan_subnet is None or behind.lan_address is None:
                raise ValueError(f"{behind!r} has no private side")
            lan = ipaddress.IPv4Network(behind.lan_subnet)
            self._routers[behind.name] += 1
            address = str(lan.network_address + HOST_OFFSET + self._routers[behind.name] - 1)
            self._wire(behind.netns, netns, address, lan.prefixlen, port=f"l{self._routers[behind.name]}", bridge="lan")
            self._ip("-n", netns, "route", "add", "default", "via", behind.lan_address)
            host = Host(self, name, netns, address, gateway=behind.lan_address)
            host.behind = behind
        if self.rate is not None:
            tbf = ["tbf", "rate", self.rate, "burst", "256kbit", "latency", "200ms"]
            self._exec(netns, ["tc", "qdisc", "add", "dev", host.interface, "root", *tbf])
        if self.loss > 0:
            rules = (
                "table inet f {\n  chain in {\n    type filter hook input priority 0; policy accept;\n"
                f'    iifname != "lo" {_nft_drop_rule(self.loss)}\n  }}\n}}\n'
            )
            self._exec(netns, ["nft", "-f", "-"], input=rules)
        self.hosts[name] = host
        log.info("netlab %s: host %s at %s (%s)", self.tag, name, address, netns)
        return host

    def add_nat_router(self, name: str) -> Host:
        """A masquerading router: ``wan`` on the switch, bridge ``lan`` on a private 172.16.K.0/24.

        Hosts added with ``add_host(..., behind=router)`` reach the switch with the router's address; nothing
        on the switch can open a connection to them (no route), as for a volunteer behind a home NAT."""
        netns = self._new_host_netns(name)
        address = self._next_switch_address()
        self._wire(self.switch_netns, netns, address, self._net.prefixlen, peer_name="wan")
        lan = ipaddress.IPv4Network(f"{NAT_LAN_BASE}.{len(self._routers)}.0/24")
        lan_address = str(lan.network_address + 1)
        self._ip("-n", netns, "link", "add", "lan", "type", "bridge")
        self._ip("-n", netns, "addr", "add", f"{lan_address}/{lan.prefixlen}", "dev", "lan")
        self._ip("-n", netns, "link", "set", "lan", "up")
        self._exec(netns, ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        rules = (
            "table ip nat {\n  chain post {\n    type nat hook postrouting priority 100; policy accept;\n"
            '    oifname "wan" masquerade\n  }\n}\n'
        )
        self._exec(netns, ["nft", "-f", "-"], input=rules)
        router = Host(self, name, netns, address, interface="wan", lan_address=lan_address, lan_subnet=str(lan))
        self._routers[name] = 0
        self.hosts[name] = router
        log.info("netlab %s: NAT router %s at %s, private side %s", self.tag, name, address, lan)
        return router

    # ----------------------------------------------------------------- helpers

    def _check_open(self) -> None:
        if not self._started or self._closed:
            raise NetLabError("lab is not running (use `with NetLab(...) as lab:`)")

    def _new_host_netns(self, name: str) -> str:
        self._check_open()
        if not _NAME_RE.match(name):
            raise ValueError(f"host name must match {_NAME_RE.pattern}, got {name!r}")
        if name in self.hosts or name == "sw":
            raise ValueError(f"host name {name!r} already used in this lab")
        netns = f"{self.tag}-{name}"
        self._add_netns(netns)
        return netns

    def _next_switch_address(self) -> str:
        if HOST_OFFSET + self._ports >= self._net.num_addresses - 1:
            raise NetLabError(f"subnet {self.subnet} is full")
        address = str(self._net.network_address + HOST_OFFSET + self._ports)
        self._ports += 1
        return address

    def _wire(
        self,
        bridge_netns: str,
        netns: str,
        address: str,
        prefixlen: int,
        *,
        port: str | None = None,
        bridge: str = "br0",
        peer_name: str = "eth0",
    ) -> None:
        """veth ``port`` (in the bridge's namespace, enslaved to ``bridge``) <-> ``peer_name`` in ``netns``.
        Both ends are created directly inside lab namespaces; the caller's namespace never sees them."""
        port = port or f"p{self._ports}"
        self._ip("-n", bridge_netns, "link", "add", port, "type", "veth", "peer", "name", peer_name, "netns", netns)
        self._ip("-n", bridge_netns, "link", "set", port, "master", bridge, "up")
        self._ip("-n", netns, "addr", "add", f"{address}/{prefixlen}", "dev", peer_name)
        self._ip("-n", netns, "link", "set", peer_name, "up")

    def _add_netns(self, netns: str) -> None:
        self._ip("netns", "add", netns)
        self._namespaces.append(netns)
        self._ip("-n", netns, "link", "set", "lo", "up")

    def _ip(self, *args: str) -> None:
        run_cmd(["ip", *args], timeout=self.cmd_timeout)

    def _exec(self, netns: str, argv: Sequence[str], input: str | None = None) -> None:
        run_cmd(["ip", "netns", "exec", netns, *argv], timeout=self.cmd_timeout, input=input)
