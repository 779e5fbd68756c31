#!/usr/bin/env bash
# Times `natscope probe` through a real (lab) NAT next to coturn's turnutils_natdiscovery and
# Debian's `stun` client, all run from h1 behind the same NAT against servers on the lab's
# reflector node: natscope reflect on :3478/:3479 and coturn (RFC 5780 mode) on :5478/:5479.
# Usage (root): PRESET=port-restricted-cone RUNS=10 scripts/bench-probe-lab.sh
# Needs: a release build (cargo build --release -p natscope), coturn, stun-client.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/natscope}
PRESET=${PRESET:-port-restricted-cone}
RUNS=${RUNS:-10}
LAB=bp$$
if [ "$(id -u)" != 0 ]; then
  echo "bench-probe-lab: labs need root (network namespaces); run with sudo" >&2
  exit 2
fi
for tool in turnserver=coturn turnutils_natdiscovery=coturn stun=stun-client "$BIN=a release build (cargo build --release -p natscope)"; do
  command -v "${tool%%=*}" >/dev/null || { echo "bench-probe-lab: ${tool%%=*} is required (${tool#*=})" >&2; exit 2; }
done
tmp=$(mktemp -d)
cleanup() { "$BIN" lab down "$LAB" >/dev/null 2>&1 || true; rm -rf "$tmp"; }
trap cleanup EXIT
"$BIN" lab up "$PRESET" --name "$LAB" >/dev/null
"$BIN" lab exec --lab "$LAB" stun -- turnserver -n --stun-only --no-auth -L 198.51.100.1 -L 198.51.100.2 \
  --listening-port 5478 --alt-listening-port 5479 --no-cli --no-tls --no-dtls --no-tcp \
  --userdb "$tmp/db" --pidfile "$tmp/pid" --log-file "$tmp/log" --simple-log >/dev/null 2>&1 &
sleep 1
run() { # name, command...
  local name=$1; shift
  local times=()
  for _ in $(seq "$RUNS"); do
    local t0 t1
    t0=$(date +%s%N)
    "$BIN" lab exec --lab "$LAB" h1 -- "$@" >"$tmp/out" 2>&1 || true
    t1=$(date +%s%N)
    times+=($(( (t1 - t0) / 1000 )))
  done
  local sorted
  sorted=$(printf '%s\n' "${times[@]}" | sort -n)
  printf '%-44s median %8.1f ms  min %8.1f ms  max %8.1f ms  (%s runs)\n' "$name" \
    "$(echo "$sorted" | awk -v n="$RUNS" 'NR==int((n+1)/2){print $1/1000}')" \
    "$(echo "$sorted" | head -1 | awk '{print $1/1000}')" \
    "$(echo "$sorted" | tail -1 | awk '{print $1/1000}')" "$RUNS"
  sed 's/^/    | /' "$tmp/out" | grep -iE "classic|summary|Primary|NAT|mapping|filter" | head -4 || true
}
echo "preset $PRESET; every time includes lab exec (setns + exec, ~1 ms)"
run "natscope probe (natscope reflect)" "$(realpath "$BIN")" probe 198.51.100.1:3478
run "natscope probe (coturn)" "$(realpath "$BIN")" probe 198.51.100.1:5478
run "turnutils_natdiscovery -m -f (coturn)" turnutils_natdiscovery -m -f 198.51.100.1 -p 5478
run "stun (Debian stun-client 0.97, coturn)" stun 198.51.100.1:5478
