// MAT's cached decode loop (seqmarl/nn/mat.py, `_decode_cached`) written in C++ against ATen.
//
// Why: one decode step is ~25 tiny ops on (B, E) tensors, and at E = 64 their fixed costs (Python
// interpreter, dispatch, kernel set-up) outweigh their arithmetic. Called from C++ the ops skip the
// interpreter; the two attentions of one query over few keys use a plain loop instead of torch's CPU
// attention kernel (attend_one), and each residual add + LayerNorm is one loop (layer_norm).
// Otherwise the maths is op for op the Python step (DecoderBlock.step and the policy head): same
// discrete actions, outputs equal within float32 rounding, as tests/test_mat_model.py checks. ATen
// calls work on CPU and CUDA tensors alike; off CPU the attention and LayerNorm are torch's kernels.
// On x86-64 CPUs with AVX2 and FMA, CPU float32 decoding runs a second, fused loop instead (namespace
// fast, below): the same maths on raw rows with no ATen op per agent step. The same namespace holds the
// forward and backward of the PPO update's attention over few tokens (attention_forward/_backward).
//
// Shape legend: B batch, N agents, E embed, H heads, D = E / H, A action width.
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

using at::Tensor;

namespace {

// The order of a block's 18 weight tensors, as mat.py's CPP_WEIGHT_ORDER flattens them.
enum Weight {
  kQkvW, kQkvB, kSelfProjW, kSelfProjB, kCrossKvW, kCrossKvB, kCrossProjW, kCrossProjB,
  kFcW, kFcB, kProjW, kProjB, kLn1W, kLn1B, kLn2W, kLn2B, kLn3W, kLn3B, kNumWeights
};

struct Block {
  std::vector<Tensor> w;  // kNumWeights tensors
  Tensor cross_q;         // (B, H, N, D) queries from the encoded observations
  Tensor self_kv;         // (2, B, H, N, D) keys/values of the action tokens, filled slot by slot
  Tensor cross_kv;        // (2, B, H, N, D)
};

// The loops below sum into 8 independent partial sums, so the compiler can vectorise them without
// reordering a single running sum (which it may not do without -ffast-math); this adds them up.
inline float reduce8(const float* acc) {
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int t = 0; t < 8; ++t) acc[t] += a[d + t] * b[d + t];
  }
  float sum = reduce8(acc);
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// Attention of one query per (batch, head) over L keys: q (B, H, 1, D), k and v (B, H, L, D) with unit
// stride in D. For few keys on CPU float32, a plain loop: torch's CPU attention kernel has a fixed
// cost of ~6-12 us per call (B = 8-32, D = 64), the loop ~2-4 us at L = 3. The loop's cost grows
// faster with L (one exp per key, no threads); from L ~ 24 on torch's kernel is as fast or faster
// (measured on AMD EPYC, 1 and 2 threads; docs/performance.md), so it takes over there, and off CPU.
constexpr int64_t kLoopAttentionMaxKeys = 24;

Tensor attend_one(const Tensor& q, const Tensor& k, const Tensor& v) {
  if (!q.is_cpu() || q.scalar_type() != at::kFloat || k.size(2) > kLoopAttentionMaxKeys || k.stride(3) != 1 ||
      v.stride(3) != 1 || q.stride(3) != 1) {
    return at::scaled_dot_product_attention(q, k, v);
  }
  const int64_t B = q.size(0), H = q.size(1), L = k.size(2), D = q.size(3);
  Tensor out = at::empty({B, H, 1, D}, q.options());
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float* qd = q.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  const float* vd = v.data_ptr<float>();
  float* od = out.data_ptr<float>();
  std::vector<float> p(L);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const float* qp = qd + b * q.stride(0) + h * q.stride(1);
      const float* kp = kd + b * k.stride(0) + h * k.stride(1);
      const float* vp = vd + b * v.stride(0) + h * v.stride(1);
      float* op = od + (b * H + h) * D;
      float max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < L; ++j) {
        const float* kj = kp + j * k.stride(2);
        p[j] = dot(qp, kj, D) * scale;
        max = std::max(max, p[j]);
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < L; ++j) sum += (p[j] = std::exp(p[j] - max));
      const float inv = 1.0f / sum;
      for (int64_t d = 0; d < D; ++d) op[d] = 0.0f;
      for (int64_t j = 0; j < L; ++j) {
        const float* vj = vp + j * v.stride(2);
        const float w = p[j] * inv;
        for (int64_t d = 0; d < D; ++d) op[d] += w * vj[d];
      }
    }
  }
  return out;
}

// LayerNorm over the last dim of x (+ r, when given) for (B, E) rows: one pass per row on CPU float32
// (~1 us against ~6 us for at::layer_norm at B = 32, E = 64, plus the separate add), else ATen.
constexpr double kLayerNormEps = 1e-5;  // nn.LayerNorm's default

Tensor layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor* r = nullptr) {
  const bool plain = x.is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() &&
                     (r == nullptr || (r->is_contiguous() && r->sizes() == x.sizes())) && w.is_contiguous() &&
                     b.is_contiguous();
  if (!plain) {
    return at::layer_norm(r == nullptr ? x : x + *r, {x.size(-1)}, w, b, kLayerNormEps);
  }
  const int64_t B = x.size(0), E = x.size(1);
  Tensor out = at::empty_like(x);
  const float* xd = x.data_ptr<float>();
  const float* rd = r == nullptr ? nullptr : r->data_ptr<float>();
  const float* wd = w.data_ptr<float>();
  const float* bd = b.data_ptr<float>();
  float* od = out.data_ptr<float>();
  for (int64_t row = 0; row < B; ++row) {
    float* o = od + row * E;
    const float* xr = xd + row * E;
    if (rd != nullptr) {
      const float* rr = rd + row * E;
      for (int64_t e = 0; e < E; ++e) o[e] = xr[e] + rr[e];
    } else {
      for (int64_t e = 0; e < E; ++e) o[e] = xr[e];
    }
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t e = 0;
    for (; e + 8 <= E; e += 8) {
      for (int t = 0; t < 8; ++t) acc[t] += o[e + t];
    }
    float sum = reduce8(acc);
    for (; e < E; ++e) sum += o[e];
    const float mean = sum / static_cast<float>(E);
    for (int t = 0; t < 8; ++t) acc[t] = 0.0f;
    for (e = 0; e + 8 <= E; e += 8) {
      for (int t = 0; t < 8; ++t) {
        const float c = o[e + t] - mean;
        acc[t] += c * c;
      }
    }
    float sq = reduce8(acc);
    for (; e < E; ++e) sq += (o[e] - mean) * (o[e] - mean);
    const float inv = 1.0f / std::sqrt(sq / static_cast<float>(E) + static_cast<float>(kLayerNormEps));
    for (e = 0; e < E; ++e) o[e] = (o[e] - mean) * inv * wd[e] + bd[e];
  }
  return out;
}

// Write kv (B, 2, H, D) into slot i of cache (2, B, H, N, D); return keys, values of slots 0..i.
std::pair<Tensor, Tensor> append(const Tensor& cache, int64_t i, const Tensor& kv) {
  cache.select(3, i).copy_(kv.transpose(0, 1));
  Tensor prefix = cache.narrow(3, 0, i + 1);
  return {prefix.select(0, 0), prefix.select(0, 1)};
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// The fused CPU loop: the same step on raw float32 rows, with no ATen op inside the agent loop.
//
// Why: with the ATen step above, a decode step at B = 32, E = 64 costs ~250 us, of which the eight
// `addmm` calls are ~47% at ~40 GFLOP/s (tiny matmuls with a fixed set-up cost each), GELU ~14% and
// copies ~12% (docs/performance.md). Here every Linear is a register-blocked AVX2/FMA kernel over the
// weights transposed once per call, GELU and softmax use vectorised exp/erf, LayerNorm, the residual
// adds and the cache writes are loops over the rows, and each thread decodes its own slice of the batch
// for all N agents (the envs of a batch never interact), so there is no synchronisation per step.
// Built with per-function target attributes and used only when the CPU reports AVX2 and FMA; every
// other case (another CPU, CUDA, another dtype) runs the ATen step. The maths is the same, summed in
// another order: outputs agree within float32 rounding (tests/test_mat_model.py).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SEQMARL_FAST_DECODE 1
#include <immintrin.h>
#define FAST __attribute__((target("avx2,fma")))
#else
#define SEQMARL_FAST_DECODE 0
#endif

namespace fast {

#if SEQMARL_FAST_DECODE

bool supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

FAST inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// e^x for 8 floats: x = n ln2 + r, e^r by Cephes' degree-6 polynomial, 2^n through the exponent bits
// (about 1 ulp; arguments below -87 give ~1e-38 instead of a denormal or 0).
FAST inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

// erf for 8 floats by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), the formula torch's own
// vectorised CPU erf uses, so GELU here matches nn.GELU() to float32 rounding. `exp_minus_x2`, when
// given, receives the e^(-x^2) computed on the way (GELU's backward reuses it for the density).
FAST inline __m256 erf8(__m256 x, __m256* exp_minus_x2 = nullptr) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, one));
  __m256 r = _mm256_set1_ps(1.061405429f);
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-1.453152027f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
  const __m256 e = exp8(_mm256_mul_ps(_mm256_xor_ps(a, _mm256_set1_ps(-0.0f)), a));  // e^(-a^2)
  if (exp_minus_x2 != nullptr) *exp_minus_x2 = e;
  const __m256 y = _mm256_fnmadd_ps(_mm256_mul_ps(e, t), r, one);                   // 1 - e t r
  return _mm256_xor_ps(y, sign);
}

// y = GELU(x), exact (erf), as nn.GELU(), over n floats; x and y may be the same.
FAST void gelu_to(const float* x, float* y, int64_t n) {
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), s = _mm256_set1_ps(0.70710678118654752f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 c = _mm256_add_ps(one, erf8(_mm256_mul_ps(v, s)));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(half, v), c));
  }
  for (; i < n; ++i) y[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.70710678118654752f));
}

FAST inline void gelu(float* x, int64_t n) { gelu_to(x, x, n); }  // in place

// The matmul of the fused decode loop and of the training pass (below):
// C (M, O) = init + A @ Bt, for A(m, k) = A[m * sam + k * sak], Bt (K, O) with row stride ldb, C with row
// stride ldc; init is C itself (acc), else bias (when given), else 0. Bt is a Linear's weight
// transposed (forward), the weight itself (input gradient), or the layer's input rows with A the output
// gradient read by columns (weight gradient: sam = 1, sak = the gradient's row stride). Register-
// blocked AVX2/FMA tiles of 6 rows x 16 columns of accumulators.

// R rows x V vectors of 8 columns (V = 1 .. 4), or V = 0: the first `n` (< 8) columns, by masked loads
// and stores. R x V accumulators, one FMA chain each: 8 or more keep both FMA units busy (4-cycle latency).
template <int R, int V>
FAST inline void mm_tile(const float* A, int64_t sam, int64_t sak, int64_t K, const float* Bt, int64_t ldb,
                         const float* bias, bool acc, float* C, int64_t ldc, int64_t n = 8) {
  // The loops over r and v are unrolled by pragma: GCC did not unroll them on its own and then kept the
  // accumulators on the stack, storing them on every step of k (~40 against ~105 GFLOP/s, one core).
  static_assert(V >= 0 && V <= 4 && R * (V == 0 ? 1 : V) <= 12, "at most 12 accumulators (16 ymm registers)");
  constexpr int NV = V == 0 ? 1 : V;
  alignas(32) static const float zeros[32] = {};
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const float* init = acc ? C : (bias != nullptr ? bias : zeros);
  const int64_t init_ld = acc ? ldc : 0;
  __m256 c[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      c[r][v] = V == 0 ? _mm256_maskload_ps(init + r * init_ld, mask) : _mm256_loadu_ps(init + r * init_ld + 8 * v);
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = V == 0 ? _mm256_maskload_ps(Bt + k * ldb, mask) : _mm256_loadu_ps(Bt + k * ldb + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * sam + k * sak);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm256_fmadd_ps(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (V == 0) {
        _mm256_maskstore_ps(C + r * ldc, mask, c[r][v]);
      } else {
        _mm256_storeu_ps(C + r * ldc + 8 * v, c[r][v]);
      }
    }
  }
}

// R rows of C across all O columns: W vectors (8 W columns) at a time, then 16, then 8, then a masked tail
// (the R rows of A and the whole of Bt stay in the L1/L2 cache while the columns are swept).
template <int R, int W = 2>
FAST void mm_rows(const float* A, int64_t sam, int64_t sak, int64_t K, const float* Bt, int64_t ldb, int64_t O,
                  const float* bias, bool acc, float* C, int64_t ldc) {
  auto b = [bias](int64_t o) { return bias == nullptr ? nullptr : bias + o; };
  int64_t o = 0;
  for (; o + 8 * W <= O; o += 8 * W) mm_tile<R, W>(A, sam, sak, K, Bt + o, ldb, b(o), acc, C + o, ldc);
  if (W > 2) {
    for (; o + 16 <= O; o += 16) mm_tile<R, 2>(A, sam, sak, K, Bt + o, ldb, b(o), acc, C + o, ldc);
  }
  for (; o + 8 <= O; o += 8) mm_tile<R, 1>(A, sam, sak, K, Bt + o, ldb, b(o), acc, C + o, ldc);
  if (o < O) mm_tile<R, 0>(A, sam, sak, K, Bt + o, ldb, b(o), acc, C + o, ldc, O - o);
}

