// Quantized matrix-vector / matrix-matrix products from GGUF blocks with int8 activations.
//
// Per block of 32: Q4_0 w = d (q - 8), Q4_1 w = d q + m (q 0..15, low nibbles are values 0-15), Q8_0 w = d q8.
// With x ~= dx * qx: dot(w, x) = d dx sum(q qx) + c sx where sx = dx sum(qx) and c = -8 d (Q4_0) or m (Q4_1),
// so Q4 weights stay unsigned and feed vpdpbusd (u8 x s8) as they are; Q8_0 uses the sign trick
// (|w| x sign(x, w)). The int32 block sums become floats scaled by d dx and add up in 8 lanes; one horizontal
// sum per row. Each unpacked weight block is used for up to 8 activation rows (tokens) while it is in registers.
#include "qmatmul.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstring>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace camelid {

#if defined(__AVX512BF16__)
#define CAMELID_HAVE_DPBF16 true
#else
#define CAMELID_HAVE_DPBF16 false
#endif

static inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);  // one instruction; the portable conversion below is ~10 and runs once per block
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

void QAct::round_bf16() const {
  xb.resize(m * k);
  for (int64_t t = 0; t < m; ++t) {
    int64_t i = 0;
#if defined(__AVX512BF16__)
    for (; i + 16 <= k; i += 16)  // round to nearest even, as c10::BFloat16
      _mm256_storeu_si256((__m256i*)(xb.data() + t * k + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xf + t * ldx + i)));
#endif
    for (; i < k; ++i) xb[t * k + i] = c10::BFloat16(xf[t * ldx + i]).x;
  }
}

void QAct::quantize(const float* x, int64_t m_, int64_t k_, int64_t ldx_) {
  m = m_;
  k = k_;
  xf = x;
  ldx = ldx_;
  q.clear();  // new activations: their roundings are made again where a product needs them
  xb.clear();
}

void QAct::round_int8() const {
  const float* x = xf;
  const int64_t nb = k / QK;
  q.resize(m * k);
  d.resize(m * nb);
  s.resize(m * nb);
  at::parallel_for(0, m * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / nb, b = i % nb;
      const float* xblk = x + t * ldx + b * QK;
      float amax = 0.f;
      for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xblk[j]));
      const float dx = amax / 127.f, inv = dx ? 1.f / dx : 0.f;
      int8_t* qb = q.data() + t * k + b * QK;
      int sum = 0;
      for (int j = 0; j < QK; ++j) {
        const int v = (int)std::nearbyint(xblk[j] * inv);
        qb[j] = (int8_t)v;
        sum += v;
      }
      d[i] = dx;
      s[i] = dx * (float)sum;
    }
  });
}

#if defined(__AVX2__)
static inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  // u8 x s8 pairs never saturate here: |q| <= 15 (Q4) or |w| <= 128 with |x| <= 127 (Q8_0).
  const __m256i pairs = _mm256_maddubs_epi16(u, s);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

static inline float hsum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// Dots of one weight row with NT activation rows; out[t] = dot(row, x_t).
template <int TYPE, int NT>
static void dot_row(const uint8_t* row, int64_t nb, const QAct& x, int64_t t0, float* out) {
  __m256 acc[NT];
  float accc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps(), accc[t] = 0.f;
  const int8_t* xq[NT];
  const float* xd[NT];
  const float* xs[NT];
  for (int t = 0; t < NT; ++t) {
    xq[t] = x.q.data() + (t0 + t) * x.k;
    xd[t] = x.d.data() + (t0 + t) * nb;
    xs[t] = x.s.data() + (t0 + t) * nb;
  }
  const __m256i low = _mm256_set1_epi8(0x0F);
  constexpr int BS = TYPE == Q4_0 ? 18 : TYPE == Q4_1 ? 20 : 34;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * BS;
    const float dw = h2f(blk);
    if (TYPE == Q8_0) {
      const __m256i w = _mm256_loadu_si256((const __m256i*)(blk + 2));
      const __m256i aw = _mm256_sign_epi8(w, w);
      for (int t = 0; t < NT; ++t) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq[t] + b * QK));
        const __m256i dot = dpbusd(_mm256_setzero_si256(), aw, _mm256_sign_epi8(xv, w));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * xd[t][b]), acc[t]);
      }
    } else {
      const __m128i packed = _mm_loadu_si128((const __m128i*)(blk + (TYPE == Q4_0 ? 2 : 4)));
      const __m256i w = _mm256_and_si256(
          _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low);
      const float c = TYPE == Q4_0 ? -8.f * dw : h2f(blk + 2);
      for (int t = 0; t < NT; ++t) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq[t] + b * QK));
        const __m256i dot = dpbusd(_mm256_setzero_si256(), w, xv);
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * xd[t][b]), acc[t]);
        accc[t] += c * xs[t][b];
      }
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]) + accc[t];
}

