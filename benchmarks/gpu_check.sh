#!/usr/bin/env bash
# All GPU measurements in one unattended run on one CUDA GPU (torch + transformers >= 5.17 + peft + accelerate;
# no trl or datasets needed). Random-weight Llama-2-7B shape in bf16. Writes logs to ${OUT:-gpu_logs}/.
#   bash benchmarks/gpu_check.sh
# DRY_RUN=1 runs the same scripts and code paths on the CPU with a tiny model and small sizes, in about a minute
# (tests/test_benchmarks.py does), so the GPU run cannot fail on a typo.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_logs}"
mkdir -p "$out"
py="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  model=tiny device=cpu pairs=16 la_batch="1 2" la_new=4 repeats=1 rahf_batch=2 prompt=32 response=8 limit=300
else
  model=llama7b-random device=cuda pairs=2000 la_batch="1 8" la_new=128 repeats=3 rahf_batch=8 prompt=256 response=64
  limit=900
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$out/gpu.txt"
status=0
run() { local name=$1; shift; echo "== $name"; timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" || status=1; }
# shellcheck disable=SC2086  # la_batch is a list
run la_throughput "$py" benchmarks/la_throughput.py --model "$model" --device "$device" --dtype bfloat16 \
  --batch $la_batch --prompt-len 128 --principle-len 100 --new-tokens "$la_new" --repeats "$repeats"
run legend_throughput "$py" benchmarks/legend_gpu_throughput.py --model "$model" --device "$device" \
  --pairs "$pairs" --batch_size 32
run rahf_step "$py" benchmarks/rahf_step.py --model "$model" --device "$device" --dtype bfloat16 --backend plain \
  --batch "$rahf_batch" --prompt-len "$prompt" --response-len "$response" --repeats "$((repeats + 2))" \
  --out "$out/rahf_step.json"
exit $status