FAST void mm(const float* A, int64_t sam, int64_t sak, int64_t M, int64_t K, const float* Bt, int64_t ldb, int64_t O,
             const float* bias, bool acc, float* C, int64_t ldc) {
  // 6 rows x 16 columns at a time. The 1-5 rows left over go in tiles that still hold 8-12 accumulators
  // (one core, K = O = 64: 105-110 GFLOP/s for 6x16, 5x16, 4x16 and 3x32 tiles, against 51 for 2x16 and 42
  // for 1x16, which waited on their FMAs' latency): after at least one 6-row strip, 1 left over goes with
  // it as 4 + 3 and 2 as 4 + 4; under 6 rows in all, the widest tiles that fit (1x32 / 2x32: ~60, bound
  // by loading the weights once per row).
  const int64_t left = M % 6;
  int64_t strips = M / 6;
  if (strips > 0 && (left == 1 || left == 2)) --strips;
#define SEQMARL_ROWS(R, W) (mm_rows<R, W>(A + m * sam, sam, sak, K, Bt, ldb, O, bias, acc, C + m * ldc, ldc), m += R)
  int64_t m = 0;
  for (int64_t i = 0; i < strips; ++i) SEQMARL_ROWS(6, 2);
  switch (M - m) {
    case 1: SEQMARL_ROWS(1, 4); break;
    case 2: SEQMARL_ROWS(2, 4); break;
    case 3: SEQMARL_ROWS(3, 4); break;
    case 4: SEQMARL_ROWS(4, 2); break;
    case 5: SEQMARL_ROWS(5, 2); break;
    case 7: SEQMARL_ROWS(4, 2), SEQMARL_ROWS(3, 4); break;
    case 8: SEQMARL_ROWS(4, 2), SEQMARL_ROWS(4, 2); break;
    default: break;  // 0
  }
#undef SEQMARL_ROWS
}

// C (M, O) = bias + A (M, K) @ Wt (K, O), Wt contiguous (a Linear's weight transposed).
FAST inline void linear(const float* A, int64_t lda, int64_t M, int64_t K, const float* Wt, const float* bias,
                        int64_t O, float* C, int64_t ldc) {
  mm(A, lda, 1, M, K, Wt, O, O, bias, false, C, ldc);
}

FAST inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
  float sum = hsum(acc);
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// One query q (D) over L keys and values (L, D), rows contiguous: out (D) = softmax(q k^T / sqrt D) v.
// p: scratch of at least L + 8 floats.
FAST void attend(const float* q, const float* k, const float* v, int64_t L, int64_t D, float* p, float* out) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  float max = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < L; ++j) {
    p[j] = dot(q, k + j * D, D) * scale;
    max = std::max(max, p[j]);
  }
  const __m256 vmax = _mm256_set1_ps(max);
  __m256 vsum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= L; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), vmax));
    _mm256_storeu_ps(p + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (; j < L; ++j) sum += (p[j] = std::exp(p[j] - max));
  // out = sum_j p_j v_j / sum: one pass over the values, key by key (a pass per 8 columns would read
  // every value row D / 8 times, which costs memory bandwidth once the cache outgrows the CPU caches)
  std::fill(out, out + D, 0.0f);
  for (j = 0; j < L; ++j) {
    const __m256 w = _mm256_set1_ps(p[j]);
    const float* vj = v + j * D;
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) _mm256_storeu_ps(out + d, _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + d), _mm256_loadu_ps(out + d)));
    for (; d < D; ++d) out[d] += p[j] * vj[d];
  }
  const float inv = 1.0f / sum;
  for (int64_t d = 0; d < D; ++d) out[d] *= inv;
}

// LayerNorm of R rows of width E: out = LN(x (+ r)) with weight w, bias b; out may be x or r. For the
// training backward, xhat (R x E) and rstd (R) receive the normalised rows and 1/std when not null.
// The same for E = 8 * NV with each row held in NV registers: one read of the row instead of three passes
// over it (the sums are taken in the same order, so the results are the same bits).
template <int NV>
FAST void layer_norm_rows_held(const float* x, const float* r, const float* w, const float* b, int64_t R,
                               float* out, float* xhat, float* rstd) {
  constexpr int64_t E = 8 * NV;
  const float eps = static_cast<float>(kLayerNormEps);
  for (int64_t row = 0; row < R; ++row) {
    __m256 v[NV];
    __m256 acc = _mm256_setzero_ps();
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) {
      v[i] = _mm256_loadu_ps(x + row * E + 8 * i);
      if (r != nullptr) v[i] = _mm256_add_ps(v[i], _mm256_loadu_ps(r + row * E + 8 * i));
      acc = _mm256_add_ps(acc, v[i]);
    }
    const __m256 vmean = _mm256_set1_ps(hsum(acc) / static_cast<float>(E));
    acc = _mm256_setzero_ps();
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) {
      v[i] = _mm256_sub_ps(v[i], vmean);
      acc = _mm256_fmadd_ps(v[i], v[i], acc);
    }
    const float inv = 1.0f / std::sqrt(hsum(acc) / static_cast<float>(E) + eps);
    const __m256 vinv = _mm256_set1_ps(inv);
    if (rstd != nullptr) rstd[row] = inv;
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) {
      const __m256 c = _mm256_mul_ps(v[i], vinv);
      if (xhat != nullptr) _mm256_storeu_ps(xhat + row * E + 8 * i, c);
      _mm256_storeu_ps(out + row * E + 8 * i, _mm256_fmadd_ps(c, _mm256_loadu_ps(w + 8 * i), _mm256_loadu_ps(b + 8 * i)));
    }
  }
}

FAST void layer_norm_rows(const float* x, const float* r, const float* w, const float* b, int64_t R, int64_t E,
                          float* out, float* xhat = nullptr, float* rstd = nullptr) {
  if (E == 64) return layer_norm_rows_held<8>(x, r, w, b, R, out, xhat, rstd);
  if (E == 32) return layer_norm_rows_held<4>(x, r, w, b, R, out, xhat, rstd);
  const float eps = static_cast<float>(kLayerNormEps);
  for (int64_t row = 0; row < R; ++row) {
    const float* xr = x + row * E;
    const float* rr = r == nullptr ? nullptr : r + row * E;
    float* o = out + row * E;
    __m256 acc = _mm256_setzero_ps();
    int64_t e = 0;
    for (; e + 8 <= E; e += 8) {
      __m256 v = _mm256_loadu_ps(xr + e);
      if (rr != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(rr + e));
      _mm256_storeu_ps(o + e, v);
      acc = _mm256_add_ps(acc, v);
    }
    float sum = hsum(acc);
    for (; e < E; ++e) sum += (o[e] = rr == nullptr ? xr[e] : xr[e] + rr[e]);
    const float mean = sum / static_cast<float>(E);
    const __m256 vmean = _mm256_set1_ps(mean);
    acc = _mm256_setzero_ps();
    for (e = 0; e + 8 <= E; e += 8) {
      const __m256 c = _mm256_sub_ps(_mm256_loadu_ps(o + e), vmean);
      acc = _mm256_fmadd_ps(c, c, acc);
    }
    float sq = hsum(acc);
    for (; e < E; ++e) sq += (o[e] - mean) * (o[e] - mean);
    const float inv = 1.0f / std::sqrt(sq / static_cast<float>(E) + eps);
    const __m256 vinv = _mm256_set1_ps(inv);
    float* h = xhat == nullptr ? nullptr : xhat + row * E;
    if (rstd != nullptr) rstd[row] = inv;
    for (e = 0; e + 8 <= E; e += 8) {
      const __m256 c = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(o + e), vmean), vinv);
      if (h != nullptr) _mm256_storeu_ps(h + e, c);
      _mm256_storeu_ps(o + e, _mm256_fmadd_ps(c, _mm256_loadu_ps(w + e), _mm256_loadu_ps(b + e)));
    }
    for (; e < E; ++e) {
      const float c = (o[e] - mean) * inv;
      if (h != nullptr) h[e] = c;
      o[e] = c * w[e] + b[e];
    }
  }
}

FAST void add_rows(float* x, const float* y, int64_t n) {  // x += y over n floats
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) x[i] += y[i];
}

struct Linear {
  Tensor wt;  // (K, O) contiguous: the weight transposed once per call
  const float* w;
  const float* b;
  int64_t K, O;
  Linear() = default;
  Linear(const Tensor& weight, const Tensor& bias)
      : wt(weight.t().contiguous()), w(wt.data_ptr<float>()), b(bias.data_ptr<float>()),
        K(weight.size(1)), O(weight.size(0)) {}
};

struct Norm {
  const float* w;
  const float* b;
};

struct FastBlock {
  Linear qkv, self_proj, cross_kv, cross_proj, fc, proj;
  Norm ln1, ln2, ln3;
  Tensor cross_q;  // (B, H, N, D), D contiguous
  float* self_cache;   // (2, B, H, N, D) contiguous: keys and values of the action tokens
  float* cross_cache;  // (2, B, H, N, D) contiguous: keys and values for the cross attention
};

struct FastModel {
  int64_t B, N, E, H, D, A, hidden;
  bool pre_norm, discrete;
  std::vector<FastBlock> blocks;
  const float* rep;    // (B, N, E)
  const float* start;  // (B, E)
  Linear head_fc, head_out, embed;
  Norm head_ln, final_ln, embed_ln;
  bool has_final_ln;
  const float* tokens;  // discrete: (A, E)
  const float* offset;  // (B, N, A) or nullptr
  float* outs;          // (B, N, A)
  int64_t* action_ids;  // discrete: (B, N)
  float* action_values; // continuous: (B, N, A)
};

// Write R rows of keys/values (row stride ld, first key at kv, values E floats later) into slot i of
// cache (2, B, H, N, D) for batch rows b0..b0+R-1.
FAST void cache_write(float* cache, const FastModel& m, int64_t b0, int64_t R, int64_t i, const float* kv, int64_t ld) {
  const int64_t N = m.N, D = m.D, H = m.H;
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t part = 0; part < 2; ++part) {
      for (int64_t h = 0; h < H; ++h) {
        float* dst = cache + (((part * m.B + b0 + r) * H + h) * N + i) * D;
        std::memcpy(dst, kv + r * ld + part * m.E + h * D, sizeof(float) * D);
      }
    }
  }
}

// Decode every agent for batch rows b0..b1-1.
FAST void decode_rows(const FastModel& m, int64_t b0, int64_t b1) {
  const int64_t R = b1 - b0, N = m.N, E = m.E, H = m.H, D = m.D, A = m.A, Hm = m.hidden;
  std::vector<float> buf(static_cast<size_t>(R * (9 * E + Hm) + N + 8));
  float* x = buf.data();     // (R, E) the token entering the decoder
  float* h = x + R * E;      // (R, E) LayerNorm'd input
  float* att = h + R * E;    // (R, E) attention outputs
  float* t = att + R * E;    // (R, E) projections
  float* y = t + R * E;      // (R, E)
  float* z = y + R * E;      // (R, E) head hidden
  float* wide = z + R * E;   // (R, 3E) fused q/k/v or k/v
  float* mid = wide + 3 * R * E;  // (R, Hm) MLP hidden
  float* p = mid + R * Hm;        // (N + 8) attention weights
  for (int64_t r = 0; r < R; ++r) std::memcpy(x + r * E, m.start + (b0 + r) * E, sizeof(float) * E);

  for (int64_t i = 0; i < N; ++i) {
    for (const FastBlock& blk : m.blocks) {
      // causal self-attention over the action tokens 0..i
      const float* in = x;
      if (m.pre_norm) {
        layer_norm_rows(x, nullptr, blk.ln1.w, blk.ln1.b, R, E, h);
        in = h;
      }
      linear(in, E, R, E, blk.qkv.w, blk.qkv.b, 3 * E, wide, 3 * E);
      cache_write(blk.self_cache, m, b0, R, i, wide + E, 3 * E);
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t hh = 0; hh < H; ++hh) {
          const float* keys = blk.self_cache + ((b0 + r) * H + hh) * N * D;
          const float* values = blk.self_cache + ((m.B + b0 + r) * H + hh) * N * D;
          attend(wide + r * 3 * E + hh * D, keys, values, i + 1, D, p, att + r * E + hh * D);
        }
      }
      linear(att, E, R, E, blk.self_proj.w, blk.self_proj.b, E, t, E);
      if (m.pre_norm) {
        add_rows(x, t, R * E);
      } else {
        layer_norm_rows(x, t, blk.ln1.w, blk.ln1.b, R, E, x);
      }
      // "cross" attention: query from the encoded observation i, keys/values from the action stream
      in = x;
      if (m.pre_norm) {
        layer_norm_rows(x, nullptr, blk.ln2.w, blk.ln2.b, R, E, h);
        in = h;
      }
      linear(in, E, R, E, blk.cross_kv.w, blk.cross_kv.b, 2 * E, wide, 2 * E);
      cache_write(blk.cross_cache, m, b0, R, i, wide, 2 * E);
      const float* cq = blk.cross_q.data_ptr<float>();
      const auto cs = blk.cross_q.strides();
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t hh = 0; hh < H; ++hh) {
          const float* keys = blk.cross_cache + ((b0 + r) * H + hh) * N * D;
          const float* values = blk.cross_cache + ((m.B + b0 + r) * H + hh) * N * D;
          const float* query = cq + (b0 + r) * cs[0] + hh * cs[1] + i * cs[2];
          attend(query, keys, values, i + 1, D, p, att + r * E + hh * D);
        }
      }
      linear(att, E, R, E, blk.cross_proj.w, blk.cross_proj.b, E, y, E);
      for (int64_t r = 0; r < R; ++r) add_rows(y + r * E, m.rep + ((b0 + r) * N + i) * E, E);  // rep_i + ...
      // MLP: Linear -> GELU -> Linear
      if (m.pre_norm) {
        layer_norm_rows(y, nullptr, blk.ln3.w, blk.ln3.b, R, E, h);
        linear(h, E, R, E, blk.fc.w, blk.fc.b, Hm, mid, Hm);
        gelu(mid, R * Hm);
        linear(mid, Hm, R, Hm, blk.proj.w, blk.proj.b, E, t, E);
        for (int64_t k = 0; k < R * E; ++k) x[k] = y[k] + t[k];
      } else {
        layer_norm_rows(y, nullptr, blk.ln2.w, blk.ln2.b, R, E, y);
        linear(y, E, R, E, blk.fc.w, blk.fc.b, Hm, mid, Hm);
        gelu(mid, R * Hm);
        linear(mid, Hm, R, Hm, blk.proj.w, blk.proj.b, E, t, E);
        layer_norm_rows(y, t, blk.ln3.w, blk.ln3.b, R, E, x);
      }
    }
    // policy head: [final LayerNorm ->] Linear -> GELU -> LayerNorm -> Linear, into outs[:, i]
    const float* in = x;
    if (m.has_final_ln) {
      layer_norm_rows(x, nullptr, m.final_ln.w, m.final_ln.b, R, E, h);
      in = h;
    }
    linear(in, E, R, E, m.head_fc.w, m.head_fc.b, m.head_fc.O, z, E);
    gelu(z, R * E);
    layer_norm_rows(z, nullptr, m.head_ln.w, m.head_ln.b, R, E, z);
    float* out = m.outs + (b0 * N + i) * A;
    linear(z, E, R, E, m.head_out.w, m.head_out.b, A, out, N * A);
    if (m.discrete) {
      for (int64_t r = 0; r < R; ++r) {  // argmax of output + offset, the first of equal maxima
        const float* o = out + r * N * A;
        const float* off = m.offset + ((b0 + r) * N + i) * A;
        int64_t best = 0;
        float best_value = o[0] + off[0];
        for (int64_t a = 1; a < A; ++a) {
          const float value = o[a] + off[a];
          if (value > best_value) best = a, best_value = value;
        }
        m.action_ids[(b0 + r) * N + i] = best;
        std::memcpy(x + r * E, m.tokens + best * E, sizeof(float) * E);
      }
    } else {
      float* act = m.action_values + (b0 * N + i) * A;
      for (int64_t r = 0; r < R; ++r) {
        const float* o = out + r * N * A;
        const float* off = m.offset == nullptr ? nullptr : m.offset + ((b0 + r) * N + i) * A;
        for (int64_t a = 0; a < A; ++a) act[r * N * A + a] = off == nullptr ? o[a] : o[a] + off[a];
      }
      linear(act, N * A, R, A, m.embed.w, m.embed.b, E, x, E);
      gelu(x, R * E);
      layer_norm_rows(x, nullptr, m.embed_ln.w, m.embed_ln.b, R, E, x);
    }
  }
}

