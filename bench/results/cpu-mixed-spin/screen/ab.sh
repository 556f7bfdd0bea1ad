#!/bin/bash
# usage: ab.sh OUTDIR ROUNDS MIX N RATE sys1 sys2 ...
cd /work/main; OUT=$1; R=$2; MIX=$3; N=$4; RATE=$5; shift 5
mkdir -p $OUT
B=".venv/bin/python -m serve_app.bench run --base-url http://127.0.0.1:8001 --model tiny-llama --tokenizer models/small-llama --no-progress"
for r in $(seq 1 $R); do for s in "$@"; do
  /tmp/sm/serve.sh start /tmp/sm/$s.yaml > /dev/null
  $B --mix "$MIX" --num-requests 4 --request-rate 1 >/dev/null 2>&1
  $B --mix "$MIX" --num-requests $N --request-rate $RATE --save $OUT/$s-$r.json > $OUT/$s-$r.txt 2>&1
  echo "== $s round $r $(date +%T)"; grep -E "^(TTFT|TPOT)" $OUT/$s-$r.txt | head -2
  /tmp/sm/serve.sh stop > /dev/null
done; done
