"""Drive the private test cluster of slurm_up.sh from python: start, submit, wait, stop.

Why not sacct/squeue: accounting is off in the test cluster (no slurmdbd), and squeue forgets a
job as soon as it ends; ``scontrol show job`` keeps it for MinJobAge (600 s in slurm_up.sh).
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from infra.trainer import clean_env

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
INSTALL_SCRIPT = ROOT / ".ci" / "slurm_setup.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}  # fmt: skip
EXIT_CANNOT_INSTALL = 3


class SlurmUnavailable(RuntimeError):
    """Slurm could not be installed here; the caller should skip."""


@dataclass
class SlurmCluster:
    state: Path
    conf: Path
    install_s: float
    start_s: float
    # Prefix for client commands (sbatch, scontrol): `ip netns exec NS` in namespace mode.
    client: tuple[str, ...] = ()

    def env(self, **extra: str) -> dict[str, str]:
        """A submit environment (this venv first on PATH, no outer SLURM_*) pointing at this cluster."""
        return clean_env(SLURM_CONF=str(self.conf), **extra)

    def sbatch(self, script: Path, env: dict[str, str], *args: str) -> str:
        """Submit ``script`` from the repo root (so SLURM_SUBMIT_DIR is the checkout); return the job id."""
        cmd = [*self.client, "sbatch", "--parsable", "--export=ALL", *args, str(script)]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> str:
        cmd = [*self.client, "scontrol", "show", "job", "-o", job_id]
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=30)
        match = re.search(r"JobState=(\S+)", proc.stdout)
        return match.group(1) if match else "UNKNOWN"

    def wait(self, job_id: str, timeout: float) -> str:
        """Poll until the job reaches a terminal state; cancel it and return TIMEOUT if it does not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in TERMINAL:
                return state
            time.sleep(0.5)
        subprocess.run([*self.client, "scancel", job_id], env=self.env(), capture_output=True, timeout=30)
        return "TEST_TIMEOUT"

    def run_template(self, template: str, env: dict[str, str], logdir: Path, *sbatch_args: str,
                     timeout: float = 300) -> str:  # fmt: skip
        """Submit launch/<template>, wait; return the job id, or raise with the job's log if it failed."""
        t0 = time.monotonic()
        job = self.sbatch(ROOT / "launch" / template, env, f"--output={logdir}/job-%j.out", "--time=10", *sbatch_args)
        state = self.wait(job, timeout)
        print(f"[timing] {template} ENGINE={env.get('ENGINE')}: submit->{state} {time.monotonic() - t0:.1f}s")
        if state != "COMPLETED":
            job_log = logdir / f"job-{job}.out"
            text = job_log.read_text()[-4000:] if job_log.exists() else "(no job log)"
            raise AssertionError(f"job {job} ended {state}\n{text}\n{self.logs()}")
        return job

    def logs(self) -> str:
        parts = []
        for path in sorted((self.state / "log").glob("*.log")):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)


def install() -> float:
    """Install Slurm and munge via apt if missing; return seconds spent (≈0 when present)."""
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SlurmUnavailable(f"{INSTALL_SCRIPT.name} failed: {proc.stderr.strip()[-800:]}")
    return time.monotonic() - t0


def start(state: Path, node_specs: tuple[str, ...] = ()) -> SlurmCluster:
    """Start the cluster; ``node_specs`` (``NETNS:HOST:ADDR``) puts one slurmd in each namespace."""
    install_s = install()
    client = ("ip", "netns", "exec", node_specs[0].split(":")[0]) if node_specs else ()
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(HERE / "slurm_up.sh"), str(state), *node_specs], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    if proc.returncode == EXIT_CANNOT_INSTALL:
        raise SlurmUnavailable(proc.stderr.strip())
    if proc.returncode != 0:
        stop(state, client)
        raise RuntimeError(f"slurm_up.sh failed ({proc.returncode}):\n{proc.stderr}")
    return SlurmCluster(state, state / "slurm.conf", install_s, time.monotonic() - t0, client)


def stop(state: Path, client: tuple[str, ...] = ()) -> None:
    netns = [client[-1]] if client else []
    subprocess.run(["bash", str(HERE / "slurm_down.sh"), str(state), *netns], capture_output=True, timeout=120)
