#!/usr/bin/env bash
# All GPU measurements in one unattended run on one CUDA GPU (torch + transformers >= 5.17 + peft + accelerate;
# no trl or datasets needed). Random-weight Llama-2-7B shape in bf16. Writes logs to ${OUT:-gpu_logs}/.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_logs}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$out/gpu.txt"
status=0
run() { local name=$1; shift; echo "== $name"; timeout 900 "$@" 2>&1 | tee "$out/$name.log" || status=1; }
run la_throughput python benchmarks/la_throughput.py --model llama7b-random --device cuda --dtype bfloat16 \
  --batch 1 8 --prompt-len 128 --principle-len 100 --new-tokens 128 --repeats 3
run legend_throughput python benchmarks/legend_gpu_throughput.py --model llama7b-random --device cuda --pairs 2000 \
  --batch_size 32
run rahf_step python benchmarks/rahf_step.py --model llama7b-random --device cuda --dtype bfloat16 --backend plain \
  --batch 8 --prompt-len 256 --response-len 64 --repeats 5 --out "$out/rahf_step.json"
exit $status
