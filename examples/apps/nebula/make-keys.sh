#!/bin/sh
# make-keys.sh WORK: the `setup` step of nebula.toml. Makes a nebula CA and the certificates of
# the lighthouse (10.200.0.1) and the two peers a (10.200.0.2) and b (10.200.0.3) under
# WORK/nebula, once for the whole grid: every cell's nebula network uses the same keys.
set -eu
keys=$1/nebula
rm -rf "$keys"
mkdir -p "$keys"
cd "$keys"
nebula-cert ca -name natscope-lab -duration 24h
for host in lighthouse:10.200.0.1 a:10.200.0.2 b:10.200.0.3; do
  name=${host%%:*}
  nebula-cert sign -name "$name" -ip "${host#*:}/24" -out-crt "$name.crt" -out-key "$name.key"
done
