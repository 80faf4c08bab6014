#!/usr/bin/env bash
# The GPU checks of issue 9 in one script (a CUDA machine with torch, transformers, cuda-python
# and NVRTC; specmesh installed or on PYTHONPATH; run from the repository root):
#
#   MODELS=../shared/models WIDEN=../shared/tools/widen_llama.py bash loadtest/gpu_check.sh OUTDIR
#
# Stages (STAGES="..." picks some; default all):
#   tests      python -m pytest -m gpu tests/kernels (the kernel against the reference)
#   attention  the tree-attention kernel vs the PyTorch reference vs dense-mask SDPA
#   models     a 1B-class bf16 target (stories260K widened: 22 x 2048, 16 q / 8 kv heads x 128,
#              ffn 5632) and a 94M-class bf16 draft (stories260K-draft2L widened: 8 x 1024,
#              16 q / 8 kv heads x 64, ffn 2816), made here with widen_llama.py: the function
#              of the tiny pair at 1B-class cost
#   engine     the engine bench on the GPU (forward time by rows), CUDA graphs on and off
#   bench      `specmesh bench --device cuda --dtype bfloat16` on that pair, with HF's rows
#   sampling   the same bench sampling (temperature 0.8, top_p 0.95), c=1, no HF rows
#   graphs-ab  (not in the default) c=1 chain:5 greedy and sampled through the services with
#              SPECMESH_CUDA_GRAPHS=0 then 1: what the graphs buy end to end
# Everything prints to stdout and lands in OUTDIR (one file per stage).
set -u
OUTDIR=${1:-out/gpu}
MODELS=${MODELS:-../shared/models}
WIDEN=${WIDEN:-../shared/tools/widen_llama.py}
BUILT=${BUILT:-/tmp/specmesh-gpu-models}
STAGES=${STAGES:-"tests attention models engine bench sampling"}
BENCH_ARGS=${BENCH_ARGS:-"--concurrency 1,16 --max-new-tokens 128 --num-prompts 4 --trees chain:3,chain:5,dynamic:8,chain:5+adaptive"}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 SPECMESH_MODEL_DIR=$MODELS
mkdir -p "$OUTDIR"
TARGET=$BUILT/stories260K-wide1B
DRAFT=$BUILT/stories260K-draft2L-wide94M

has() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
say() { echo "== $(date +%T) $*"; }

nvidia-smi -L | tee "$OUTDIR/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
        transformers.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUTDIR/gpu.txt"

if has tests; then
  say "pytest -m gpu tests/kernels"
  timeout 240 $PY -m pytest -m gpu tests/kernels -q -p no:cacheprovider 2>&1 | tail -40 \
    | tee "$OUTDIR/tests.txt"
fi
if has attention; then
  say "tree-attention bench"
  for dt in bf16 f16; do
    timeout 60 $PY -m specmesh.kernels.bench_tree_attention --dtype $dt 2>&1
    timeout 60 $PY -m specmesh.kernels.bench_tree_attention --dtype $dt --batch 16 --prefix 1024 \
      --heads 16 --kv-heads 8 --head-dim 128 2>&1
  done | tee "$OUTDIR/attention.txt"
fi
if has models; then
  say "making the 1B-class target and the 94M-class draft (bf16)"
  mkdir -p "$BUILT"
  [ -f "$TARGET/model.safetensors" ] || $PY "$WIDEN" "$MODELS/stories260K" "$TARGET" \
    --hidden 2048 --heads 16 --kv-heads 8 --head-dim 128 --ffn 5632 --layers 22 --dtype bfloat16
  [ -f "$DRAFT/model.safetensors" ] || $PY "$WIDEN" "$MODELS/stories260K-draft2L" "$DRAFT" \
    --hidden 1024 --heads 16 --kv-heads 8 --head-dim 64 --ffn 2816 --layers 8 --dtype bfloat16
fi
if has engine; then
  for graphs in ${GRAPHS:-1 0}; do
    say "engine bench, SPECMESH_CUDA_GRAPHS=$graphs"
    SPECMESH_CUDA_GRAPHS=$graphs timeout 150 $PY -m specmesh.kernels.bench_forward --device cuda \
      --dtype bfloat16 --target "$TARGET" --draft "$DRAFT" --repeats 30 2>&1
  done | tee "$OUTDIR/engine.txt"
fi
if has bench; then
  say "specmesh bench on the GPU: $BENCH_ARGS"
  # shellcheck disable=SC2086
  timeout ${BENCH_TIMEOUT:-330} $PY -m specmesh.loadtest.bench --device cuda --dtype bfloat16 \
    --target "$TARGET" --draft "$DRAFT" $BENCH_ARGS --json ${PLOT:+--plot "$OUTDIR/bench_gpu.png"} \
    > "$OUTDIR/bench_gpu.json" 2> "$OUTDIR/bench_gpu.log"
  echo "bench exit $?"
  grep -v "^\[bench" "$OUTDIR/bench_gpu.log" | tail -60
fi
if has sampling; then
  say "specmesh bench on the GPU, sampling"
  timeout ${SAMPLING_TIMEOUT:-120} $PY -m specmesh.loadtest.bench --device cuda --dtype bfloat16 \
    --target "$TARGET" --draft "$DRAFT" --temperature 0.8 --top-p 0.95 --no-hf --concurrency 1 \
    --max-new-tokens 128 --num-prompts 4 --trees chain:3,chain:5 --json \
    > "$OUTDIR/bench_gpu_sampling.json" 2> "$OUTDIR/bench_gpu_sampling.log"
  echo "sampling bench exit $?"
  grep -v "^\[bench" "$OUTDIR/bench_gpu_sampling.log" | sed -n '/^mode/,/^ratios/p'
fi
if has graphs-ab; then
  for graphs in 0 1; do
    for temp in 0 0.8; do
      say "services A/B: SPECMESH_CUDA_GRAPHS=$graphs temperature $temp"
      SPECMESH_CUDA_GRAPHS=$graphs timeout 120 $PY -m specmesh.loadtest.bench --device cuda \
        --dtype bfloat16 --target "$TARGET" --draft "$DRAFT" --concurrency 1 --num-prompts 4 \
        --max-new-tokens 128 --trees chain:5 --temperature $temp --top-p 0.95 --no-hf 2>&1 \
        | grep -E "^specmesh (target|spec)|spec/target"
    done
  done | tee "$OUTDIR/graphs_ab.txt"
fi
say done
