// Prefill-sized products (AVX512-VNNI): 8 weight rows x 16 activation rows per step, the int8 arithmetic of the
// decode kernels (same activation rounding, exact int32 block sums, the same float operations in the same order),
// so a prompt's prefill and its decode agree bit for bit and a near tie does not flip between them.
//
// Lanes are tokens: a 64-byte vector holds the same 4-value chunk of 16 tokens (activations + 128 as u8), and
// each weight row's chunk is a 4-byte broadcast from memory (vpdpbusd's embedded broadcast, s8). The repacked
// Q8_0 layout already stores chunk c of row j at byte 32c + 4j of a group block; repacked Q4 blocks have their
// nibbles split into that order, and plain rows are gathered into it, once per group into a small scratch that
// every token tile reuses. With u = x + 128:
//   dot(w, x) = dot(u, w) - 128 sum(w)
// so each row's int32 sum starts at -128 sum(w) (precomputed per block) and ends exact.
#include <ATen/Parallel.h>

#include <cstring>

#include "qmatmul.h"
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace camelid {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr int LANES = 16;  // tokens per tile

// The activations in tile form: chunk c of block b of tile t is 64 bytes at ((t nb + b) 8 + c) 64, token u of the
// tile in bytes 4u..4u+3; dx, sx (and -8 sx for Q4_0) per (tile, block) as 16 floats. Padding tokens are x = 0.
struct Tiles {
  std::vector<uint8_t> u;
  std::vector<float> dx, sx;
  int64_t tiles = 0, nb = 0;
  explicit Tiles(const QAct& x) : tiles((x.m + LANES - 1) / LANES), nb(x.k / QK) {
    u.assign(tiles * nb * 8 * 64, 0x80);
    dx.assign(tiles * nb * LANES, 0.f);
    sx.assign(tiles * nb * LANES, 0.f);
    at::parallel_for(0, x.m, 4, [&](int64_t begin, int64_t end) {
      for (int64_t tok = begin; tok < end; ++tok) {
        const int64_t t = tok / LANES, lane = tok % LANES;
        const int8_t* q = x.q.data() + tok * x.k;
        for (int64_t b = 0; b < nb; ++b) {
          for (int c = 0; c < 8; ++c) {
            uint32_t w;
            std::memcpy(&w, q + b * QK + 4 * c, 4);
            w ^= 0x80808080u;  // s8 -> u8 + 128
            std::memcpy(&u[((t * nb + b) * 8 + c) * 64 + 4 * lane], &w, 4);
          }
          dx[(t * nb + b) * LANES + lane] = x.d[tok * nb + b];
          sx[(t * nb + b) * LANES + lane] = x.s[tok * nb + b];
        }
      }
    });
  }
};

// Per group, what the microkernel reads for block b: chunk words (256 bytes, row j chunk c at 32c + 4j),
// -128 sum(w) per row, and the rows' scales (and Q4_1 minimums) as floats.
struct GroupScratch {
  std::vector<uint8_t> words;
  std::vector<int32_t> corr;
  std::vector<float> d, m;
};

// Rows 8g..8g+7 in the file's own layout -> the chunk words of block b (Q4: nibbles split; value i low, 16+i
// high in byte i), the scales and minimums.
// Q8_0: the 8 rows' 32 bytes are an 8 x 8 matrix of 4-byte words; its transpose is the chunk order.
static inline void transpose_words(const uint8_t* const rows[8], int64_t at, uint8_t* out) {
  __m256i r[8], t[8], u[8];
  for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_si256((const __m256i*)(rows[j] + at));
  for (int j = 0; j < 8; j += 2) t[j] = _mm256_unpacklo_epi32(r[j], r[j + 1]), t[j + 1] = _mm256_unpackhi_epi32(r[j], r[j + 1]);
  for (int h = 0; h < 8; h += 4) {  // words 0/4, 1/5, 2/6, 3/7 of rows h..h+3
    u[h] = _mm256_unpacklo_epi64(t[h], t[h + 2]);
    u[h + 1] = _mm256_unpackhi_epi64(t[h], t[h + 2]);
    u[h + 2] = _mm256_unpacklo_epi64(t[h + 1], t[h + 3]);
    u[h + 3] = _mm256_unpackhi_epi64(t[h + 1], t[h + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_si256((__m256i*)(out + 32 * c), _mm256_permute2x128_si256(u[c], u[c + 4], 0x20));
    _mm256_storeu_si256((__m256i*)(out + 32 * (c + 4)), _mm256_permute2x128_si256(u[c], u[c + 4], 0x31));
  }
}

template <int TYPE>
static void gather_plain(const QMat& w, int64_t g, int64_t b, GroupScratch& s) {
  constexpr int BS = TYPE == Q4_0 ? 18 : TYPE == Q4_1 ? 20 : 34;
  uint8_t* out = s.words.data() + b * 256;
  if (TYPE == Q8_0) {
    const uint8_t* rows[8];
    for (int j = 0; j < GROUP; ++j) rows[j] = w.data + (g * GROUP + j) * w.row_bytes + b * BS;
    for (int j = 0; j < GROUP; ++j) s.d[b * 8 + j] = _cvtsh_ss(*(const uint16_t*)rows[j]);
    transpose_words(rows, 2, out);
    return;
  }
  for (int j = 0; j < GROUP; ++j) {
    const uint8_t* blk = w.data + (g * GROUP + j) * w.row_bytes + b * BS;
    uint16_t h[2];
    std::memcpy(h, blk, TYPE == Q4_1 ? 4 : 2);
    s.d[b * 8 + j] = _cvtsh_ss(h[0]);
    if (TYPE == Q4_1) s.m[b * 8 + j] = _cvtsh_ss(h[1]);
    for (int c = 0; c < 8; ++c) {
      uint32_t v;
      if (TYPE == Q8_0) {
        std::memcpy(&v, blk + 2 + 4 * c, 4);
      } else {
        std::memcpy(&v, blk + (TYPE == Q4_0 ? 2 : 4) + 4 * (c % 4), 4);
        v = (c < 4 ? v : v >> 4) & 0x0F0F0F0Fu;
      }
      std::memcpy(out + 32 * c + 4 * j, &v, 4);
    }
  }
}

// Fills the scratch of group g: repacked Q8_0 blocks are read in place (their words are already in this order),
// repacked Q4 blocks have their nibbles split, plain rows are gathered.
template <int TYPE>
static void prepare_group(const QMat& w, int64_t g, GroupScratch& s) {
  constexpr int BS = TYPE == Q4_0 ? 18 : TYPE == Q4_1 ? 20 : 34;
  constexpr int HDR = TYPE == Q4_1 ? 32 : 16;
  const int64_t nb = w.cols / QK;
  const bool packed = g < w.groups;
  s.corr.resize(nb * 8);
  s.d.resize(nb * 8);
  if (TYPE == Q4_1) s.m.resize(nb * 8);
  s.words.resize(nb * 256);
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi8(1);
  const uint8_t* grp = w.data + g * GROUP * w.row_bytes;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = grp + b * GROUP * BS;
    const uint8_t* words = s.words.data() + b * 256;
    if (!packed) {
      gather_plain<TYPE>(w, g, b, s);
    } else {
      _mm256_storeu_ps(&s.d[b * 8], _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)blk)));
      if (TYPE == Q4_1) _mm256_storeu_ps(&s.m[b * 8], _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(blk + 16))));
      if (TYPE == Q8_0) words = blk + HDR;
      for (int L = 0; L < 4 && TYPE != Q8_0; ++L) {
        const __m256i raw = _mm256_loadu_si256((const __m256i*)(blk + HDR + 32 * L));
        _mm256_storeu_si256((__m256i*)&s.words[b * 256 + 64 * L], _mm256_and_si256(raw, low));
        _mm256_storeu_si256((__m256i*)&s.words[b * 256 + 64 * L + 32], _mm256_and_si256(_mm256_srli_epi16(raw, 4), low));
      }
    }
    __m256i sum = _mm256_setzero_si256();  // lane j: the sum of row j's 32 values (s8)
    for (int c = 0; c < 8; ++c) sum = _mm256_dpbusd_epi32(sum, ones, _mm256_loadu_si256((const __m256i*)(words + 32 * c)));
    _mm256_storeu_si256((__m256i*)&s.corr[b * 8], _mm256_slli_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), sum), 7));
  }
}