bool usable(const Tensor& rep, const std::vector<std::vector<Tensor>>& blocks) {
  if (!supported() || !rep.is_cpu() || rep.scalar_type() != at::kFloat) return false;
  for (const auto& parts : blocks) {
    for (const auto& t : parts) {
      if (!t.is_cpu() || t.scalar_type() != at::kFloat) return false;
    }
    if (!parts[kNumWeights + 1].is_contiguous() || !parts[kNumWeights + 2].is_contiguous()) return false;
  }
  return true;
}

std::tuple<Tensor, Tensor> decode(const Tensor& rep_in, const std::vector<std::vector<Tensor>>& blocks,
                                  const std::vector<Tensor>& head, const Tensor& start,
                                  const std::optional<Tensor>& tokens, const std::vector<Tensor>& embed,
                                  const std::optional<Tensor>& offset, int64_t n_head, bool pre_norm) {
  const Tensor rep = rep_in.contiguous();
  FastModel m;
  m.B = rep.size(0), m.N = rep.size(1), m.E = rep.size(2), m.H = n_head, m.D = m.E / n_head;
  m.pre_norm = pre_norm;
  m.discrete = tokens.has_value();
  m.rep = rep.data_ptr<float>();
  const Tensor start_rows = start.contiguous();
  m.start = start_rows.data_ptr<float>();
  auto norm = [](const Tensor& w, const Tensor& b) { return Norm{w.data_ptr<float>(), b.data_ptr<float>()}; };
  std::vector<Tensor> keep;  // contiguous copies that must outlive the loop
  for (const auto& parts : blocks) {
    std::vector<Tensor> w;
    for (int k = 0; k < kNumWeights; ++k) w.push_back(parts[k].contiguous());
    keep.insert(keep.end(), w.begin(), w.end());
    FastBlock blk{Linear(w[kQkvW], w[kQkvB]),         Linear(w[kSelfProjW], w[kSelfProjB]),
                  Linear(w[kCrossKvW], w[kCrossKvB]), Linear(w[kCrossProjW], w[kCrossProjB]),
                  Linear(w[kFcW], w[kFcB]),           Linear(w[kProjW], w[kProjB]),
                  norm(w[kLn1W], w[kLn1B]),           norm(w[kLn2W], w[kLn2B]),
                  norm(w[kLn3W], w[kLn3B]),           parts[kNumWeights],
                  parts[kNumWeights + 1].data_ptr<float>(), parts[kNumWeights + 2].data_ptr<float>()};
    if (blk.cross_q.stride(3) != 1) blk.cross_q = blk.cross_q.contiguous();
    m.hidden = blk.fc.O;
    m.blocks.push_back(std::move(blk));
  }
  std::vector<Tensor> h;
  for (const auto& t : head) h.push_back(t.contiguous());
  keep.insert(keep.end(), h.begin(), h.end());
  m.head_fc = Linear(h[0], h[1]);
  m.head_ln = norm(h[2], h[3]);
  m.head_out = Linear(h[4], h[5]);
  m.A = m.head_out.O;
  m.has_final_ln = h.size() == 8;
  if (m.has_final_ln) m.final_ln = norm(h[6], h[7]);
  Tensor token_rows, offset_rows;
  if (m.discrete) {
    token_rows = tokens->contiguous();
    m.tokens = token_rows.data_ptr<float>();
  } else {
    std::vector<Tensor> e;
    for (const auto& t : embed) e.push_back(t.contiguous());
    keep.insert(keep.end(), e.begin(), e.end());
    m.embed = Linear(e[0], e[1]);
    m.embed_ln = norm(e[2], e[3]);
  }
  if (offset.has_value()) offset_rows = offset->contiguous();
  m.offset = offset.has_value() ? offset_rows.data_ptr<float>() : nullptr;
  TORCH_CHECK(!m.discrete || m.offset != nullptr, "decode: discrete actions need the offset (mask) tensor");
  Tensor outs = at::empty({m.B, m.N, m.A}, rep.options());
  Tensor actions = m.discrete ? at::empty({m.B, m.N}, rep.options().dtype(at::kLong)) : at::empty({m.B, m.N, m.A}, rep.options());
  m.outs = outs.data_ptr<float>();
  m.action_ids = m.discrete ? actions.data_ptr<int64_t>() : nullptr;
  m.action_values = m.discrete ? nullptr : actions.data_ptr<float>();
  // Each thread decodes its own rows for every agent; 4 rows at least, the height of a matmul tile.
  at::parallel_for(0, m.B, 4, [&](int64_t b0, int64_t b1) { decode_rows(m, b0, b1); });
  return {outs, actions};
}

// ---- Attention over few tokens in training (the PPO update's forward and backward; nn/layers.py) ----
// q, k, v, out: (B, L, H, D) float32, contiguous (the Linear outputs viewed per head: no transposes);
// probs (B, H, L, L) the softmax weights, kept for the backward (zero above the diagonal when causal).
// torch's CPU attention kernel is built for long sequences; at L = 3-27 tokens per sample its fixed
// cost per (batch, head) dominates, and these loops run forward + backward 2-5x faster (docs/performance.md).

FAST inline void axpy(float a, const float* x, float* y, int64_t n) {  // y += a x
  const __m256 va = _mm256_set1_ps(a);
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) _mm256_storeu_ps(y + d, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d)));
  for (; d < n; ++d) y[d] += a * x[d];
}

// Row strides (floats between consecutive tokens) of the queries, the keys and values, and the outputs:
// H * D for the (B, L, H, D) tensors below; the fused training pass (further down) reads q/k/v packed
// side by side in wider rows.
struct Strides {
  int64_t q, kv, o;
};

// Both loops are written once, as templates: for head sizes D = 8 * NV (NV = 2, 4, 8) they hold a row's
// output (forward) or query gradient (backward) in NV registers over the keys; NV = 0 takes D at run time
// and reads and writes that row once per key. The same operations in the same order either way, so the
// same bits; holding it is 1.2x (3 tokens) to 1.6x (27 tokens) faster for forward + backward.
template <int NV>
struct HeldRow {  // a row of D floats, in registers when NV > 0, else in memory at `row`
  __m256 acc[NV > 0 ? NV : 1];
  float* row;
  int64_t D;
  FAST void zero(float* out, int64_t d) {
    row = out, D = d;
    if constexpr (NV > 0) {
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) acc[i] = _mm256_setzero_ps();
    } else {
      std::fill(row, row + D, 0.0f);
    }
  }
  FAST void add(float a, const float* x) {  // row += a x
    if constexpr (NV > 0) {
      const __m256 w = _mm256_set1_ps(a);
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 8 * i), acc[i]);
    } else {
      axpy(a, x, row, D);
    }
  }
  FAST void store() {
    if constexpr (NV > 0) {
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) _mm256_storeu_ps(row + 8 * i, acc[i]);
    }
  }
};

template <int NV>
FAST void attention_rows_forward_t(const float* q, const float* k, const float* v, float* out, float* probs,
                                   int64_t L, int64_t H, int64_t D, bool causal, int64_t bh0, int64_t bh1,
                                   Strides st) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    const int64_t s = bh / H, hd = (bh % H) * D;
    const float *qs = q + s * L * st.q + hd, *ks = k + s * L * st.kv + hd, *vs = v + s * L * st.kv + hd;
    float* os = out + s * L * st.o + hd;
    float* p = probs + bh * L * L;
    for (int64_t i = 0; i < L; ++i) {
      const int64_t n = causal ? i + 1 : L;
      const float* qi = qs + i * st.q;
      float* pi = p + i * L;
      float max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        pi[j] = dot(qi, ks + j * st.kv, D) * scale;
        max = std::max(max, pi[j]);
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < n; ++j) sum += (pi[j] = std::exp(pi[j] - max));
      const float inv = 1.0f / sum;
      HeldRow<NV> o;
      o.zero(os + i * st.o, D);
      for (int64_t j = 0; j < n; ++j) {
        pi[j] *= inv;
        o.add(pi[j], vs + j * st.kv);
      }
      o.store();
      std::fill(pi + n, pi + L, 0.0f);
    }
  }
}

FAST void attention_rows_forward(const float* q, const float* k, const float* v, float* out, float* probs,
                                 int64_t L, int64_t H, int64_t D, bool causal, int64_t bh0, int64_t bh1,
                                 Strides st) {
  if (D == 64) return attention_rows_forward_t<8>(q, k, v, out, probs, L, H, D, causal, bh0, bh1, st);
  if (D == 32) return attention_rows_forward_t<4>(q, k, v, out, probs, L, H, D, causal, bh0, bh1, st);
  if (D == 16) return attention_rows_forward_t<2>(q, k, v, out, probs, L, H, D, causal, bh0, bh1, st);
  attention_rows_forward_t<0>(q, k, v, out, probs, L, H, D, causal, bh0, bh1, st);
}

// dv_j = sum_i p_ij do_i;  dp_ij = do_i . v_j;  ds_ij = p_ij (dp_ij - sum_j' p_ij' dp_ij');
// dq_i = scale sum_j ds_ij k_j;  dk_j = scale sum_i ds_ij q_i.  dp: scratch of L floats.
// dout has the outputs' stride, dq the queries', dk and dv the keys'.
template <int NV>
FAST void attention_rows_backward_t(const float* dout, const float* q, const float* k, const float* v,
                                    const float* probs, float* dq, float* dk, float* dv, int64_t L, int64_t H,
                                    int64_t D, bool causal, int64_t bh0, int64_t bh1, float* dp, Strides st) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    const int64_t s = bh / H, hd = (bh % H) * D, qo = s * L * st.q + hd, ko = s * L * st.kv + hd;
    const float* p = probs + bh * L * L;
    for (int64_t j = 0; j < L; ++j) {
      std::fill(dk + ko + j * st.kv, dk + ko + j * st.kv + D, 0.0f);
      std::fill(dv + ko + j * st.kv, dv + ko + j * st.kv + D, 0.0f);
    }
    for (int64_t i = 0; i < L; ++i) {
      const int64_t n = causal ? i + 1 : L;
      const float* doi = dout + s * L * st.o + hd + i * st.o;
      const float* pi = p + i * L;
      float weighted = 0.0f;
      for (int64_t j = 0; j < n; ++j) {
        dp[j] = dot(doi, v + ko + j * st.kv, D);
        weighted += pi[j] * dp[j];
        axpy(pi[j], doi, dv + ko + j * st.kv, D);
      }
      const float* qi = q + qo + i * st.q;
      HeldRow<NV> dqi;
      dqi.zero(dq + qo + i * st.q, D);
      for (int64_t j = 0; j < n; ++j) {
        const float ds = pi[j] * (dp[j] - weighted) * scale;
        dqi.add(ds, k + ko + j * st.kv);
        axpy(ds, qi, dk + ko + j * st.kv, D);
      }
      dqi.store();
    }
  }
}

FAST void attention_rows_backward(const float* dout, const float* q, const float* k, const float* v,
                                  const float* probs, float* dq, float* dk, float* dv, int64_t L, int64_t H,
                                  int64_t D, bool causal, int64_t bh0, int64_t bh1, float* dp, Strides st) {
  if (D == 64) return attention_rows_backward_t<8>(dout, q, k, v, probs, dq, dk, dv, L, H, D, causal, bh0, bh1, dp, st);
  if (D == 32) return attention_rows_backward_t<4>(dout, q, k, v, probs, dq, dk, dv, L, H, D, causal, bh0, bh1, dp, st);
  if (D == 16) return attention_rows_backward_t<2>(dout, q, k, v, probs, dq, dk, dv, L, H, D, causal, bh0, bh1, dp, st);
  attention_rows_backward_t<0>(dout, q, k, v, probs, dq, dk, dv, L, H, D, causal, bh0, bh1, dp, st);
}

void check_rows(const std::vector<Tensor>& ts, const char* what) {
  for (const auto& t : ts) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), what,
                ": CPU float32 contiguous tensors only");
  }
  TORCH_CHECK(supported(), what, ": needs a CPU with AVX2 and FMA");
}

void check_attention(const std::vector<Tensor>& ts) {
  check_rows(ts, "attention");
  for (const auto& t : ts) TORCH_CHECK(t.dim() == 4, "attention: (B, L, H, D) tensors only");
}

