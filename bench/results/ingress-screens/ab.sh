#!/bin/bash
# A/B: proxy port vs direct port, interleaved. $1 = label prefix, $2 = rate, $3 = n
cd /work/main
for round in 1 2; do
  for port in 8000 30000; do
    .venv/bin/python -m serve_app.bench run --base-url http://127.0.0.1:$port --model tiny-llama \
      --tokenizer models/tiny-llama --mix chat:0.8:64:128,doc:0.2:1700:8 --request-rate $2 \
      --num-requests $3 --seed $round --slo-ttft-ms 500 --slo-tpot-ms 50 --no-progress \
      --label $1-$port-r$round --save /tmp/tp/$1-$port-r$round.json 2>&1 | tail -n 25 > /tmp/tp/$1-$port-r$round.txt
  done
done
