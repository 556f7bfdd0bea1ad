#!/bin/bash
# The route-threshold screen: usage run.sh OUTDIR ROUNDS [RATE [PROMPTS [OUTPUTS]]] (README.md).
# Each round starts the three configs in turn (order reversed in even rounds) and runs, on each,
# the mix 80% chats (64 prompt / 128 output tokens, decode-local everywhere) + 20% probes:
#   prompt sweep  probe:0.2:L:64    L in PROMPTS (default 128 256 512 1024 1700; local, disagg)
#   output sweep  probe:0.2:1700:N  N in OUTPUTS (default 2 8 16 32; disagg, whole; N=64 above)
# Poisson arrivals at RATE req/s (default 6), 200 requests per run (10 s of them above 20 req/s),
# after 30 warm-up requests per start. An empty PROMPTS or OUTPUTS skips that sweep, and a config
# with nothing to run is not started. Files: SYSTEM-NAME-ROUND.{txt,json.gz}, NAME p<L> or o<N>,
# with -r<RATE> before the round for rates other than 6.
cd /work/main; OUT=$1; R=$2; RATE=${3:-6}; mkdir -p $OUT /tmp/sm
PROMPTS=${4-128 256 512 1024 1700}; OUTPUTS=${5-2 8 16 32}
N=200; [ $RATE -gt 20 ] && N=$((RATE * 10)); TAG=""; [ $RATE != 6 ] && TAG="r$RATE-"
SERVE=bench/results/cpu-mixed-spin/screen/serve.sh; CFG=bench/results/cpu-route-thresholds/configs
B=".venv/bin/python -m serve_app.bench run --base-url http://127.0.0.1:8001 --model tiny-llama --tokenizer models/tiny-llama --no-progress"
one() {  # one() SYS NAME PROBE_IN PROBE_OUT ROUND
  local f=$OUT/$1-$2-$TAG$5
  $B --mix "chat:0.8:64:128,probe:0.2:$3:$4" --num-requests $N --request-rate $RATE \
     --save $f.json.gz > $f.txt 2>&1
  echo "== $1 $2 rate $RATE round $5 $(date +%T)"
}
for r in $(seq 1 $R); do
  systems="local disagg whole"; [ $((r % 2)) = 0 ] && systems="whole disagg local"
  for s in $systems; do
    case $s in local) [ -z "$PROMPTS" ] && continue;; whole) [ -z "$OUTPUTS" ] && continue;; esac
    cp $CFG/$s.yaml /tmp/sm/$s.yaml; $SERVE start /tmp/sm/$s.yaml > /dev/null
    $B --mix "chat:0.8:64:128,probe:0.2:1700:8" --num-requests 30 --request-rate 4 >/dev/null 2>&1
    if [ $s != whole ]; then for L in $PROMPTS; do one $s p$L $L 64 $r; done; fi
    if [ $s != local ]; then for O in $OUTPUTS; do one $s o$O 1700 $O $r; done; fi
    [ $s = whole ] && [ -n "$OUTPUTS" ] && one $s p1700 1700 64 $r
    curl -s 127.0.0.1:8001/metrics | grep '^pd:requests_total' > $OUT/$s-routes-$TAG$r.txt
    $SERVE stop > /dev/null
  done
done