std::tuple<Tensor, Tensor> attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, bool causal) {
  check_attention({q, k, v});
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3);
  Tensor out = at::empty_like(q), probs = at::empty({B, H, L, L}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *op = out.data_ptr<float>(), *pp = probs.data_ptr<float>();
  at::parallel_for(0, B * H, 64, [&](int64_t bh0, int64_t bh1) {
    attention_rows_forward(qp, kp, vp, op, pp, L, H, D, causal, bh0, bh1, {H * D, H * D, H * D});
  });
  return {out, probs};
}

std::tuple<Tensor, Tensor, Tensor> attention_backward(const Tensor& dout_in, const Tensor& q, const Tensor& k,
                                                      const Tensor& v, const Tensor& probs, bool causal) {
  const Tensor dout = dout_in.contiguous();
  check_attention({dout, q, k, v, probs});
  const int64_t L = q.size(1), H = q.size(2), D = q.size(3);
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::parallel_for(0, q.size(0) * H, 64, [&](int64_t bh0, int64_t bh1) {
    std::vector<float> dp(L);
    attention_rows_backward(dout.data_ptr<float>(), q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                            probs.data_ptr<float>(), dq.data_ptr<float>(), dk.data_ptr<float>(),
                            dv.data_ptr<float>(), L, H, D, causal, bh0, bh1, dp.data(), {H * D, H * D, H * D});
  });
  return {dq, dk, dv};
}


// ---- GELU and residual + LayerNorm in training (the update's forward and backward; nn/layers.py) ----
// torch runs GELU, the residual add and LayerNorm as separate passes with generic kernels; at E = 64
// they were ~25% of a MAT update at N = 3 (torch.profiler, docs/performance.md). These are one pass
// each over contiguous float32 rows, with the vectorised erf/exp above; LayerNorm keeps the normalised
// rows and 1/std for its backward. The backward's weight and bias gradients are summed per fixed chunk
// of rows and then over the chunks in order, so the result does not depend on how threads are scheduled.

// GELU'(x) = Phi(x) + x phi(x) for 8 floats, and GELU(x) = x Phi(x) into *y when asked: one erf and one
// exponential for both (gelu_grad and gelu_and_slope below).
FAST inline __m256 gelu_slope8(__m256 v, __m256* y = nullptr) {
  const __m256 half = _mm256_set1_ps(0.5f), s = _mm256_set1_ps(0.70710678118654752f);
  __m256 e;  // e^(-x^2 / 2), from inside erf
  const __m256 c = _mm256_add_ps(_mm256_set1_ps(1.0f), erf8(_mm256_mul_ps(v, s), &e));  // 2 Phi(x)
  if (y != nullptr) *y = _mm256_mul_ps(_mm256_mul_ps(half, v), c);
  return _mm256_fmadd_ps(v, _mm256_mul_ps(_mm256_set1_ps(0.39894228040143268f), e), _mm256_mul_ps(half, c));
}

inline float gelu_slope1(float v, float* y = nullptr) {  // the same for one float
  const float c = 1.0f + std::erf(v * 0.70710678118654752f);
  if (y != nullptr) *y = 0.5f * v * c;
  return 0.5f * c + v * 0.39894228040143268f * std::exp(-0.5f * v * v);
}

// dx = dy * GELU'(x) over n floats.
FAST void gelu_grad(const float* dy, const float* x, float* dx, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dx + i, _mm256_mul_ps(_mm256_loadu_ps(dy + i), gelu_slope8(_mm256_loadu_ps(x + i))));
  }
  for (; i < n; ++i) dx[i] = dy[i] * gelu_slope1(x[i]);
}

// One chunk of rows of the LayerNorm backward: ds = rstd (g - mean(g) - xhat mean(g xhat)), g = dy w,
// and this chunk's sums of dy xhat (dw) and dy (db), E floats each (zeroed here first, unless `accumulate`).
FAST void layer_norm_backward_rows(const float* dy, const float* xhat, const float* rstd, const float* w,
                                   int64_t R, int64_t E, float* ds, float* dw, float* db, bool accumulate = false) {
  if (!accumulate) {
    std::fill(dw, dw + E, 0.0f);
    std::fill(db, db + E, 0.0f);
  }
  const float inv_e = 1.0f / static_cast<float>(E);
  for (int64_t row = 0; row < R; ++row) {
    const float *d = dy + row * E, *h = xhat + row * E;
    __m256 sg = _mm256_setzero_ps(), sgh = _mm256_setzero_ps();
    int64_t e = 0;
    for (; e + 8 <= E; e += 8) {
      const __m256 vd = _mm256_loadu_ps(d + e), vh = _mm256_loadu_ps(h + e);
      const __m256 g = _mm256_mul_ps(vd, _mm256_loadu_ps(w + e));
      sg = _mm256_add_ps(sg, g);
      sgh = _mm256_fmadd_ps(g, vh, sgh);
      _mm256_storeu_ps(dw + e, _mm256_fmadd_ps(vd, vh, _mm256_loadu_ps(dw + e)));
      _mm256_storeu_ps(db + e, _mm256_add_ps(vd, _mm256_loadu_ps(db + e)));
    }
    float sum_g = hsum(sg), sum_gh = hsum(sgh);
    for (; e < E; ++e) {
      const float g = d[e] * w[e];
      sum_g += g;
      sum_gh += g * h[e];
      dw[e] += d[e] * h[e];
      db[e] += d[e];
    }
    const float a = sum_g * inv_e, c = sum_gh * inv_e, r = rstd[row];
    const __m256 va = _mm256_set1_ps(a), vc = _mm256_set1_ps(c), vr = _mm256_set1_ps(r);
    float* o = ds + row * E;
    for (e = 0; e + 8 <= E; e += 8) {
      const __m256 g = _mm256_mul_ps(_mm256_loadu_ps(d + e), _mm256_loadu_ps(w + e));
      const __m256 t = _mm256_fnmadd_ps(_mm256_loadu_ps(h + e), vc, _mm256_sub_ps(g, va));
      _mm256_storeu_ps(o + e, _mm256_mul_ps(vr, t));
    }
    for (; e < E; ++e) o[e] = r * (d[e] * w[e] - a - h[e] * c);
  }
}

constexpr int64_t kElementGrain = 16384;  // floats per task of the elementwise loops
constexpr int64_t kRowChunk = 256;        // rows per chunk of the LayerNorm loops

Tensor gelu_forward(const Tensor& x_in) {
  const Tensor x = x_in.contiguous();
  check_rows({x}, "gelu");
  Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.numel(), kElementGrain, [&](int64_t i0, int64_t i1) { gelu_to(xp + i0, yp + i0, i1 - i0); });
  return y;
}

Tensor gelu_backward(const Tensor& dy_in, const Tensor& x) {
  const Tensor dy = dy_in.contiguous();
  check_rows({dy, x}, "gelu");
  Tensor dx = at::empty_like(x);
  const float *dp = dy.data_ptr<float>(), *xp = x.data_ptr<float>();
  float* op = dx.data_ptr<float>();
  at::parallel_for(0, x.numel(), kElementGrain,
                   [&](int64_t i0, int64_t i1) { gelu_grad(dp + i0, xp + i0, op + i0, i1 - i0); });
  return dx;
}

// y = LayerNorm(x (+ r)) over the last dimension; with `keep`, also the normalised rows and 1/std per
// row for the backward (else those two are empty).
std::tuple<Tensor, Tensor, Tensor> add_layer_norm_forward(const Tensor& x_in, const std::optional<Tensor>& r_in,
                                                          const Tensor& w, const Tensor& b, bool keep) {
  const Tensor x = x_in.contiguous();
  const Tensor r = r_in.has_value() ? r_in->contiguous() : Tensor();
  check_rows(r.defined() ? std::vector<Tensor>{x, r, w, b} : std::vector<Tensor>{x, w, b}, "layer_norm");
  const int64_t E = x.size(-1), R = x.numel() / E;
  TORCH_CHECK(w.numel() == E && b.numel() == E && (!r.defined() || r.sizes() == x.sizes()),
              "layer_norm: weight, bias and residual must match the input's width");
  Tensor y = at::empty_like(x);
  Tensor xhat = keep ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor rstd = at::empty({keep ? R : 0}, x.options());
  const float *xp = x.data_ptr<float>(), *rp = r.defined() ? r.data_ptr<float>() : nullptr;
  const float *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *hp = keep ? xhat.data_ptr<float>() : nullptr;
  float* sp = keep ? rstd.data_ptr<float>() : nullptr;
  at::parallel_for(0, R, kRowChunk, [&](int64_t r0, int64_t r1) {
    layer_norm_rows(xp + r0 * E, rp == nullptr ? nullptr : rp + r0 * E, wp, bp, r1 - r0, E, yp + r0 * E,
                    hp == nullptr ? nullptr : hp + r0 * E, sp == nullptr ? nullptr : sp + r0);
  });
  return {y, xhat, rstd};
}

// Gradients of add_layer_norm_forward: d(x + r) (the same for x and r), d weight, d bias.
std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(const Tensor& dy_in, const Tensor& xhat, const Tensor& rstd,
                                                       const Tensor& w) {
  const Tensor dy = dy_in.contiguous();
  check_rows({dy, xhat, rstd, w}, "layer_norm");
  TORCH_CHECK(xhat.numel() > 0, "layer_norm backward: the forward kept no rows (keep=false)");
  TORCH_CHECK(xhat.sizes() == dy.sizes(), "layer_norm backward: the gradient's shape differs from the input's");
  const int64_t E = xhat.size(-1), R = xhat.numel() / E, chunks = (R + kRowChunk - 1) / kRowChunk;
  Tensor ds = at::empty_like(xhat), partial = at::empty({chunks, 2, E}, xhat.options());
  const float *dp = dy.data_ptr<float>(), *hp = xhat.data_ptr<float>(), *sp = rstd.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float *op = ds.data_ptr<float>(), *pp = partial.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * kRowChunk, r1 = std::min(R, r0 + kRowChunk);
      layer_norm_backward_rows(dp + r0 * E, hp + r0 * E, sp + r0, wp, r1 - r0, E, op + r0 * E,
                               pp + c * 2 * E, pp + c * 2 * E + E);
    }
  });
  const Tensor sums = partial.sum(0);  // (2, E): chunk by chunk in a fixed order
  return {ds, sums[0].clone(), sums[1].clone()};
}

// ---- The masked categorical's log-prob and entropy in training (nn/distributions.py) ----
// For each row of logits l (A wide), with unavailable actions at MASKED_LOGIT (-1e10, as masked_logits):
// log p = l - logsumexp(l), log_prob = log p[action], entropy H = -sum p log p. Backward:
// d l_j = g_lp (1[j = action] - p_j) - g_H p_j (log p_j + H), and 0 for unavailable j (masked_fill's).
// torch runs this as ~8 ops forward and ~8 backward over (B, N, A); here it is one pass over the rows
// each way. Scalar loops: A is ~5-20 wide.
constexpr float kMaskedLogit = -1e10f;
constexpr int64_t kCategoricalRows = 1024;  // rows per task

void check_categorical(const Tensor& logits, const Tensor& mask, const Tensor& actions) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() >= 1,
              "categorical: logits must be CPU float32");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.sizes() == logits.sizes(),
              "categorical: the mask must be bool with the logits' shape");
  TORCH_CHECK(actions.scalar_type() == at::kLong && actions.numel() * logits.size(-1) == logits.numel(),
              "categorical: one int64 action per row of logits");
}

// logits, mask (..., A), actions (...) -> log_prob, entropy (...), and p, log p (..., A) for the backward.
std::tuple<Tensor, Tensor, Tensor, Tensor> categorical_forward(const Tensor& logits_in, const Tensor& mask_in,
                                                               const Tensor& actions_in) {
  const Tensor logits = logits_in.contiguous(), mask = mask_in.contiguous(), actions = actions_in.contiguous();
  check_categorical(logits, mask, actions);
  const int64_t A = logits.size(-1), R = actions.numel();
  Tensor probs = at::empty_like(logits), log_probs = at::empty_like(logits);
  Tensor log_prob = at::empty(actions.sizes(), logits.options()), entropy = at::empty_like(log_prob);
  const float* lp = logits.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  const int64_t* ap = actions.data_ptr<int64_t>();
  float *pp = probs.data_ptr<float>(), *qp = log_probs.data_ptr<float>();
  float *op = log_prob.data_ptr<float>(), *hp = entropy.data_ptr<float>();
  std::atomic<bool> bad_action{false};
  at::parallel_for(0, R, kCategoricalRows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* l = lp + r * A;
      const bool* m = mp + r * A;
      float *p = pp + r * A, *q = qp + r * A;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < A; ++j) {
        q[j] = m[j] ? l[j] : kMaskedLogit;  // q: the masked logits, then log p
        top = std::max(top, q[j]);
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < A; ++j) sum += (p[j] = std::exp(q[j] - top));
      const float log_sum = std::log(sum), inv = 1.0f / sum;
      float h = 0.0f;
      for (int64_t j = 0; j < A; ++j) {
        q[j] = (q[j] - top) - log_sum;
        p[j] *= inv;
        h -= p[j] * q[j];
      }
      const int64_t a = ap[r];
      if (a < 0 || a >= A) {
        bad_action = true;
        continue;
      }
      op[r] = q[a], hp[r] = h;
    }
  });
  TORCH_CHECK(!bad_action, "categorical: an action outside [0, ", A, ")");
  return {log_prob, entropy, probs, log_probs};
}

