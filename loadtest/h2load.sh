#!/usr/bin/env bash
# Named h2load scenarios for raw throughput, HTTP/1.1 by default.
#   loadtest/h2load.sh SCENARIO [--url http://127.0.0.1:8082] [-c 32] [-n 20000 | -D 10] [--h2] [--out DIR]
# Scenarios: iris-single, iris-batch32, v2-iris, digits-single, healthz.
# Writes DIR/h2load.txt (h2load's output) and DIR/requests.log (one line per request:
# start µs, status, duration µs) and prints p50/p90/p99/max computed from that log
# (h2load itself prints no percentiles). Every request of a scenario sends the same body,
# so after the first one every prediction is a cache hit: for controlled hit ratios use
# Locust (loadtest/locustfile.py) or `make bench`. The default URL is the internal listener:
# the public one (8080) rate limits every client, loopback too.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
scenario=$1; shift
url=http://127.0.0.1:8082 connections=32 amount=(-n 20000) protocol=--h1 out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --url) url=$2; shift 2 ;;
    -c) connections=$2; shift 2 ;;
    -n) amount=(-n "$2"); shift 2 ;;
    -D) amount=(-D "$2"); shift 2 ;;
    --h2) protocol=""; shift ;;
    --out) out=$2; shift 2 ;;
    *) usage ;;
  esac
done
out=${out:-reports/h2load-$scenario-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
body="$out/body.json"
python=.venv/bin/python; [ -x "$python" ] || python=python3

case "$scenario" in
  iris-single)   path=/v1/models/iris:predict;   echo '{"instances": [[5.1, 3.5, 1.4, 0.2]]}' > "$body" ;;
  iris-batch32)  path=/v1/models/iris:predict
                 "$python" -c 'import json; print(json.dumps({"instances": [[5.1 + i / 100, 3.5, 1.4, 0.2] for i in range(32)]}))' > "$body" ;;
  v2-iris)       path=/v2/models/iris/infer
                 echo '{"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]}' > "$body" ;;
  digits-single) path=/v1/models/digits:predict
                 "$python" -c 'import json; print(json.dumps({"instances": [[float(i % 17) for i in range(64)]]}))' > "$body" ;;
  healthz)       path=/healthz; body="" ;;
  *) echo "h2load.sh: unknown scenario $scenario" >&2; usage ;;
esac

data=()
[ -n "$body" ] && data=(-d "$body" -H "Content-Type: application/json")
command=(h2load $protocol -c "$connections" -m 1 "${amount[@]}" -T 10 "${data[@]}" --log-file "$out/requests.log" "$url$path")
echo "${command[*]}" > "$out/command.txt"
"${command[@]}" | tee "$out/h2load.txt" | grep -E "finished in|requests:|status codes:"
# h2load exits 0 even when every request failed; say so, and fail.
PYTHONPATH=. "$python" -c '
import sys
from loadtest.parsers import parse_h2load, parse_h2load_log
totals = parse_h2load(open(sys.argv[2]).read())
r = parse_h2load_log(open(sys.argv[1]).read())
ok = sum(n for status, n in r["statuses"].items() if status.startswith("2"))
if ok == 0:
    print("h2load.sh: all %d requests failed (statuses %s; %d errored, %d timed out): is the cluster up at this URL?"
          % (totals["total"], r["statuses"] or "none", totals["errored"], totals["timeout"]), file=sys.stderr)
    sys.exit(1)
print("latency ms: p50 %.2f  p90 %.2f  p99 %.2f  max %.2f  (%d requests, statuses %s)"
      % (r["p50_ms"], r["p90_ms"], r["p99_ms"], r["max_ms"], r["requests"], r["statuses"]))
if ok < totals["total"]:
    print("h2load.sh: %d of %d requests did not get a 2xx" % (totals["total"] - ok, totals["total"]), file=sys.stderr)
' "$out/requests.log" "$out/h2load.txt"
echo "output: $out"
