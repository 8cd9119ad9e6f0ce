"""Turn a Slurm allocation into `torchrun` / `deepspeed` command lines, one launcher per node.

Why this exists: Slurm knows the nodes, torchrun and deepspeed need a rendezvous (master address,
port, node count, node rank, processes per node). Deriving that in one tested place keeps the sbatch
templates in ``launch/`` free of logic and identical for every engine.

Usage on each node of a job (the templates run it via ``srun --ntasks-per-node=1``)::

    python -m ds_soo.integrations.slurm launch [--dry-run] [-- PROGRAM ARGS...]
    python -m ds_soo.integrations.slurm env          # shell `export` lines of the rendezvous
    python -m ds_soo.integrations.slurm hostfile P   # write a deepspeed hostfile
    python -m ds_soo.integrations.slurm expand 'node[01-03,07],gpu5'

Environment read by ``launch`` (all optional; see launch/*.sbatch):
ENGINE (ddp|fsdp2|deepspeed), LAUNCHER (torchrun|deepspeed), CONFIG, DS_CONFIG, EXTRA, OUT, PROGRAM,
ENGINE_KEY, DS_CONFIG_KEY, GPUS_PER_NODE, TORCHRUN_RDZV (static|c10d), DS_SOO_MASTER_ADDR,
DS_SOO_MASTER_PORT, DS_SOO_HOSTFILE.

This module must not import torch: it runs before every job and its import time is paid per node.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ENGINES = ("ddp", "fsdp2", "deepspeed")
LAUNCHERS = ("torchrun", "deepspeed")
# Ports are drawn below the Linux ephemeral range (32768+) so a client socket cannot hold them.
PORT_BASE = 15000
PORT_SPAN = 15000
DEFAULT_PORT = 29500
SCONTROL_TIMEOUT_S = 10.0
# ds_soo.train overrides are `section.key=value`.
DEFAULT_ENGINE_KEY = "train.engine"
DEFAULT_DS_CONFIG_KEY = "train.ds_config"

_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")


class SlurmEnvError(RuntimeError):
    """The environment does not describe a usable allocation; the message names the variable."""


# ---------------------------------------------------------------------------------------------
# Hostlist expansion


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist such as ``node[01-03,07],gpu5`` into host names, in order.

    A pure-python twin of ``scontrol show hostnames`` for machines without Slurm's client tools
    (or without a slurm.conf, where scontrol fails). Supports comma lists, zero-padded ranges and
    several bracket groups per name (``r[1-2]n[1-2]`` is their cartesian product, last fastest).
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_item(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets; reject unbalanced brackets."""
    items: list[str] = []
    depth = 0
    current = ""
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in nodelist {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in nodelist {text!r}")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if depth != 0:
        raise ValueError(f"unbalanced '[' in nodelist {text!r}")
    items.append(current)
    if text and any(not item for item in items):
        raise ValueError(f"empty host name in nodelist {text!r}")
    return [item for item in items if item]


def _expand_item(item: str) -> list[str]:
    """Expand one host pattern (no top-level commas), e.g. ``rack[1-2]-n[01,03]``."""
    start = item.find("[")
    if start < 0:
        return [item]
    end = item.index("]", start)
    prefix, body, rest = item[:start], item[start + 1 : end], item[end + 1 :]
    suffixes = _expand_item(rest)
    return [f"{prefix}{num}{suffix}" for num in _expand_ranges(body, item) for suffix in suffixes]


def _expand_ranges(body: str, item: str) -> list[str]:
    """Expand ``01-03,07`` into ``['01', '02', '03', '07']``; width comes from the range start."""
    out: list[str] = []
    for part in body.split(","):
        match = _RANGE_RE.match(part.strip())
        if not match:
            raise ValueError(f"bad range {part!r} in nodelist item {item!r}")
        lo_text, hi_text = match.group(1), match.group(2)
        lo = int(lo_text)
        hi = int(hi_text) if hi_text is not None else lo
        if hi < lo:
            raise ValueError(f"descending range {part!r} in nodelist item {item!r}")
        width = len(lo_text) if lo_text.startswith("0") else 0
        out.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return out


def hostnames(nodelist: str, scontrol: str | None = "scontrol") -> list[str]:
    """Host names of ``nodelist``: ``scontrol show hostnames`` when it works, else the python expander.

    scontrol is preferred because it is the reference implementation, but it needs a slurm.conf
    (it exits non-zero without one, or retries for a minute when SLURM_CONF names a missing file),
    so it runs with a timeout and any failure falls back silently to :func:`expand_nodelist`.
    """
    exe = shutil.which(scontrol) if scontrol else None
    if exe:
        try:
            proc = subprocess.run(
                [exe, "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=SCONTROL_TIMEOUT_S,
                check=False,
            )
            hosts = proc.stdout.split()
            if proc.returncode == 0 and hosts:
                return hosts
        except (OSError, subprocess.TimeoutExpired):
            pass
    return expand_nodelist(nodelist)


# ---------------------------------------------------------------------------------------------
# Rendezvous


def master_port(job_id: str | None) -> int:
    """A port derived from the job id, so all nodes agree without talking and jobs rarely collide.

    crc32 rather than ``hash()``: python string hashing is salted per process.
    """
    if not job_id:
        return DEFAULT_PORT
    return PORT_BASE + zlib.crc32(job_id.encode()) % PORT_SPAN


def procs_per_node(env: Mapping[str, str]) -> int:
    """Processes to start on this node.

    Order: GPUS_PER_NODE (user override) > SLURM_GPUS_ON_NODE > CUDA_VISIBLE_DEVICES count > CPUs
    usable by this process (``nproc``), the CPU fallback that makes the same template work on
    CPU-only test machines.
    """
    for key in ("GPUS_PER_NODE", "SLURM_GPUS_ON_NODE"):
        value = env.get(key, "").strip()
        if value:
            count = int(value)
            if count < 1:
                raise SlurmEnvError(f"{key}={value} must be >= 1")
            return count
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("-1", "NoDevFiles"):
        return len([d for d in visible.split(",") if d.strip()])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _first(env: Mapping[str, str], *keys: str) -> str | None:
    for key in keys:
        value = env.get(key, "").strip()
        if value:
            return value
    return None


@dataclass(frozen=True)
class Rendezvous:
    """Everything a per-node launcher needs to join the job's process group."""

    hosts: tuple[str, ...]
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int
    job_id: str

    @property
    def nnodes(self) -> int:
        return len(self.hosts)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, scontrol: str | None = "scontrol") -> Rendezvous:
        """Read a Slurm task environment (as set by ``srun`` on each node, or by sbatch on node 0).

        Step variables win over job variables: inside ``srun`` they describe the nodes this step
        runs on (a step may use fewer nodes than the job), and SLURM_NODEID counts within the step.
        """
        env = os.environ if env is None else env
        nodelist = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        if nodelist is None:
            raise SlurmEnvError("no SLURM_JOB_NODELIST: not inside a Slurm allocation")
        hosts = tuple(hostnames(nodelist, scontrol))
        count = _first(env, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
        if count is not None and int(count) != len(hosts):
            raise SlurmEnvError(f"node count {count} does not match nodelist {nodelist!r} ({len(hosts)} hosts)")
        node_rank = int(_first(env, "SLURM_NODEID") or "0")
        if not 0 <= node_rank < len(hosts):
            raise SlurmEnvError(f"SLURM_NODEID={node_rank} outside 0..{len(hosts) - 1}")
        job_id = _first(env, "SLURM_JOB_ID", "SLURM_JOBID") or ""
        addr = _first(env, "DS_SOO_MASTER_ADDR") or hosts[0]
        port_text = _first(env, "DS_SOO_MASTER_PORT")
        port = int(port_text) if port_text else master_port(job_id)
        return cls(hosts, node_rank, procs_per_node(env), addr, port, job_id)

    def hostfile_text(self) -> str:
        """DeepSpeed hostfile: one ``host slots=N`` line per node, in node-rank order."""
        return "".join(f"{host} slots={self.nproc_per_node}\n" for host in self.hosts)

    def env_exports(self) -> dict[str, str]:
        """The conventional variable names, for scripts that want them (``eval $(... env)``)."""
        return {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "NNODES": str(self.nnodes),
            "NODE_RANK": str(self.node_rank),
            "GPUS_PER_NODE": str(self.nproc_per_node),
            "WORLD_SIZE": str(self.world_size),
        }


# ---------------------------------------------------------------------------------------------
# Command construction


def program_from_env(env: Mapping[str, str]) -> list[str]:
    """Training program and its arguments, from PROGRAM/CONFIG/ENGINE/DS_CONFIG/EXTRA/OUT.

    Produces e.g. ``-m ds_soo.train --config C train.engine=deepspeed train.ds_config=D lr=0.1 --out O``.
    The override keys follow ds_soo.train's ``section.key=value`` syntax; ENGINE_KEY / DS_CONFIG_KEY
    rename them for another program. EXTRA is split like a shell would (quotes allowed), so one
    --export value can carry many args.
    """
    program = shlex.split(env.get("PROGRAM", "").strip() or "-m ds_soo.train")
    args = list(program)
    if env.get("CONFIG"):
        args += ["--config", env["CONFIG"]]
    args.append(f"{env.get('ENGINE_KEY') or DEFAULT_ENGINE_KEY}={engine_from_env(env)}")
    if env.get("DS_CONFIG"):
        args.append(f"{env.get('DS_CONFIG_KEY') or DEFAULT_DS_CONFIG_KEY}={env['DS_CONFIG']}")
    args += shlex.split(env.get("EXTRA", ""))
    out = env.get("OUT") or _default_out(env)
    args += ["--out", out]
    return args


def _default_out(env: Mapping[str, str]) -> str:
    name = env.get("SLURM_JOB_NAME", "ds_soo")
    return os.path.join("runs", f"{name}-{env.get('SLURM_JOB_ID', 'local')}")


def engine_from_env(env: Mapping[str, str]) -> str:
    engine = env.get("ENGINE", "ddp").strip() or "ddp"
    if engine not in ENGINES:
        raise SlurmEnvError(f"ENGINE={engine!r}; expected one of {list(ENGINES)}")
    return engine


def launcher_from_env(env: Mapping[str, str]) -> str:
    """LAUNCHER if given, else deepspeed's own launcher for ENGINE=deepspeed and torchrun otherwise."""
    launcher = env.get("LAUNCHER", "").strip()
    if not launcher:
        launcher = "deepspeed" if engine_from_env(env) == "deepspeed" else "torchrun"
    if launcher not in LAUNCHERS:
        raise SlurmEnvError(f"LAUNCHER={launcher!r}; expected one of {list(LAUNCHERS)}")
    return launcher


def _split_program(program: Sequence[str]) -> tuple[bool, str, list[str]]:
    """(is_module, script_or_module, args) from ``['-m', 'pkg.mod', ...]`` or ``['x.py', ...]``."""
    if not program:
        raise SlurmEnvError("empty training program")
    if program[0] in ("-m", "--module"):
        if len(program) < 2:
            raise SlurmEnvError("'-m' needs a module name")
        return True, program[1], list(program[2:])
    return False, program[0], list(program[1:])


def torchrun_cmd(rdzv: Rendezvous, program: Sequence[str], backend: str = "static") -> list[str]:
    """torchrun for this node.

    ``static`` (default) fixes global rank = node_rank * nproc + local_rank, so ranks follow
    Slurm's node order and runs are reproducible; node 0 hosts the TCPStore at master_addr:port.
    ``c10d`` is torch's elastic rendezvous: node ranks are assigned in join order instead.
    """
    is_module, target, args = _split_program(program)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # = torchrun, but pinned to this interpreter's environment
        f"--nnodes={rdzv.nnodes}",
        f"--nproc_per_node={rdzv.nproc_per_node}",
        f"--rdzv_backend={backend}",
        f"--rdzv_endpoint={rdzv.master_addr}:{rdzv.master_port}",
        f"--rdzv_id={rdzv.job_id or 'ds_soo'}",
    ]
    if backend == "static":
        cmd.append(f"--node_rank={rdzv.node_rank}")
    elif backend != "c10d":
        raise SlurmEnvError(f"TORCHRUN_RDZV={backend!r}; expected 'static' or 'c10d'")
    cmd += (["-m", target] if is_module else [target]) + args
    return cmd


def deepspeed_cmd(rdzv: Rendezvous, program: Sequence[str], hostfile: str) -> list[str]:
    """deepspeed's launcher in ``--no_ssh`` mode for this node.

    Each node runs its own ``deepspeed --no_ssh --node_rank=R``, which reads the world from the
    hostfile and starts only the local ranks (as torchrun does). This needs neither ssh/pdsh nor
    mpi4py, and unlike ``--launcher slurm`` it honours ``--module``. ``--no_local_rank`` because
    ds_soo.train reads LOCAL_RANK from the environment instead of a ``--local_rank`` argument.
    """
    is_module, target, args = _split_program(program)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",  # = the `deepspeed` script, pinned to this interpreter
        f"--hostfile={hostfile}",
        "--no_ssh",
        f"--node_rank={rdzv.node_rank}",
        f"--master_addr={rdzv.master_addr}",
        f"--master_port={rdzv.master_port}",
        "--no_local_rank",
    ]
    if is_module:
        cmd.append("--module")
    cmd += [target] + args
    return cmd


