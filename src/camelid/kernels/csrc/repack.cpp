// Repacked block matrices: 8 rows' blocks interleaved so that one pass of dot products serves 8 output rows
// (the idea of llama.cpp's x86 "repack" buffers; our own layout). Sizes are unchanged: group g of a matrix
// takes exactly the bytes of rows 8g..8g+7, so a repacked matrix replaces the file's bytes one for one.
//
// Block b of a group (8 rows, block j of each), for a 4-byte chunk c of 32 values (values 4c..4c+3):
//   Q4_0: d[8] (fp16) | qs[128]      Q4_1: d[8] | m[8] | qs[128]      Q8_0: d[8] | qs[256]
//   Q4: byte 32L + 4j + i = value 8L+i of row j (low nibble) | value 8L+4+i (high nibble), L = 0..3, i = 0..3,
//       so one 32-byte load gives, after masking, chunk 2L (low) and chunk 2L+1 (high) of all 8 rows, row j in
//       32-bit lane j: the layout vpdpbusd wants against a broadcast chunk of the activations.
//   Q8_0: byte 32c + 4j + i = value 4c+i of row j.
#include <ATen/Parallel.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include "qmatmul.h"
#if defined(__SSE4_1__)
#include <immintrin.h>
#endif

namespace camelid {

static inline int header_bytes(int type) { return type == Q4_1 ? 32 : 16; }

// Plain Q4 quants (16 bytes: value i low nibble, value 16+i high) -> the 4 words of row j in a group block.
static inline void pack_q4(const uint8_t* qs, uint32_t words[4]) {
#if defined(__SSE4_1__)
  const __m128i p = _mm_loadu_si128((const __m128i*)qs), mask = _mm_set1_epi8(0x0F);
  const __m128 lo = _mm_castsi128_ps(_mm_and_si128(p, mask));                    // values 0..15
  const __m128 hi = _mm_castsi128_ps(_mm_and_si128(_mm_srli_epi16(p, 4), mask));  // values 16..31
  const __m128i a = _mm_castps_si128(_mm_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0)));  // 0-3 8-11 16-19 24-27
  const __m128i b = _mm_castps_si128(_mm_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1)));  // 4-7 12-15 20-23 28-31
  _mm_storeu_si128((__m128i*)words, _mm_or_si128(a, _mm_slli_epi16(b, 4)));
#else
  uint8_t v[32], out[16];
  for (int i = 0; i < 16; ++i) v[i] = qs[i] & 15, v[i + 16] = qs[i] >> 4;
  for (int L = 0; L < 4; ++L)
    for (int i = 0; i < 4; ++i) out[4 * L + i] = v[8 * L + i] | (v[8 * L + 4 + i] << 4);
  std::memcpy(words, out, 16);
#endif
}

// The inverse: the 4 words of row j -> plain Q4 quants.
static inline void unpack_q4(const uint32_t words[4], uint8_t* qs) {
#if defined(__SSE4_1__)
  const __m128i p = _mm_loadu_si128((const __m128i*)words), mask = _mm_set1_epi8(0x0F);
  const __m128i a = _mm_and_si128(p, mask), b = _mm_and_si128(_mm_srli_epi16(p, 4), mask);
  const __m128i lo = _mm_unpacklo_epi32(a, b), hi = _mm_unpackhi_epi32(a, b);
  _mm_storeu_si128((__m128i*)qs, _mm_or_si128(lo, _mm_slli_epi16(hi, 4)));
#else
  uint8_t in[16], v[32];
  std::memcpy(in, words, 16);
  for (int L = 0; L < 4; ++L)
    for (int i = 0; i < 4; ++i) v[8 * L + i] = in[4 * L + i] & 15, v[8 * L + 4 + i] = in[4 * L + i] >> 4;
  for (int i = 0; i < 16; ++i) qs[i] = v[i] | (v[i + 16] << 4);
#endif
}