// d logits from the gradients of log_prob and entropy, with what the forward returned.
Tensor categorical_backward(const Tensor& g_lp_in, const Tensor& g_h_in, const Tensor& mask_in,
                            const Tensor& actions_in, const Tensor& probs, const Tensor& log_probs,
                            const Tensor& entropy) {
  const Tensor g_lp = g_lp_in.contiguous(), g_h = g_h_in.contiguous(), mask = mask_in.contiguous();
  const Tensor actions = actions_in.contiguous();
  const int64_t A = probs.size(-1), R = actions.numel();
  TORCH_CHECK(g_lp.numel() == R && g_h.numel() == R && entropy.numel() == R && log_probs.sizes() == probs.sizes(),
              "categorical backward: shapes differ from the forward's");
  Tensor dl = at::empty_like(probs);
  const float *gp = g_lp.data_ptr<float>(), *gh = g_h.data_ptr<float>(), *hp = entropy.data_ptr<float>();
  const float *pp = probs.data_ptr<float>(), *qp = log_probs.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  const int64_t* ap = actions.data_ptr<int64_t>();
  float* dp = dl.data_ptr<float>();
  at::parallel_for(0, R, kCategoricalRows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *p = pp + r * A, *q = qp + r * A;
      const bool* m = mp + r * A;
      float* d = dp + r * A;
      for (int64_t j = 0; j < A; ++j) {
        d[j] = m[j] ? -gp[r] * p[j] - gh[r] * p[j] * (q[j] + hp[r]) : 0.0f;
      }
      if (m[ap[r]]) d[ap[r]] += gp[r];
    }
  });
  return dl;
}


// ---- The whole training pass of MAT, fused (the PPO update; nn/mat.py `_TrainingPass`) ----
// With autograd, one update at E = 64 runs ~750 ATen ops, and torch's matmuls at these shapes (rows x 64
// @ 64 x 64) reach ~65% of what a register-blocked AVX2/FMA tile reaches on the same rows. Here the
// encoder, the decoder and both heads run forward over chunks of ~128 token rows (whole samples, so
// attention stays inside a chunk), keeping what the backward needs; the PPO loss is taken in Python
// on the policy outputs and values (the PPO maths stays in one place, algos/ppo_losses.py), and the backward
// runs chunk by chunk again, every weight gradient summed into per-thread buffers that are added up
// in thread order at the end. Post-LayerNorm blocks (the reference's), any N, heads, blocks, discrete
// or continuous actions; float32 on an x86-64 CPU with AVX2 and FMA. The same maths as the autograd
// pass, summed in another order (tests/test_mat_model.py compares outputs and every gradient).

// y = GELU(x) as gelu_to, and its slope GELU'(x) = Phi(x) + x phi(x) as gelu_grad computes it, from the
// same erf and exponential: the backward then multiplies by the slope instead of evaluating erf again.
// y may be x.
FAST void gelu_and_slope(const float* x, float* y, float* slope, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 g;
    _mm256_storeu_ps(slope + i, gelu_slope8(_mm256_loadu_ps(x + i), &g));
    _mm256_storeu_ps(y + i, g);
  }
  for (; i < n; ++i) slope[i] = gelu_slope1(x[i], y + i);
}

// Rows indexed by token: out row r = table row idx[r] (gather_rows), table row idx[r] += x row r
// (scatter_add_rows, in row order); rows of `width` floats.
FAST void gather_rows(const float* table, const int64_t* idx, int64_t R, int64_t width, float* out) {
  for (int64_t r = 0; r < R; ++r) std::memcpy(out + r * width, table + idx[r] * width, sizeof(float) * width);
}
FAST void scatter_add_rows(const float* x, const int64_t* idx, int64_t R, int64_t width, float* table) {
  for (int64_t r = 0; r < R; ++r) add_rows(table + idx[r] * width, x + r * width, width);
}

FAST void mul_rows(const float* x, const float* y, float* out, int64_t n) {  // out = x * y over n floats
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) out[i] = x[i] * y[i];
}

// out (O) += column sums of y (R, O) with row stride ld, four vectors of columns at a time in registers.
FAST void col_sums_acc(const float* y, int64_t ld, int64_t R, int64_t O, float* out) {
  int64_t o = 0;
  for (; o + 32 <= O; o += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t r = 0; r < R; ++r) {
      const float* row = y + r * ld + o;
      a0 = _mm256_add_ps(a0, _mm256_loadu_ps(row));
      a1 = _mm256_add_ps(a1, _mm256_loadu_ps(row + 8));
      a2 = _mm256_add_ps(a2, _mm256_loadu_ps(row + 16));
      a3 = _mm256_add_ps(a3, _mm256_loadu_ps(row + 24));
    }
    _mm256_storeu_ps(out + o, _mm256_add_ps(_mm256_loadu_ps(out + o), a0));
    _mm256_storeu_ps(out + o + 8, _mm256_add_ps(_mm256_loadu_ps(out + o + 8), a1));
    _mm256_storeu_ps(out + o + 16, _mm256_add_ps(_mm256_loadu_ps(out + o + 16), a2));
    _mm256_storeu_ps(out + o + 24, _mm256_add_ps(_mm256_loadu_ps(out + o + 24), a3));
  }
  for (; o + 8 <= O; o += 8) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t r = 0; r < R; ++r) a = _mm256_add_ps(a, _mm256_loadu_ps(y + r * ld + o));
    _mm256_storeu_ps(out + o, _mm256_add_ps(_mm256_loadu_ps(out + o), a));
  }
  for (; o < O; ++o) {
    float a = 0.0f;
    for (int64_t r = 0; r < R; ++r) a += y[r * ld + o];
    out[o] += a;
  }
}

// A Linear (weight (O, K), bias (O)) in the fused pass, and where its gradients sit in a gradient buffer.
struct TLinear {
  Tensor wt_t;  // (K, O) the weight transposed (forward only)
  const float *w = nullptr, *wt = nullptr, *b = nullptr;
  int64_t O = 0, K = 0, gw = 0, gb = 0;
};

struct TNorm {
  const float *w = nullptr, *b = nullptr;
  int64_t E = 0, gw = 0, gb = 0;
};

// The two sub-layers both block kinds are made of (post-LayerNorm): out = LN(x + proj(attention(qkv(x))))
// and out = LN(x + mproj(GELU(fc(x)))).
struct TAttention {
  TLinear qkv, proj;
  TNorm ln;
};

struct TMlp {
  TLinear fc, mproj;
  TNorm ln;
};

struct TEncBlock {
  TAttention attn;
  TMlp mlp;
};

struct TDecBlock {
  TAttention self;                // causal, over the action tokens
  TLinear cq, ckv, cproj;         // the "cross" attention: queries from rep, keys/values from the tokens
  TNorm ln2;                      // LN(rep + cross_proj(...))
  TMlp mlp;
};

struct TModel {
  int64_t B = 0, N = 0, O = 0, E = 0, H = 0, D = 0, A = 0, P = 0;  // P: floats in all gradients
  bool discrete = false;
  TNorm ln_obs, enc_ln, v_ln, dec_ln, p_ln;
  TLinear embed, v_fc, v_out, a_embed, p_fc, p_out;
  const float* table = nullptr;  // discrete: (A + 1, E) action-token embedding
  int64_t g_table = 0;
  std::vector<TEncBlock> enc;
  std::vector<TDecBlock> dec;
  std::vector<std::vector<int64_t>> shapes;  // of every weight, in the order given
  std::vector<int64_t> offsets;              // of every weight's gradient in a gradient buffer
  // Discrete actions: the first decoder block's input is one of V = A + 1 token rows, so its embedding
  // (GELU, LayerNorm) and its self-attention's query/key/value Linear are computed once per token value
  // (token_forward), and their backward is summed per token value first (token_grads): the same maths,
  // one Linear of 3E outputs fewer per token row forward and two fewer backward.
  bool token_table() const { return discrete && !dec.empty(); }
  int64_t V() const { return A + 1; }
  // Past the weights' gradients, a gradient buffer then holds per token value the sums of d qkv (V, 3E)
  // and of the residual's d x (V, E) of the first decoder block (token_table only).
  int64_t g_tok_qkv() const { return P; }
  int64_t g_tok_x() const { return P + V() * 3 * E; }
  int64_t buffer_floats() const { return token_table() ? P + V() * 4 * E : P; }
};

// Reads the weights in the order of mat.py `_training_pass_weights`; with `transpose`, also the
// transposed copies the forward multiplies by.
// `encoder_only`: the list ends after the value head (mat.py `_training_pass_weights(encoder_only=True)`).
TModel bind_model(const std::vector<Tensor>& ws, int64_t n_block, int64_t n_head, bool discrete, bool transpose,
                  bool encoder_only = false) {
  TModel m;
  m.discrete = discrete;
  size_t i = 0;
  auto next = [&]() -> const Tensor& {
    TORCH_CHECK(i < ws.size(), "training pass: too few weights (", ws.size(), ")");
    const Tensor& t = ws[i++];
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                "training pass: weights must be CPU float32 contiguous");
    m.offsets.push_back(m.P);
    m.shapes.push_back(t.sizes().vec());
    m.P += t.numel();
    return t;
  };
  // a weight and its bias: their data, and where their gradients go
  auto pair = [&](const float*& w, const float*& b, int64_t& gw, int64_t& gb) -> const Tensor& {
    const Tensor& weight = next();
    gw = m.offsets.back();
    b = next().data_ptr<float>();
    gb = m.offsets.back();
    w = weight.data_ptr<float>();
    return weight;
  };
  auto linear = [&]() {
    TLinear l;
    const Tensor& w = pair(l.w, l.b, l.gw, l.gb);
    l.O = w.size(0), l.K = w.size(1);
    if (transpose) {
      l.wt_t = w.t().contiguous();
      l.wt = l.wt_t.data_ptr<float>();
    }
    return l;
  };
  auto norm = [&]() {
    TNorm n;
    n.E = pair(n.w, n.b, n.gw, n.gb).numel();
    return n;
  };
  m.ln_obs = norm();
  m.embed = linear();
  m.enc_ln = norm();
  for (int64_t k = 0; k < n_block; ++k) {
    TEncBlock e;
    e.attn.qkv = linear(), e.attn.proj = linear(), e.attn.ln = norm();
    e.mlp.fc = linear(), e.mlp.mproj = linear(), e.mlp.ln = norm();
    m.enc.push_back(std::move(e));
  }
  m.v_fc = linear(), m.v_ln = norm(), m.v_out = linear();
  if (encoder_only) {
    TORCH_CHECK(i == ws.size(), "encoder pass: ", ws.size(), " weights given, ", i, " expected");
    m.O = m.embed.K, m.E = m.embed.O, m.H = n_head, m.D = m.E / n_head;
    TORCH_CHECK(m.E % n_head == 0 && m.v_out.O == 1, "encoder pass: unexpected weight shapes");
    return m;
  }
  if (discrete) {
    const Tensor& t = next();
    m.table = t.data_ptr<float>(), m.g_table = m.offsets.back();
  } else {
    m.a_embed = linear();
  }
  m.dec_ln = norm();
  for (int64_t k = 0; k < n_block; ++k) {
    TDecBlock d;
    d.self.qkv = linear(), d.self.proj = linear(), d.self.ln = norm();
    d.cq = linear(), d.ckv = linear(), d.cproj = linear(), d.ln2 = norm();
    d.mlp.fc = linear(), d.mlp.mproj = linear(), d.mlp.ln = norm();
    m.dec.push_back(std::move(d));
  }
  m.p_fc = linear(), m.p_ln = norm(), m.p_out = linear();
  TORCH_CHECK(i == ws.size(), "training pass: ", ws.size(), " weights given, ", i, " expected");
  m.O = m.embed.K, m.E = m.embed.O, m.H = n_head, m.D = m.E / n_head, m.A = m.p_out.O;
  TORCH_CHECK(m.E % n_head == 0 && m.v_out.O == 1, "training pass: unexpected weight shapes");
  for (const auto& e : m.enc) TORCH_CHECK(e.attn.qkv.O == 3 * m.E && e.mlp.fc.O == m.E, "training pass: block shapes");
  for (const auto& d : m.dec) {
    TORCH_CHECK(d.self.qkv.O == 3 * m.E && d.ckv.O == 2 * m.E && d.mlp.fc.O == m.E, "training pass: block shapes");
  }
  return m;
}

// What the forward keeps for the backward: one (T, width) tensor per field (each GELU's slope, not its
// input: see gelu_and_slope), T = B * N token rows
// (attention weights: H * N per row, i.e. (B, H, N, N)). `field` hands out the next one, allocating it
// in the forward and reading it back in the backward, so both walk the same list.
// What one Linear -> GELU -> LayerNorm stage keeps (the embeddings and the heads' first halves), and what
// each sub-layer keeps; `at(t0)` gives the same fields from token row t0 on (one chunk's rows).
struct TGeluNormSaved {
  float *slope, *hat, *rstd, *out;
  TGeluNormSaved at(int64_t t0, int64_t E) const { return {slope + t0 * E, hat + t0 * E, rstd + t0, out + t0 * E}; }
};
struct TAttentionSaved {
  float *qkv, *att, *probs, *hat, *rstd, *out;
  TAttentionSaved at(int64_t t0, int64_t E, int64_t HN) const {
    return {qkv + t0 * 3 * E, att + t0 * E, probs + t0 * HN, hat + t0 * E, rstd + t0, out + t0 * E};
  }
};
struct TMlpSaved {
  float *slope, *g, *hat, *rstd, *out;
  TMlpSaved at(int64_t t0, int64_t E) const {
    return {slope + t0 * E, g + t0 * E, hat + t0 * E, rstd + t0, out + t0 * E};
  }
};
struct TEncSaved {
  TAttentionSaved attn;
  TMlpSaved mlp;
};
struct TDecSaved {
  TAttentionSaved self;
  float *cq, *ckv, *catt, *cprobs, *hat2, *rstd2, *y2;
  TMlpSaved mlp;
};
struct TSaved {
  float* obs_hat;
  TGeluNormSaved embed, value, tokens, policy;  // out: x0 (the encoder's input), lnv, y0, lnp
  float* tok_qkv = nullptr;  // token_table: the first decoder block's q, k, v per token value (V, 3E)
  std::vector<TEncSaved> enc;
  std::vector<TDecSaved> dec;
};