// One row against one activation row (the decode case). The scaled accumulate of a block is a float FMA whose
// 4-cycle latency, not the arithmetic, bounded the one-accumulator loop (~1 ns per block): four independent
// accumulators, one per block of a group of four, keep the FMA units busy.
template <int TYPE>
static inline __m256i block_dot(const uint8_t* blk, const int8_t* xq, __m256i low) {
  const __m256i xv = _mm256_loadu_si256((const __m256i*)xq);
  if (TYPE == Q8_0) {
    const __m256i w = _mm256_loadu_si256((const __m256i*)(blk + 2));
    return dpbusd(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
  }
  const __m128i packed = _mm_loadu_si128((const __m128i*)(blk + (TYPE == Q4_0 ? 2 : 4)));
  const __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low);
  return dpbusd(_mm256_setzero_si256(), w, xv);
}

template <int TYPE>
static float dot_row_1(const uint8_t* row, int64_t nb, const int8_t* xq, const float* xd, const float* xs) {
  constexpr int BS = TYPE == Q4_0 ? 18 : TYPE == Q4_1 ? 20 : 34;
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  float accc[4] = {0.f, 0.f, 0.f, 0.f};
  int64_t b = 0;
  auto one = [&](int64_t i, int k) {
    const uint8_t* blk = row + i * BS;
    const float d = h2f(blk);
    const __m256i dot = block_dot<TYPE>(blk, xq + i * QK, low);
    acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * xd[i]), acc[k]);
    if (TYPE != Q8_0) accc[k] += (TYPE == Q4_0 ? -8.f * d : h2f(blk + 2)) * xs[i];
  };
  for (; b + 4 <= nb; b += 4) {
    one(b, 0);
    one(b + 1, 1);
    one(b + 2, 2);
    one(b + 3, 3);
  }
  for (int k = 0; b < nb; ++b, ++k) one(b, k);
  const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  return hsum(sum) + (accc[0] + accc[1]) + (accc[2] + accc[3]);
}
#define CAMELID_DOT_ROW_1 1

