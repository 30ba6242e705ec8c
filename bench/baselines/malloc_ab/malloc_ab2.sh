# The allocator A/B of docs/performance.md ("The allocator"): separate processes, alternating.
# Run from anywhere: bash bench/baselines/malloc_ab/THIS_FILE (with the venv active).
cd "$(dirname "$0")/../../.."  # the repository root
T="glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=2147483647:glibc.malloc.top_pad=67108864:glibc.malloc.tcache_count=0"
for i in 1 2; do
  for m in system keep tunables; do
    if [ $m = tunables ]; then export GLIBC_TUNABLES=$T; mm=system; else unset GLIBC_TUNABLES; mm=$m; fi
    echo "== $m $i"
    SEQMARL_MALLOC=$mm PYTHONPATH=src /usr/bin/time -f "%e s wall %U user %S sys %R minflt %M maxrssKB" python bench/train.py --envs smax:27m_vs_30m --threads 1 --iterations 2 --json /tmp/malloc2_${m}_$i.json 2>&1 | grep -v "^\[" | tail -4
  done
done
