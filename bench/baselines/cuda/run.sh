#!/usr/bin/env bash
# The CUDA run recorded in docs/performance.md ("On a CUDA GPU"): the GPU tests, then bench/update.py,
# bench/decode.py, bench/smax_step.py and bench/train.py on the GPU (--device auto picks it), each under a
# time limit so that one failure does not cost the rest. Needs the smax extra for SMAX and the CLI test.
#   bash bench/baselines/cuda/run.sh OUTDIR [REFERENCE_SRC]
# REFERENCE_SRC: a checkout of PKU-MARL/Multi-Agent-Transformer (be3ff49) for the reference's update
# timed beside ours on the same GPU (bench/update.py --reference-src).
set -uo pipefail
cd "$(dirname "$0")/../../.."
out=${1:?usage: run.sh OUTDIR [REFERENCE_SRC]}
ref=${2:-}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() {
  local limit=$1
  shift
  echo "## $(date -u +%T) $*"
  timeout "$limit" "$@"
  echo "## rc=$? $(date -u +%T)"
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
step 180 $PY -c "from seqmarl.nn import cpp_decode; print('C++ module:', cpp_decode.extension('auto'))"
step 180 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
if [ "${SKIP_UPDATE:-0}" != 1 ]; then
  step 120 $PY bench/update.py --json "$out/update_cuda.json" ${ref:+--reference-src "$ref"}
fi
step 150 $PY bench/decode.py --repeats 5 --json "$out/decode_cuda.json"
step 120 $PY bench/smax_step.py --steps 100 --json "$out/smax_step_cuda.json"
step 180 $PY bench/train.py --envs smax:3m smax:27m_vs_30m --json "$out/train_cuda.json"
# the simulator on jax's GPU (env.sim_device=gpu) for the large map
step 120 $PY bench/train.py --envs smax:27m_vs_30m --set env.sim_device=gpu --json "$out/train_cuda_sim_gpu.json"
# acting without CUDA graphs (eager), for the graphs' gain end to end
step 100 $PY bench/train.py --envs smax:3m --set model.cuda_graphs=false --json "$out/train_cuda_eager.json"
