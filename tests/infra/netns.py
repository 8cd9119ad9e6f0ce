"""Two network namespaces joined by a veth pair: two "nodes" on one machine for launcher tests.

Why: a multi-node rendezvous bug (wrong master address, node rank, or interface) hides on a
single host where everything is 127.0.0.1. Here each "node" has its own network stack and an
address (10.77.0.x) that exists only inside the namespaces; neither namespace has a default
route, so rendezvous and gloo traffic cannot leave the veth pair. Host names for the simulated
nodes come from /etc/netns/<ns>/hosts, which ``ip netns exec`` bind-mounts over /etc/hosts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUBNET_PREFIX = "10.77.0"
IFNAME = "dsveth0"  # the veth end's name inside each namespace
SETUP_SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "netns_setup.sh"


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be created here (no `ip`, or no CAP_NET_ADMIN/CAP_SYS_ADMIN)."""


@dataclass(frozen=True)
class Node:
    """One simulated node: its namespace, veth interface, address and host name."""

    netns: str
    ifname: str
    addr: str
    hostname: str

    def netns_id(self) -> str:
        """``net:[inode]`` as /proc/<pid>/ns/net reads inside this namespace."""
        return f"net:[{os.stat(f'/run/netns/{self.netns}').st_ino}]"

    def exec_prefix(self) -> list[str]:
        """Run a command in this node's network namespace with its /etc/hosts."""
        return ["ip", "netns", "exec", self.netns]

    def spec(self) -> str:
        """``NETNS:HOST:ADDR``, the node argument of slurm_up.sh."""
        return f"{self.netns}:{self.hostname}:{self.addr}"


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


def ensure_ip_tool() -> None:
    """Install iproute2 through .ci/netns_setup.sh when `ip` is missing."""
    if shutil.which("ip"):
        return
    proc = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not shutil.which("ip"):
        raise NetnsUnavailable(f"`ip` missing and {SETUP_SCRIPT.name} failed: {proc.stderr.strip()[-500:]}")


def routes(netns: str) -> list[str]:
    """IPv4 routes inside ``netns``, one line each (used to prove there is no way out)."""
    proc = subprocess.run(["ip", "-n", netns, "-4", "route"], capture_output=True, text=True, check=True)
    return [line for line in proc.stdout.splitlines() if line.strip()]


def kill_namespace_processes(netns: str, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, the processes a test left inside its own namespace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
        pids = [int(p) for p in proc.stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
            if not left:
                return
            time.sleep(0.1)


@contextlib.contextmanager
def netns_pair(tag: str | None = None) -> Iterator[tuple[Node, Node]]:
    """Create namespaces A and B linked by a veth pair; always remove them (and their /etc files).

    Names carry the pid so concurrent test runs do not collide (veth names are limited to 15 chars).
    Raises NetnsUnavailable before yielding when the host does not allow namespaces.
    """
    ensure_ip_tool()
    tag = tag or str(os.getpid())
    nodes = tuple(
        Node(f"dssoo{tag}{side}", IFNAME, f"{SUBNET_PREFIX}.{i}", f"dssoo{tag}-n{i}")
        for i, side in ((1, "a"), (2, "b"))
    )
    created: list[str] = []
    etc_dirs: list[Path] = []
    tmp_names = [f"dsv{tag}{side}" for side in "ab"]
    try:
        for node in nodes:
            _ip("netns", "add", node.netns)
            created.append(node.netns)
        # Unique names while both ends are in the root namespace, then the same name in each
        # namespace: one GLOO_SOCKET_IFNAME then fits every node, as on a real cluster.
        _ip("link", "add", tmp_names[0], "type", "veth", "peer", "name", tmp_names[1])
        hosts = "127.0.0.1 localhost\n" + "".join(f"{n.addr} {n.hostname}\n" for n in nodes)
        for node, tmp_name in zip(nodes, tmp_names, strict=True):
            _ip("link", "set", tmp_name, "netns", node.netns)
            _ip("-n", node.netns, "link", "set", tmp_name, "name", node.ifname)
            _ip("-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", node.ifname)
            _ip("-n", node.netns, "link", "set", node.ifname, "up")
            _ip("-n", node.netns, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / node.netns
            etc.mkdir(parents=True, exist_ok=True)
            etc_dirs.append(etc)
            (etc / "hosts").write_text(hosts)
        yield nodes[0], nodes[1]
    finally:
        for netns in created:
            kill_namespace_processes(netns)
            # Deleting a namespace also deletes the veth end inside it, and so its peer.
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        for name in tmp_names:  # only left in the root namespace if setup failed half-way
            subprocess.run(["ip", "link", "del", name], capture_output=True)
        for etc in etc_dirs:
            shutil.rmtree(etc, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path("/etc/netns").rmdir()  # only if empty: other namespaces may keep files there
