#!/usr/bin/env bash
# Lab costs and the userspace NAT's data path, with `natscope bench lab` (as root, or as any user
# where the kernel allows unprivileged user namespaces: docs/lab.md, "Rootless").
#
# Times `lab up` / `lab down` of the 2-host preset port-restricted-cone and of a 20-NAT topology,
# then sends traffic from h1 to stun through three paths in turn: open (no NAT, the path's own
# ceiling), port-restricted-cone (natscope's userspace engine) and linux (nftables masquerade):
# a one-thread 64-byte UDP flood (sent/s, received/s, loss), TCP bulk (MB/s) and UDP ping-pong
# round trips (p50/p99 and the p50 a NAT adds over open). Sender, NAT and receiver share this
# machine's cores, so the numbers are the machine's; the first output line says how many.
#
# Environment: RUNS (default 10), BIG_RUNS (3), SECONDS_PER_RUN (3), JSON=1 for one JSON document.
# BIN=path runs that prebuilt natscope (for A/B runs of two builds) instead of building the tree.
# Every lab is torn down by natscope itself, on errors too.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-10}
BIG_RUNS=${BIG_RUNS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-3}
BIN=${BIN:-}

if [ -z "$BIN" ]; then
  cargo build --release -p natscope
  BIN=${CARGO_TARGET_DIR:-target}/release/natscope
fi

json=()
if [ "${JSON:-0}" = 1 ]; then
  json=(--json)
fi
exec "$BIN" bench lab --runs "$RUNS" --big-runs "$BIG_RUNS" --seconds "$SECONDS_PER_RUN" "${json[@]}"
