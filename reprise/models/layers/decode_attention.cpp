// Paged attention of decode rows (one query per sequence) for the compiled decode graph (compiled.py),
// registered as `reprise::decode_attention`. It first writes each row's new K/V to its slot, then
// attends over the sequence's keys through its block table:
//
//   q             [rows, heads, dim]          k, v   [rows, kv_heads, dim]
//   pool          [layers, 2, kv_heads, num_blocks, block_size, dim]: the runner's KV of every layer
//                 (keys, then values); the call reads and writes layer `layer`. The pool goes in
//                 whole, not as views of one layer: inductor's C++ wrapper dropped the offset of
//                 such a view once the pool's sizes were symbolic (a recompile for a second pool
//                 size), and the values were read and written over the keys
//   positions     int64 [rows]: the row's position p; it attends to keys first..p, where first is
//                 0, or p - window + 1 under a sliding window
//   block_tables  int64 [rows, max_blocks]: key position t lies at block_tables[row][t / block_size],
//                 offset t % block_size (entries past p's block, or before first's, are never read)
//   out           [rows, heads * dim], the dtype of q
//
// Per (row, KV head), the query heads of that KV head share each key and value as it is read: scores
// in float32 (a dot product over 16 float lanes, summed in a fixed order), softmax in float32, values
// summed in float32 in key order. A row's result depends only on its own query and keys, never on the
// other rows of the call or on which blocks hold its keys: batched == alone, hot == cold.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {
constexpr int64_t kLanes = 16;

#ifdef __AVX512F__
// 16 values from memory as float32 lanes
inline __m512 load16(const float* from) { return _mm512_loadu_ps(from); }
inline __m512 load16(const c10::BFloat16* from) {
  __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
template <typename scalar_t>
constexpr bool kVector = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;

// e^x for x <= 0 (a score minus the row's top), 16 lanes: 2^n e^r with n = round(x log2 e) and
// |r| <= ln 2 / 2, e^r by its degree-6 Taylor polynomial (relative error < 2e-7); x under -87 is
// taken as -87 (e^-87 ~ 1.6e-38, nothing beside the top score's e^0 = 1)
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);          // ln 2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}
#else
template <typename scalar_t>
constexpr bool kVector = false;
#endif

