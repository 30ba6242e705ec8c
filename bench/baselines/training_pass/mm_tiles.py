"""One core: the training pass's matmul tile (csrc/decode.cpp `mm`, compiled here from the tree's source)
against torch.mm on the same shapes, hot in cache. Rows = one chunk of the pass (126) and more.

    PYTHONPATH=src python bench/baselines/training_pass/mm_tiles.py     (needs g++)

Forward: (R x 64) @ (64 x 64) + bias; input gradient: (R x 64) @ (64 x 64); weight gradient:
(64 x R) @ (R x 64) accumulated (the pass reads the output gradient by columns).
"""

import subprocess
import tempfile
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parents[3] / "src/seqmarl/nn/csrc/decode.cpp"
MAIN = r"""
#include <chrono>
#include <cstdio>
#include <cstdlib>
int main(int argc, char** argv) {
  const int R = atoi(argv[1]), reps = atoi(argv[2]), K = 64, O = 64;
  float *X = new float[R * K], *W = new float[K * O], *Y = new float[R * O];
  float *b = new float[O](), *G = new float[K * O]();
  for (int i = 0; i < R * K; ++i) X[i] = rand() / (float)RAND_MAX;
  for (int i = 0; i < R * O; ++i) Y[i] = rand() / (float)RAND_MAX;
  for (int i = 0; i < K * O; ++i) W[i] = rand() / (float)RAND_MAX;
  for (int mode = 0; mode < 3; ++mode) {
    double best = 1e9;
    for (int t = 0; t < 5; ++t) {
      auto t0 = std::chrono::steady_clock::now();
      for (int r = 0; r < reps; ++r) {
        if (mode == 0) mm(X, K, 1, R, K, W, O, O, b, false, Y, O);
        if (mode == 1) mm(Y, O, 1, R, O, W, K, K, nullptr, false, X, K);
        if (mode == 2) mm(Y, 1, O, O, R, X, K, K, nullptr, true, G, K);
      }
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    printf("%.1f\n", 2.0 * R * K * O * reps / best / 1e9);
  }
}
"""


def tile_rates(rows: int) -> list[float]:
    text = SOURCE.read_text()
    start = text.index("template <int V>\nFAST inline __m256 load_columns")
    end = text.index("// C (M, O) = bias + A (M, K) @ Wt (K, O), Wt contiguous")
    head = "#include <immintrin.h>\n#include <cstdint>\n#include <algorithm>\n"
    head += '#define FAST __attribute__((target("avx2,fma")))\n'
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "tiles.cpp", Path(tmp) / "tiles"
        src.write_text(head + text[start:end] + MAIN)
        subprocess.run(["g++", "-O3", "-o", str(exe), str(src)], check=True)
        out = subprocess.run(
            [str(exe), str(rows), str(max(200, 2_000_000 // rows))],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return [float(x) for x in out.split()]


def torch_rates(rows: int) -> list[float]:
    torch.set_num_threads(1)
    x, w, y = torch.rand(rows, 64), torch.rand(64, 64), torch.rand(rows, 64)
    b = torch.zeros(64)
    cases = [lambda: torch.addmm(b, x, w), lambda: torch.mm(y, w), lambda: torch.mm(y.t(), x)]
    reps = max(200, 2_000_000 // rows)
    rates = []
    for fn in cases:
        best = 1e9
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            best = min(best, time.perf_counter() - start)
        rates.append(2.0 * rows * 64 * 64 * reps / best / 1e9)
    return rates


if __name__ == "__main__":
    print("| rows | pass tile: forward / input grad / weight grad GFLOP/s | torch: same | tile / torch |")
    print("|---|---|---|---|")
    for rows in (126, 1024, 9600):
        ours, theirs = tile_rates(rows), torch_rates(rows)
        fmt = lambda r: " / ".join(f"{v:.0f}" for v in r)  # noqa: E731
        ratio = " / ".join(f"{a / b:.2f}" for a, b in zip(ours, theirs))
        print(f"| {rows} | {fmt(ours)} | {fmt(theirs)} | {ratio} |")