// With `encoder_only` (acting: encoder and value head, no backward), the decoder's fields are left out.
TSaved bind_saved(const TModel& m, int64_t T, std::vector<Tensor>& ts, bool allocate, bool encoder_only = false) {
  size_t i = 0;
  const int64_t E = m.E, HN = m.H * m.N;
  auto field = [&](int64_t width, int64_t rows = -1) -> float* {
    rows = rows < 0 ? T : rows;
    if (allocate) ts.push_back(at::empty({rows, width}, at::kFloat));
    TORCH_CHECK(i < ts.size() && ts[i].numel() == rows * width, "training pass: saved tensors do not match");
    return ts[i++].data_ptr<float>();
  };
  auto gelu_norm = [&](int64_t rows = -1) {
    return TGeluNormSaved{field(E, rows), field(E, rows), field(1, rows), field(E, rows)};
  };
  auto attention = [&]() { return TAttentionSaved{field(3 * E), field(E), field(HN), field(E), field(1), field(E)}; };
  auto mlp = [&]() { return TMlpSaved{field(E), field(E), field(E), field(1), field(E)}; };
  TSaved s;
  s.obs_hat = field(m.O), s.embed = gelu_norm(), s.value = gelu_norm();
  for (size_t k = 0; k < m.enc.size(); ++k) s.enc.push_back({attention(), mlp()});
  if (encoder_only) return s;
  if (m.token_table()) {  // kept per token value, not per row
    s.tokens = gelu_norm(m.V()), s.tok_qkv = field(3 * E, m.V());
  } else {
    s.tokens = gelu_norm();
  }
  s.policy = gelu_norm();
  for (size_t k = 0; k < m.dec.size(); ++k) {
    TDecSaved d;
    d.self = attention();
    d.cq = field(E), d.ckv = field(2 * E), d.catt = field(E), d.cprobs = field(HN), d.hat2 = field(E);
    d.rstd2 = field(1), d.y2 = field(E);
    d.mlp = mlp();
    s.dec.push_back(d);
  }
  return s;
}

// Whole samples per chunk: ~128 token rows, so a chunk's activations stay in the CPU's caches.
int64_t samples_per_chunk(int64_t N) { return std::max<int64_t>(1, (128 + N - 1) / N); }

// How the pass splits B samples into chunks: n chunks, chunk c holding samples [c B / n, (c + 1) B / n)
// (sizes differ by one at most), n a multiple of the thread count. at::parallel_for hands each thread
// n / threads consecutive chunks, so every thread gets the same number of samples within one chunk's
// rounding. Chunks of exactly S samples left the last thread short: at N = 3, B = 3200, 2 threads,
// 38 + 37 chunks of 43 = 1634 + 1566 samples, the first thread 2% over the mean.
struct ChunkPlan {
  int64_t n = 0, B = 0;
  int64_t begin(int64_t c) const { return c * B / n; }
  int64_t max_samples() const { return n == 0 ? 0 : (B + n - 1) / n; }
};

ChunkPlan plan_chunks(int64_t B, int64_t N) {
  if (B <= 0) return {};
  const int64_t S = samples_per_chunk(N), threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t n = (B + S - 1) / S;
  return {std::min(B, (n + threads - 1) / threads * threads), B};
}

// y (R, l.O) = l(x (R, l.K)), row strides ldx and ldy.
FAST inline void t_forward(const TLinear& l, const float* x, int64_t ldx, int64_t R, float* y, int64_t ldy) {
  linear(x, ldx, R, l.K, l.wt, l.b, l.O, y, ldy);
}

// dx (R, l.K) (+)= dy (R, l.O) @ W.
FAST inline void t_input_grad(const TLinear& l, const float* dy, int64_t ldy, int64_t R, bool acc, float* dx,
                              int64_t ldx) {
  mm(dy, ldy, 1, R, l.O, l.w, l.K, l.K, nullptr, acc, dx, ldx);
}

// G[weight] += dy^T x, G[bias] += column sums of dy. The rows go in blocks of at most 64 (balanced): a
// block's rows of dy and x (2 x 64 x 64 floats at E = 64) stay in the L1 cache while every tile of the
// weight sweeps them, where one sweep over a chunk's ~128 rows read them from L2 for each tile (one core,
// a 64 x 64 weight from 129 rows: ~96 against ~105 GFLOP/s; forward and input gradient ~110). The same
// sums in the same order: each tile adds the rows one by one onto what G holds.
FAST inline void t_weight_grad(const TLinear& l, const float* dy, int64_t ldy, const float* x, int64_t ldx, int64_t R,
                               float* G) {
  const int64_t blocks = (R + 63) / 64;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r0 = b * R / blocks, r1 = (b + 1) * R / blocks;
    mm(dy + r0 * ldy, 1, ldy, l.O, r1 - r0, x + r0 * ldx, ldx, l.K, nullptr, true, G + l.gw, l.K);
  }
  col_sums_acc(dy, ldy, R, l.O, G + l.gb);
}

// ds = LayerNorm backward of dy; G[weight], G[bias] accumulate.
FAST inline void t_norm_grad(const TNorm& n, const float* dy, const float* hat, const float* rstd, int64_t R, float* ds,
                             float* G) {
  layer_norm_backward_rows(dy, hat, rstd, n.w, R, n.E, ds, G + n.gw, G + n.gb, true);
}

// One chunk's shape: token rows t0 .. t0 + R - 1, whole samples of N tokens, bh = samples x heads.
struct Chunk {
  int64_t t0, R, N, E, H, D, bh;
};

// s.out = LN(GELU(x)), x (R, E) overwritten; GELU's slope kept.
FAST void gelu_norm_forward(const TNorm& ln, float* x, const TGeluNormSaved& s, const Chunk& c) {
  gelu_and_slope(x, x, s.slope, c.R * c.E);
  layer_norm_rows(x, nullptr, ln.w, ln.b, c.R, c.E, s.out, s.hat, s.rstd);
}

// dx = the gradient of gelu_norm_forward's input, from dy, that of its output.
FAST void gelu_norm_backward(const TNorm& ln, const TGeluNormSaved& s, const float* dy, float* dx, const Chunk& c,
                             float* G) {
  t_norm_grad(ln, dy, s.hat, s.rstd, c.R, dx, G);
  mul_rows(dx, s.slope, dx, c.R * c.E);
}

// s.out = LN(x + proj(attention(s.qkv))), the queries, keys and values already in s.qkv. tmp: R x E scratch.
FAST void attend_project_norm(const TAttention& w, const float* x, const TAttentionSaved& s, bool causal,
                              const Chunk& c, float* tmp) {
  const int64_t E = c.E;
  attention_rows_forward(s.qkv, s.qkv + E, s.qkv + 2 * E, s.att, s.probs, c.N, c.H, c.D, causal, 0, c.bh,
                         {3 * E, 3 * E, E});
  t_forward(w.proj, s.att, E, c.R, tmp, E);
  layer_norm_rows(x, tmp, w.ln.w, w.ln.b, c.R, E, s.out, s.hat, s.rstd);
}

// s.out = LN(x + proj(attention(qkv(x)))). tmp: R x E scratch.
FAST void attention_forward_rows(const TAttention& w, const float* x, const TAttentionSaved& s, bool causal,
                                 const Chunk& c, float* tmp) {
  t_forward(w.qkv, x, c.E, c.R, s.qkv, 3 * c.E);
  attend_project_norm(w, x, s, causal, c, tmp);
}

// From dy = d s.out (dy is not kept): dx = the residual's part of d x, wide (R x 3E) = d qkv.
// tmp: R x E scratch; dp: N floats.
FAST void attention_backward_to_qkv(const TAttention& w, const TAttentionSaved& s, bool causal, const float* dy,
                                    float* dx, const Chunk& c, float* tmp, float* wide, float* dp, float* G) {
  const int64_t E = c.E;
  t_norm_grad(w.ln, dy, s.hat, s.rstd, c.R, dx, G);  // d (x + proj(...)): the residual's part is dx itself
  t_weight_grad(w.proj, dx, E, s.att, E, c.R, G);
  t_input_grad(w.proj, dx, E, c.R, false, tmp, E);
  attention_rows_backward(tmp, s.qkv, s.qkv + E, s.qkv + 2 * E, s.probs, wide, wide + E, wide + 2 * E, c.N, c.H, c.D,
                          causal, 0, c.bh, dp, {3 * E, 3 * E, E});
}

// dx = d x from dy = d s.out (dy is not kept). tmp: R x E, wide: R x 3E scratch; dp: N floats.
FAST void attention_backward_rows(const TAttention& w, const float* x, const TAttentionSaved& s, bool causal,
                                  const float* dy, float* dx, const Chunk& c, float* tmp, float* wide, float* dp,
                                  float* G) {
  const int64_t E = c.E;
  attention_backward_to_qkv(w, s, causal, dy, dx, c, tmp, wide, dp, G);
  t_weight_grad(w.qkv, wide, 3 * E, x, E, c.R, G);
  t_input_grad(w.qkv, wide, 3 * E, c.R, true, dx, E);
}

// s.out = LN(x + mproj(GELU(fc(x)))). tmp: R x E scratch.
FAST void mlp_forward_rows(const TMlp& w, const float* x, const TMlpSaved& s, const Chunk& c, float* tmp) {
  const int64_t E = c.E;
  t_forward(w.fc, x, E, c.R, s.g, E);
  gelu_and_slope(s.g, s.g, s.slope, c.R * E);
  t_forward(w.mproj, s.g, E, c.R, tmp, E);
  layer_norm_rows(x, tmp, w.ln.w, w.ln.b, c.R, E, s.out, s.hat, s.rstd);
}

// dx = d x from dy = d s.out. tmp: R x E scratch.
FAST void mlp_backward_rows(const TMlp& w, const float* x, const TMlpSaved& s, const float* dy, float* dx,
                            const Chunk& c, float* tmp, float* G) {
  const int64_t E = c.E;
  t_norm_grad(w.ln, dy, s.hat, s.rstd, c.R, dx, G);
  t_weight_grad(w.mproj, dx, E, s.g, E, c.R, G);
  t_input_grad(w.mproj, dx, E, c.R, false, tmp, E);
  mul_rows(tmp, s.slope, tmp, c.R * E);
  t_weight_grad(w.fc, tmp, E, x, E, c.R, G);
  t_input_grad(w.fc, tmp, E, c.R, true, dx, E);
}

// The encoder and the value head for one chunk: writes the values (B, N) and the encoder's saved fields;
// returns the chunk's encoded rows (rep). tmp: scratch of R * E floats, h0: of R * O.
FAST const float* encoder_forward_chunk(const TModel& m, const TSaved& all, const float* obs, float* value,
                                        const Chunk& c, float* tmp, float* h0) {
  const int64_t E = m.E, O = m.O, t0 = c.t0, R = c.R, HN = m.H * m.N;
  // encoder input: LayerNorm -> Linear -> GELU -> LayerNorm (the observation LayerNorm's 1/std is not kept:
  // the backward needs only its normalised rows, see training_backward)
  layer_norm_rows(obs + t0 * O, nullptr, m.ln_obs.w, m.ln_obs.b, R, O, h0, all.obs_hat + t0 * O, tmp);
  t_forward(m.embed, h0, O, R, tmp, E);
  const TGeluNormSaved embed = all.embed.at(t0, E);
  gelu_norm_forward(m.enc_ln, tmp, embed, c);
  const float* x = embed.out;
  for (size_t k = 0; k < m.enc.size(); ++k) {
    const TEncSaved e{all.enc[k].attn.at(t0, E, HN), all.enc[k].mlp.at(t0, E)};
    attention_forward_rows(m.enc[k].attn, x, e.attn, false, c, tmp);
    mlp_forward_rows(m.enc[k].mlp, e.attn.out, e.mlp, c, tmp);
    x = e.mlp.out;
  }
  const float* rep = x;
  // value head: Linear -> GELU -> LayerNorm -> Linear
  const TGeluNormSaved vh = all.value.at(t0, E);
  t_forward(m.v_fc, rep, E, R, tmp, E);
  gelu_norm_forward(m.v_ln, tmp, vh, c);
  t_forward(m.v_out, vh.out, E, R, value + t0, 1);
  return rep;
}

// token_table: the decoder's input LN(GELU(table row)) and the first block's q, k, v, once per token value.
FAST void token_forward(const TModel& m, const TSaved& all) {
  const int64_t V = m.V(), E = m.E;
  std::vector<float> rows(m.table, m.table + V * E);
  gelu_norm_forward(m.dec_ln, rows.data(), all.tokens, Chunk{0, V, 1, E, m.H, m.D, 0});
  t_forward(m.dec[0].self.qkv, all.tokens.out, E, V, all.tok_qkv, 3 * E);
}

// Forward of samples [s0, s1): writes the policy outputs (B, N, A), the values (B, N) and the saved fields.
// tmp, y0: scratch of R * E floats, h0: of R * O (R = the chunk's token rows).
FAST void training_forward_chunk(const TModel& m, const TSaved& all, const float* obs, const int64_t* tokens,
                                 const float* prev, float* out, float* value, int64_t s0, int64_t s1, float* tmp,
                                 float* h0, float* y0) {
  const int64_t N = m.N, E = m.E, A = m.A, t0 = s0 * N, R = (s1 - s0) * N, HN = m.H * N;
  const Chunk c{t0, R, N, E, m.H, m.D, (s1 - s0) * m.H};
  const float* rep = encoder_forward_chunk(m, all, obs, value, c, tmp, h0);
  // decoder input: the start token and the previous agents' actions, embedded -> GELU -> LayerNorm
  const float* y;
  if (m.token_table()) {  // rows of token_forward's
    gather_rows(all.tokens.out, tokens + t0, R, E, y0);
    y = y0;
  } else {
    if (m.discrete) {
      gather_rows(m.table, tokens + t0, R, E, tmp);
    } else {
      t_forward(m.a_embed, prev + t0 * A, A, R, tmp, E);
    }
    const TGeluNormSaved tok = all.tokens.at(t0, E);
    gelu_norm_forward(m.dec_ln, tmp, tok, c);
    y = tok.out;
  }
  for (size_t k = 0; k < m.dec.size(); ++k) {
    const TDecBlock& b = m.dec[k];
    const TDecSaved& d = all.dec[k];
    const TAttentionSaved self = d.self.at(t0, E, HN);
    float *cq = d.cq + t0 * E, *ckv = d.ckv + t0 * 2 * E, *catt = d.catt + t0 * E, *y2 = d.y2 + t0 * E;
    if (k == 0 && m.token_table()) {
      gather_rows(all.tok_qkv, tokens + t0, R, 3 * E, self.qkv);
      attend_project_norm(b.self, y, self, true, c, tmp);
    } else {
      attention_forward_rows(b.self, y, self, true, c, tmp);
    }
    // y2 = LN(rep + cross_proj(attention(q = cq(rep), k, v = ckv(y1))))
    t_forward(b.cq, rep, E, R, cq, E);
    t_forward(b.ckv, self.out, E, R, ckv, 2 * E);
    attention_rows_forward(cq, ckv, ckv + E, catt, d.cprobs + t0 * HN, N, c.H, c.D, true, 0, c.bh, {E, 2 * E, E});
    t_forward(b.cproj, catt, E, R, tmp, E);
    layer_norm_rows(rep, tmp, b.ln2.w, b.ln2.b, R, E, y2, d.hat2 + t0 * E, d.rstd2 + t0);
    const TMlpSaved mlp = d.mlp.at(t0, E);
    mlp_forward_rows(b.mlp, y2, mlp, c, tmp);
    y = mlp.out;
  }
  // policy head: Linear -> GELU -> LayerNorm -> Linear
  const TGeluNormSaved ph = all.policy.at(t0, E);
  t_forward(m.p_fc, y, E, R, tmp, E);
  gelu_norm_forward(m.p_ln, tmp, ph, c);
  t_forward(m.p_out, ph.out, E, R, out + t0 * A, A);
}

