// Quantized matrix products straight from GGUF blocks (Q4_0, Q4_1, Q8_0), activations rounded to int8 per
// block of 32 as llama.cpp's Q8_0 path does. Shared by qmatmul.cpp (the products) and decode.cpp (the fused step).
#pragma once
#include <torch/extension.h>
#include <cstdint>
#include <vector>

namespace camelid {

enum QType : int { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };
constexpr int QK = 32;  // values per block
constexpr int PACKED = 3;  // type + PACKED: the same blocks repacked, 8 rows interleaved (see repack.cpp)
constexpr int GROUP = 8;   // rows per interleaved group
// Float matrices (a model loaded at bfloat16 / float32 width): plain rows, "blocks" of 32 values, the same
// interface, so one decode step serves every width.
constexpr int BF16 = 2 * PACKED, F32 = 2 * PACKED + 1;
inline bool is_float(int type) { return type >= BF16; }
inline int block_bytes(int type) {
  return type == BF16 ? 64 : type == F32 ? 128 : type % PACKED == Q4_0 ? 18 : type % PACKED == Q4_1 ? 20 : 34;
}

// One matrix in block form: rows x cols (cols % 32 == 0), row r at data + r * row_bytes.
// perm (optional): output row r is written to position perm[r] (GGUF q/k rows -> Hugging Face order).
// groups: rows 0 .. 8 groups - 1 are repacked (group g holds rows 8g..8g+7 in the bytes those rows had);
// the rows after them (rows % 8) stay as they were.
struct QMat {
  const uint8_t* data = nullptr;
  int type = 0;  // Q4_0 / Q4_1 / Q8_0 (the layout is in `groups`), or BF16 / F32
  int64_t rows = 0, cols = 0, row_bytes = 0, groups = 0;
  const int64_t* perm = nullptr;
};

// Block b of row r in the plain GGUF form: a pointer into the matrix, or into tmp (>= 34 bytes) where the row
// is repacked and its block has to be put back together.
const uint8_t* row_block(const QMat& w, int64_t r, int64_t b, uint8_t* tmp);

// A repacked copy of a plain block matrix (same size); where `release`, the source's pages are handed back to
// the kernel as they are copied (the source is a read-only file mapping that is dropped afterwards).
torch::Tensor repack(const torch::Tensor& blocks, int type, bool release);

// Activations: x itself (f32 products), x rounded to int8 per block of 32 (q (m x k), d (m x k/32) block scales,
// s = d * sum(q) per block: the block products) and x rounded to bfloat16 (xb: bf16 products, as llama.cpp's).
// `quantize` only records x; each rounding is made on first use by a product that needs it (qgemm), so a call
// over float matrices never pays for the int8 one, nor a call over blocks for the bf16 one.
struct QAct {
  mutable std::vector<int8_t> q;
  mutable std::vector<float> d, s;
  mutable std::vector<uint16_t> xb;
  const float* xf = nullptr;
  int64_t m = 0, k = 0, ldx = 0;
  void quantize(const float* x, int64_t m_, int64_t k_, int64_t ldx);
  void round_int8() const;  // fills q, d, s
  void round_bf16() const;  // fills xb
};

// y[t, off_i + row] = dot(mat_i row, x_t) for every matrix i, side by side (ldy = y's row stride).
void qgemm(const std::vector<QMat>& mats, const QAct& x, float* y, int64_t ldy);

// Rows 0 .. 8 (rows / 8) - 1 of every matrix, repacked or not, through the 8-row x 16-token tile kernel
// (gemm.cpp, AVX512-VNNI); false, with nothing written, where the build has no such kernel.
bool qgemm_groups(const std::vector<QMat>& mats, const QAct& x, float* y, int64_t ldy);
bool has_tile_kernel();
// Activation rows from which qgemm takes the tile kernel: below, a 16-token tile is mostly padding and the
// decode kernel's pass per 4 rows is faster (5632 x 2048 Q4_0, 1 thread: 8 rows 0.6 vs 0.96 ms, 16 rows 1.2 vs
// 0.86 ms).
constexpr int64_t GEMM_ROWS = 12;

void dequantize_bf16(const QMat& w, int64_t r0, int64_t r1, at::BFloat16* out);

QMat qmat_from(const torch::Tensor& blocks, int type, const torch::Tensor& perm);

}  // namespace camelid
