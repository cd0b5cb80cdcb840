// Quantized matrix products straight from GGUF blocks (Q4_0, Q4_1, Q8_0), activations rounded to int8 per
// block of 32 as llama.cpp's Q8_0 path does. Shared by qmatmul.cpp (the products) and decode.cpp (the fused step).
#pragma once
#include <torch/extension.h>
#include <cstdint>
#include <vector>

namespace camelid {

enum QType : int { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };
constexpr int QK = 32;  // values per block
inline int block_bytes(int type) { return type == Q4_0 ? 18 : type == Q4_1 ? 20 : 34; }

// One matrix in block form: rows x cols (cols % 32 == 0), row r at data + r * row_bytes.
// perm (optional): output row r is written to position perm[r] (GGUF q/k rows -> Hugging Face order).
struct QMat {
  const uint8_t* data = nullptr;
  int type = 0;
  int64_t rows = 0, cols = 0, row_bytes = 0;
  const int64_t* perm = nullptr;
};

// Activations rounded to int8: q (m x k), d (m x k/32) block scales, s = d * sum(q) per block.
struct QAct {
  std::vector<int8_t> q;
  std::vector<float> d, s;
  int64_t m = 0, k = 0;
  void quantize(const float* x, int64_t m_, int64_t k_, int64_t ldx);
};

// y[t, off_i + row] = dot(mat_i row, x_t) for every matrix i, side by side (ldy = y's row stride).
void qgemm(const std::vector<QMat>& mats, const QAct& x, float* y, int64_t ldy);

void dequantize_bf16(const QMat& w, int64_t r0, int64_t r1, at::BFloat16* out);

QMat qmat_from(const torch::Tensor& blocks, int type, const torch::Tensor& perm);

}  // namespace camelid
