#!/usr/bin/env bash
# Start a private Slurm cluster (munged + slurmctld + slurmd) for the tests.
#
#   tests/infra/slurm_up.sh STATE_DIR                      # one node: this host
#   tests/infra/slurm_up.sh STATE_DIR NETNS:HOST:ADDR ...  # one slurmd per network namespace
#   tests/infra/slurm_down.sh STATE_DIR                    # stop what this started, by PID
#
# Prints SLURM_CONF=STATE_DIR/slurm.conf once every node is idle.
# Everything (config, spool, state, logs, pid files) lives in STATE_DIR and the daemons listen on
# free ports, so it neither reads nor clobbers /etc/slurm and can coexist with another test cluster.
# munged is shared: reused if one already answers, otherwise started here (and its PID recorded).
#
# Namespace mode (see tests/infra/netns.py): each slurmd runs inside NETNS under its own UTS
# hostname HOST, with /etc/netns/NETNS/hosts bind-mounted on /etc/hosts, and registers as node
# HOST at ADDR; the first node also runs slurmctld. Clients (sbatch, scontrol) must then run in
# the first namespace. `nsenter --net` + `unshare --mount --uts` rather than `ip netns exec`,
# because the latter remounts /sys, hiding /sys/fs/cgroup, and slurmd refuses to start without it.
#
# Exit codes: 0 ok, 3 Slurm could not be installed (caller skips), anything else is a failure.
# Needs root (daemons run as SlurmUser=root; munged runs as the munge user).
set -euo pipefail

STATE="${1:?usage: slurm_up.sh STATE_DIR [NETNS:HOST:ADDR ...]}"
shift
NODE_SPECS=("$@")
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "${HERE}/../.." && pwd)"
mkdir -p "${STATE}"
STATE="$(cd "${STATE}" && pwd)"

if ! bash "${ROOT}/.ci/slurm_setup.sh" >"${STATE}/install.log" 2>&1; then
    echo "slurm_up: installing slurm-wlm/munge failed, see ${STATE}/install.log" >&2
    tail -5 "${STATE}/install.log" >&2 || true
    exit 3
fi

# --- munge: the authentication every Slurm RPC needs (a unix socket: reachable from any netns) --
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    # The pid file must be writable by the munge user (STATE may sit under a 0700 pytest dir).
    pidfile="/run/munge/munged.dssoo.$$.pid"
    runuser -u munge -- /usr/sbin/munged --pid-file="${pidfile}" --force
    for _ in $(seq 50); do munge_ok && [[ -s "${pidfile}" ]] && break; sleep 0.1; done
    munge_ok || { echo "slurm_up: munged did not come up" >&2; exit 1; }
    cp "${pidfile}" "${STATE}/munged.pid"
fi

# --- slurm.conf ------------------------------------------------------------------------------
# The CPUs this process may run on (what the tests request with len(os.sched_getaffinity(0))). Not
# `nproc`: it honours OMP_NUM_THREADS, which clusters often export as 1, and the node would then be
# too small for the job, which would stay pending (reason PartitionConfig) until its timeout.
CPUS="$(python3 -c 'import os; print(len(os.sched_getaffinity(0)))')"
# RealMemory above the real amount makes slurmd drain the node ("Low RealMemory").
MEM_MB="$(awk '/^MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
read -r CTLD_PORT SLURMD_PORT < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("", 0))
print(*[s.getsockname()[1] for s in socks])
EOF
)
NETNS=() HOSTS=() ADDRS=()
if ((${#NODE_SPECS[@]} == 0)); then
    HOSTS=("$(hostname -s)")
    CTLD_HOST="${HOSTS[0]}"
else
    for spec in "${NODE_SPECS[@]}"; do
        IFS=: read -r ns host addr <<<"${spec}"
        NETNS+=("${ns}") HOSTS+=("${host}") ADDRS+=("${addr}")
    done
    CTLD_HOST="${HOSTS[0]}(${ADDRS[0]})"
fi
mkdir -p "${STATE}/spool/slurmctld" "${STATE}/log"
for host in "${HOSTS[@]}"; do mkdir -p "${STATE}/spool/slurmd-${host}"; done
{
    cat <<EOF
ClusterName=dssootest
SlurmctldHost=${CTLD_HOST}
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmctldPidFile=${STATE}/slurmctld.pid
SlurmdPidFile=${STATE}/slurmd-%n.pid
SlurmdSpoolDir=${STATE}/spool/slurmd-%n
StateSaveLocation=${STATE}/spool/slurmctld
SlurmctldLogFile=${STATE}/log/slurmctld.log
SlurmdLogFile=${STATE}/log/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
EOF
    for i in "${!HOSTS[@]}"; do
        addr=""
        ((${#ADDRS[@]})) && addr="NodeAddr=${ADDRS[$i]} "
        echo "NodeName=${HOSTS[$i]} ${addr}CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} >"${STATE}/slurm.conf"
export SLURM_CONF="${STATE}/slurm.conf"

# --- daemons (they daemonize and write their pid files) --------------------------------------
in_node() {  # in_node NETNS HOST CMD...: run CMD as node HOST inside NETNS
    local ns="$1" host="$2"
    shift 2
    nsenter --net="/run/netns/${ns}" unshare --mount --uts --propagation private \
        sh -c 'mount --bind "/etc/netns/$0/hosts" /etc/hosts && hostname "$1" && shift && exec "$@"' \
        "${ns}" "${host}" "$@"
}
client=()
if ((${#NETNS[@]} == 0)); then
    /usr/sbin/slurmctld -f "${SLURM_CONF}"
    /usr/sbin/slurmd -f "${SLURM_CONF}"
else
    in_node "${NETNS[0]}" "${HOSTS[0]}" /usr/sbin/slurmctld -f "${SLURM_CONF}"
    for i in "${!NETNS[@]}"; do
        in_node "${NETNS[$i]}" "${HOSTS[$i]}" /usr/sbin/slurmd -f "${SLURM_CONF}"
    done
    client=(ip netns exec "${NETNS[0]}")
fi
want="${#HOSTS[@]}"
idle=0
for _ in $(seq 150); do
    idle="$("${client[@]}" sinfo -h -N -o '%N %T' 2>/dev/null | grep -c ' idle' || true)"
    ((idle == want)) && break
    sleep 0.2
done
if ((idle != want)); then
    echo "slurm_up: ${idle}/${want} nodes idle after 30 s" >&2
    "${client[@]}" sinfo -N >&2 || true
    tail -n 20 "${STATE}"/log/*.log >&2 || true
    exit 1
fi
echo "SLURM_CONF=${SLURM_CONF}"
