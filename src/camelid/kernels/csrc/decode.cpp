// One decode step of a whole LLaMA model in one native call: for every layer RMSNorm, the q/k/v products
// (one pass over the three matrices), rotary embedding, the cache write, attention over the cache (grouped
// query heads), the output product and residual, RMSNorm, gate/up, SiLU, down and residual; then the final
// norm and the output matrix. The same blocks and the same int8 activation rounding as qgemm, so its logits
// equal the module-by-module path within float rounding. Hugging Face layout throughout (rotate-half rotary,
// q/k rows reordered by the matrices' perm as they are written), so the cache is shared with the PyTorch path.
#include <ATen/Parallel.h>

#include <cmath>

#include "qmatmul.h"

namespace camelid {

struct Layer {
  torch::Tensor attn_norm, ffn_norm;
  std::vector<QMat> qkv, gate_up;
  QMat o, down;
};

class DecodePlan {
 public:
  DecodePlan(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t inter, double eps,
             std::vector<torch::Tensor> norms, std::vector<torch::Tensor> blocks, std::vector<int64_t> types,
             std::vector<torch::Tensor> perms, torch::Tensor final_norm)
      : D(hidden), H(heads), KV(kv_heads), HD(head_dim), F(inter), eps((float)eps), keep(blocks), final_norm(final_norm) {
    const size_t n_layers = norms.size() / 2;
    TORCH_CHECK(blocks.size() == n_layers * 7 + 1 && types.size() == blocks.size() && perms.size() == blocks.size(),
                "expected 7 matrices per layer (q k v o gate up down) and the output matrix");
    for (size_t l = 0; l < n_layers; ++l) {
      Layer L;
      L.attn_norm = norms[2 * l].contiguous();
      L.ffn_norm = norms[2 * l + 1].contiguous();
      auto m = [&](size_t i) { return qmat_from(blocks[7 * l + i], (int)types[7 * l + i], perms[7 * l + i]); };
      L.qkv = {m(0), m(1), m(2)};
      L.o = m(3);
      L.gate_up = {m(4), m(5)};
      L.down = m(6);
      layers.push_back(L);
    }
    head = qmat_from(blocks.back(), (int)types.back(), perms.back());
    V = head.rows;
    keep_perms = perms;
  }

