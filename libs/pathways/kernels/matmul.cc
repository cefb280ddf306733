// y[M, N] = x[M, K] @ W[K, N] for the few rows of a decode step, W pre-packed for streaming.
//
// Decoding one token reads every weight once for a handful of rows: the work is bound by how
// fast weights stream from memory, and XLA's CPU dot reaches ~70 % of what the cache delivers
// for such shapes (and converts bfloat16 weights to float32 in memory first, so storing them in
// bfloat16 makes it slower, not faster). Here W is packed as [N / 32, K, 32]: the k-loop of one
// column panel reads consecutive bytes, up to 8 rows accumulate in registers per weight load, and
// bfloat16 weights widen to float32 in registers (they are the upper half of a float32), so
// bfloat16 weights halve the bytes read. Accumulation is float32.
//
// Written with GCC/Clang vector extensions rather than intrinsics, at the machine's vector width
// (-march=native: AVX-512, AVX2 or SSE/NEON; see kLanes below).
//
// Prefill with bfloat16 weights (the `_tiles` target: many rows, compute-bound) runs on AMX
// tiles where the CPU and the OS provide them: activations are rounded to bfloat16, products
// accumulate in float32 (as any bfloat16 GEMM does). Elsewhere it takes the float32 path above.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// AMX needs x86-64 and a compiler that knows it (GCC >= 11, Clang >= 12); without, the `_tiles`
// target takes the float32 path.
#if defined(__x86_64__) && defined(__has_include)
#if __has_include(<amxtileintrin.h>) || __has_include(<amxintrin.h>)
#define PATHWAYS_HAVE_TILES 1
#endif
#endif

#if PATHWAYS_HAVE_TILES
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "pool.h"
#include "xla/ffi/api/ffi.h"


namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;  // columns per packed panel
constexpr int kMaxRows = 8;     // a decode step's rows: above this, prefill paths (AMX tiles)
// Prefetch this far ahead in a panel: the hardware prefetcher alone left the 154 MB GPT-2 head
// at ~10 GB/s; 4 KB ahead gave 1.9x for bfloat16 weights (distances of 2-8 KB were within noise).
constexpr int64_t kAheadBytes = 4096;

// Vectors of the machine's width, and as many rows per pass over a panel as its registers hold:
// R rows x V vectors of accumulators, V weight vectors and a broadcast x. With AVX-512 (32
// registers of 16 lanes) a pass covers the panel's 32 columns for 8 rows. With AVX2 (16 of 8
// lanes) one or two rows (three with float32 weights, see Panel) take the whole panel (4
// vectors) in a pass, more rows take it in two halves of 2 vectors for up to 6 rows each: as
// groups of 3 rows x 4 vectors, with the weights as memory operands loaded 3 times each, 6 rows
// ran 1.25x slower and prefill 30 % slower. The first version used 16-lane vectors everywhere:
// on AVX2 they spilled to the stack and a GPT-2 decode step ran 4x (1 row) to 11x (8 rows)
// slower than now.
#if defined(__AVX512F__)
constexpr int kLanes = 16, kRegs = 32, kRowGroup = 8;
#elif defined(__AVX__)
constexpr int kLanes = 8, kRegs = 16, kRowGroup = 6;
#else
constexpr int kLanes = 4, kRegs = 16, kRowGroup = 6;  // SSE, NEON
#endif
constexpr int kVecs = kPanel / kLanes;

typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef uint32_t vu __attribute__((vector_size(kLanes * 4)));
typedef uint16_t vh __attribute__((vector_size(kLanes * 2)));

inline vf Load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline vf Load(const uint16_t* p) {  // bfloat16 bits -> float32
  vh h;
  std::memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu) << 16;
  vf f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// R rows of x (row stride K) times V vectors of one packed panel [K, 32], its columns c0, over
