#!/usr/bin/env bash
# The GPU comparison of docs/benchmarks.md in one run: per benchmark shape (CelebA, then
# MNIST), float32 against the PyTorch twin, then the bfloat16 compute option (the twin
# builds float32 only); then both shapes in float32 again against the twin with
# JAX_DEFAULT_MATMUL_PRECISION=highest (ours in full float32 instead of TF32).
#
#   bash scripts/gpu_benchmark.sh OUT_DIR [TWIN_SCRIPT]
#
# Needs a python ($PYTHON, default python3) with jax for the GPU, flax, optax, chex,
# orbax-checkpoint, ml_collections, tensorboard and Pillow (a GPU image may lack
# ml_collections: pip install ml_collections==1.1.0, a pure-Python wheel), and one with torch for the twin ($TWIN_PYTHON, default the same; the
# twin runs on CUDA when JAX's backend is a GPU). TWIN_SCRIPT defaults to
# ../shared/bench/torch_twin.py beside the repository. Writes OUT_DIR/machine.txt (GPU,
# driver, versions) and, per run, NAME.jsonl (benchmark.py's JSON lines) and NAME.log (its
# table and progress). STEPS and ROUNDS (defaults 50 and 5) size the runs; any other
# argument of benchmark.py can follow in BENCH_ARGS.
set -euo pipefail
out=${1:?usage: bash scripts/gpu_benchmark.sh OUT_DIR [TWIN_SCRIPT]}
repo=$(cd "$(dirname "$0")/.." && pwd)
twin=${2:-$repo/../shared/bench/torch_twin.py}
py=${PYTHON:-python3}
twin_py=${TWIN_PYTHON:-$py}
steps=${STEPS:-50}
rounds=${ROUNDS:-5}
[ -f "$twin" ] || { echo "gpu_benchmark.sh: no twin at $twin" >&2; exit 2; }
# Paths as given from here; the runs start in the repository.
mkdir -p "$out"
out=$(cd "$out" && pwd)
twin=$(cd "$(dirname "$twin")" && pwd)/$(basename "$twin")
# The pythons too (a relative path, or a name on PATH), before the cd.
for var in py twin_py; do
  resolved=$(command -v "${!var}") || { echo "gpu_benchmark.sh: no python at ${!var}" >&2; exit 2; }
  case $resolved in /*) ;; *) resolved=$(cd "$(dirname "$resolved")" && pwd)/$(basename "$resolved") ;; esac
  printf -v "$var" '%s' "$resolved"
done
cd "$repo"
# JAX takes 75% of the GPU's memory at start-up by default; the twin, a process of its
# own on the same GPU, needs some of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
export PYTHONUNBUFFERED=1

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$py" -c 'import platform, jax, flax, optax; print("python", platform.python_version(),
      "| jax", jax.__version__, "| flax", flax.__version__, "| optax", optax.__version__,
      jax.devices())' || true
  "$twin_py" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name()
      if torch.cuda.is_available() else "without CUDA")' || true
  lscpu | grep -E '^(Model name|CPU\(s\))' || true
  # TF32 or full float32 on NVIDIA GPUs (docs/benchmarks.md, GPU).
  echo "JAX_DEFAULT_MATMUL_PRECISION=${JAX_DEFAULT_MATMUL_PRECISION:-unset, the default}"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

run() {  # NAME ARGS...: one benchmark.py invocation, its JSON lines and its log.
  local name=$1; shift
  echo "== $name: benchmark.py $*"
  "$py" benchmark.py --steps="$steps" --rounds="$rounds" "$@" ${BENCH_ARGS:-} \
    > "$out/$name.jsonl" 2> "$out/$name.log" || { tail -20 "$out/$name.log"; return 1; }
  grep -A8 '^step ' "$out/$name.log"
}

for shape in celeba mnist; do
  run "$shape-float32" --config="configs/bench_$shape.py" \
    --twin_python="$twin_py" --twin_script="$twin"
  run "$shape-bfloat16" --config="configs/bench_$shape.py" --config.model.dtype=bfloat16 \
    --cases=pretrain_step,adversarial_step_both
done
for shape in celeba mnist; do
  JAX_DEFAULT_MATMUL_PRECISION=highest run "$shape-float32-highest" \
    --config="configs/bench_$shape.py" --twin_python="$twin_py" --twin_script="$twin"
done