// Dots of one repacked group (8 rows, see repack.cpp) with NT activation rows: out[t * 8 + j] = dot(row j, x_t).
// Per block: 4 loads give the 8 chunks of all 8 rows (Q4; 8 loads for Q8_0), each multiplied by a broadcast
// 4-byte chunk of the activations; lane j of the int32 sums is row j, so no horizontal sums and one float
// scale per 8 row-blocks. The weights are unpacked once per block for all NT activation rows.
template <int TYPE, int NT>
static void dot_group(const uint8_t* grp, int64_t nb, const QAct& x, int64_t t0, float* out) {
  constexpr int BS = TYPE == Q4_0 ? 18 : TYPE == Q4_1 ? 20 : 34;
  constexpr int GBS = GROUP * BS, HDR = TYPE == Q4_1 ? 32 : 16;
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[NT], accm[NT];
  const int8_t* xq[NT];
  const float* xd[NT];
  const float* xs[NT];
  for (int t = 0; t < NT; ++t) {
    acc[t] = _mm256_setzero_ps(), accm[t] = _mm256_setzero_ps();
    xq[t] = x.q.data() + (t0 + t) * x.k;
    xd[t] = x.d.data() + (t0 + t) * nb;
    xs[t] = x.s.data() + (t0 + t) * nb;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = grp + b * GBS;
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)blk));
    const uint8_t* qs = blk + HDR;
    __m256i wv[8], sw[8];
    if (TYPE == Q8_0) {
      for (int c = 0; c < 8; ++c) {
        sw[c] = _mm256_loadu_si256((const __m256i*)(qs + 32 * c));
        wv[c] = _mm256_sign_epi8(sw[c], sw[c]);  // |w| as u8; the sign moves onto the activations
      }
    } else {
      for (int L = 0; L < 4; ++L) {
        const __m256i raw = _mm256_loadu_si256((const __m256i*)(qs + 32 * L));
        wv[2 * L] = _mm256_and_si256(raw, low);
        wv[2 * L + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
      }
    }
    for (int t = 0; t < NT; ++t) {
      const int8_t* xb = xq[t] + b * QK;
      __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
      for (int c = 0; c < 8; c += 2) {
        int32_t c0, c1;
        std::memcpy(&c0, xb + 4 * c, 4);
        std::memcpy(&c1, xb + 4 * c + 4, 4);
        __m256i x0 = _mm256_set1_epi32(c0), x1 = _mm256_set1_epi32(c1);
        if (TYPE == Q8_0) x0 = _mm256_sign_epi8(x0, sw[c]), x1 = _mm256_sign_epi8(x1, sw[c + 1]);
        a0 = dpbusd(a0, wv[c], x0);
        a1 = dpbusd(a1, wv[c + 1], x1);
      }
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(a0, a1));
      if (TYPE == Q4_0) {  // d (dx dot - 8 sx)
        acc[t] = _mm256_fmadd_ps(_mm256_fmadd_ps(dot, _mm256_set1_ps(xd[t][b]), _mm256_set1_ps(-8.f * xs[t][b])), dw, acc[t]);
      } else {
        acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dot, _mm256_set1_ps(xd[t][b])), dw, acc[t]);
        if (TYPE == Q4_1)
          accm[t] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(blk + 16))),
                                    _mm256_set1_ps(xs[t][b]), accm[t]);
      }
    }
  }
  for (int t = 0; t < NT; ++t) _mm256_storeu_ps(out + 8 * t, _mm256_add_ps(acc[t], accm[t]));
}
#else
template <int TYPE, int NT>
static void dot_row(const uint8_t* row, int64_t nb, const QAct& x, int64_t t0, float* out) {
  constexpr int BS = TYPE == Q4_0 ? 18 : TYPE == Q4_1 ? 20 : 34;
  for (int t = 0; t < NT; ++t) {
    const int8_t* xq = x.q.data() + (t0 + t) * x.k;
    const float* xd = x.d.data() + (t0 + t) * nb;
    const float* xs = x.s.data() + (t0 + t) * nb;
    float total = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * BS;
      const float dw = h2f(blk);
      int sum = 0;
      if (TYPE == Q8_0) {
        for (int j = 0; j < QK; ++j) sum += (int)(int8_t)blk[2 + j] * xq[b * QK + j];
        total += dw * xd[b] * (float)sum;
      } else {
        const uint8_t* p = blk + (TYPE == Q4_0 ? 2 : 4);
        for (int j = 0; j < 16; ++j) sum += (p[j] & 15) * xq[b * QK + j] + (p[j] >> 4) * xq[b * QK + 16 + j];
        const float c = TYPE == Q4_0 ? -8.f * dw : h2f(blk + 2);
        total += dw * xd[b] * (float)sum + c * xs[b];
      }
    }
    out[t] = total;
  }
}
#endif