// k in [k0, k1): added to the accumulators `acc`.
template <int R, int V, typename W>
inline void Accumulate(const float* x, int64_t k_dim, const W* panel, int c0, int64_t k0,
                       int64_t k1, vf (&acc)[R][V]) {
  constexpr int64_t ahead = kAheadBytes / (kPanel * sizeof(W));
  for (int64_t k = k0; k < k1; ++k) {
    __builtin_prefetch(panel + (k + ahead) * kPanel);  // past the end is harmless: no fault
    if (sizeof(W) == 4) __builtin_prefetch(panel + (k + ahead) * kPanel + 16);
    vf w[V];
    for (int v = 0; v < V; ++v) w[v] = Load(panel + k * kPanel + c0 + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * k_dim + k];
      for (int v = 0; v < V; ++v) acc[r][v] += xv * w[v];
    }
  }
}

// R rows of x times V vectors of one packed panel [K, 32], its columns c0.. -> the same columns
// (from n0 + c0) of R rows of y.
template <int R, int V, typename W>
void Pass(const float* x, int64_t k_dim, const W* panel, int c0, float* y, int64_t n_dim,
          int64_t n0) {
  vf acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = vf{};
  Accumulate<R, V>(x, k_dim, panel, c0, 0, k_dim, acc);
  const int64_t cols = std::min<int64_t>(V * kLanes, n_dim - n0 - c0);
  if (cols <= 0) return;
  for (int r = 0; r < R; ++r) {
    float out[V * kLanes];
    for (int v = 0; v < V; ++v) std::memcpy(out + v * kLanes, &acc[r][v], sizeof(vf));
    std::memcpy(y + r * n_dim + n0 + c0, out, cols * sizeof(float));
  }
}

// The same over k in [k0, k1) only, the accumulators kept in `part` between calls: R rows' sums
// for all 32 columns, kVecs vectors per row. Not inlined: each call holds its own accumulators in
// registers, loaded from and stored to `part` (in L1) once per block.
template <int R, int V, typename W>
__attribute__((noinline)) void PassBlock(const float* x, int64_t k_dim, const W* panel, int c0,
                                         int64_t k0, int64_t k1, vf* part) {
  vf acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = part[r * kVecs + c0 / kLanes + v];
  Accumulate<R, V>(x, k_dim, panel, c0, k0, k1, acc);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) part[r * kVecs + c0 / kLanes + v] = acc[r][v];
}

// R rows times one packed panel -> columns n0.. of R rows of y, in as few passes as the
// registers allow (see kRegs). Float32 weights need no register of their own where the FMA
// reads them from memory (x86; they are in L1 after the first row): AVX2's 3 rows take the
// panel in one pass of 12 accumulator chains instead of two passes of 6, which wait on the FMA's
// latency (a 3-row step's matmuls 1.2x faster on two threads, `tools/bench/decode_rows.py`, and
// 1.3-1.4x on one, measured with an AVX2 build on a Zen 5).
// Bfloat16 weights are widened in registers first, so they keep the register rule.
template <int R, typename W>
constexpr int VecsPerPass() {
  constexpr bool weights_in_regs = (R + 1) * kVecs + 1 <= kRegs;
  constexpr bool weights_from_memory = std::is_same_v<W, float> && R * kVecs + 1 <= kRegs;
  constexpr int V = weights_in_regs || weights_from_memory ? kVecs : 2;
  static_assert(V == kVecs || R * V + V + 1 <= kRegs, "accumulators and weights fit the registers");
  return V;
}

template <int R, typename W>
void Panel(const float* x, int64_t k_dim, const W* panel, float* y, int64_t n_dim, int64_t n0) {
  constexpr int V = VecsPerPass<R, W>();
  for (int c0 = 0; c0 < kPanel; c0 += V * kLanes) Pass<R, V>(x, k_dim, panel, c0, y, n_dim, n0);
}

// Panel's passes over k in [k0, k1) only, the sums in `part` (see PassBlock).
template <int R, typename W>
void PanelBlock(const float* x, int64_t k_dim, const W* panel, int64_t k0, int64_t k1, vf* part) {
  constexpr int V = VecsPerPass<R, W>();
  for (int c0 = 0; c0 < kPanel; c0 += V * kLanes) PassBlock<R, V>(x, k_dim, panel, c0, k0, k1, part);
}