def write_hostfile(rdzv: Rendezvous, path: str | None = None) -> str:
    """Write the hostfile to node-local storage (no shared filesystem needed); return its path."""
    if path is None:
        tag = f"{rdzv.job_id or os.getpid()}_{rdzv.node_rank}"
        path = os.path.join(tempfile.gettempdir(), f"ds_soo_hostfile_{tag}")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(rdzv.hostfile_text())
    return path


def build_command(env: Mapping[str, str], program: Sequence[str] | None = None) -> list[str]:
    """The full launcher command for this node (writes the hostfile for the deepspeed launcher)."""
    rdzv = Rendezvous.from_env(env)
    prog = list(program) if program else program_from_env(env)
    if launcher_from_env(env) == "deepspeed":
        return deepspeed_cmd(rdzv, prog, write_hostfile(rdzv, env.get("DS_SOO_HOSTFILE") or None))
    return torchrun_cmd(rdzv, prog, env.get("TORCHRUN_RDZV", "static").strip() or "static")


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_soo.integrations.slurm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_launch = sub.add_parser("launch", help="exec torchrun/deepspeed for this node")
    p_launch.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p_launch.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM ARGS (default: from env)")
    sub.add_parser("env", help="print `export K=V` lines for MASTER_ADDR, MASTER_PORT, NNODES, ...")
    p_host = sub.add_parser("hostfile", help="write a deepspeed hostfile")
    p_host.add_argument("path")
    p_expand = sub.add_parser("expand", help="print one host per line")
    p_expand.add_argument("nodelist")
    args = parser.parse_args(argv)

    try:
        if args.cmd == "expand":
            print("\n".join(expand_nodelist(args.nodelist)))
        elif args.cmd == "env":
            for key, value in Rendezvous.from_env().env_exports().items():
                print(f"export {key}={shlex.quote(value)}")
        elif args.cmd == "hostfile":
            write_hostfile(Rendezvous.from_env(), args.path)
        else:
            program = args.program[1:] if args.program[:1] == ["--"] else args.program
            cmd = build_command(os.environ, program)
            print("[ds_soo.slurm] " + shlex.join(cmd), file=sys.stderr, flush=True)
            if args.dry_run:
                print(shlex.join(cmd))
                return 0
            os.execvp(cmd[0], cmd)
    except (SlurmEnvError, ValueError) as err:
        print(f"ds_soo.integrations.slurm: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
