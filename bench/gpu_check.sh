#!/usr/bin/env bash
# The GPU figures in one go, under 10 minutes: what BENCHMARKS.md's "On a GPU" section asks for.
#
#   bash bench/gpu_check.sh                 # writes its log to $OUT/gpu_check.log (or runs/gpu_check/)
#
# 1. the machine: GPUs, driver, torch / transformers / TRL versions;
# 2. dpo.py against TRL's DPOTrainer (bf16 autocast on both sides), a Qwen2.5-0.5B-shaped Llama,
#    sequences up to 1024 tokens (median about 640): pairs/s, peak CUDA memory, MFU against
#    --peak_tflops (989: H100/H200 SXM dense bf16); with 2+ GPUs dpo.py also runs under torchrun on
#    all of them (FSDP2 on NCCL);
# 3. the HF decode path (sample.py's brevity.generation.decode) against `generate`: tokens/s;
# 4. with 2+ GPUs, the 2-process equivalence tests (tests/test_train_processes.py) on NCCL; NCCL
#    needs one GPU per process, so on one GPU this step says so and is skipped.
# Each step has its own time limit, so a hang in one still leaves the others' figures; nothing is
# downloaded (random-init models from configs), so no network is needed. TRL and psutil must be
# installed (pip install -e .[bench]); without TRL step 2 runs dpo.py alone.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
log=$out/gpu_check.log
exec > >(tee "$log") 2>&1
export TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
step() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }

step "machine"
date -u
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv || { echo "no GPU: nothing to do"; exit 1; }
gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
if python3 -c "import trl, psutil; print('trl', trl.__version__)"; then
  trl_runs=",trl_bf16,trl_precompute_bf16"
else
  echo "TRL or psutil missing: dpo.py runs alone"; trl_runs=""
fi

step "dpo.py vs TRL, 0.5b, 1 GPU"
timeout 210 python3 bench/dpo_vs_trl.py --size 0.5b --device cuda --max_length 1024 --length_scale 8 \
  --warmup 3 --steps 10 --batch_size 8 --runs "ours$trl_runs" --work_dir "$out/dpo_1gpu" \
  || echo "step failed or timed out (exit $?)"

if [ "$gpus" -ge 2 ]; then
  step "dpo.py under torchrun on $gpus GPUs (FSDP2, NCCL), the same global batch per GPU"
  timeout 120 python3 bench/dpo_vs_trl.py --size 0.5b --device cuda --nproc "$gpus" --max_length 1024 \
    --length_scale 8 --warmup 3 --steps 10 --batch_size $((8 * gpus)) --runs ours --work_dir "$out/dpo_fsdp" \
    || echo "step failed or timed out (exit $?)"
fi

step "decode: sample.py vs generate, 0.5b"
timeout 120 python3 bench/sample_label.py --size 0.5b --device cuda --stages sample --prompts 64 \
  --max_new_tokens 128 --work_dir "$out/sample" || echo "step failed or timed out (exit $?)"

step "2-process equivalence on NCCL"
if [ "$gpus" -ge 2 ]; then
  timeout 120 python3 -m pytest -q tests/test_train_processes.py -k "two_processes" \
    || echo "step failed or timed out (exit $?)"
else
  echo "skipped: $gpus GPU; NCCL needs one GPU per process"
fi
step "done"
