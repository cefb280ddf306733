// Splitting a kernel's work over XLA's intra-op thread pool (matmul.cc's panels, attention.cc's
// (row, kv head) pairs).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace pathways {

// Calls part(begin, end) over [0, n) in `chunks` consecutive ranges, on this thread and on
// `threads - 1` tasks of `pool` (all on this thread where threads or chunks <= 1). Every
// participant takes chunks from a shared counter, and this thread waits only for chunks someone
// has taken: a task that starts late (its pool threads busy, e.g. with another such call) finds
// nothing left and returns, so waiting can never deadlock. The state lives on the heap for such
// late tasks.
template <typename Part>
void SplitOverPool(xla::ffi::ThreadPool& pool, int64_t threads, int64_t n, int64_t chunks,
                   Part part) {
  if (threads <= 1 || chunks <= 1) {
    part(int64_t{0}, n);
    return;
  }
  struct Work {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto work = std::make_shared<Work>();
  auto run = [work, chunks, n, part] {
    for (int64_t c; (c = work->next.fetch_add(1)) < chunks;) {
      part(n * c / chunks, n * (c + 1) / chunks);
      work->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([run] { run(); });
  run();
  while (work->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

}  // namespace pathways