#ifdef __AVX512F__
// score() and weigh() for a head dim of Chunks * 16, a key's or a query head's lanes held in registers
template <typename scalar_t, int Chunks, typename KeyAt>
void score_lanes(int64_t group, int64_t num_keys, KeyAt key_at, float scale, const float* queries, float* scores) {
  for (int64_t t = 0; t < num_keys; ++t) {
    const scalar_t* key = key_at(t);
    __m512 k[Chunks];
    for (int c = 0; c < Chunks; ++c) k[c] = load16(key + c * kLanes);
    for (int64_t g = 0; g < group; ++g) {
      const float* query = queries + g * Chunks * kLanes;
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(query), k[0]);
      for (int c = 1; c < Chunks; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(query + c * kLanes), k[c], acc);
      scores[g * num_keys + t] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
}

template <typename scalar_t, int Chunks, typename KeyAt>
void weigh_lanes(int64_t group, int64_t num_keys, KeyAt value_at, const float* weights, float* sums) {
  for (int64_t g = 0; g < group; ++g) {
    __m512 acc[Chunks];
    for (int c = 0; c < Chunks; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < num_keys; ++t) {
      const scalar_t* value = value_at(t);
      const __m512 weight = _mm512_set1_ps(weights[g * num_keys + t]);
      for (int c = 0; c < Chunks; ++c) acc[c] = _mm512_fmadd_ps(weight, load16(value + c * kLanes), acc[c]);
    }
    for (int c = 0; c < Chunks; ++c) _mm512_storeu_ps(sums + (g * Chunks + c) * kLanes, acc[c]);
  }
}
#endif

struct Shape {
  int64_t heads, kv_heads, dim, num_blocks, block_size, max_blocks;
};

// scores[g * num_keys + t] = scale * q_g . key_t for the group's query heads. The dot product runs
// over 16 float32 lanes (vector FMAs where the CPU has AVX-512, else the same lanes in a loop), the
// lanes then summed in a fixed order: the same bits wherever the key lies and whatever the batch.
template <typename scalar_t, typename KeyAt>
void score(const scalar_t* q, int64_t group, int64_t dim, int64_t num_keys, KeyAt key_at, float scale,
           float* queries, float* scores) {
  for (int64_t i = 0; i < group * dim; ++i) queries[i] = static_cast<float>(q[i]);
#ifdef __AVX512F__
  if constexpr (kVector<scalar_t>) {
    if (dim == 4 * kLanes) return score_lanes<scalar_t, 4>(group, num_keys, key_at, scale, queries, scores);
    if (dim == 8 * kLanes) return score_lanes<scalar_t, 8>(group, num_keys, key_at, scale, queries, scores);
  }
#endif
  std::vector<float> line(dim);
  for (int64_t t = 0; t < num_keys; ++t) {
    const scalar_t* key = key_at(t);
    for (int64_t d = 0; d < dim; ++d) line[d] = static_cast<float>(key[d]);
    for (int64_t g = 0; g < group; ++g) {
      float lanes[kLanes] = {};
      int64_t d = 0;
      for (; d + kLanes <= dim; d += kLanes)
        for (int64_t l = 0; l < kLanes; ++l) lanes[l] += queries[g * dim + d + l] * line[d + l];
      float sum = 0.f;
      for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
      for (; d < dim; ++d) sum += queries[g * dim + d] * line[d];
      scores[g * num_keys + t] = sum * scale;
    }
  }
}

// scores[t] = e^(scores[t] - max); returns their sum (in 16 lanes, then the lanes in a fixed order)
template <typename scalar_t>
float softmax_numerators(float* scores, int64_t num_keys) {
  const float top = *std::max_element(scores, scores + num_keys);
  float lanes[kLanes] = {};
  int64_t t = 0;
#ifdef __AVX512F__
  if constexpr (kVector<scalar_t>) {
    __m512 total = _mm512_setzero_ps();
    for (; t + kLanes <= num_keys; t += kLanes) {
      __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + t), _mm512_set1_ps(top)));
      _mm512_storeu_ps(scores + t, e);
      total = _mm512_add_ps(total, e);
    }
    _mm512_storeu_ps(lanes, total);
    if (t < num_keys) {                 // the tail, masked: the same exponential as the full vectors
      const __mmask16 tail = (1u << (num_keys - t)) - 1;
      __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, scores + t), _mm512_set1_ps(top)));
      _mm512_mask_storeu_ps(scores + t, tail, e);
      _mm512_storeu_ps(lanes, _mm512_add_ps(_mm512_loadu_ps(lanes), _mm512_maskz_mov_ps(tail, e)));
      t = num_keys;
    }
  }
#endif
  for (; t < num_keys; ++t) lanes[t % kLanes] += (scores[t] = std::exp(scores[t] - top));
  float sum = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// sums[g * dim + d] = sum_t weights[g * num_keys + t] * value_t[d], t in key order
template <typename scalar_t, typename KeyAt>
void weigh(int64_t group, int64_t dim, int64_t num_keys, KeyAt value_at, const float* weights, float* sums) {
#ifdef __AVX512F__
  if constexpr (kVector<scalar_t>) {
    if (dim == 4 * kLanes) return weigh_lanes<scalar_t, 4>(group, num_keys, value_at, weights, sums);
    if (dim == 8 * kLanes) return weigh_lanes<scalar_t, 8>(group, num_keys, value_at, weights, sums);
  }
#endif
  std::fill_n(sums, group * dim, 0.f);
  for (int64_t t = 0; t < num_keys; ++t) {
    const scalar_t* value = value_at(t);
    for (int64_t g = 0; g < group; ++g)
      for (int64_t d = 0; d < dim; ++d) sums[g * dim + d] += weights[g * num_keys + t] * static_cast<float>(value[d]);
  }
}

