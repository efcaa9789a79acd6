// y = x W^T for a few rows of x, W held as `_convert_weight_to_int4pack_for_cpu` packs it (see kernel.py).
//
// Operands, as QuantizedLinear holds them:
//   x             bfloat16 [rows, positions], already laid out by `expand`
//   packed        uint8 [out / 64, positions, 32]: per 64-row block and kernel position, byte j holds
//                 row j (low nibble) and row j + 32 (high nibble), level q in [0, 16)
//   scales_zeros  bfloat16 [groups, out, 2] (any 16-bit dtype): scale S and zero Z per 32 positions
// y_n = sum_g (S_ng sum_{p in g} x_p (q_np - 8) + Z_ng sum_{p in g} x_p), as aten's kernel defines it.
//
// Why it is faster than aten's kernel for 1-95 rows: a 64-row block's group (32 positions) is unpacked
// ONCE per call into bfloat16 pairs (4 KiB, in L1), then every row multiplies it with vdpbf16ps (two
// positions a lane); aten's unpacks the weight again for every 4 rows. q - 8 is exact in bfloat16 and
// the products are exact in float32, so a row's sum is float32 accumulation in a fixed order: it never
// depends on how many rows the call has (batched == alone), only the tiling of rows into registers does.
// Needs AVX-512 F/BW/BF16; no AMX (kernel.py checks the CPU before loading this).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

namespace {
constexpr int64_t kBlock = 64, kGroup = 32, kPairs = kGroup / 2, kTile = 4;

// word q (q < 16): the bfloat16 bits of q - 8
const __m512i kLevels = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040, 0x4000, 0x3f80, 0x0000,
    0xbf80, 0xc000, 0xc040, 0xc080, 0xc0a0, 0xc0c0, 0xc0e0, 0xc100);
// interleave words a_i, b_i for i in [0, 16) (first) or [16, 32) (second)
const __m512i kFirst = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
const __m512i kSecond = _mm512_add_epi16(kFirst, _mm512_set1_epi16(16));

// One group of a block as bfloat16 pairs: pairs[4 p + t] holds rows 16 t .. 16 t + 15, each as
// (w at position k0 + 2 p, w at k0 + 2 p + 1), the operand layout of vdpbf16ps.
void unpack_group(const uint8_t* block, int64_t k0, __m512i* pairs) {
  const __m512i nibble = _mm512_set1_epi16(15);
  for (int64_t p = 0; p < kPairs; ++p) {
    const uint8_t* at = block + (k0 + 2 * p) * 32;
    _mm_prefetch(reinterpret_cast<const char*>(at) + 2048, _MM_HINT_T0);   // the weight streams from DRAM
    __m512i a = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)));
    __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + 32)));
    __m512i a_low = _mm512_permutexvar_epi16(_mm512_and_si512(a, nibble), kLevels);
    __m512i b_low = _mm512_permutexvar_epi16(_mm512_and_si512(b, nibble), kLevels);
    __m512i a_high = _mm512_permutexvar_epi16(_mm512_srli_epi16(a, 4), kLevels);
    __m512i b_high = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), kLevels);
    pairs[4 * p + 0] = _mm512_permutex2var_epi16(a_low, kFirst, b_low);
    pairs[4 * p + 1] = _mm512_permutex2var_epi16(a_low, kSecond, b_low);
    pairs[4 * p + 2] = _mm512_permutex2var_epi16(a_high, kFirst, b_high);
    pairs[4 * p + 3] = _mm512_permutex2var_epi16(a_high, kSecond, b_high);
  }
}

struct Group {
  const __m512i* pairs;     // unpack_group's output
  __m512 scales[4], zeros[4];
  int64_t k0, groups, positions;
};

// totals[r][0..64) += S * sum x (q - 8) + Z * sum x over one group, for Rows rows of x from `x`
template <int Rows>
void multiply_group(const Group& group, const uint16_t* x, const float* sums, float* totals) {
  __m512 acc[Rows][4];
  for (int r = 0; r < Rows; ++r)
    for (int t = 0; t < 4; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kPairs; ++p) {
    for (int r = 0; r < Rows; ++r) {
      const uint16_t* pair = x + r * group.positions + group.k0 + 2 * p;
      __m512bh inputs = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(pair));
      for (int t = 0; t < 4; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)group.pairs[4 * p + t], inputs);
    }
  }
  for (int r = 0; r < Rows; ++r) {
    __m512 sum = _mm512_set1_ps(sums[r * group.groups]);
    for (int t = 0; t < 4; ++t) {
      float* total = totals + r * kBlock + 16 * t;
      __m512 value = _mm512_fmadd_ps(acc[r][t], group.scales[t], _mm512_loadu_ps(total));
      _mm512_storeu_ps(total, _mm512_fmadd_ps(sum, group.zeros[t], value));
    }
  }
}

