#!/usr/bin/env bash
# GPU check: the CUDA paths of retain on random models of the embedded model's shape and of
# Qwen2.5-1.5B's (no weights need to travel), each step under its own time limit.
#
#   DEADLINE=500 bash benchmarks/gpu_check.sh OUT_DIR TOKENIZER_DIR
#
# TOKENIZER_DIR: a saved tokenizer, e.g. a copy of the embedded model's from retain's cache
# (~/.cache/retain/gguf/SmolLM2-*/tokenizer*.json and chat_template.jinja; 3.5 MB).
# Needs a CUDA machine with retain importable and `retain` on PATH. Writes OUT_DIR/log.txt
# (every step's output), OUT_DIR/runs.jsonl (each run's key figures, as it ends), the ES
# cost results es-gpu-*.{md,json} and pytest.txt. Steps run in order of importance; none
# starts or runs past DEADLINE seconds, so a leased machine's time limit is kept.
set -u
OUT=${1:?usage: gpu_check.sh OUT_DIR TOKENIZER_DIR}
TOK=${2:?usage: gpu_check.sh OUT_DIR TOKENIZER_DIR (a saved tokenizer folder)}
[ -f "$TOK/tokenizer_config.json" ] || { echo "no tokenizer_config.json in $TOK" >&2; exit 2; }
DEADLINE=${DEADLINE:-500}
M=/tmp/retain-gpu-models
R=/tmp/retain-gpu-runs
mkdir -p "$OUT" "$M" "$R"
LOG="$OUT/log.txt"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  local left=$((DEADLINE - SECONDS))
  if ((left < 20)); then echo "=== $name skipped (deadline)" | tee -a "$LOG"; return; fi
  ((limit > left)) && limit=$left
  echo "=== $name" >>"$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name rc=$rc $((SECONDS - start))s" | tee -a "$LOG"
}

run() {  # run NAME CONFIG OVERRIDES... : one `retain run` on the GPU
  local name=$1 config=$2
  shift 2
  step "$name" 150 retain run "configs/$config.yaml" "name=$name" "output_dir=$R" "model=$M/smol" \
    eval.max_test=16 eval.probe_max=16 "$@" --overwrite --quiet
  record "$name"
}

record() {  # record NAME : a finished run's key figures, one line of runs.jsonl
  [ -f "$R/$1/results.json" ] && python3 -c "import json, sys
r = json.load(open(sys.argv[1]))
keys = ('metrics', 'wall_s', 'peak_memory_mb', 'train_tokens_per_s', 'num_processes', 'sharding', 'timings',
        'strategy_stats', 'routing', 'final')
print(json.dumps({'run': sys.argv[2], **{k: r.get(k) for k in keys}}, default=str))" "$R/$1/results.json" "$1" \
    >>"$OUT/runs.jsonl"
}

{ nvidia-smi -L; python3 -c "import torch, transformers, peft, trl, pyarrow; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'pyarrow', pyarrow.__version__)"; } >>"$LOG" 2>&1
step models 120 sh -c "python3 benchmarks/random_model.py smollm2-135m $M/smol --tokenizer $TOK && \
  python3 benchmarks/random_model.py qwen2.5-1.5b $M/qwen --tokenizer $TOK"

step es-bench-smol 120 python3 benchmarks/es.py --model $M/smol --batches 8 32 --rounds 3 --segments 1 4 16 --name es-gpu-smollm2
run lora-bf16 lora train.max_steps=20 train.precision=bf16
run lora-fp32 lora train.max_steps=20
run es es-arithmetic train.max_steps=4 analysis.every=2
run grpo-bf16 grpo-arithmetic train.max_steps=3 train.precision=bf16 analysis.every=2
step pytest 200 python3 -m pytest -q -m "not embedded" -n 8 -p no:cacheprovider tests
step es-bench-qwen 150 python3 benchmarks/es.py --model $M/qwen --batches 8 --rounds 2 --dtype bfloat16 \
  --max-new-tokens 16 --segments 1 4 16 --name es-gpu-qwen15
run qwen-lora-bf16 lora model=$M/qwen train.max_steps=10 train.precision=bf16 eval.probe_max=8
# QLoRA on the same shape: peak memory against the bf16 LoRA run above (needs bitsandbytes there,
# carried as a wheel: pip download bitsandbytes, see the device notes).
run qwen-qlora-nf4 lora model=$M/qwen model_quantization=nf4 train.max_steps=10 train.precision=bf16 eval.probe_max=8
run merge lora-per-task-merge train.max_steps=5
# The sharded path (FSDP2 on CUDA, lockstep evaluation with synced generation) as one process on one GPU.
run shard-1gpu lora-replay train.max_steps=10 train.precision=bf16 train.sharding=zero3
# Data-parallel (NCCL) where the machine has 2 GPUs or more: the same lora+replay run as one process and
# as 2; their trained weights and R should agree to float tolerance (tested on CPU with gloo).
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  run dp-1 lora-replay train.max_steps=10 train.precision=bf16 lora.dropout=0
  step dp-2 200 torchrun --standalone --nproc_per_node 2 -m retain.cli run configs/lora-replay.yaml name=dp-2 \
    "output_dir=$R" "model=$M/smol" eval.max_test=16 eval.probe_max=16 train.max_steps=10 train.precision=bf16 \
    lora.dropout=0 --overwrite --quiet
  python3 -c "import json, sys
a, b = (json.load(open(f'{sys.argv[1]}/{n}/results.json')) for n in ('dp-1', 'dp-2'))
print(json.dumps({'run': 'dp-2-vs-1', 'R_1': a['R'], 'R_2': b['R'], 'tokens_per_s': [a['train_tokens_per_s'], b['train_tokens_per_s']]}))" \
    "$R" >>"$OUT/runs.jsonl" 2>>"$LOG"
  # Sharded training (FSDP2, tested on CPU with gloo): full fine-tuning of the 1.5B shape on 2 GPUs,
  # replicated against zero2 and zero3; peak_memory_mb is the main process's device peak.
  for mode in none zero2 zero3; do
    step "shard-$mode" 240 torchrun --standalone --nproc_per_node 2 -m retain.cli run configs/naive.yaml \
      "name=shard-$mode" "output_dir=$R" "model=$M/qwen" eval.max_test=8 eval.probe_max=8 train.max_steps=5 \
      train.precision=bf16 "train.sharding=$mode" --overwrite --quiet
    record "shard-$mode"
  done
fi
run experts lora-experts train.max_steps=5
# retain export's vLLM manifest, started as written (skipped with exit 3 when vLLM is not installed).
step vllm-manifest 240 sh -c "retain export $R/merge $R/merge-export --overwrite && \
  python3 benchmarks/vllm_check.py $R/merge-export --timeout 200"
sed -n '/^=== pytest$/,/^=== pytest rc/p' "$LOG" >"$OUT/pytest.txt"
cp benchmarks/results/es-gpu-* "$OUT/" 2>/dev/null

