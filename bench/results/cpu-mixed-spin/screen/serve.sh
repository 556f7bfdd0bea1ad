#!/bin/bash
# usage: serve.sh start CFG | stop
cd /work/main; export PATH=$PWD/.venv/bin:$PATH
if [ "$1" = start ]; then
  setsid bash -c 'echo $$ > /tmp/sm/pgid; exec scripts/serve-local "$0"' "$2" > /tmp/sm/serve.log 2>&1 &
  sleep 2
  for i in $(seq 1 90); do sleep 2; curl -sf 127.0.0.1:8001/v1/models >/dev/null && break; done
  # wait for engines: a real completion
  for i in $(seq 1 60); do curl -sf 127.0.0.1:8001/v1/completions -H 'content-type: application/json' -d '{"model":"tiny-llama","prompt":"hi","max_tokens":2}' >/dev/null && echo ready && exit 0; sleep 3; done; echo notready
else
  kill -TERM -- -$(cat /tmp/sm/pgid); sleep 15
  ps -eo pid,args | grep -E "ray::|VLLM|serve run|raylet" | grep -v grep | wc -l
fi
