// Attention against a slot-addressed KV cache, updating the cache in place.
//
// cache_k, cache_v: [L, S, T_max, K, H] (layer, slot, position, kv head, head dim), float32.
// For layer `layer`, rows b = 0..B-1 (session slot slots[b]) and chunk positions t = 0..T-1:
//   1. k_new[b, t] and v_new[b, t] are written at (layer, slots[b], positions[b, t]); positions
//      >= T_max mark padding and are not written;
//   2. each query q[b, t] (N heads; head n reads kv head n / (N / K)) attends to the keys at
//      positions s < window with s <= positions[b, t] of its slot: softmax(q.k / sqrt(H)) . v.
// Both caches are aliased to the outputs: nothing is copied. The (row, kv head) pairs are split
// over XLA's intra-op pool where it has more than one thread and the step reads enough keys.
//
// XLA computes the same with a scatter, a gather of each row's window and two batched dots; on
// a decode step that gather and the layout changes around the dots cost ~0.6 ms per GPT-2 layer
// (a third of the layer), for ~0.2 MFLOP of work.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Keys a step reads, at least, before its work is split over the pool (see AttendCached).
constexpr int64_t kSplitFloats = 64 * 1024;

typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

template <typename A, typename B>
bool Same(const A& a, const B& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// The sum of a vector's lanes by halving (three adds of halves, then four lanes), not lane by lane:
// on a head of 64 floats the lane-by-lane sum cost more than the products.
inline float Sum(v16f a) {
  v8f lo, hi;
  std::memcpy(&lo, &a, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&a) + sizeof lo, sizeof hi);
  const v8f b = lo + hi;
  v4f c, d;
  std::memcpy(&c, &b, sizeof c);
  std::memcpy(&d, reinterpret_cast<const char*>(&b) + sizeof c, sizeof d);
  const v4f e = c + d;
  return (e[0] + e[2]) + (e[1] + e[3]);
}

inline float Dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
  if (n >= 16) {
    v16f acc = {};
    for (; i + 16 <= n; i += 16) {
      v16f x, y;
      std::memcpy(&x, a + i, sizeof x);
      std::memcpy(&y, b + i, sizeof y);
      acc += x * y;
    }
    sum = Sum(acc);
  }
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline void Axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