// Calls f(std::integral_constant<int, R>{}) with R = min(rows, kRowGroup): the row count as a
// compile-time constant for the templates below (one instantiation per count).
template <typename F>
decltype(auto) ByRows(int rows, F&& f) {
  static_assert(kRowGroup >= 1 && kRowGroup <= 8, "row group of 1 to 8 rows");
  switch (std::min(rows, kRowGroup)) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, std::min(2, kRowGroup)>{});
    case 3: return f(std::integral_constant<int, std::min(3, kRowGroup)>{});
    case 4: return f(std::integral_constant<int, std::min(4, kRowGroup)>{});
    case 5: return f(std::integral_constant<int, std::min(5, kRowGroup)>{});
    case 6: return f(std::integral_constant<int, std::min(6, kRowGroup)>{});
    case 7: return f(std::integral_constant<int, std::min(7, kRowGroup)>{});
    default: return f(std::integral_constant<int, kRowGroup>{});
  }
}

template <typename W>
void Rows(int rows, const float* x, int64_t k_dim, const W* panel, float* y, int64_t n_dim,
          int64_t n0) {
  ByRows(rows, [&](auto r) { Panel<decltype(r)::value>(x, k_dim, panel, y, n_dim, n0); });
}

template <typename W>
void RowsBlock(int rows, const float* x, int64_t k_dim, const W* panel, int64_t k0, int64_t k1,
               vf* part) {
  ByRows(rows, [&](auto r) { PanelBlock<decltype(r)::value>(x, k_dim, panel, k0, k1, part); });
}

template <typename W>
bool OnePass(int rows) {  // whether Rows(rows, ...) takes a panel in one pass
  return ByRows(rows, [](auto r) { return VecsPerPass<decltype(r)::value, W>() == kVecs; });
}

// A decode step's rows (m_dim <= kMaxRows) that take a panel in several passes (AVX2's 4-8
// float32 or 3-8 bfloat16 rows: several row groups, or two halves of a panel) make all their
// passes over one block of kBlock k's before the next. Each pass over a whole panel (96 KB of
// float32 weights) used to leave memory idle after the first: only the first streamed from
// memory, the others computed from L2, so 8 rows cost 1.6-1.8x one row on a Zen 3. Over 4 KB
// blocks (the prefetch distance) the first pass's prefetches stay in flight while the later
// passes compute from L1: 1.3-1.4x faster for 8 rows (a scratch C++ loop, 151 MB of weights, one
// and two threads; `tools/bench/decode_rows.py`, BENCHMARKS.md).
constexpr int64_t kBlock = 32;

template <typename W>
void PanelsBlocked(int64_t p0, int64_t p1, const float* x, int m_dim, int64_t k_dim, const W* w,
                   float* y, int64_t n_dim) {
  alignas(64) vf part[kMaxRows * kVecs];
  for (int64_t p = p0; p < p1; ++p) {
    const W* panel = w + p * k_dim * kPanel;
    std::memset(part, 0, sizeof part);
    for (int64_t k0 = 0; k0 < k_dim; k0 += kBlock) {
      const int64_t k1 = std::min(k_dim, k0 + kBlock);
      for (int m = 0; m < m_dim; m += kRowGroup) {
        RowsBlock(std::min(kRowGroup, m_dim - m), x + m * k_dim, k_dim, panel, k0, k1,
                  part + m * kVecs);
      }
    }
    const int64_t cols = std::min(kPanel, n_dim - p * kPanel);
    for (int r = 0; r < m_dim; ++r) {
      std::memcpy(y + r * n_dim + p * kPanel, part + r * kVecs, cols * sizeof(float));
    }
  }
}

// Panels [p0, p1): each panel once, all row groups against it while it is in cache. With many
// row groups a bfloat16 panel is widened once into a float32 copy (K * 32 floats, in L2) instead
// of once per group: prefill of 128 tokens ran 25 % slower than float32 without. With few the
// copy costs more than it saves (it writes twice the bytes the panel has): measured on GPT-2
// small's matmuls (`tools/bench/decode_rows.py`), widening at 2 to 4 groups made 8 to 32 rows
// 1.3-1.6x slower (an AVX2 build's 8-row step cost 3.9x its 1-row step); it pays from ~8 groups.
// The copy is each thread's own and kept between calls.
constexpr int kWidenGroups = 6;  // widen where a call has more row groups than this