// One group (8 rows) against tile t: out[j * 16 + u] = dot(row j, token u of the tile).
template <int TYPE>
static void group_tile(const uint8_t* grp, bool packed, int64_t nb, const GroupScratch& s, const Tiles& x, int64_t t,
                       float* out) {
  constexpr int BS = TYPE == Q4_0 ? 18 : TYPE == Q4_1 ? 20 : 34;
  // Q4_1's minimum terms add up apart and join at the end, as the decode kernel's do: the same float operations
  // in the same order, so a row's result here equals the decode kernel's bit for bit.
  __m512 acc[8], accm[8];
  for (int j = 0; j < 8; ++j) acc[j] = accm[j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* words = TYPE == Q8_0 && packed ? grp + b * GROUP * BS + 16 : s.words.data() + b * 256;
    const uint8_t* xu = x.u.data() + (t * nb + b) * 8 * 64;
    const int32_t* corr = s.corr.data() + b * 8;
    __m512i dot[8];
    for (int j = 0; j < 8; ++j) dot[j] = _mm512_set1_epi32(corr[j]);
    for (int c = 0; c < 8; ++c) {
      const __m512i a = _mm512_loadu_si512((const void*)(xu + 64 * c));
      for (int j = 0; j < 8; ++j) {
        int32_t w;
        std::memcpy(&w, words + 32 * c + 4 * j, 4);
        dot[j] = _mm512_dpbusd_epi32(dot[j], a, _mm512_set1_epi32(w));
      }
    }
    const __m512 dx = _mm512_loadu_ps(&x.dx[(t * nb + b) * LANES]);
    const __m512 sx = _mm512_loadu_ps(&x.sx[(t * nb + b) * LANES]);
    const __m512 m8sx = _mm512_mul_ps(sx, _mm512_set1_ps(-8.f));
    const float* d = s.d.data() + b * 8;
    for (int j = 0; j < 8; ++j) {
      const __m512 f = _mm512_cvtepi32_ps(dot[j]);
      if (TYPE == Q4_0) {
        acc[j] = _mm512_fmadd_ps(_mm512_fmadd_ps(f, dx, m8sx), _mm512_set1_ps(d[j]), acc[j]);
      } else {
        acc[j] = _mm512_fmadd_ps(_mm512_mul_ps(f, dx), _mm512_set1_ps(d[j]), acc[j]);
        if (TYPE == Q4_1) accm[j] = _mm512_fmadd_ps(_mm512_set1_ps(s.m[b * 8 + j]), sx, accm[j]);
      }
    }
  }
  for (int j = 0; j < 8; ++j) _mm512_storeu_ps(out + j * LANES, _mm512_add_ps(acc[j], accm[j]));
}

