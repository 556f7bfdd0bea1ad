#!/bin/bash
# usage: ab2.sh OUTDIR ROUNDS MIX TOKENIZER "RATE:N ..." sys1 sys2 ...
cd /work/main; OUT=$1; R=$2; MIX=$3; TOK=$4; RATES=$5; shift 5
mkdir -p $OUT
B=".venv/bin/python -m serve_app.bench run --base-url http://127.0.0.1:8001 --model tiny-llama --tokenizer $TOK --no-progress"
for r in $(seq 1 $R); do for s in "$@"; do
  /tmp/sm/serve.sh start /tmp/sm/$s.yaml > /dev/null
  $B --mix "$MIX" --num-requests 30 --request-rate 4 >/dev/null 2>&1
  for rn in $RATES; do rate=${rn%:*}; n=${rn#*:}
    $B --mix "$MIX" --num-requests $n --request-rate $rate --save $OUT/$s-$rate-$r.json > $OUT/$s-$rate-$r.txt 2>&1
    echo "== $s rate $rate round $r $(date +%T)"; grep -E "^(TTFT|TPOT|E2E)" $OUT/$s-$rate-$r.txt | head -3
  done
  /tmp/sm/serve.sh stop > /dev/null
done; done