template <typename W>
void Panels(int64_t p0, int64_t p1, const float* x, int64_t m_dim, int64_t k_dim, const W* w,
            float* y, int64_t n_dim) {
  if (m_dim <= kMaxRows && (m_dim > kRowGroup || !OnePass<W>(static_cast<int>(m_dim)))) {
    return PanelsBlocked(p0, p1, x, static_cast<int>(m_dim), k_dim, w, y, n_dim);
  }
  const bool widen =
      !std::is_same_v<W, float> && (m_dim + kRowGroup - 1) / kRowGroup > kWidenGroups;
  thread_local std::vector<float> wide;
  if (widen && wide.size() < static_cast<size_t>(k_dim * kPanel)) wide.resize(k_dim * kPanel);
  for (int64_t p = p0; p < p1; ++p) {
    const W* panel = w + p * k_dim * kPanel;
    if (widen) {
      for (int64_t i = 0; i < k_dim * kPanel; i += kLanes) {
        const vf v = Load(panel + i);
        std::memcpy(wide.data() + i, &v, sizeof v);
      }
    }
    for (int64_t m = 0; m < m_dim; m += kRowGroup) {
      const int rows = static_cast<int>(std::min<int64_t>(kRowGroup, m_dim - m));
      if (widen) {
        Rows(rows, x + m * k_dim, k_dim, wide.data(), y + m * n_dim, n_dim, p * kPanel);
      } else {
        Rows(rows, x + m * k_dim, k_dim, panel, y + m * n_dim, n_dim, p * kPanel);
      }
    }
  }
}


// ---- AMX tiles (x86-64 with AMX-BF16, Linux >= 5.16) -----------------------------------------
#if PATHWAYS_HAVE_TILES
#define PATHWAYS_TILES __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw")))

bool TilesReady() {
  static const bool ready = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool amx = (d >> 22 & 1) && (d >> 24 & 1) && (b >> 16 & 1) && (b >> 30 & 1);
    if (!amx) return false;
    // The kernel hands out the tile data state only to processes that ask for it.
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ready;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Rows of x (float32, [m_dim, k_dim]) -> bfloat16 rounded to nearest even, [mp, kp]: rows and
// columns past x's are zero.
PATHWAYS_TILES void ToBf16(const float* x, int64_t m_dim, int64_t k_dim, uint16_t* out,
                           int64_t mp, int64_t kp) {
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff);
  const __m512i abs = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  const __m512i quiet = _mm512_set1_epi32(0x40);
  for (int64_t m = 0; m < mp; ++m) {
    uint16_t* row = out + m * kp;
    int64_t k = 0;
    if (m < m_dim) {
      const float* src = x + m * k_dim;
      for (; k < k_dim; k += 16) {
        const __mmask16 valid = k + 16 <= k_dim ? 0xffff : (1u << (k_dim - k)) - 1;
        const __m512i u = _mm512_maskz_loadu_epi32(valid, src + k);
        const __m512i up = _mm512_add_epi32(
            u, _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), one), half));
        // NaN stays NaN (rounding would carry it into the sign bit): truncate and quiet it.
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs), inf);
        const __m512i h = _mm512_mask_blend_epi32(nan, _mm512_srli_epi32(up, 16),
                                                  _mm512_or_si512(_mm512_srli_epi32(u, 16), quiet));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + k), _mm512_cvtepi32_epi16(h));
      }
    }
    for (; k < kp; k += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + k),
                                                _mm256_setzero_si256());
  }
}

// One packed bfloat16 panel [K, 32] -> the pair-interleaved layout AMX reads B from:
// [kp / 2][32 columns][2], rows past K zero. kp is K rounded up to 32.
PATHWAYS_TILES void Interleave(const uint16_t* panel, int64_t k_dim, int64_t kp, uint16_t* out) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40,
                                      8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t k = 0; k < kp; k += 2) {
    const __m512i a = k < k_dim ? _mm512_loadu_si512(panel + k * kPanel) : _mm512_setzero_si512();
    const __m512i b =
        k + 1 < k_dim ? _mm512_loadu_si512(panel + (k + 1) * kPanel) : _mm512_setzero_si512();
    _mm512_storeu_si512(out + k * kPanel, _mm512_permutex2var_epi16(a, lo, b));
    _mm512_storeu_si512(out + k * kPanel + 32, _mm512_permutex2var_epi16(a, hi, b));
  }
}