// One row and one KV head: write its new K/V, then attend over keys first..position with the
// query heads of that KV head.
template <typename scalar_t>
void attend(const Shape& s, int64_t row, int64_t head, const scalar_t* q, const scalar_t* k, const scalar_t* v,
            scalar_t* k_cache, scalar_t* v_cache, int64_t position, int64_t first, const int64_t* table, float scale,
            scalar_t* out, std::vector<float>& scratch, std::vector<int64_t>& slots) {
  const int64_t dim = s.dim, group = s.heads / s.kv_heads, num_keys = position - first + 1;
  const int64_t head_slots = s.num_blocks * s.block_size;       // one head's slots in the cache
  slots.resize(num_keys);                              // the flat slot of each key, first..position
  for (int64_t t = first, block = first / s.block_size, offset = first % s.block_size; t <= position; ++t) {
    slots[t - first] = head * head_slots + table[block] * s.block_size + offset;
    if (++offset == s.block_size) offset = 0, ++block;
  }
  std::copy_n(k + (row * s.kv_heads + head) * dim, dim, k_cache + slots[num_keys - 1] * dim);
  std::copy_n(v + (row * s.kv_heads + head) * dim, dim, v_cache + slots[num_keys - 1] * dim);

  scratch.resize(group * dim + group * num_keys + group * dim);
  float* queries = scratch.data();                     // [group, dim]
  float* scores = queries + group * dim;               // [group, num_keys], then their exponentials
  float* sums = scores + group * num_keys;             // [group, dim]
  const int64_t first_head = row * s.heads + head * group;
  score(q + first_head * dim, group, dim, num_keys, [&](int64_t t) { return k_cache + slots[t] * dim; }, scale,
        queries, scores);
  float totals[64];
  for (int64_t g = 0; g < group; ++g) totals[g] = softmax_numerators<scalar_t>(scores + g * num_keys, num_keys);
  weigh<scalar_t>(group, dim, num_keys, [&](int64_t t) { return v_cache + slots[t] * dim; }, scores, sums);
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < dim; ++d)
      out[(first_head + g) * dim + d] = static_cast<scalar_t>(sums[g * dim + d] / totals[g]);
}

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, at::Tensor& pool,
                            int64_t layer, const at::Tensor& positions_in, const at::Tensor& tables_in, double scale,
                            c10::optional<int64_t> window) {
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3 && pool.dim() == 6 && tables_in.dim() == 2, "decode_attention: shapes");
  TORCH_CHECK(pool.is_contiguous() && layer >= 0 && layer < pool.size(0) && pool.size(1) == 2,
              "decode_attention: a contiguous [layers, 2, kv_heads, num_blocks, block_size, dim] pool and a layer in it");
  TORCH_CHECK(q_in.scalar_type() == pool.scalar_type() && k_in.scalar_type() == pool.scalar_type(),
              "decode_attention: q, k, v and the pool share one dtype");
  const at::Tensor k_cache = pool.select(0, layer).select(0, 0), v_cache = pool.select(0, layer).select(0, 1);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor positions = positions_in.to(at::kLong).contiguous(), tables = tables_in.to(at::kLong).contiguous();
  const Shape s{q.size(1), k_cache.size(0), q.size(2), k_cache.size(1), k_cache.size(2), tables.size(1)};
  const int64_t rows = q.size(0);
  TORCH_CHECK(s.heads % s.kv_heads == 0 && s.heads / s.kv_heads <= 64 && k.size(1) == s.kv_heads && k_cache.size(3) == s.dim &&
              positions.size(0) == rows && tables.size(0) == rows, "decode_attention: operands do not match");
  at::Tensor out = at::empty({rows, s.heads * s.dim}, q.options());
  const int64_t* position = positions.data_ptr<int64_t>();
  const int64_t num_tasks = rows * s.kv_heads;         // one per (row, KV head)
  int64_t work = 0;                                   // keys read, over all tasks
  for (int64_t r = 0; r < rows; ++r) work += (position[r] + 1) * s.kv_heads;
  // small calls run on this thread (a parallel region costs more than attending to a few hundred
  // keys); larger ones hand tasks to whichever thread asks next, so a thread the OS pauses delays
  // only the task it holds
  const int64_t num_threads = work * s.dim < (1 << 16) ? 1 : std::min<int64_t>(at::get_num_threads(), num_tasks);
  std::atomic<int64_t> next_task{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    at::parallel_for(0, num_threads, 1, [&](int64_t, int64_t) {
      std::vector<float> scratch;
      std::vector<int64_t> slots;
      for (int64_t task; (task = next_task.fetch_add(1, std::memory_order_relaxed)) < num_tasks;) {
        const int64_t row = task / s.kv_heads, head = task % s.kv_heads, p = position[row];
        TORCH_CHECK(p >= 0 && p / s.block_size < s.max_blocks, "decode_attention: position past the block table");
        const int64_t first = window.has_value() ? std::max<int64_t>(0, p - *window + 1) : 0;
        attend<scalar_t>(s, row, head, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                         k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), p, first,
                         tables.data_ptr<int64_t>() + row * s.max_blocks, static_cast<float>(scale),
                         out.data_ptr<scalar_t>(), scratch, slots);
      }
    });
  });
  return out;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(reprise, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) pool, int layer, Tensor positions, "
        "Tensor block_tables, float scale, int? window) -> Tensor");
}

TORCH_LIBRARY_IMPL(reprise, CPU, m) { m.impl("decode_attention", &decode_attention); }