ffi::Error AttendCached(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                        ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::S32> positions,
                        ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> cache_k,
                        ffi::Buffer<ffi::F32> cache_v, int64_t layer, int64_t window,
                        ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> cache_k_out,
                        ffi::ResultBuffer<ffi::F32> cache_v_out) {
  const auto qd = q.dimensions(), kd = k_new.dimensions(), cd = cache_k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || cd.size() != 5) {
    return ffi::Error::InvalidArgument("pathways_attend_cached: bad ranks");
  }
  const int64_t b_dim = qd[0], t_dim = qd[1], n_heads = qd[2], h_dim = qd[3];
  const int64_t l_dim = cd[0], s_dim = cd[1], t_max = cd[2], kv_heads = cd[3];
  if (kd[0] != b_dim || kd[1] != t_dim || kd[2] != kv_heads || kd[3] != h_dim ||
      cd[4] != h_dim || !Same(v_new.dimensions(), kd) || !Same(cache_v.dimensions(), cd) ||
      positions.dimensions().size() != 2 || positions.dimensions()[0] != b_dim ||
      positions.dimensions()[1] != t_dim || slots.dimensions().size() != 1 ||
      slots.dimensions()[0] != b_dim || n_heads % kv_heads != 0) {
    return ffi::Error::InvalidArgument("pathways_attend_cached: shapes disagree");
  }
  if (layer < 0 || layer >= l_dim || window < 1 || window > t_max) {
    return ffi::Error::InvalidArgument("pathways_attend_cached: layer or window out of range");
  }
  const int32_t* pos = positions.typed_data();
  const int32_t* slot = slots.typed_data();
  for (int64_t b = 0; b < b_dim; ++b) {
    if (slot[b] < 0 || slot[b] >= s_dim) {
      return ffi::Error::InvalidArgument("pathways_attend_cached: slot out of range");
    }
    for (int64_t t = 0; t < t_dim; ++t) {
      if (pos[b * t_dim + t] < 0) {
        return ffi::Error::InvalidArgument("pathways_attend_cached: position out of range");
      }
    }
  }
  // The outputs alias the inputs; XLA may still hand separate buffers (when it could not donate).
  float* ck = cache_k_out->typed_data();
  float* cv = cache_v_out->typed_data();
  const size_t cache_bytes = cache_k.element_count() * sizeof(float);
  if (ck != cache_k.typed_data()) std::memcpy(ck, cache_k.typed_data(), cache_bytes);
  if (cv != cache_v.typed_data()) std::memcpy(cv, cache_v.typed_data(), cache_bytes);

  const int64_t row = kv_heads * h_dim;  // floats per (slot, position)
  auto at = [&](float* c, int64_t s, int64_t p) {
    return c + ((layer * s_dim + s) * t_max + p) * row;
  };
  for (int64_t b = 0; b < b_dim; ++b) {
    for (int64_t t = 0; t < t_dim; ++t) {
      const int64_t p = pos[b * t_dim + t];
      if (p >= t_max) continue;  // padding
      std::memcpy(at(ck, slot[b], p), k_new.typed_data() + (b * t_dim + t) * row,
                  row * sizeof(float));
      std::memcpy(at(cv, slot[b], p), v_new.typed_data() + (b * t_dim + t) * row,
                  row * sizeof(float));
    }
  }

  // Each query row's heads are independent: work items are (row, kv head), in that order, and
  // a chunk of consecutive items is attended as runs of one row's kv heads [kv0, kv1) (with
  // their query heads). Keys and values are read in position order, that run's heads of a
  // position together (a contiguous part of the position's row): walking one head's keys at a
  // time strides K * H floats and ran 3x slower.
  const int64_t group = n_heads / kv_heads;
  const float scale = 1.f / std::sqrt(static_cast<float>(h_dim));
  const float* qs = q.typed_data();
  float* outs = out->typed_data();
  auto attend = [=](int64_t bt, int64_t kv0, int64_t kv1) {
    const int64_t b = bt / t_dim, n0 = kv0 * group, n1 = kv1 * group;
    const float* keys = at(ck, slot[b], 0);
    const float* values = at(cv, slot[b], 0);
    const int64_t seen = std::min<int64_t>(pos[bt], window - 1) + 1;
    const float* qv = qs + bt * n_heads * h_dim;
    float* o = outs + bt * n_heads * h_dim;
    thread_local std::vector<float> scores;  // [head - n0, position]
    scores.resize(std::max<size_t>(scores.size(), (n1 - n0) * window));
    float* sc0 = scores.data() - n0 * window;
    for (int64_t s = 0; s < seen; ++s) {
      const float* key = keys + s * row;
      for (int64_t n = n0; n < n1; ++n) {
        sc0[n * window + s] = Dot(qv + n * h_dim, key + (n / group) * h_dim, h_dim) * scale;
      }
    }
    for (int64_t n = n0; n < n1; ++n) {
      float* sc = sc0 + n * window;
      const float top = *std::max_element(sc, sc + seen);
      float total = 0.f;
      for (int64_t s = 0; s < seen; ++s) total += sc[s] = std::exp(sc[s] - top);
      const float inv = 1.f / total;
      for (int64_t s = 0; s < seen; ++s) sc[s] *= inv;
    }
    std::memset(o + n0 * h_dim, 0, (n1 - n0) * h_dim * sizeof(float));
    for (int64_t s = 0; s < seen; ++s) {
      const float* value = values + s * row;
      for (int64_t n = n0; n < n1; ++n) {
        Axpy(sc0[n * window + s], value + (n / group) * h_dim, o + n * h_dim, h_dim);
      }
    }
  };
  auto items = [=](int64_t i0, int64_t i1) {  // items [i0, i1) as runs within one row
    for (int64_t i = i0; i < i1;) {
      const int64_t bt = i / kv_heads, kv0 = i % kv_heads;
      const int64_t kv1 = std::min<int64_t>(kv_heads, kv0 + (i1 - i));
      attend(bt, kv0, kv1);  // padding rows too: garbage the caller ignores, as XLA's
      i += kv1 - kv0;
    }
  };
  const int64_t n_items = b_dim * t_dim * kv_heads;
  // Split the items over XLA's intra-op pool as the matmul splits its panels (pool.h). Little
  // work (a small model, or few positions) stays on this thread: waking the pool costs more
  // than it saves there.
  int64_t key_floats = 0;
  for (int64_t bt = 0; bt < b_dim * t_dim; ++bt) {
    key_floats += (std::min<int64_t>(pos[bt], window - 1) + 1) * row;
  }
  const int64_t threads = key_floats < kSplitFloats ? 1 : std::max<int64_t>(pool.num_threads(), 1);
  pathways::SplitOverPool(pool, threads, n_items, std::min<int64_t>(threads * 4, n_items), items);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PathwaysAttendCached, AttendCached,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, T, N, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_new [B, T, K, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_new [B, T, K, H]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions [B, T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slots [B]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cache_k [L, S, T_max, K, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cache_v
                                  .Attr<int64_t>("layer")
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [B, T, N, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // cache_k (aliased)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // cache_v (aliased)