// Panels [p0, p1) of y = x @ w on tiles. `a` is x in bfloat16, [mp, kp] (zero-padded to
// multiples of 32). Per 32x32 block of y: 4 accumulator tiles, 2 of x, 2 of the panel. Panels
// go in groups of kGroup, interleaved together (in L2); each 32-row slice of x is then used
// against the whole group while it is in L1, so only the panels stream from L2.
constexpr int64_t kGroup = 4;

PATHWAYS_TILES void PanelsTiles(int64_t p0, int64_t p1, const uint16_t* a, int64_t mp, int64_t kp,
                                int64_t m_dim, int64_t k_dim, const uint16_t* w, float* y,
                                int64_t n_dim) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  thread_local std::vector<uint16_t> group;  // kept: a fresh one per call costs page faults
  group.resize(std::max<size_t>(group.size(), kGroup * kp * kPanel));
  alignas(64) float c[32 * kPanel];
  for (int64_t g = p0; g < p1; g += kGroup) {
    const int64_t g1 = std::min(p1, g + kGroup);
    for (int64_t p = g; p < g1; ++p) {
      Interleave(w + p * k_dim * kPanel, k_dim, kp, group.data() + (p - g) * kp * kPanel);
    }
    for (int64_t m = 0; m < mp; m += 32) {
      const uint16_t* a0 = a + m * kp;
      for (int64_t p = g; p < g1; ++p) {
        const uint16_t* b = group.data() + (p - g) * kp * kPanel;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t k = 0; k < kp; k += 32) {
          _tile_loadd(4, a0 + k, kp * 2);
          _tile_loadd(5, a0 + 16 * kp + k, kp * 2);
          _tile_loadd(6, b + k * kPanel, 2 * kPanel * 2);
          _tile_loadd(7, b + k * kPanel + 32, 2 * kPanel * 2);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, c, kPanel * 4);
        _tile_stored(1, c + 16, kPanel * 4);
        _tile_stored(2, c + 16 * kPanel, kPanel * 4);
        _tile_stored(3, c + 16 * kPanel + 16, kPanel * 4);
        const int64_t cols = std::min(kPanel, n_dim - p * kPanel);
        for (int64_t r = 0; r < 32 && m + r < m_dim; ++r) {
          std::memcpy(y + (m + r) * n_dim + p * kPanel, c + r * kPanel, cols * sizeof(float));
        }
      }
    }
  }
  _tile_release();
}
#else
bool TilesReady() { return false; }
#endif

template <ffi::DataType T, bool kTiles = false>
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
  thread_local std::vector<uint16_t> a;  // x in bfloat16 for the tiles, [mp, kp]
  const int64_t mp = (m_dim + 31) / 32 * 32, kp = (k_dim + 31) / 32 * 32;
#if PATHWAYS_HAVE_TILES
  const bool tiles = kTiles && T == ffi::BF16 && m_dim > kMaxRows && TilesReady();
  if (tiles) {
    a.resize(std::max<size_t>(a.size(), mp * kp));
    ToBf16(xp, m_dim, k_dim, a.data(), mp, kp);
  }
  const uint16_t* ap = a.data();  // the pool's threads see their own `a`: pass the pointer
#else
  const bool tiles = false;
#endif
  auto panels_of = [&](int64_t p0, int64_t p1) {
#if PATHWAYS_HAVE_TILES
    if (tiles) {
      PanelsTiles(p0, p1, ap, mp, kp, m_dim, k_dim,
                  reinterpret_cast<const uint16_t*>(wp), yp, n_dim);
      return;
    }
#endif
    Panels(p0, p1, xp, m_dim, k_dim, wp, yp, n_dim);
  };

  // Split the panels over XLA's intra-op pool when it has more than one thread (pool.h).
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  pathways::SplitOverPool(pool, threads, panels, std::min<int64_t>(threads * 4, panels),
                          panels_of);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(PathwaysMatmulBf16Tiles, (Matmul<ffi::BF16, true>),
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Whether `_tiles` targets run on AMX here (for tests and benchmarks).
extern "C" int pathways_tiles_ready() { return TilesReady() ? 1 : 0; }
