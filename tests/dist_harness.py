"""Run a worker function on N gloo ranks, torchrun-style, and collect one JSON result per rank.

Usage from a test::

    results = launch("tests/test_dist_exchange.py:worker_ddp", nproc=2, args={"seed": 0})

The target is ``path/to/file.py:function`` or ``package.module:function``. Each rank runs with the
torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), started either directly (default) or
by torchrun itself, with a gloo default process group already initialised and ``OMP_NUM_THREADS=1``;
it calls ``function(**args)``, which returns a JSON-able dict. A launch costs ~4-7 s here (mostly
``import torch`` in every process), so batch many checks into one worker.

Workers end with ``os._exit`` after flushing, which avoids most of torch/gloo's sporadic shutdown
abort (``terminate called without an active exception``, exit -6). If that abort still happens after
every rank wrote its result, the launch is retried once; any other failure is raised at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHUTDOWN_ABORT = "terminate called without an active exception"


class DistWorkerError(RuntimeError):
    """A rank raised, timed out, or the launcher failed; the message carries the tracebacks and log tail."""


def assert_no_failures(results: list[dict]) -> None:
    """Workers return {"failures": [...], "rows": [...] (optional)}: print the rows, fail on any failure."""
    for r in results:
        for row in r.get("rows", []):
            print(row)
    problems = [f"rank {rank}: {f}" for rank, r in enumerate(results) for f in r["failures"]]
    assert not problems, "\n".join(problems)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env(env: dict | None) -> dict:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full.get("PYTHONPATH")]))
    return full


def _kill(procs: list[subprocess.Popen]) -> None:
    """Kill the process groups this harness started (each child leads its own session)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait()


def _spawn(cmds_envs: list[tuple[list[str], dict]], logs: list[Path], timeout: float) -> int:
    """Start the processes, wait for all; if one fails, give the rest 2 s to report, then kill them."""
    procs = []
    try:
        for (cmd, env), log in zip(cmds_envs, logs, strict=True):
            with open(log, "w") as fh:
                proc = subprocess.Popen(
                    cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
                )
            procs.append(proc)
        deadline, failed_at = time.monotonic() + timeout, None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline:
                raise TimeoutError
            if failed_at is not None and now > failed_at + 2.0:
                break
            time.sleep(0.05)
    finally:
        _kill(procs)
    return next((p.returncode for p in procs if p.returncode != 0), 0)


def _run_once(
    target: str, nproc: int, args: dict, timeout: float, env: dict | None, launcher: str
) -> tuple[list, str, int]:
    with tempfile.TemporaryDirectory(prefix="ds_soo_dist_") as out:
        worker = [__file__, "--worker", target, out, json.dumps(args)]
        port = free_port()
        base = _base_env(env)
        if launcher == "torchrun":
            cmd = [
                sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
                "--master_addr=127.0.0.1", f"--master_port={port}", *worker,
            ]  # fmt: skip
            jobs = [(cmd, base)]
        elif launcher == "direct":
            # The environment torchrun gives each worker, without its agent process (~2 s cheaper here).
            common = {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "none"}  # fmt: skip
            jobs = [
                ([sys.executable, *worker], {**base, **common, "RANK": str(r), "LOCAL_RANK": str(r)})
                for r in range(nproc)
            ]
        else:
            raise ValueError(f"launcher must be 'direct' or 'torchrun', got {launcher!r}")
        logs = [Path(out, f"log{i}.txt") for i in range(len(jobs))]
        try:
            rc = _spawn(jobs, logs, timeout)
        except TimeoutError:
            log = "".join(p.read_text(errors="replace") for p in logs if p.exists())
            raise DistWorkerError(f"{target} timed out after {timeout}s\n{log[-4000:]}") from None
        log = "".join(p.read_text(errors="replace") for p in logs)
        results: list = [None] * nproc
        errors = []
        for r in range(nproc):
            ok, err = Path(out, f"rank{r}.json"), Path(out, f"rank{r}.error")
            if err.exists():
                errors.append(f"--- rank {r} ---\n{err.read_text()[-2500:]}")
            elif ok.exists():
                results[r] = json.loads(ok.read_text())
        if errors:
            raise DistWorkerError(f"{target} failed:\n" + "\n".join(errors) + f"\n--- log tail ---\n{log[-1500:]}")
        return results, log, rc


def launch(
    target: str,
    nproc: int = 2,
    args: dict | None = None,
    timeout: float = 180.0,
    env: dict | None = None,
    launcher: str = "direct",
    backend: str = "gloo",
) -> list[dict]:
    """Run ``target`` on ``nproc`` ranks and return the per-rank result dicts, in rank order.

    ``launcher="direct"`` starts the ranks itself with torchrun's environment variables;
    ``"torchrun"`` goes through ``python -m torch.distributed.run`` (slower by its agent's start-up).
    ``backend="nccl"`` puts rank r on ``cuda:r`` (one GPU per rank, as NCCL requires).
    """
    env = {**(env or {}), "DS_SOO_TEST_BACKEND": backend}
    for attempt in range(2):
        results, log, rc = _run_once(target, nproc, args or {}, timeout, env, launcher)
        complete = all(r is not None for r in results)
        verdict = judge(rc, complete, log, attempt)
        if verdict == "ok":
            return results
        if verdict == "retry":
            continue
        raise DistWorkerError(
            f"{target} exited with {rc} (results from {sum(r is not None for r in results)}"
            f"/{nproc} ranks)\n--- log tail ---\n{log[-4000:]}"
        )
    raise AssertionError("unreachable")


def judge(rc: int, complete: bool, log: str, attempt: int) -> str:
    """ "ok", "retry" (only the known exit abort after every rank wrote its result, only once) or "fail"."""
    if rc == 0 and complete:
        return "ok"
    if attempt == 0 and complete and SHUTDOWN_ABORT in log:
        return "retry"
    return "fail"


def _load(target: str):
    where, _, fn = target.rpartition(":")
    if where.endswith(".py"):
        path = Path(where) if Path(where).is_absolute() else ROOT / where
        spec = importlib.util.spec_from_file_location(f"_dist_worker_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, fn)


def _worker_main(target: str, out: str, args_json: str) -> None:
    rank = int(os.environ["RANK"])
    code = 0
    try:
        import torch
        import torch.distributed as dist

        backend = os.environ.get("DS_SOO_TEST_BACKEND", "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
        result = _load(target)(**json.loads(args_json))
        tmp = Path(out, f"rank{rank}.json.tmp")
        tmp.write_text(json.dumps(result))
        tmp.rename(Path(out, f"rank{rank}.json"))
    except BaseException:  # noqa: BLE001 - report everything, the parent decides
        Path(out, f"rank{rank}.error").write_text(traceback.format_exc())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        _worker_main(*sys.argv[2:])
    raise SystemExit("usage: dist_harness.py --worker TARGET OUTDIR ARGS_JSON (started by launch())")
