#!/bin/sh
# node.sh ROLE WORK SERVER CELL: writes CELL/nebula-ROLE.yml and runs nebula with it, in the
# foreground, until it is stopped. ROLE is `lighthouse` (on the public host SERVER: lighthouse and
# relay, no tun device) or a peer, `a` or `b` (tun device nebula1, SERVER:4242 as lighthouse and
# relay). Nebula punches on its own (punchy) and falls back to the relay when it cannot.
# NEBULA_LOG_LEVEL (default info) sets nebula's logging level; NEBULA_RELAY=0 turns the relay off
# on the peers (to see what nebula's punching alone achieves).
set -eu
role=$1 keys=$2/nebula server=$3 cell=$4
case $role in
  lighthouse) ip=10.200.0.1 ;;
  a) ip=10.200.0.2 ;;
  b) ip=10.200.0.3 ;;
  *) echo "node.sh: unknown role $role (lighthouse, a or b)" >&2; exit 2 ;;
esac
mkdir -p "$cell"
conf=$cell/nebula-$role.yml
if [ "$role" = lighthouse ]; then
  lighthouse="am_lighthouse: true"
  hosts="[]"
  static="{}"
  relay="am_relay: true
  use_relays: false"
  tun="disabled: true"
else
  lighthouse="am_lighthouse: false"
  hosts='["10.200.0.1"]'
  static="{\"10.200.0.1\": [\"$server:4242\"]}"
  if [ "${NEBULA_RELAY:-1}" = 0 ]; then
    relay="am_relay: false
  use_relays: false"
  else
    relay="am_relay: false
  use_relays: true
  relays: [\"10.200.0.1\"]"
  fi
  tun="disabled: false
  dev: nebula1"
fi
cat >"$conf" <<CONF
# nebula $ip ($role), written by natscope's examples/apps/nebula/node.sh
pki:
  ca: $keys/ca.crt
  cert: $keys/$role.crt
  key: $keys/$role.key
static_host_map: $static
lighthouse:
  $lighthouse
  interval: 60
  hosts: $hosts
listen:
  host: 0.0.0.0
  port: 4242
punchy:
  punch: true
  respond: true
relay:
  $relay
tun:
  $tun
logging:
  level: ${NEBULA_LOG_LEVEL:-info}
  format: text
firewall:
  outbound:
    - port: any
      proto: any
      host: any
  inbound:
    - port: any
      proto: any
      host: any
CONF
exec nebula -config "$conf"