template <int TYPE>
static void run_groups(const QMat& w, int64_t g0, int64_t g1, const Tiles& x, int64_t m, float* y, int64_t ldy,
                       int64_t off) {
  thread_local GroupScratch scratch;
  const int64_t nb = w.cols / QK;
  alignas(64) float out[8 * LANES];
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* grp = w.data + g * GROUP * w.row_bytes;
    prepare_group<TYPE>(w, g, scratch);
    for (int64_t t = 0; t < x.tiles; ++t) {
      group_tile<TYPE>(grp, g < w.groups, nb, scratch, x, t, out);
      const int64_t n = std::min<int64_t>(LANES, m - t * LANES);
      for (int j = 0; j < 8; ++j) {
        const int64_t r = g * GROUP + j, col = off + (w.perm ? w.perm[r] : r);
        for (int64_t u = 0; u < n; ++u) y[(t * LANES + u) * ldy + col] = out[j * LANES + u];
      }
    }
  }
}

bool qgemm_groups(const std::vector<QMat>& mats, const QAct& x, float* y, int64_t ldy) {
  const Tiles tiles(x);
  // Work items of 2 groups (16 rows): enough items for every thread, and a group's scratch stays in L1.
  struct Item { int32_t mat; int64_t g0, g1, off; };
  std::vector<Item> items;
  int64_t off = 0;
  for (size_t i = 0; i < mats.size(); ++i) {
    // repacked or not: plain rows are gathered group by group (float matrices are left to the caller)
    const int64_t groups = is_float(mats[i].type) ? 0 : mats[i].rows / GROUP;
    for (int64_t g = 0; g < groups; g += 2) items.push_back({(int32_t)i, g, std::min(groups, g + 2), off});
    off += mats[i].rows;
  }
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const Item& it = items[k];
      const QMat& w = mats[it.mat];
      if (w.type == Q4_0) run_groups<Q4_0>(w, it.g0, it.g1, tiles, x.m, y, ldy, it.off);
      else if (w.type == Q4_1) run_groups<Q4_1>(w, it.g0, it.g1, tiles, x.m, y, ldy, it.off);
      else run_groups<Q8_0>(w, it.g0, it.g1, tiles, x.m, y, ldy, it.off);
    }
  });
  return true;
}
bool has_tile_kernel() { return true; }
#else
bool qgemm_groups(const std::vector<QMat>&, const QAct&, float*, int64_t) { return false; }
bool has_tile_kernel() { return false; }
#endif

}  // namespace camelid
