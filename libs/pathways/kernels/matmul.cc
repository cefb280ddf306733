// y[M, N] = x[M, K] @ W[K, N] for the few rows of a decode step, W pre-packed for streaming.
//
// Decoding one token reads every weight once for a handful of rows: the work is bound by how
// fast weights stream from memory, and XLA's CPU dot reaches ~70 % of what the cache delivers
// for such shapes (and converts bfloat16 weights to float32 in memory first, so storing them in
// bfloat16 makes it slower, not faster). Here W is packed as [N / 32, K, 32]: the k-loop of one
// column panel reads consecutive bytes, 8 rows accumulate in registers per weight load, and
// bfloat16 weights widen to float32 in registers (they are the upper half of a float32), so
// bfloat16 weights halve the bytes read. Accumulation is float32.
//
// Written with GCC/Clang vector extensions rather than intrinsics: the compiler lowers them to
// AVX-512, AVX2 or SSE for the machine it builds on (-march=native).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;  // columns per packed panel: two 16-lane vectors
constexpr int kMaxRows = 8;     // rows accumulated together (2 * 8 accumulators)
// Prefetch this far ahead in a panel: the hardware prefetcher alone left the 154 MB GPT-2 head
// at ~10 GB/s; 4 KB ahead gave 1.9x for bfloat16 weights (distances of 2-8 KB were within noise).
constexpr int64_t kAheadBytes = 4096;

typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

inline v16f Load(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline v16f Load(const uint16_t* p) {  // bfloat16 bits -> float32
  v16h h;
  std::memcpy(&h, p, sizeof h);
  v16u u = __builtin_convertvector(h, v16u) << 16;
  v16f f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// R rows of x (row stride K) times one packed panel [K, 32] -> columns n0.. of R rows of y.
template <int R, typename W>
void Panel(const float* x, int64_t k_dim, const W* panel, float* y, int64_t n_dim, int64_t n0) {
  v16f acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = v16f{};
  constexpr int64_t ahead = kAheadBytes / (kPanel * sizeof(W));
  for (int64_t k = 0; k < k_dim; ++k) {
    __builtin_prefetch(panel + (k + ahead) * kPanel);  // past the end is harmless: no fault
    if (sizeof(W) == 4) __builtin_prefetch(panel + (k + ahead) * kPanel + 16);
    const v16f w0 = Load(panel + k * kPanel);
    const v16f w1 = Load(panel + k * kPanel + 16);
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * k_dim + k];
      acc[r][0] += xv * w0;
      acc[r][1] += xv * w1;
    }
  }
  const int64_t cols = std::min(kPanel, n_dim - n0);
  for (int r = 0; r < R; ++r) {
    float out[kPanel];
    std::memcpy(out, &acc[r][0], sizeof(v16f));
    std::memcpy(out + 16, &acc[r][1], sizeof(v16f));
    std::memcpy(y + r * n_dim + n0, out, cols * sizeof(float));
  }
}

template <typename W>
void Rows(int rows, const float* x, int64_t k_dim, const W* panel, float* y, int64_t n_dim,
          int64_t n0) {
  switch (rows) {
    case 1: return Panel<1>(x, k_dim, panel, y, n_dim, n0);
    case 2: return Panel<2>(x, k_dim, panel, y, n_dim, n0);
    case 3: return Panel<3>(x, k_dim, panel, y, n_dim, n0);
    case 4: return Panel<4>(x, k_dim, panel, y, n_dim, n0);
    case 5: return Panel<5>(x, k_dim, panel, y, n_dim, n0);
    case 6: return Panel<6>(x, k_dim, panel, y, n_dim, n0);
    case 7: return Panel<7>(x, k_dim, panel, y, n_dim, n0);
    default: return Panel<8>(x, k_dim, panel, y, n_dim, n0);
  }
}

// Panels [p0, p1): each panel once, all row groups against it while it is in cache. With more
// row groups than one, a bfloat16 panel is widened once into a float32 copy (K * 32 floats, in
// L2) instead of once per group: prefill of 128 tokens ran 25 % slower than float32 without.
template <typename W>
void Panels(int64_t p0, int64_t p1, const float* x, int64_t m_dim, int64_t k_dim, const W* w,
            float* y, int64_t n_dim) {
  std::vector<float> wide;
  if (!std::is_same_v<W, float> && m_dim > kMaxRows) wide.resize(k_dim * kPanel);
  for (int64_t p = p0; p < p1; ++p) {
    const W* panel = w + p * k_dim * kPanel;
    if (!wide.empty()) {
      for (int64_t i = 0; i < k_dim * kPanel; i += 16) {
        const v16f v = Load(panel + i);
        std::memcpy(wide.data() + i, &v, sizeof v);
      }
    }
    for (int64_t m = 0; m < m_dim; m += kMaxRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, m_dim - m));
      if (wide.empty()) {
        Rows(rows, x + m * k_dim, k_dim, panel, y + m * n_dim, n_dim, p * kPanel);
      } else {
        Rows(rows, x + m * k_dim, k_dim, wide.data(), y + m * n_dim, n_dim, p * kPanel);
      }
    }
  }
}

template <ffi::DataType T>
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w,
                  ffi::ResultBuffer<ffi::F32> y) {
  using W = std::conditional_t<T == ffi::F32, float, uint16_t>;
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("pathways_matmul: x must be (M, K), w (N/32, K, 32)");
  }
  const int64_t m_dim = xd[0], k_dim = xd[1], n_dim = yd[1], panels = wd[0];
  if (wd[1] != k_dim || wd[2] != kPanel || yd[0] != m_dim ||
      panels != (n_dim + kPanel - 1) / kPanel) {
    return ffi::Error::InvalidArgument("pathways_matmul: shapes of x, w and y disagree");
  }
  const float* xp = x.typed_data();
  const W* wp = reinterpret_cast<const W*>(w.untyped_data());
  float* yp = y->typed_data();

  // Split the panels over XLA's intra-op pool when it has more than one thread. Every
  // participant (this thread and the scheduled tasks) takes chunks of panels from a shared
  // counter, and this thread waits only for chunks someone has taken: a task that starts late
  // (its pool threads busy, e.g. with another such call) finds nothing left and returns, so
  // waiting can never deadlock. The state lives on the heap for such late tasks.
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t chunks = std::min<int64_t>(threads * 4, panels);
  if (threads <= 1 || chunks <= 1) {
    Panels(0, panels, xp, m_dim, k_dim, wp, yp, n_dim);
    return ffi::Error::Success();
  }
  struct Work {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto work = std::make_shared<Work>();
  auto run = [work, chunks, panels, xp, m_dim, k_dim, wp, yp, n_dim] {
    for (int64_t c; (c = work->next.fetch_add(1)) < chunks;) {
      Panels(panels * c / chunks, panels * (c + 1) / chunks, xp, m_dim, k_dim, wp, yp, n_dim);
      work->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([run] { run(); });
  run();
  while (work->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PathwaysMatmulF32, Matmul<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PathwaysMatmulBf16, Matmul<ffi::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