template <int Rows>
void multiply_rows(const Group& group, const uint16_t* x, const float* sums, float* totals, int64_t from) {
  multiply_group<Rows>(group, x + from * group.positions, sums + from * group.groups, totals + from * kBlock);
}

// S and Z of rows [n0, n0 + 64) for group g, from their bfloat16 (S, Z) pairs
void load_scales(const int32_t* scales_zeros, int64_t out_features, int64_t g, int64_t n0, Group& group) {
  for (int t = 0; t < 4; ++t) {
    __m512i both = _mm512_loadu_si512(scales_zeros + g * out_features + n0 + 16 * t);
    group.scales[t] = _mm512_castsi512_ps(_mm512_slli_epi32(both, 16));
    group.zeros[t] = _mm512_castsi512_ps(_mm512_and_si512(both, _mm512_set1_epi32(0xffff0000)));
  }
  if (g + 1 < group.groups) {      // the next group's scales: 4 lines a stride of out_features away
    const char* next = reinterpret_cast<const char*>(scales_zeros + (g + 1) * out_features + n0);
    for (int line = 0; line < 4; ++line) _mm_prefetch(next + 64 * line, _MM_HINT_T0);
  }
}

// sum x over each group of 32 positions, in float32 (two 16-lane halves, added lane by lane, then
// the lanes in the order _mm512_reduce_add_ps adds them), here rather than as three ATen ops a call
std::vector<float> group_sums(const uint16_t* x, int64_t count) {
  std::vector<float> sums(count);
  for (int64_t i = 0; i < count; ++i) {
    const uint16_t* at = x + i * kGroup;
    __m512 low = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)at)), 16));
    __m512 high = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(at + 16))), 16));
    sums[i] = _mm512_reduce_add_ps(_mm512_add_ps(low, high));
  }
  return sums;
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: contiguous bf16 [rows, positions]");
  const int64_t rows = x.size(0), positions = x.size(1), groups = positions / kGroup;
  const int64_t out_features = scales_zeros.size(1);
  TORCH_CHECK(positions % kGroup == 0 && out_features % kBlock == 0 && scales_zeros.size(0) == groups &&
              scales_zeros.element_size() == 2 && scales_zeros.is_contiguous() && packed.is_contiguous() &&
              packed.numel() == out_features * positions / 2, "operands do not match");
  at::Tensor out = at::empty({rows, out_features}, x.options());
  const auto* inputs = reinterpret_cast<const uint16_t*>(x.data_ptr());
  std::vector<float> sums = group_sums(inputs, rows * groups);
  const auto* weights = packed.data_ptr<uint8_t>();
  const auto* coefficients = reinterpret_cast<const int32_t*>(scales_zeros.data_ptr());
  const float* input_sums = sums.data();
  auto* outputs = reinterpret_cast<uint16_t*>(out.data_ptr());
  // blocks go one at a time to whichever thread asks next, not half to each: where the OS takes a
  // core away for a while (a server's HTTP thread, a client on the same machine), the other thread
  // takes over the rest instead of the call waiting for the slower half
  const int64_t num_blocks = out_features / kBlock;
  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), num_blocks), 1, [&](int64_t, int64_t) {
    std::vector<float> totals(rows * kBlock);
    alignas(64) __m512i pairs[4 * kPairs];
    Group group{pairs, {}, {}, 0, groups, positions};
    for (int64_t block; (block = next_block.fetch_add(1, std::memory_order_relaxed)) < num_blocks;) {
      std::fill(totals.begin(), totals.end(), 0.f);
      for (int64_t g = 0; g < groups; ++g) {
        group.k0 = g * kGroup;
        load_scales(coefficients, out_features, g, block * kBlock, group);
        unpack_group(weights + block * positions * 32, group.k0, pairs);
        int64_t r = 0;
        for (; r + kTile <= rows; r += kTile) multiply_rows<kTile>(group, inputs, input_sums + g, totals.data(), r);
        switch (rows - r) {
          case 3: multiply_rows<3>(group, inputs, input_sums + g, totals.data(), r); break;
          case 2: multiply_rows<2>(group, inputs, input_sums + g, totals.data(), r); break;
          case 1: multiply_rows<1>(group, inputs, input_sums + g, totals.data(), r); break;
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int t = 0; t < 4; ++t)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(outputs + r * out_features + block * kBlock + 16 * t),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(totals.data() + r * kBlock + 16 * t)));
    }
  });
  return out;
}
}  // namespace

TORCH_LIBRARY(reprise, m) { m.def("int4_mm(Tensor x, Tensor packed, Tensor scales_zeros) -> Tensor"); }

TORCH_LIBRARY_IMPL(reprise, CPU, m) { m.impl("int4_mm", &int4_mm); }