// Backward of samples [s0, s1) from the gradients of the outputs and values; weight gradients into G.
// work: 8 * R * E floats of scratch.
FAST void training_backward_chunk(const TModel& m, const TSaved& all, const int64_t* tokens, const float* prev,
                                  const float* dout, const float* dvalue, int64_t s0, int64_t s1, float* G,
                                  float* work) {
  const int64_t N = m.N, E = m.E, O = m.O, A = m.A, t0 = s0 * N, R = (s1 - s0) * N, HN = m.H * N;
  const Chunk c{t0, R, N, E, m.H, m.D, (s1 - s0) * m.H};
  float *dy = work, *ds = dy + R * E, *tmp = ds + R * E, *drep = tmp + R * E, *wide = drep + R * E;  // wide: 3E
  float* dpart = wide + 3 * R * E;  // R * E
  std::vector<float> dp(static_cast<size_t>(N) + 8);
  const TGeluNormSaved embed = all.embed.at(t0, E), tok = m.token_table() ? all.tokens : all.tokens.at(t0, E);
  const TGeluNormSaved vh = all.value.at(t0, E), ph = all.policy.at(t0, E);
  auto enc_out = [&](size_t k) { return all.enc[k].mlp.out + t0 * E; };  // block k's output rows
  auto dec_out = [&](size_t k) { return all.dec[k].mlp.out + t0 * E; };
  const float* rep = m.enc.empty() ? embed.out : enc_out(m.enc.size() - 1);
  // policy head
  const float* dout_c = dout + t0 * A;
  t_weight_grad(m.p_out, dout_c, A, ph.out, E, R, G);
  t_input_grad(m.p_out, dout_c, A, R, false, tmp, E);
  gelu_norm_backward(m.p_ln, ph, tmp, ds, c, G);
  t_weight_grad(m.p_fc, ds, E, m.dec.empty() ? tok.out : dec_out(m.dec.size() - 1), E, R, G);
  t_input_grad(m.p_fc, ds, E, R, false, dy, E);
  // decoder blocks, last first; every block's cross attention and the value head add to drep
  std::fill(drep, drep + R * E, 0.0f);
  for (size_t k = m.dec.size(); k-- > 0;) {
    const TDecBlock& b = m.dec[k];
    const TDecSaved& d = all.dec[k];
    const float* y_in = k == 0 ? tok.out : dec_out(k - 1);  // token_table: not read for k = 0
    const TAttentionSaved self = d.self.at(t0, E, HN);
    const float *cq = d.cq + t0 * E, *ckv = d.ckv + t0 * 2 * E, *y2 = d.y2 + t0 * E;
    mlp_backward_rows(b.mlp, y2, d.mlp.at(t0, E), dy, ds, c, tmp, G);  // ds: d y2
    // y2 = LN2(rep + cross_proj(attention(q = cq(rep), k, v = ckv(y1))))
    t_norm_grad(b.ln2, ds, d.hat2 + t0 * E, d.rstd2 + t0, R, dy, G);
    add_rows(drep, dy, R * E);
    t_weight_grad(b.cproj, dy, E, d.catt + t0 * E, E, R, G);
    t_input_grad(b.cproj, dy, E, R, false, tmp, E);
    attention_rows_backward(tmp, cq, ckv, ckv + E, d.cprobs + t0 * HN, dpart, wide, wide + E, N, c.H, c.D, true, 0,
                            c.bh, dp.data(), {E, 2 * E, E});
    t_weight_grad(b.cq, dpart, E, rep, E, R, G);
    t_input_grad(b.cq, dpart, E, R, true, drep, E);
    t_weight_grad(b.ckv, wide, 2 * E, self.out, E, R, G);
    t_input_grad(b.ckv, wide, 2 * E, R, false, dy, E);  // dy: d y1
    if (k == 0 && m.token_table()) {  // summed per token value; token_grads does the rest
      attention_backward_to_qkv(b.self, self, true, dy, ds, c, tmp, wide, dp.data(), G);
      scatter_add_rows(wide, tokens + t0, R, 3 * E, G + m.g_tok_qkv());
      scatter_add_rows(ds, tokens + t0, R, E, G + m.g_tok_x());
    } else {
      attention_backward_rows(b.self, y_in, self, true, dy, ds, c, tmp, wide, dp.data(), G);  // ds: d y_in
    }
    std::swap(dy, ds);
  }
  // decoder input: LN(GELU(token embedding)) (token_table: in token_grads)
  if (!m.token_table()) {
    gelu_norm_backward(m.dec_ln, tok, dy, ds, c, G);
    if (m.discrete) {
      scatter_add_rows(ds, tokens + t0, R, E, G + m.g_table);
    } else {
      t_weight_grad(m.a_embed, ds, E, prev + t0 * A, A, R, G);
    }
  }
  // value head
  const float* dv = dvalue + t0;
  t_weight_grad(m.v_out, dv, 1, vh.out, E, R, G);
  t_input_grad(m.v_out, dv, 1, R, false, tmp, E);
  gelu_norm_backward(m.v_ln, vh, tmp, ds, c, G);
  t_weight_grad(m.v_fc, ds, E, rep, E, R, G);
  t_input_grad(m.v_fc, ds, E, R, true, drep, E);
  // encoder blocks, last first: drep is the last block's output gradient
  dy = drep;
  for (size_t k = m.enc.size(); k-- > 0;) {
    const TEncSaved e{all.enc[k].attn.at(t0, E, HN), all.enc[k].mlp.at(t0, E)};
    const float* x_in = k == 0 ? embed.out : enc_out(k - 1);
    float* next = dy == drep ? dpart : drep;
    mlp_backward_rows(m.enc[k].mlp, e.attn.out, e.mlp, dy, ds, c, tmp, G);  // ds: d x1
    attention_backward_rows(m.enc[k].attn, x_in, e.attn, false, ds, next, c, tmp, wide, dp.data(), G);
    dy = next;  // d x_in
  }
  // encoder input: LN(GELU(Linear(h0 = LN(obs)))). Into the embedding's weight slot goes ds^T obs_hat, not
  // ds^T h0; training_backward turns it into the gradients of the embedding and of the observation
  // LayerNorm at the end (embedding_grads), so no input gradient (R x O) is formed here.
  gelu_norm_backward(m.enc_ln, embed, dy, ds, c, G);
  t_weight_grad(m.embed, ds, E, all.obs_hat + t0 * O, O, R, G);
}

// With h0 = obs_hat * w0 + b0 (the observation LayerNorm), ds the gradient of the embedding's output,
// M = sum ds^T obs_hat (E, O) and c = sum ds (E), summed over every row:
//   d embedding weight = M * w0 (per column) + c b0^T,   d w0 = sum_e W * M,   d b0 = c^T W.
// On entry M and c sit in the embedding's weight and bias slots of G, the LayerNorm's slots are zero.
void embedding_grads(const TModel& m, float* G) {
  const int64_t E = m.E, O = m.O;
  float *M = G + m.embed.gw, *c = G + m.embed.gb, *dw0 = G + m.ln_obs.gw, *db0 = G + m.ln_obs.gb;
  const float *W = m.embed.w, *w0 = m.ln_obs.w, *b0 = m.ln_obs.b;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t o = 0; o < O; ++o) {
      dw0[o] += W[e * O + o] * M[e * O + o];
      db0[o] += W[e * O + o] * c[e];
      M[e * O + o] = M[e * O + o] * w0[o] + c[e] * b0[o];
    }
  }
}

// token_table, once the threads' buffers are added up: from the sums per token value of d qkv (Sq) and of
// the residual's d x (Sx), the first decoder block's query/key/value gradients (Sq^T x_v, column sums of
// Sq), d x_v = Sx + Sq W, and back through the token LayerNorm and GELU into the embedding's rows. Exact
// because every row of one token value has the same x_v, GELU slope and LayerNorm statistics.
FAST void token_grads(const TModel& m, const TSaved& s, float* G) {
  const int64_t V = m.V(), E = m.E;
  const TLinear& qkv = m.dec[0].self.qkv;
  float *dq = G + m.g_tok_qkv(), *dx = G + m.g_tok_x();
  t_weight_grad(qkv, dq, 3 * E, s.tokens.out, E, V, G);
  t_input_grad(qkv, dq, 3 * E, V, true, dx, E);
  std::vector<float> ds(static_cast<size_t>(V * E));
  gelu_norm_backward(m.dec_ln, s.tokens, dx, ds.data(), Chunk{0, V, 1, E, m.H, m.D, 0}, G);
  add_rows(G + m.g_table, ds.data(), V * E);
}

void check_training_inputs(const Tensor& obs, const Tensor& dec_in, bool discrete) {
  TORCH_CHECK(supported(), "training pass: needs a CPU with AVX2 and FMA");
  TORCH_CHECK(obs.device().is_cpu() && obs.scalar_type() == at::kFloat && obs.dim() == 3,
              "training pass: obs must be (B, N, O) CPU float32");
  if (discrete) {
    TORCH_CHECK(dec_in.scalar_type() == at::kLong && dec_in.dim() == 2, "training pass: tokens must be (B, N) int64");
  } else {
    TORCH_CHECK(dec_in.scalar_type() == at::kFloat && dec_in.dim() == 3, "training pass: prev must be (B, N, A)");
  }
  TORCH_CHECK(dec_in.size(0) == obs.size(0) && dec_in.size(1) == obs.size(1), "training pass: batch shapes differ");
}

// obs (B, N, O); dec_in: discrete (B, N) int64 token rows of the action embedding (0 = start, a + 1 =
// action a), continuous (B, N, A) the previous agent's action (zeros for the first). Returns policy
// outputs (B, N, A), values (B, N) and the saved fields for training_backward.
std::tuple<Tensor, Tensor, std::vector<Tensor>> training_forward(const Tensor& obs_in, const Tensor& dec_in_t,
                                                                 const std::vector<Tensor>& weights, int64_t n_block,
                                                                 int64_t n_head) {
  const bool discrete = dec_in_t.scalar_type() == at::kLong;
  const Tensor obs = obs_in.contiguous(), dec_in = dec_in_t.contiguous();
  check_training_inputs(obs, dec_in, discrete);
  TModel m = bind_model(weights, n_block, n_head, discrete, true);
  m.B = obs.size(0), m.N = obs.size(1);
  TORCH_CHECK(obs.size(2) == m.O, "training pass: obs width ", obs.size(2), " but the embedding takes ", m.O);
  if (discrete) {
    const int64_t lo = dec_in.min().item<int64_t>(), hi = dec_in.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi <= m.A, "training pass: token rows must lie in [0, ", m.A, "]");
  } else {
    TORCH_CHECK(dec_in.size(2) == m.A, "training pass: previous actions must have width ", m.A);
  }
  const int64_t T = m.B * m.N;
  const ChunkPlan plan = plan_chunks(m.B, m.N);
  std::vector<Tensor> saved;
  const TSaved s = bind_saved(m, T, saved, true);
  Tensor out = at::empty({m.B, m.N, m.A}, obs.options()), value = at::empty({m.B, m.N}, obs.options());
  const float* op = obs.data_ptr<float>();
  const int64_t* tokens = discrete ? dec_in.data_ptr<int64_t>() : nullptr;
  const float* prev = discrete ? nullptr : dec_in.data_ptr<float>();
  float *outp = out.data_ptr<float>(), *valp = value.data_ptr<float>();
  if (m.token_table()) token_forward(m, s);
  at::parallel_for(0, plan.n, 1, [&](int64_t c0, int64_t c1) {
    const int64_t R = plan.max_samples() * m.N;
    std::vector<float> tmp(static_cast<size_t>(R * (2 * m.E + m.O)));
    for (int64_t c = c0; c < c1; ++c) {
      training_forward_chunk(m, s, op, tokens, prev, outp, valp, plan.begin(c), plan.begin(c + 1), tmp.data(),
                             tmp.data() + R * m.E, tmp.data() + R * (m.E + m.O));
    }
  });
  return {out, value, saved};
}

