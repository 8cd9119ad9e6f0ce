#!/usr/bin/env bash
# Install what tests/test_multinode_netns.py needs: the `ip` tool (iproute2). Idempotent; needs root.
# The test itself additionally needs CAP_NET_ADMIN + CAP_SYS_ADMIN (ip netns add / ip netns exec).
set -euo pipefail
if command -v ip >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends iproute2
