cd /work/main
export PD_SERVE_NIXL_PROGRESS_DELAY_US=20000 VLLM_NIXL_SIDE_CHANNEL_PORT=5690 REPS=5
for r in 1 2; do for m in nixl lazy plain; do
  if [ $m = lazy ]; then L=1; M=nixl; else L=0; M=$m; fi
  LAZY_KV=$L PYTHONPATH=/tmp/lazy .venv/bin/python /tmp/lazy/cost.py $M models/tiny-llama 2>/tmp/lazy/$m.err | grep "^{" | sed "s/^/$m r$r /"
done; done