// The encoder and the value head alone, for acting (no gradients): obs (B, N, O) and the weights of
// training_forward up to the value head -> encoded tokens (B, N, E), values (B, N). The same loops as the
// training pass's forward.
std::tuple<Tensor, Tensor> encoder_forward(const Tensor& obs_in, const std::vector<Tensor>& weights, int64_t n_block,
                                           int64_t n_head) {
  const Tensor obs = obs_in.contiguous();
  TORCH_CHECK(supported(), "encoder pass: needs a CPU with AVX2 and FMA");
  TORCH_CHECK(obs.device().is_cpu() && obs.scalar_type() == at::kFloat && obs.dim() == 3,
              "encoder pass: obs must be (B, N, O) CPU float32");
  TModel m = bind_model(weights, n_block, n_head, false, true, true);
  m.B = obs.size(0), m.N = obs.size(1);
  TORCH_CHECK(obs.size(2) == m.O, "encoder pass: obs width ", obs.size(2), " but the embedding takes ", m.O);
  const int64_t T = m.B * m.N;
  const ChunkPlan plan = plan_chunks(m.B, m.N);
  std::vector<Tensor> saved;
  const TSaved s = bind_saved(m, T, saved, true, true);
  Tensor value = at::empty({m.B, m.N}, obs.options());
  const float* op = obs.data_ptr<float>();
  float* valp = value.data_ptr<float>();
  at::parallel_for(0, plan.n, 1, [&](int64_t c0, int64_t c1) {
    const int64_t R = plan.max_samples() * m.N;
    std::vector<float> tmp(static_cast<size_t>(R * (m.E + m.O)));
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t s0 = plan.begin(c), s1 = plan.begin(c + 1);
      const Chunk chunk{s0 * m.N, (s1 - s0) * m.N, m.N, m.E, m.H, m.D, (s1 - s0) * m.H};
      encoder_forward_chunk(m, s, op, valp, chunk, tmp.data(), tmp.data() + R * m.E);
    }
  });
  const float* rep = m.enc.empty() ? s.embed.out : s.enc.back().mlp.out;  // the encoder's output rows
  const auto field =
      std::find_if(saved.begin(), saved.end(), [rep](const Tensor& t) { return t.data_ptr<float>() == rep; });
  return {field->view({m.B, m.N, m.E}), value};
}

// Gradients of every weight (same order and shapes as given) from those of the outputs and values.
std::vector<Tensor> training_backward(const Tensor& dout_in, const Tensor& dvalue_in, std::vector<Tensor> saved,
                                      const Tensor& dec_in_t, const std::vector<Tensor>& weights, int64_t n_block,
                                      int64_t n_head) {
  const bool discrete = dec_in_t.scalar_type() == at::kLong;
  const Tensor dout = dout_in.contiguous(), dvalue = dvalue_in.contiguous(), dec_in = dec_in_t.contiguous();
  TModel m = bind_model(weights, n_block, n_head, discrete, false);
  m.B = dout.size(0), m.N = dout.size(1);
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({m.B, m.N, m.A}) && dvalue.numel() == m.B * m.N,
              "training pass: gradient shapes differ from the outputs'");
  const int64_t T = m.B * m.N;
  const ChunkPlan plan = plan_chunks(m.B, m.N);
  const TSaved s = bind_saved(m, T, saved, false);
  const int64_t threads = at::get_num_threads();
  const int64_t width = m.buffer_floats();
  Tensor grads = at::zeros({threads, width}, dout.options());
  const int64_t* tokens = discrete ? dec_in.data_ptr<int64_t>() : nullptr;
  const float* prev = discrete ? nullptr : dec_in.data_ptr<float>();
  const float *dop = dout.data_ptr<float>(), *dvp = dvalue.data_ptr<float>();
  float* gp = grads.data_ptr<float>();
  at::parallel_for(0, plan.n, 1, [&](int64_t c0, int64_t c1) {
    const int64_t R = plan.max_samples() * m.N;
    std::vector<float> work(static_cast<size_t>(8 * R * m.E));
    float* G = gp + std::min<int64_t>(at::get_thread_num(), threads - 1) * width;
    for (int64_t c = c0; c < c1; ++c) {
      training_backward_chunk(m, s, tokens, prev, dop, dvp, plan.begin(c), plan.begin(c + 1), G, work.data());
    }
  });
  const Tensor total = threads == 1 ? grads[0] : grads.sum(0);  // thread by thread, in order
  embedding_grads(m, total.data_ptr<float>());
  if (m.token_table()) token_grads(m, s, total.data_ptr<float>());
  std::vector<Tensor> result;
  for (size_t i = 0; i < m.shapes.size(); ++i) {
    int64_t n = 1;
    for (int64_t d : m.shapes[i]) n *= d;
    result.push_back(total.narrow(0, m.offsets[i], n).view(m.shapes[i]));
  }
  return result;
}

#else

bool supported() { return false; }
bool usable(const Tensor&, const std::vector<std::vector<Tensor>>&) { return false; }
std::tuple<Tensor, Tensor> decode(const Tensor&, const std::vector<std::vector<Tensor>>&, const std::vector<Tensor>&,
                                  const Tensor&, const std::optional<Tensor>&, const std::vector<Tensor>&,
                                  const std::optional<Tensor>&, int64_t, bool) {
  TORCH_CHECK(false, "decode: the fused CPU loop needs an x86-64 build");
}
std::tuple<Tensor, Tensor> attention_forward(const Tensor&, const Tensor&, const Tensor&, bool) {
  TORCH_CHECK(false, "attention: needs an x86-64 build");
}
std::tuple<Tensor, Tensor, Tensor> attention_backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, bool) {
  TORCH_CHECK(false, "attention: needs an x86-64 build");
}
std::tuple<Tensor, Tensor, std::vector<Tensor>> training_forward(const Tensor&, const Tensor&,
                                                                 const std::vector<Tensor>&, int64_t, int64_t) {
  TORCH_CHECK(false, "training pass: needs an x86-64 build");
}
std::vector<Tensor> training_backward(const Tensor&, const Tensor&, std::vector<Tensor>, const Tensor&,
                                      const std::vector<Tensor>&, int64_t, int64_t) {
  TORCH_CHECK(false, "training pass: needs an x86-64 build");
}
std::tuple<Tensor, Tensor> encoder_forward(const Tensor&, const std::vector<Tensor>&, int64_t, int64_t) {
  TORCH_CHECK(false, "encoder pass: needs an x86-64 build");
}
Tensor gelu_forward(const Tensor&) { TORCH_CHECK(false, "gelu: needs an x86-64 build"); }
Tensor gelu_backward(const Tensor&, const Tensor&) { TORCH_CHECK(false, "gelu: needs an x86-64 build"); }
std::tuple<Tensor, Tensor, Tensor> add_layer_norm_forward(const Tensor&, const std::optional<Tensor>&, const Tensor&,
                                                          const Tensor&, bool) {
  TORCH_CHECK(false, "layer_norm: needs an x86-64 build");
}
std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  TORCH_CHECK(false, "layer_norm: needs an x86-64 build");
}
std::tuple<Tensor, Tensor, Tensor, Tensor> categorical_forward(const Tensor&, const Tensor&, const Tensor&) {
  TORCH_CHECK(false, "categorical: needs an x86-64 build");
}
Tensor categorical_backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                            const Tensor&) {
  TORCH_CHECK(false, "categorical: needs an x86-64 build");
}

#endif

}  // namespace fast

bool fast_supported() { return fast::supported(); }

// blocks: per block [18 weights..., cross_q, self_kv, cross_kv] (see Weight).
// head: [fc_w, fc_b, ln_w, ln_b, out_w, out_b] (+ [final_ln_w, final_ln_b] with pre-LayerNorm).
// start (B, E): the first decoder token. Discrete: tokens (A, E) the embedded action tokens, offset
// (B, N, A) the masked Gumbel noise (or the mask alone when greedy). Continuous: tokens None, embed
// [w, b, ln_w, ln_b] of the action embedding, offset (B, N, A) std * noise or None when greedy.
// fused: use the fused CPU loop (namespace fast) where it applies; false forces the ATen step (tests).
// Returns policy outputs (B, N, A) and actions (B, N) int64 or (B, N, A).
std::tuple<Tensor, Tensor> decode(const Tensor& rep, const std::vector<std::vector<Tensor>>& blocks,
                                  const std::vector<Tensor>& head, const Tensor& start,
                                  const std::optional<Tensor>& tokens, const std::vector<Tensor>& embed,
                                  const std::optional<Tensor>& offset, int64_t n_head, bool pre_norm, bool fused) {
  at::NoGradGuard no_grad;
  if (fused && fast::usable(rep, blocks)) {
    return fast::decode(rep, blocks, head, start, tokens, embed, offset, n_head, pre_norm);
  }
  const int64_t B = rep.size(0), N = rep.size(1), E = rep.size(2), H = n_head, D = E / H;
  // Weight matrices transposed once (views), so each Linear is one addmm: bias + x @ W^T.
  auto linear = [](const Tensor& x, const Tensor& wt, const Tensor& b) { return at::addmm(b, x, wt); };
  std::vector<Block> bs;
  for (const auto& parts : blocks) {
    TORCH_CHECK(parts.size() == kNumWeights + 3, "decode: a block needs 21 tensors, got ", parts.size());
    Block blk{std::vector<Tensor>(parts.begin(), parts.begin() + kNumWeights), parts[kNumWeights],
              parts[kNumWeights + 1], parts[kNumWeights + 2]};
    for (int k : {kQkvW, kSelfProjW, kCrossKvW, kCrossProjW, kFcW, kProjW}) blk.w[k] = blk.w[k].t();
    bs.push_back(std::move(blk));
  }
  const bool final_ln = head.size() == 8;
  const Tensor head_fc = head[0].t(), head_out = head[4].t();
  const bool discrete = tokens.has_value();
  const Tensor embed_w = discrete ? Tensor() : embed[0].t();

  std::vector<Tensor> outs, actions;  // N x (B, A), N x (B,) or (B, A): stacked once at the end
  Tensor x = start;  // (B, E) the token entering the decoder
  for (int64_t i = 0; i < N; ++i) {
    const Tensor rep_i = rep.select(1, i);  // (B, E)
    for (auto& blk : bs) {
      const auto& w = blk.w;
      // causal self-attention over the action tokens 0..i
      Tensor h = pre_norm ? layer_norm(x, w[kLn1W], w[kLn1B]) : x;
      Tensor qkv = linear(h, w[kQkvW], w[kQkvB]).view({B, 3, H, D});
      auto [k, v] = append(blk.self_kv, i, qkv.narrow(1, 1, 2));  // 2 x (B, H, i+1, D)
      Tensor att = attend_one(qkv.select(1, 0).unsqueeze(2), k, v);  // (B, H, 1, D)
      att = linear(att.reshape({B, E}), w[kSelfProjW], w[kSelfProjB]);
      x = pre_norm ? x + att : layer_norm(x, w[kLn1W], w[kLn1B], &att);
      // "cross" attention: query from the encoded observation i, keys/values from the action stream
      Tensor kv_in = pre_norm ? layer_norm(x, w[kLn2W], w[kLn2B]) : x;
      Tensor kv = linear(kv_in, w[kCrossKvW], w[kCrossKvB]).view({B, 2, H, D});
      auto [ck, cv] = append(blk.cross_kv, i, kv);
      att = attend_one(blk.cross_q.narrow(2, i, 1), ck, cv);  // (B, H, 1, D)
      Tensor y = rep_i + linear(att.reshape({B, E}), w[kCrossProjW], w[kCrossProjB]);
      auto mlp = [&w, &linear](const Tensor& t) {
        return linear(at::gelu(linear(t, w[kFcW], w[kFcB])), w[kProjW], w[kProjB]);
      };
      if (pre_norm) {
        x = y + mlp(layer_norm(y, w[kLn3W], w[kLn3B]));
      } else {
        y = layer_norm(y, w[kLn2W], w[kLn2B]);
        Tensor m = mlp(y);
        x = layer_norm(y, w[kLn3W], w[kLn3B], &m);
      }
    }
    // policy head: [final LayerNorm ->] Linear -> GELU -> LayerNorm -> Linear
    Tensor z = final_ln ? layer_norm(x, head[6], head[7]) : x;
    Tensor out = linear(layer_norm(at::gelu(linear(z, head_fc, head[1])), head[2], head[3]), head_out, head[5]);
    outs.push_back(out);
    if (discrete) {
      Tensor a = (out + offset->select(1, i)).argmax(-1);  // (B,)
      actions.push_back(a);
      x = tokens->index_select(0, a);
    } else {
      Tensor a = offset.has_value() ? out + offset->select(1, i) : out;  // (B, A)
      actions.push_back(a);
      x = layer_norm(at::gelu(linear(a, embed_w, embed[1])), embed[2], embed[3]);
    }
  }
  return {at::stack(outs, 1), at::stack(actions, 1)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode, "MAT's cached decode loop (see seqmarl/nn/mat.py)");
  m.def("fused_available", [] { return SEQMARL_FAST_DECODE && fast_supported(); },
        "whether decode's fused CPU loop runs on this machine (x86-64 with AVX2 and FMA)");
  m.def("attend_one", &attend_one, "attention of one query per (batch, head): q (B, H, 1, D), k, v (B, H, L, D)");
  m.def("attention_forward", &fast::attention_forward,
        "training attention over few tokens: q, k, v (B, L, H, D) -> out (B, L, H, D), probs (B, H, L, L)");
  m.def("attention_backward", &fast::attention_backward,
        "its backward: dout, q, k, v, probs -> dq, dk, dv");
  m.def("gelu_forward", &fast::gelu_forward, "training GELU (exact): x -> y");
  m.def("gelu_backward", &fast::gelu_backward, "its backward: dy, x -> dx");
  m.def("add_layer_norm_forward", &fast::add_layer_norm_forward,
        "training LayerNorm(x (+ r)) over the last dim: x, r or None, w, b, keep -> y, xhat, rstd");
  m.def("layer_norm_backward", &fast::layer_norm_backward, "its backward: dy, xhat, rstd, w -> d(x + r), dw, db");
  m.def("categorical_forward", &fast::categorical_forward,
        "training masked categorical: logits, mask, actions -> log_prob, entropy, probs, log_probs");
  m.def("categorical_backward", &fast::categorical_backward,
        "its backward: d log_prob, d entropy, mask, actions, probs, log_probs, entropy -> d logits");
  m.def("training_forward", &fast::training_forward,
        "MAT's whole forward for the update: obs, tokens or previous actions, weights, n_block, n_head -> "
        "policy outputs, values, saved");
  m.def("encoder_forward", &fast::encoder_forward,
        "MAT's encoder and value head for acting: obs, the training pass's weights up to the value head, "
        "n_block, n_head -> encoded tokens, values");
  m.def("training_backward", &fast::training_backward,
        "its backward: d outputs, d values, saved, tokens or previous actions, weights, n_block, n_head -> "
        "the weights' gradients");
}
