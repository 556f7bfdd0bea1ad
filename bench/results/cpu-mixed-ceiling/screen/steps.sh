#!/bin/bash
# steps.sh SYS ROUND: serve SYS with the step timer, warm, 200 at 6 req/s, collect step stats
cd /work/main; S=$1; R=$2
rm -f /tmp/step-timer-*.json
export PYTHONPATH=/work/main/bench/results/cpu-mixed-spin/screen/step_timer STEP_TIMER=$S
/tmp/sm/serve.sh start /tmp/sm/$S.yaml >/dev/null
unset PYTHONPATH STEP_TIMER
B=".venv/bin/python -m serve_app.bench run --base-url http://127.0.0.1:8001 --model tiny-llama --tokenizer models/tiny-llama --no-progress --mix chat:0.8:64:128,doc:0.2:1700:8"
$B --num-requests 60 --request-rate 6 >/dev/null 2>&1
sleep 1; mkdir -p /tmp/st0; rm -f /tmp/st0/*; cp /tmp/step-timer-*.json /tmp/st0/
$B --num-requests 200 --request-rate 6 > /tmp/sm/st-$S-$R.txt 2>&1
sleep 1.5; mkdir -p /tmp/st-$S-$R; rm -f /tmp/st-$S-$R/*; for f in /tmp/step-timer-*.json; do cp $f /tmp/st-$S-$R/final-$(basename $f); done; for f in /tmp/st0/*; do cp $f /tmp/st-$S-$R/base-$(basename $f); done
/tmp/sm/serve.sh stop >/dev/null
grep -E "^(TTFT|TPOT)" /tmp/sm/st-$S-$R.txt | head -2
