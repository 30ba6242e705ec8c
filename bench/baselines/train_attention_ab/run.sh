# The training attention A/B of docs/performance.md ("Attention over few tokens in the update"):
# bench/train.py on smax:3m with the C++ attention (cpp) and with torch's kernel (sdpa), separate
# processes alternating, two rounds. Run from the repository root with the venv active (or PYTHON=...).
for i in 1 2; do
  for kernel in sdpa cpp; do
    flag=$([ $kernel = cpp ] && echo True || echo False)
    PYTHONPATH=src ${PYTHON:-python} -c "
import runpy, sys
from seqmarl.nn import cpp_decode
cpp_decode.use_training_attention = $flag
sys.argv = ['bench/train.py', '--envs', 'smax:3m', '--threads', '1', '--iterations', '3',
            '--json', 'bench/baselines/train_attention_ab/train_${kernel}_$i.json']
sys.path.insert(0, 'bench')
runpy.run_path('bench/train.py', run_name='__main__')
" 2>&1 | grep -E "^\| smax|Error|error"
  done
done