  // x (B, D) embeddings; positions, rows (B,) int64; cos/sin (B, head_dim); caches [k0, v0, k1, v1, ...]
  // each (rows, kv_heads, max_seq, head_dim) float32. Returns logits (B, V).
  torch::Tensor step(torch::Tensor x, torch::Tensor positions, torch::Tensor rows, torch::Tensor cos,
                     torch::Tensor sin, std::vector<torch::Tensor> caches) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == D, "x must be float32 (B, hidden)");
    TORCH_CHECK(caches.size() == 2 * layers.size(), "one k and one v cache per layer");
    const int64_t B = x.size(0);
    x = x.contiguous().clone();
    positions = positions.contiguous();
    rows = rows.contiguous();
    cos = cos.contiguous().to(torch::kFloat32);
    sin = sin.contiguous().to(torch::kFloat32);
    const int64_t QKV = (H + 2 * KV) * HD;
    std::vector<float> h(B * std::max(D, H * HD)), qkv(B * QKV), tmp(B * D), gu(B * 2 * F), act(B * F);
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* row = rows.data_ptr<int64_t>();
    float* xp = x.data_ptr<float>();
    QAct qa;
    for (size_t l = 0; l < layers.size(); ++l) {
      const Layer& L = layers[l];
      torch::Tensor& kc = caches[2 * l];
      torch::Tensor& vc = caches[2 * l + 1];
      TORCH_CHECK(kc.dtype() == torch::kFloat32 && kc.is_contiguous() && vc.is_contiguous(), "caches must be contiguous float32");
      rmsnorm(xp, L.attn_norm.data_ptr<float>(), h.data(), B);
      qa.quantize(h.data(), B, D, D);
      qgemm(L.qkv, qa, qkv.data(), QKV);
      rope_and_store(qkv.data(), B, pos, row, cos.data_ptr<float>(), sin.data_ptr<float>(), kc, vc);
      attention(qkv.data(), B, pos, row, kc, vc, h.data());
      qa.quantize(h.data(), B, H * HD, H * HD);
      qgemm({L.o}, qa, tmp.data(), D);
      for (int64_t i = 0; i < B * D; ++i) xp[i] += tmp[i];
      rmsnorm(xp, L.ffn_norm.data_ptr<float>(), h.data(), B);
      qa.quantize(h.data(), B, D, D);
      qgemm(L.gate_up, qa, gu.data(), 2 * F);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < F; ++i) {
          const float g = gu[b * 2 * F + i], u = gu[b * 2 * F + F + i];
          act[b * F + i] = g / (1.f + std::exp(-g)) * u;
        }
      qa.quantize(act.data(), B, F, F);
      qgemm({L.down}, qa, tmp.data(), D);
      for (int64_t i = 0; i < B * D; ++i) xp[i] += tmp[i];
    }
    rmsnorm(xp, final_norm.data_ptr<float>(), h.data(), B);
    qa.quantize(h.data(), B, D, D);
    auto logits = torch::empty({B, V}, torch::kFloat32);
    qgemm({head}, qa, logits.data_ptr<float>(), V);
    return logits;
  }

 private:
  void rmsnorm(const float* x, const float* w, float* out, int64_t B) const {
    for (int64_t b = 0; b < B; ++b) {
      double ss = 0;
      for (int64_t i = 0; i < D; ++i) ss += (double)x[b * D + i] * x[b * D + i];
      const float r = 1.f / std::sqrt((float)(ss / D) + eps);
      for (int64_t i = 0; i < D; ++i) out[b * D + i] = w[i] * (x[b * D + i] * r);
    }
  }

  // Rotate-half rotary on q and k (first half of a head = real parts), then k and v into the cache.
  void rope_and_store(float* qkv, int64_t B, const int64_t* pos, const int64_t* row, const float* cos,
                      const float* sin, torch::Tensor& kc, torch::Tensor& vc) const {
    const int64_t QKV = (H + 2 * KV) * HD, half = HD / 2, S = kc.size(2);
    float* kp = kc.data_ptr<float>();
    float* vp = vc.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(pos[b] >= 0 && pos[b] < S && row[b] >= 0 && row[b] < kc.size(0), "position or row outside the cache");
      const float* c = cos + b * HD;
      const float* s = sin + b * HD;
      for (int64_t hh = 0; hh < H + KV; ++hh) {
        float* v = qkv + b * QKV + hh * HD;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = v[i], x2 = v[i + half];
          v[i] = x1 * c[i] - x2 * s[i];
          v[i + half] = x2 * c[i + half] + x1 * s[i + half];
        }
      }
      for (int64_t g = 0; g < KV; ++g) {
        const int64_t at = ((row[b] * KV + g) * S + pos[b]) * HD;
        std::memcpy(kp + at, qkv + b * QKV + (H + g) * HD, HD * sizeof(float));
        std::memcpy(vp + at, qkv + b * QKV + (H + KV + g) * HD, HD * sizeof(float));
      }
    }
  }

  // One query per sequence over cache positions 0..pos (inclusive); out (B, H*HD).
  void attention(const float* qkv, int64_t B, const int64_t* pos, const int64_t* row, const torch::Tensor& kc,
                 const torch::Tensor& vc, float* out) const {
    const int64_t QKV = (H + 2 * KV) * HD, S = kc.size(2), group = H / KV;
    const float* kp = kc.data_ptr<float>();
    const float* vp = vc.data_ptr<float>();
    const float scale = 1.f / std::sqrt((float)HD);
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> p;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / H, hh = i % H, g = hh / group, n = pos[b] + 1;
        const float* q = qkv + b * QKV + hh * HD;
        const float* K = kp + (row[b] * KV + g) * S * HD;
        const float* Vv = vp + (row[b] * KV + g) * S * HD;
        p.resize(n);
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          float dot = 0.f;
          for (int64_t e = 0; e < HD; ++e) dot += q[e] * K[j * HD + e];
          p[j] = dot * scale;
          mx = std::max(mx, p[j]);
        }
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - mx));
        float* o = out + b * H * HD + hh * HD;
        for (int64_t e = 0; e < HD; ++e) o[e] = 0.f;
        for (int64_t j = 0; j < n; ++j) {
          const float w = p[j] / sum;
          for (int64_t e = 0; e < HD; ++e) o[e] += w * Vv[j * HD + e];
        }
      }
    });
  }

  int64_t D, H, KV, HD, F, V = 0;
  float eps;
  std::vector<torch::Tensor> keep, keep_perms;  // the blocks and perms stay alive as long as the plan
  torch::Tensor final_norm;
  std::vector<Layer> layers;
  QMat head;
};

}  // namespace camelid

