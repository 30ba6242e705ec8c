// MAT's cached decode loop (seqmarl/nn/mat.py, `_decode_cached`) written in C++ against ATen.
//
// Why: one decode step is ~25 tiny ops on (B, E) tensors, and at E = 64 their fixed costs (Python
// interpreter, dispatch, kernel set-up) outweigh their arithmetic. Called from C++ the ops skip the
// interpreter; the two attentions of one query over few keys use a plain loop instead of torch's CPU
// attention kernel (attend_one), and each residual add + LayerNorm is one loop (layer_norm).
// Otherwise the maths is op for op the Python step (DecoderBlock.step and the policy head): same
// discrete actions, outputs equal within float32 rounding, as tests/test_mat_model.py checks. ATen
// calls work on CPU and CUDA tensors alike; off CPU the attention and LayerNorm are torch's kernels.
//
// Shape legend: B batch, N agents, E embed, H heads, D = E / H, A action width.
#include <torch/extension.h>

#include <cmath>
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

// blocks: per block [18 weights..., cross_q, self_kv, cross_kv] (see Weight).
// head: [fc_w, fc_b, ln_w, ln_b, out_w, out_b] (+ [final_ln_w, final_ln_b] with pre-LayerNorm).
// start (B, E): the first decoder token. Discrete: tokens (A, E) the embedded action tokens, offset
// (B, N, A) the masked Gumbel noise (or the mask alone when greedy). Continuous: tokens None, embed
// [w, b, ln_w, ln_b] of the action embedding, offset (B, N, A) std * noise or None when greedy.
// Returns policy outputs (B, N, A) and actions (B, N) int64 or (B, N, A).
std::tuple<Tensor, Tensor> decode(const Tensor& rep, const std::vector<std::vector<Tensor>>& blocks,
                                  const std::vector<Tensor>& head, const Tensor& start,
                                  const std::optional<Tensor>& tokens, const std::vector<Tensor>& embed,
                                  const std::optional<Tensor>& offset, int64_t n_head, bool pre_norm) {
  at::NoGradGuard no_grad;
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
  m.def("attend_one", &attend_one, "attention of one query per (batch, head): q (B, H, 1, D), k, v (B, H, L, D)");
}