const uint8_t* row_block(const QMat& w, int64_t r, int64_t b, uint8_t* tmp) {
  const int bs = block_bytes(w.type);
  if (r >= w.groups * GROUP) return w.data + r * w.row_bytes + b * bs;
  const int64_t j = r % GROUP;
  const uint8_t* blk = w.data + (r / GROUP) * GROUP * w.row_bytes + b * GROUP * bs;
  const int hdr = header_bytes(w.type);
  std::memcpy(tmp, blk + 2 * j, 2);
  if (w.type == Q4_1) std::memcpy(tmp + 2, blk + 16 + 2 * j, 2);
  const uint8_t* qs = blk + hdr;
  if (w.type == Q8_0) {
    for (int c = 0; c < 8; ++c) std::memcpy(tmp + 2 + 4 * c, qs + 32 * c + 4 * j, 4);
  } else {
    uint32_t words[4];
    for (int L = 0; L < 4; ++L) std::memcpy(&words[L], qs + 32 * L + 4 * j, 4);
    unpack_q4(words, tmp + (w.type == Q4_0 ? 2 : 4));
  }
  return tmp;
}

static void pack_group(const uint8_t* src, uint8_t* dst, int type, int64_t nb, int64_t row_bytes) {
  const int bs = block_bytes(type), hdr = header_bytes(type);
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* out = dst + b * GROUP * bs;
    uint8_t* qs = out + hdr;
    for (int j = 0; j < GROUP; ++j) {
      const uint8_t* blk = src + j * row_bytes + b * bs;
      std::memcpy(out + 2 * j, blk, 2);
      if (type == Q8_0) {
        for (int c = 0; c < 8; ++c) std::memcpy(qs + 32 * c + 4 * j, blk + 2 + 4 * c, 4);
        continue;
      }
      if (type == Q4_1) std::memcpy(out + 16 + 2 * j, blk + 2, 2);
      uint32_t words[4];
      pack_q4(blk + (type == Q4_0 ? 2 : 4), words);
      for (int L = 0; L < 4; ++L) std::memcpy(qs + 32 * L + 4 * j, &words[L], 4);
    }
  }
}

// madvise over the whole pages (of `align` bytes) inside [p, p + n).
static void advise(const uint8_t* p, int64_t n, int advice, uintptr_t align = 0) {
  if (!align) align = (uintptr_t)sysconf(_SC_PAGESIZE);
  const uintptr_t a = ((uintptr_t)p + align - 1) & ~(align - 1), e = ((uintptr_t)p + n) & ~(align - 1);
  if (e > a) madvise((void*)a, e - a, advice);
}

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

// Hand whole pages of [p, p + n) back to the kernel (a read-only file mapping: they are read again on use).
static void release_pages(const uint8_t* p, int64_t n) { advise(p, n, MADV_DONTNEED); }

torch::Tensor repack(const torch::Tensor& blocks, int type, bool release) {
  QMat w = qmat_from(blocks, type, torch::Tensor());
  TORCH_CHECK(w.groups == 0, "these blocks are repacked already");
  auto out = torch::empty_like(blocks);
  const uint8_t* src = w.data;
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t groups = w.rows / GROUP, nb = w.cols / QK, group_bytes = GROUP * w.row_bytes;
  // Page faults, not the shuffle, bounded the copy (~3 s for 620 MB on a loaded machine, the same as a plain
  // clone): huge pages for the copy, and the source's page tables filled a slice at a time, not page by page.
  advise(dst, w.rows * w.row_bytes, MADV_HUGEPAGE, 2 << 20);
  // Slices of ~8 MB: pages of the source are released slice by slice, so the mapped file and the copy are
  // never both resident whole (peak RSS stays near one copy of the weights).
  const int64_t per_slice = std::max<int64_t>(1, (8 << 20) / group_bytes);
  for (int64_t g0 = 0; g0 < groups; g0 += per_slice) {
    const int64_t g1 = std::min(groups, g0 + per_slice);
    if (release) advise(src + g0 * group_bytes, (g1 - g0) * group_bytes, MADV_POPULATE_READ);
    at::parallel_for(g0, g1, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) pack_group(src + g * group_bytes, dst + g * group_bytes, w.type, nb, w.row_bytes);
    });
    if (release) release_pages(src + g0 * group_bytes, (g1 - g0) * group_bytes);
  }
  const int64_t tail = groups * group_bytes, total = w.rows * w.row_bytes;
  std::memcpy(dst + tail, src + tail, total - tail);
  if (release) release_pages(src + tail, total - tail);
  return out;
}

}  // namespace camelid
