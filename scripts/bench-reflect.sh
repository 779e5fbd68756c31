#!/usr/bin/env bash
# Binding throughput of `natscope reflect` against coturn, on loopback, with `natscope bench reflect`.
#
# Three servers run side by side, each RFC 5780-shaped (two IPs, two ports) and idle unless loaded,
# on 127.0.10.x so that a reflector someone runs on the usual 127.0.0.1:3478 is left alone:
#   natscope     127.0.10.1:3478 / 127.0.10.2:3479, default workers (one per core), no rate limit
#   natscope-w1  127.0.10.3:3478 / 127.0.10.4:3479, --workers 1
#   coturn       127.0.10.5:3478 / 127.0.10.6:3479, --stun-only, default threads (one per core)
# For every (sockets, window) setting each server is loaded REPS times, interleaved so drift in the
# machine hits all three alike; the median run is reported. Besides requests/s, the server's own CPU
# time per answered request is read from /proc: the load generator shares the cores with the server
# under test, so requests/s measures the pair, while CPU µs per request measures the server alone.
# "other" is the CPU (in % of one core) that anything else on the machine used during the run; a
# run with more than 10 % there was disturbed and is repeated (three attempts at most; runs still
# disturbed are counted in a warning at the end).
#
# Environment: SECONDS_PER_RUN (default 10), REPS (3), SETTINGS ("4x32 16x8 2x64 8x16", sockets x
# window), PIN=1 to give the servers CPU 1 and the load generator CPU 0 (taskset) instead of letting
# them share both: then requests/s is bounded by one core of server, which isolates its efficiency.
# BIN=path runs that prebuilt natscope (for A/B runs of two builds) instead of building the tree.
# Traffic stays on 127.0.0.0/8. Every process started here is stopped by its PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
REPS=${REPS:-3}
SETTINGS=${SETTINGS:-"4x32 16x8 2x64 8x16"}
BIN=${BIN:-}
server_cpus=()
client_cpus=()
if [ "${PIN:-0}" = 1 ]; then
  server_cpus=(taskset -c 1)
  client_cpus=(taskset -c 0)
fi

for tool in turnserver=coturn jq=jq ss=iproute2 /usr/bin/time=time; do
  command -v "${tool%%=*}" >/dev/null || {
    echo "bench-reflect: ${tool%%=*} is required (Debian/Ubuntu package ${tool#*=})" >&2
    exit 2
  }
done

if [ -z "$BIN" ]; then
  cargo build --release -p natscope
  BIN=target/release/natscope
fi

