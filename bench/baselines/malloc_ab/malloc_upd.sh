# The allocator A/B of docs/performance.md ("The allocator"): separate processes, alternating.
# Run from anywhere: bash bench/baselines/malloc_ab/THIS_FILE (with the venv active).
cd "$(dirname "$0")/../../.."  # the repository root
for i in 1 2; do
  for m in system keep; do
    echo "== $m $i"
    SEQMARL_MALLOC=$m PYTHONPATH=src python bench/update.py --agents 3 27 --threads 1 --repeats 5 --json /tmp/upd_${m}_$i.json 2>&1 | grep -E "^\| [0-9]|^# update"
  done
done