// Float rows (BF16 / F32) against up to 4 activation rows at a time: each 64-byte load of weights serves them
// all; two accumulators per activation row hide the multiply-add latency. bf16: both operands bfloat16 with float
// sums (vdpbf16ps), as llama.cpp's BF16 path; f32: exact float products. Elsewhere (and for the k % 64 or % 32
// tail) the same sums in scalar code. (Tried and measured slower on a 49152 x 576 bf16 matrix: four rows per
// pass, for more reads in flight, 16 vs 23 GB/s; prefetching the row 4 ahead, 32 vs 35 GB/s.)
template <int TYPE>
static void float_rows(const QMat& w, int64_t r0, int64_t r1, const QAct& x, float* y, int64_t ldy, int64_t off) {
  const int64_t k = w.cols;
  for (int64_t t0 = 0; t0 < x.m; t0 += 4) {
    const int nt = (int)std::min<int64_t>(4, x.m - t0);
    for (int64_t r = r0; r < r1; ++r) {
      float out[4] = {0.f, 0.f, 0.f, 0.f};
      int64_t i = 0;
#if defined(__AVX512F__)
      constexpr int STEP = TYPE == BF16 ? 32 : 16;
      if (TYPE == F32 || CAMELID_HAVE_DPBF16) {
        __m512 acc[4][2];
        for (int t = 0; t < 4; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
        for (; i + 2 * STEP <= k; i += 2 * STEP) {
          for (int u = 0; u < 2; ++u) {
            const int64_t at = i + u * STEP;
            if (TYPE == BF16) {
#if defined(__AVX512BF16__)
              const __m512i wv = _mm512_loadu_si512((const void*)(w.data + (r * k + at) * 2));
              for (int t = 0; t < nt; ++t) {
                const __m512i xv = _mm512_loadu_si512((const void*)(x.xb.data() + (t0 + t) * k + at));
                acc[t][u] = _mm512_dpbf16_ps(acc[t][u], (__m512bh)xv, (__m512bh)wv);
              }
#endif
            } else {
              const __m512 wv = _mm512_loadu_ps((const float*)w.data + r * k + at);
              for (int t = 0; t < nt; ++t)
                acc[t][u] = _mm512_fmadd_ps(_mm512_loadu_ps(x.xf + (t0 + t) * x.ldx + at), wv, acc[t][u]);
            }
          }
        }
        for (int t = 0; t < nt; ++t) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
      }
#endif
      for (; i < k; ++i) {
        for (int t = 0; t < nt; ++t) {
          if (TYPE == BF16) {
            uint16_t wb;
            std::memcpy(&wb, w.data + (r * k + i) * 2, 2);
            out[t] += c10::detail::f32_from_bits(wb) * c10::detail::f32_from_bits(x.xb[(t0 + t) * k + i]);
          } else {
            out[t] += ((const float*)w.data)[r * k + i] * x.xf[(t0 + t) * x.ldx + i];
          }
        }
      }
      const int64_t col = off + (w.perm ? w.perm[r] : r);
      for (int t = 0; t < nt; ++t) y[(t0 + t) * ldy + col] = out[t];
    }
  }
}

template <int TYPE>
static void rows_tile(const QMat& w, int64_t r0, int64_t r1, const QAct& x, float* y, int64_t ldy, int64_t off) {
  const int64_t nb = w.cols / QK;
  float out[8 * 4];
  for (int64_t t0 = 0; t0 < x.m; t0 += 8) {
    const int64_t nt = std::min<int64_t>(8, x.m - t0);
    int64_t r = r0;
#ifdef CAMELID_DOT_ROW_1
    // Repacked groups (tiles start on a group: qgemm cuts each matrix at multiples of 8 rows).
    for (; r + GROUP <= r1 && r < w.groups * GROUP; r += GROUP) {
      const uint8_t* grp = w.data + r * w.row_bytes;
      for (int64_t t = 0; t < nt; t += 4) {
        const int64_t n = std::min<int64_t>(4, nt - t);
        switch (n) {
          case 1: dot_group<TYPE, 1>(grp, nb, x, t0 + t, out); break;
          case 2: dot_group<TYPE, 2>(grp, nb, x, t0 + t, out); break;
          case 3: dot_group<TYPE, 3>(grp, nb, x, t0 + t, out); break;
          default: dot_group<TYPE, 4>(grp, nb, x, t0 + t, out); break;
        }
        for (int64_t j = 0; j < GROUP; ++j) {
          const int64_t col = off + (w.perm ? w.perm[r + j] : r + j);
          for (int64_t u = 0; u < n; ++u) y[(t0 + t + u) * ldy + col] = out[u * 8 + j];
        }
      }
    }
#endif
    TORCH_CHECK(r >= w.groups * GROUP || r >= r1, "a repacked group split between tiles");
    for (; r < r1; ++r) {
      const uint8_t* row = w.data + r * w.row_bytes;
      switch (nt) {
#ifdef CAMELID_DOT_ROW_1
        case 1:
          out[0] = dot_row_1<TYPE>(row, nb, x.q.data() + t0 * x.k, x.d.data() + t0 * nb, x.s.data() + t0 * nb);
          break;
#else
        case 1: dot_row<TYPE, 1>(row, nb, x, t0, out); break;
#endif
        case 2: dot_row<TYPE, 2>(row, nb, x, t0, out); break;
        case 3: dot_row<TYPE, 3>(row, nb, x, t0, out); break;
        case 4: dot_row<TYPE, 4>(row, nb, x, t0, out); break;
        case 5: dot_row<TYPE, 5>(row, nb, x, t0, out); break;
        case 6: dot_row<TYPE, 6>(row, nb, x, t0, out); break;
        case 7: dot_row<TYPE, 7>(row, nb, x, t0, out); break;
        default: dot_row<TYPE, 8>(row, nb, x, t0, out); break;
      }
      const int64_t col = off + (w.perm ? w.perm[r] : r);
      for (int64_t t = 0; t < nt; ++t) y[(t0 + t) * ldy + col] = out[t];
    }
  }
}

void qgemm(const std::vector<QMat>& mats, const QAct& x, float* y, int64_t ldy) {
  // Work items of 16 rows, cut per matrix (so a repacked group of 8 is never split): a tile's weights
  // (<= 16 x row_bytes) stay in L1/L2 while every token passes over them.
  constexpr int64_t TILE = 16;
  // Prefill-sized: the repacked groups through the tile kernel (gemm.cpp), only the rows % 8 left here.
  bool any_groups = false, any_bf16 = false, any_blocks = false;
  for (const QMat& w : mats) {
    any_groups |= !is_float(w.type) && w.rows >= GROUP;
    any_bf16 |= w.type == BF16;
    any_blocks |= !is_float(w.type);
  }
  if (any_bf16 && x.xb.empty()) x.round_bf16();
  if (any_blocks && x.q.empty()) x.round_int8();
  const bool tiled = x.m >= GEMM_ROWS && any_groups && qgemm_groups(mats, x, y, ldy);
  struct Item { int32_t mat; int64_t r0, r1, off; };
  std::vector<Item> items;
  int64_t off = 0;
  for (size_t i = 0; i < mats.size(); ++i) {
    for (int64_t r = tiled && !is_float(mats[i].type) ? mats[i].rows / GROUP * GROUP : 0; r < mats[i].rows; r += TILE)
      items.push_back({(int32_t)i, r, std::min(mats[i].rows, r + TILE), off});
    off += mats[i].rows;
  }
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const Item& it = items[k];
      const QMat& w = mats[it.mat];
      if (w.type == BF16) float_rows<BF16>(w, it.r0, it.r1, x, y, ldy, it.off);
      else if (w.type == F32) float_rows<F32>(w, it.r0, it.r1, x, y, ldy, it.off);
      else if (w.type == Q4_0) rows_tile<Q4_0>(w, it.r0, it.r1, x, y, ldy, it.off);
      else if (w.type == Q4_1) rows_tile<Q4_1>(w, it.r0, it.r1, x, y, ldy, it.off);
      else rows_tile<Q8_0>(w, it.r0, it.r1, x, y, ldy, it.off);
    }
  });
}

