#!/bin/sh
# connect.sh WORK SERVER CELL: the `connect` role of nebula.toml, on peer a. Starts nebula as
# 10.200.0.2 (log: CELL/nebula-a.log), waits until b (10.200.0.3) answers a ping through the
# overlay, then sends 20 more pings of 1000 bytes and exits 0 only if all of them came back.
# Its stderr ends with nebula's log lines about b; its last stdout line is the path nebula itself
# reports for its tunnel to b, {"path": "direct"} or {"path": "relayed"} (the lab compares it with
# what it saw). NEBULA_CONNECT_S (default 25) bounds the wait for the first answer.
set -u
dir=$(dirname "$0")
work=$1 server=$2 cell=$3
peer=10.200.0.3
mkdir -p "$cell"
log=$cell/nebula-a.log
sh "$dir/node.sh" a "$work" "$server" "$cell" >"$log" 2>&1 &
nebula=$!
trap 'kill "$nebula" 2>/dev/null; wait "$nebula" 2>/dev/null' EXIT
trap 'exit 143' INT TERM
deadline=$(($(date +%s) + ${NEBULA_CONNECT_S:-25}))
first=
while [ "$(date +%s)" -lt "$deadline" ]; do
  if ! kill -0 "$nebula" 2>/dev/null; then
    echo "connect.sh: nebula exited; its log:" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
  # Every 100 ms for up to 2 s, done at the first answer.
  if ping -n -q -c 1 -i 0.1 -w 2 "$peer" >/dev/null 2>&1; then
    first=$(date +%s)
    break
  fi
done
if [ -z "$first" ]; then
  echo "connect.sh: no answer from $peer through nebula within ${NEBULA_CONNECT_S:-25} s; nebula's log:" >&2
  grep -v 'Lighthouse update' "$log" | tail -n 20 >&2
  exit 1
fi
# The data: every one of 20 pings with 1000 bytes of payload must come back.
if ! ping -n -q -c 20 -i 0.05 -s 1000 -W 2 "$peer"; then
  echo "connect.sh: pings to $peer were lost; nebula's log:" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
# Nebula's own account of its tunnel to b, for the cell's stderr tail.
grep -E 'vpnIp=10\.200\.0\.3|certName=b |relayTarget=10\.200\.0\.3|roamed' "$log" |
  grep -v 'Packet store' | sed 's/ fingerprint=[0-9a-f]*//; s/ issuer=[0-9a-f]*//' | tail -n 12 >&2
# Nebula's own view: the last event that set the tunnel's remote, a handshake with b or a roam of
# its tunnel to a new address. A handshake names b's UDP address when it came directly and has
# udpAddr="<nil>" (or a relay field) when it came through the relay; a roam names the new address.
last=$(grep -E 'msg="Handshake message received".*certName=b |msg="Host roamed to new udp ip/port.*vpnIp=10\.200\.0\.3' "$log" | tail -n 1)
case $last in
  *roamed*newAddr=*) echo '{"path": "direct"}' ;;
  *'udpAddr="<nil>"'* | *' relay='*) echo '{"path": "relayed"}' ;;
  *udpAddr=*) echo '{"path": "direct"}' ;;
  *) echo '{"path": "unknown"}' ;;
esac
