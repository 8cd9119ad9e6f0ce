#!/usr/bin/env bash
# Stop the daemons tests/infra/slurm_up.sh started, by the PIDs it recorded in STATE_DIR.
# munged is stopped only if slurm_up.sh started it (STATE_DIR/munged.pid exists).
# In namespace mode scancel must reach slurmctld from the first namespace: pass its name as $2.
set -euo pipefail

STATE="${1:?usage: slurm_down.sh STATE_DIR [NETNS]}"
client=()
if [[ -n "${2:-}" ]]; then
    client=(ip netns exec "$2")
fi
if [[ -f "${STATE}/slurm.conf" ]] && command -v scancel >/dev/null 2>&1; then
    # Jobs of this private cluster only (its own SLURM_CONF): none should outlive the test.
    SLURM_CONF="${STATE}/slurm.conf" timeout 10 "${client[@]}" scancel --full --quiet --user="$(id -un)" || true
fi
# TERM all first, then wait: each daemon needs 1-2 s to shut down, so in parallel it is ~2 s total.
pids=()
for pidfile in "${STATE}"/slurmd*.pid "${STATE}/slurmctld.pid" "${STATE}/munged.pid"; do
    [[ -s "${pidfile}" ]] || continue
    pid="$(cat "${pidfile}")"
    if kill -TERM "${pid}" 2>/dev/null; then
        pids+=("${pid}")
    fi
    rm -f "${pidfile}"
done
for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "${pid}" 2>/dev/null || break; sleep 0.05; done
    if kill -0 "${pid}" 2>/dev/null; then
        kill -KILL "${pid}" 2>/dev/null || true
    fi
done