// Rows r0..r1 of a block matrix as bfloat16 (the prefill path's weight tile).
void dequantize_bf16(const QMat& w, int64_t r0, int64_t r1, at::BFloat16* out) {
  const int64_t nb = w.cols / QK;
  const int bs = block_bytes(w.type);
  at::parallel_for(r0, r1, 16, [&](int64_t begin, int64_t end) {
    float tmp[QK];
    uint8_t plain[36];
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* row = w.data + r * w.row_bytes;
      const bool packed = r < w.groups * GROUP;
      at::BFloat16* o = out + (r - r0) * w.cols;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = packed ? row_block(w, r, b, plain) : row + b * bs;
        const float d = h2f(blk);
        const float m = w.type == Q8_0 ? 0.f : w.type == Q4_0 ? -8.f * d : h2f(blk + 2);
#if defined(__AVX512F__) && defined(__AVX512BF16__)
        // 32 values: bytes -> int32 -> float (x d + m) -> bfloat16 with round-to-nearest-even, 16 at a time.
        __m512i lo, hi;
        if (w.type == Q8_0) {
          lo = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 2)));
          hi = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 18)));
        } else {
          const __m128i p = _mm_loadu_si128((const __m128i*)(blk + (w.type == Q4_0 ? 2 : 4)));
          const __m128i mask = _mm_set1_epi8(0x0F);
          lo = _mm512_cvtepu8_epi32(_mm_and_si128(p, mask));
          hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(p, 4), mask));
        }
        const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(m);
        const __m512 flo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), vd, vm);
        const __m512 fhi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), vd, vm);
        _mm512_storeu_si512((void*)(o + b * QK), (__m512i)_mm512_cvtne2ps_pbh(fhi, flo));