using camelid::QAct;
using camelid::QMat;

static torch::Tensor qmatmul(torch::Tensor x, std::vector<torch::Tensor> blocks, std::vector<int64_t> types,
                             std::vector<torch::Tensor> perms) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be float32 (m, k)");
  TORCH_CHECK(blocks.size() == types.size() && blocks.size() == perms.size() && !blocks.empty(), "one type and perm per matrix");
  x = x.contiguous();
  std::vector<QMat> mats;
  int64_t total = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    mats.push_back(camelid::qmat_from(blocks[i], (int)types[i], perms[i]));
    TORCH_CHECK(mats.back().cols == x.size(1), "matrix width ", mats.back().cols, " differs from x's ", x.size(1));
    total += mats.back().rows;
  }
  QAct qa;
  qa.quantize(x.data_ptr<float>(), x.size(0), x.size(1), x.size(1));
  auto y = torch::empty({x.size(0), total}, torch::kFloat32);
  camelid::qgemm(mats, qa, y.data_ptr<float>(), total);
  return y;
}

// Prefill-sized products: weight tiles dequantized to bfloat16 and multiplied by oneDNN's bfloat16 GEMM
// (measured ~3.5x the int8 kernel's throughput at 128 rows on AVX512-BF16). Activations and outputs are rounded
// to bfloat16 (8 bits of mantissa; the int8 path keeps 7 bits + a block scale): libtorch exports no
// bfloat16 x bfloat16 -> float32 GEMM, and a float32 GEMM runs at a quarter of the speed.
static torch::Tensor qmatmul_bf16(torch::Tensor x, std::vector<torch::Tensor> blocks, std::vector<int64_t> types,
                                  std::vector<torch::Tensor> perms) {
  TORCH_CHECK(x.dim() == 2, "x must be (m, k)");
  auto xb = x.to(torch::kBFloat16).contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  int64_t total = 0;
  std::vector<QMat> mats;
  for (size_t i = 0; i < blocks.size(); ++i) {
    mats.push_back(camelid::qmat_from(blocks[i], (int)types[i], perms[i]));
    TORCH_CHECK(!camelid::is_float(mats.back().type), "float matrices multiply as they are, not through tiles");
    TORCH_CHECK(mats.back().cols == k, "matrix width ", mats.back().cols, " differs from x's ", k);
    total += mats.back().rows;
  }
  auto y = torch::empty({m, total}, torch::kFloat32);
  constexpr int64_t TILE = 1024;  // rows per weight tile: a few MB of bfloat16, reused by every activation row
  auto tile = torch::empty({TILE, k}, torch::kBFloat16);
  int64_t off = 0;
  for (size_t i = 0; i < mats.size(); ++i) {
    const QMat& w = mats[i];
    auto yi = perms[i].defined() && perms[i].numel() ? torch::empty({m, w.rows}, torch::kFloat32) : torch::Tensor();
    auto target = yi.defined() ? yi : y.narrow(1, off, w.rows);
    for (int64_t r0 = 0; r0 < w.rows; r0 += TILE) {
      const int64_t r1 = std::min(w.rows, r0 + TILE);
      auto t = tile.narrow(0, 0, r1 - r0);
      camelid::dequantize_bf16(w, r0, r1, t.data_ptr<at::BFloat16>());
      target.narrow(1, r0, r1 - r0).copy_(at::linear(xb, t));
    }
    if (yi.defined()) y.narrow(1, off, w.rows).index_copy_(1, perms[i], yi);
    off += w.rows;
  }
  return y;
}

