#!/bin/sh
# run-pair.sh A B [LAB]: one cell of nebula.toml by hand, through the natscope CLI, for the NAT
# presets A (peer a) and B (peer b): `natscope lab up pair:A,B`, the keys, the lighthouse on
# `rendezvous`, b, then a's connect; then what nebula says and what the lab saw, and teardown.
# Needs root, natscope on PATH (or NATSCOPE=path), nebula, nft and ping. Bounded: the connect step
# is killed after 40 s; everything it started is stopped and the lab removed on any exit.
# NEBULA_KEEP=1 keeps the work directory (configs and nebula's logs) and prints where it is.
#
# Evidence comes from nftables counters the script adds inside the lab only: on the internet
# bridge (what crossed between the two NATs' public addresses, and to and from the rendezvous)
# and in a and b (what was delivered into each peer's LAN from the other NAT's address). Only
# packets longer than 500 bytes count as data: connect.sh sends 1000-byte pings, nebula's punch
# and keepalive packets are far smaller.
#
# Output: one line, e.g.
#   full-cone,symmetric connected=yes nebula=relayed observed=relayed direct_ab=0 direct_ba=0 delivered_b=0 delivered_a=0 relay_a=42 relay_b=42
set -u
[ $# -ge 2 ] || { echo "usage: $0 PRESET_A PRESET_B [LAB]" >&2; exit 2; }
a=$1 b=$2 lab=${3:-nebulapair}
natscope=${NATSCOPE:-natscope}
dir=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/natscope-nebula.XXXXXX")
cell=$work/cell
mkdir -p "$cell"
pids=
up=
cleanup() {
  for p in $pids; do kill "$p" 2>/dev/null; done
  [ -n "$up" ] && "$natscope" lab down "$lab" >/dev/null 2>&1
  if [ "${NEBULA_KEEP:-0}" = 1 ]; then echo "work directory: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
in_node() {
  node=$1
  shift
  "$natscope" lab exec --lab "$lab" "$node" -- "$@"
}
# The first public address (203.0.113.x, 198.51.100.x) among the names given: a peer's outermost
# NAT, or the rendezvous host.
public_of() {
  in_node internet getent hosts "$@" | awk '$1 ~ /^(203\.0\.113|198\.51\.100)\./ { print $1; exit }'
}

"$natscope" lab up "pair:$a,$b" --name "$lab" >/dev/null || exit 2
up=1
sh "$dir/make-keys.sh" "$work" >"$work/keys.log" 2>&1 || { cat "$work/keys.log" >&2; exit 2; }
server=$(public_of rendezvous)
ext_a=$(public_of carriera nata a)
ext_b=$(public_of carrierb natb b)
if [ -z "$server" ] || [ -z "$ext_a" ] || [ -z "$ext_b" ]; then
  echo "$0: lab addresses not found" >&2
  exit 2
fi

count() { echo "ip length > 500 $1 counter comment \"$2\""; }
in_node internet nft -f - <<NFT || exit 2
table bridge nebula_evidence {
  chain forward {
    type filter hook forward priority 0; policy accept;
    $(count "ip saddr $ext_a ip daddr $ext_b" direct_ab)
    $(count "ip saddr $ext_b ip daddr $ext_a" direct_ba)
    $(count "ip saddr $ext_a ip daddr $server" relay_a)
    $(count "ip saddr $ext_b ip daddr $server" relay_b)
  }
}
NFT
for peer in a:"$ext_b" b:"$ext_a"; do
  in_node "${peer%%:*}" nft -f - <<NFT || exit 2
table inet nebula_evidence {
  chain input {
    type filter hook input priority 0; policy accept;
    $(count "ip saddr ${peer#*:}" delivered)
  }
}
NFT
done

in_node rendezvous sh "$dir/node.sh" lighthouse "$work" "$server" "$cell" >"$cell/lighthouse.out" 2>&1 &
pids="$pids $!"
sleep 0.5
in_node b sh "$dir/node.sh" b "$work" "$server" "$cell" >"$cell/b.out" 2>&1 &
pids="$pids $!"
sleep 1
connected=no
if timeout 40 "$natscope" lab exec --lab "$lab" a -- sh "$dir/connect.sh" "$work" "$server" "$cell" >"$cell/connect.out" 2>"$cell/connect.err"; then
  connected=yes
fi
nebula=$(tail -n 1 "$cell/connect.out" | sed -n 's/.*"path": *"\([a-z]*\)".*/\1/p')

# counter NODE COMMENT: the packets of the counter with that comment in NODE.
counter() {
  in_node "$1" nft list ruleset | awk -v c="\"$2\"" '$0 ~ c { for (i = 1; i < NF; i++) if ($i == "packets") print $(i + 1) }'
}
direct_ab=$(counter internet direct_ab)
direct_ba=$(counter internet direct_ba)
relay_a=$(counter internet relay_a)
relay_b=$(counter internet relay_b)
delivered_b=$(counter b delivered)
delivered_a=$(counter a delivered)
observed=failed
if [ "$connected" = yes ]; then
  if [ "${delivered_a:-0}" -ge 20 ] && [ "${delivered_b:-0}" -ge 20 ]; then
    observed=direct
  else
    observed=relayed
  fi
fi
echo "$a,$b connected=$connected nebula=${nebula:-none} observed=$observed direct_ab=$direct_ab direct_ba=$direct_ba delivered_b=$delivered_b delivered_a=$delivered_a relay_a=$relay_a relay_b=$relay_b"
if [ "$connected" != yes ]; then
  tail -n 5 "$cell/connect.err" >&2
  exit 1
fi