#else
        if (w.type == Q8_0) {
          for (int j = 0; j < QK; ++j) tmp[j] = d * (float)(int8_t)blk[2 + j];
        } else {
          const uint8_t* p = blk + (w.type == Q4_0 ? 2 : 4);
          for (int j = 0; j < 16; ++j) {
            tmp[j] = d * (float)(p[j] & 15) + m;
            tmp[j + 16] = d * (float)(p[j] >> 4) + m;
          }
        }
        for (int j = 0; j < QK; ++j) o[b * QK + j] = at::BFloat16(tmp[j]);
#endif
      }
    }
  });
}

QMat qmat_from(const torch::Tensor& blocks, int type, const torch::Tensor& perm) {
  TORCH_CHECK(blocks.dtype() == torch::kUInt8 && blocks.dim() == 2 && blocks.is_contiguous(),
              "blocks must be a contiguous uint8 (rows, bytes) tensor");
  TORCH_CHECK(type >= 0 && type <= F32, "unknown block type");
  QMat w;
  w.data = blocks.data_ptr<uint8_t>();
  w.type = is_float(type) ? type : type % PACKED;
  w.rows = blocks.size(0);
  w.row_bytes = blocks.size(1);
  TORCH_CHECK(w.row_bytes % block_bytes(type) == 0, "row bytes not a whole number of blocks");
  w.cols = w.row_bytes / block_bytes(type) * QK;
#ifdef CAMELID_DOT_ROW_1
  if (type >= PACKED && !is_float(type)) w.groups = w.rows / GROUP;
#else
  TORCH_CHECK(type < PACKED || is_float(type), "repacked blocks need the AVX2 build");
#endif
  if (perm.defined() && perm.numel()) {
    TORCH_CHECK(perm.dtype() == torch::kInt64 && perm.numel() == w.rows, "perm must be int64 of one entry per row");
    w.perm = perm.data_ptr<int64_t>();
  }
  return w;
}

}  // namespace camelid