work=$(mktemp -d /tmp/natscope-bench.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# SO_REUSEPORT would let a second reflector silently share a port with one already running there.
for addr in 127.0.10.{1..6}:{3478,3479}; do
  if [ -n "$(ss -Hlnu "src $addr")" ]; then
    echo "bench-reflect: $addr is already in use; stop whatever listens there first" >&2
    exit 2
  fi
done

declare -A server_pid server_target
start() { # name target pid-of-started-process
  server_pid[$1]=$3
  server_target[$1]=$2
  pids+=("$3")
  for _ in $(seq 50); do
    if "$BIN" bench reflect "$2" --seconds 0.05 --sockets 1 --window 1 --json >/dev/null 2>&1; then
      return 0
    fi
    kill -0 "$3" 2>/dev/null || break
    sleep 0.2
  done
  echo "bench-reflect: $1 did not start; its log:" >&2
  cat "$work/$1.log" >&2
  exit 2
}

"${server_cpus[@]}" "$BIN" reflect --primary 127.0.10.1:3478 --alternate 127.0.10.2:3479 --rate-limit 0 \
  >"$work/natscope.log" 2>&1 &
start natscope 127.0.10.1:3478 $!
"${server_cpus[@]}" "$BIN" reflect --primary 127.0.10.3:3478 --alternate 127.0.10.4:3479 --rate-limit 0 --workers 1 \
  >"$work/natscope-w1.log" 2>&1 &
start natscope-w1 127.0.10.3:3478 $!
"${server_cpus[@]}" turnserver -n --stun-only --no-auth -L 127.0.10.5 -L 127.0.10.6 --listening-port 3478 \
  --alt-listening-port 3479 --no-cli --no-tls --no-dtls --log-file stdout --simple-log \
  --pidfile "$work/turnserver.pid" --userdb "$work/turndb" >"$work/coturn.log" 2>&1 &
start coturn 127.0.10.5:3478 $!

cpu_ticks() { # utime + stime of a process, all threads, in clock ticks
  awk '{ print $14 + $15 }' "/proc/$1/stat"
}
busy_ticks() { # non-idle time of the whole machine (all cores), in clock ticks
  awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat
}
hz=$(getconf CLK_TCK)

echo "# $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load average $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "${PIN:-0}" = 1 ]; then
  echo "# $SECONDS_PER_RUN s per run, median of $REPS; servers pinned to CPU 1, load generator to CPU 0"
  echo "# (natscope's default worker count follows its CPU affinity: here it is 1, like natscope-w1)"
else
  echo "# $SECONDS_PER_RUN s per run, median of $REPS; the load generator shares the cores with the server"
fi
printf '%-6s %-12s %10s %8s %8s %6s %10s %8s %8s %6s\n' \
  setting server 'req/s' 'p50 µs' 'p99 µs' lost 'srv µs/req' 'srv cpu' 'cli cpu' 'other'

for setting in $SETTINGS; do
  sockets=${setting%x*}
  window=${setting#*x}
  for _ in $(seq "$REPS"); do
    for name in natscope coturn natscope-w1; do
      for attempt in 1 2 3; do
        pid=${server_pid[$name]}
        before=$(cpu_ticks "$pid")
        busy_before=$(busy_ticks)
        # Exit code 1 still comes with a report (invalid answers are counted below); 2 does not.
        rc=0
        "${client_cpus[@]}" /usr/bin/time -f '%U %S' -o "$work/client.time" \
          "$BIN" bench reflect "${server_target[$name]}" --seconds "$SECONDS_PER_RUN" \
          --sockets "$sockets" --window "$window" --json >"$work/run.json" || rc=$?
        if [ "$rc" -gt 1 ]; then
          echo "bench-reflect: the load generator failed against $name (exit $rc)" >&2
          exit 2
        fi
        after=$(cpu_ticks "$pid")
        busy_after=$(busy_ticks)
        client=$(awk '{ print $1 + $2 }' "$work/client.time")
        jq -c --arg s "$setting" --arg n "$name" --argjson ticks $((after - before)) --argjson hz "$hz" \
          --argjson busy $((busy_after - busy_before)) --argjson client "$client" \
          '{setting: $s, server: $n, rps: .requests_per_second, p50: .p50_us, p99: .p99_us,
            lost: .lost, invalid: .invalid, cpu_s: ($ticks / $hz), client_s: $client,
            other_pct: ((($busy - $ticks) / $hz - $client) / .seconds * 100 | if . < 0 then 0 else . end),
            cpu_us_per_req: (if .responses > 0 then $ticks / $hz * 1e6 / .responses else null end)}' \
          "$work/run.json" >"$work/run.line"
        # A run disturbed by other work on the machine is repeated, up to three times in all.
        if [ "$(jq '.other_pct <= 10' "$work/run.line")" = true ] || [ "$attempt" = 3 ]; then
          break
        fi
      done
      cat "$work/run.line" >>"$work/results.jsonl"
    done
  done
  # The median run by requests/s, per server.
  for name in natscope coturn natscope-w1; do
    jq -s -r --arg s "$setting" --arg n "$name" \
      '[.[] | select(.setting == $s and .server == $n)] | sort_by(.rps) | .[(length / 2 | floor)]
       | [.setting, .server, (.rps | floor), .p50, .p99, .lost, (.cpu_us_per_req * 100 | round / 100),
          .cpu_s, .client_s, (.other_pct | round)] | @tsv' "$work/results.jsonl" |
      awk -F'\t' '{ printf "%-6s %-12s %10s %8s %8s %6s %10s %7ss %7ss %5s%%\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 }'
  done
done

echo
echo "# ratios of median requests/s (and of server CPU per request, lower is better)"
jq -s -r --arg settings "$SETTINGS" '
  def med(f): (map(f) | sort) as $v | $v[($v | length / 2 | floor)];
  def at($s; $n): [.[] | select(.setting == $s and .server == $n)];
  . as $all | ($settings | split(" ")[]) as $s
  | ($all | at($s; "natscope") | med(.rps)) as $ns
  | ($all | at($s; "coturn") | med(.rps)) as $tc
  | ($all | at($s; "natscope-w1") | med(.rps)) as $w1
  | ($all | at($s; "natscope") | med(.cpu_us_per_req)) as $ncpu
  | ($all | at($s; "coturn") | med(.cpu_us_per_req)) as $tcpu
  | "\($s)\tnatscope/coturn \($ns / $tc * 100 | round / 100)x\tworkers 2/1 \($ns / $w1 * 100 | round / 100)x\tcpu/req natscope/coturn \($ncpu / $tcpu * 100 | round / 100)x"
' "$work/results.jsonl"
disturbed=$(jq -s '[.[] | select(.other_pct > 10)] | length' "$work/results.jsonl")
if [ "$disturbed" != 0 ]; then
  echo "bench-reflect: warning: $disturbed runs shared the machine with other work (other > 10%)" >&2
fi
invalid=$(jq -s '[.[].invalid] | add' "$work/results.jsonl")
if [ "$invalid" != 0 ]; then
  echo "bench-reflect: $invalid invalid answers (see a server log)" >&2
  exit 1
fi