// Rows `index` of a block matrix as float32 (the embedding lookup of a quantized embedding).
static torch::Tensor dequantize_rows(torch::Tensor blocks, int64_t type, torch::Tensor index) {
  QMat w = camelid::qmat_from(blocks, (int)type, torch::Tensor());
  index = index.contiguous().to(torch::kInt64);
  if (camelid::is_float(w.type))  // a bfloat16 / float32 embedding: its rows, widened
    return blocks.view(w.type == camelid::BF16 ? torch::kBFloat16 : torch::kFloat32).index_select(0, index).to(torch::kFloat32);
  auto out = torch::empty({index.numel(), w.cols}, torch::kFloat32);
  const int64_t* idx = index.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  uint8_t plain[36];
  for (int64_t i = 0; i < index.numel(); ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < w.rows, "row index out of range");
    for (int64_t b = 0; b < w.cols / 32; ++b) {
      const uint8_t* blk = camelid::row_block(w, idx[i], b, plain);
      uint16_t hd, hm;
      std::memcpy(&hd, blk, 2);
      const float d = c10::detail::fp16_ieee_to_fp32_value(hd);
      float* ob = o + i * w.cols + b * 32;
      if (w.type == camelid::Q8_0) {
        for (int j = 0; j < 32; ++j) ob[j] = d * (float)(int8_t)blk[2 + j];
      } else {
        std::memcpy(&hm, blk + 2, 2);
        const float m = w.type == camelid::Q4_0 ? -8.f * d : c10::detail::fp16_ieee_to_fp32_value(hm);
        const uint8_t* p = blk + (w.type == camelid::Q4_0 ? 2 : 4);
        for (int j = 0; j < 16; ++j) {
          ob[j] = d * (float)(p[j] & 15) + m;
          ob[j + 16] = d * (float)(p[j] >> 4) + m;
        }
      }
    }
  }
  return out;
}

// (repacked blocks, their type): 8 rows interleaved where the build has the kernels for it, else as given.
static std::tuple<torch::Tensor, int64_t> repack(torch::Tensor blocks, int64_t type, bool release) {
#if defined(__AVX2__)
  if (type < camelid::PACKED && blocks.size(0) >= camelid::GROUP)
    return {camelid::repack(blocks, (int)type, release), type + camelid::PACKED};
#endif
  return {blocks, type};
}

static std::string isa() {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512-vnni";
#elif defined(__AVXVNNI__)
  return "avx-vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qmatmul", &qmatmul, "y = x @ W.T for GGUF block matrices side by side (int8 activations)");
  m.def("qmatmul_bf16", &qmatmul_bf16, "prefill: y = x @ W.T through bfloat16 weight tiles");
  m.def("dequantize_rows", &dequantize_rows, "rows of a block matrix as float32");
  m.def("repack", &repack, "blocks with 8 rows interleaved (same size), and their type");
  m.def("isa", &isa, "the instruction set the kernels were built for");
  m.def("has_tile_kernel", &camelid::has_tile_kernel, "whether prefill-sized products on repacked blocks stay int8");
  pybind11::class_<camelid::DecodePlan>(m, "DecodePlan")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, std::vector<torch::Tensor>,
                          std::vector<torch::Tensor>, std::vector<int64_t>, std::vector<torch::Tensor>, torch::Tensor>())
      .def("step", &camelid::DecodePlan::step);
}
