// Ring replay buffer of float32 transitions with uniform sampling and a background prefetcher.
// No Python, no libtorch: callers hand in raw pointers (the bindings take them from numpy).
//
// Locking (see README "Replay buffer" for the user-facing summary):
//  * data_mutex_ (shared_mutex): add() and restore() take it exclusively; sampling takes it shared,
//    so several samplers (the prefetcher thread and the caller) can gather at once, and an add()
//    waits for in-flight gathers and vice versa. A batch is therefore never torn by an add.
//  * rng_mutex_: drawing indices advances the one RNG; it is held only while the B indices are
//    drawn, not during the gather. With a single sampler the sequence of batches is a pure function
//    of the seed and the buffer contents.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "rng.h"

namespace misa {

// Destination of one batch: five row-major float32 arrays of batch_size rows each.
struct BatchView {
  float* observations;       // [B, obs_dim]
  float* actions;            // [B, act_dim]
  float* rewards;            // [B]
  float* next_observations;  // [B, obs_dim]
  float* terminals;          // [B]
};

// Zero-initialised float storage, 2 MiB aligned and, on Linux, backed by transparent huge pages
// where the kernel allows it: sampling touches random rows of a large array, and with 4 KiB pages
// nearly every row costs a TLB miss on top of its cache miss.
class FloatStorage {
 public:
  explicit FloatStorage(std::size_t count);
  float* data() { return data_.get(); }
  const float* data() const { return data_.get(); }

 private:
  struct Free {
    void operator()(float* p) const;
  };
  std::unique_ptr<float, Free> data_;
};

// Source rows for add(): same layout with n rows.
struct ConstRows {
  const float* observations;
  const float* actions;
  const float* rewards;
  const float* next_observations;
  const float* terminals;
};

class ReplayBuffer {
 public:
  ReplayBuffer(std::size_t capacity, std::size_t obs_dim, std::size_t act_dim, uint64_t seed);

  // Appends n rows; once full, overwrites the oldest (FIFO). If n > capacity only the last
  // `capacity` rows are kept, as if they had been added one by one.
  void add(const ConstRows& rows, std::size_t n);

  // Draws batch_size indices uniformly with replacement and gathers them into out.
  // If state_after is given it receives the RNG state right after these indices were drawn.
  void sample_into(std::size_t batch_size, const BatchView& out, Xoshiro256::State* state_after = nullptr);

  // One batch for each of `streams` independent index streams in one call (several seeds trained
  // together): stream m draws batch_size indices from its own RNG state states[m], exactly as a
  // buffer whose RNG held that state would, and advances it; the rows go to out as streams blocks
  // of batch_size rows, stream 0 first. The buffer's own RNG is not touched.
  void sample_streams_into(std::size_t batch_size, Xoshiro256::State* states, std::size_t streams,
                           const BatchView& out);

  // Gathers the given row indices (each < size()) into out; no RNG involved.
  void gather(const uint64_t* indices, std::size_t batch_size, const BatchView& out) const;

  std::size_t capacity() const { return capacity_; }
  std::size_t obs_dim() const { return obs_dim_; }
  std::size_t act_dim() const { return act_dim_; }
  std::size_t size() const;
  std::size_t position() const;  // next row written by add()

  Xoshiro256::State rng_state() const;
  void set_rng_state(const Xoshiro256::State& s);

  // Raw storage, for zero-copy views: transition i occupies floats [i * row_stride(), ...) of
  // data(), its fields at the offsets below. Rows [0, size()) are valid.
  float* data() { return storage_.data(); }
  std::size_t row_stride() const { return row_stride_; }
  std::size_t observations_offset() const { return 0; }
  std::size_t actions_offset() const { return obs_dim_; }
  std::size_t rewards_offset() const { return obs_dim_ + act_dim_; }
  std::size_t next_observations_offset() const { return obs_dim_ + act_dim_ + 1; }
  std::size_t terminals_offset() const { return 2 * obs_dim_ + act_dim_ + 1; }

  // Replaces size/position (contents are written through the raw storage beforehand).
  void restore(std::size_t size, std::size_t position);

 private:
  void draw_indices(std::size_t batch_size, uint64_t* out, Xoshiro256::State* state_after);
  void gather_unlocked(const uint64_t* indices, std::size_t batch_size, const BatchView& out) const;

  const std::size_t capacity_, obs_dim_, act_dim_;
  // One interleaved row per transition, padded to whole 64-byte cache lines: a sampled row then
  // costs two or three cache misses instead of one or two per field.
  const std::size_t row_stride_;
  FloatStorage storage_;
  std::size_t size_ = 0, position_ = 0;
  Xoshiro256 rng_;
  mutable std::shared_mutex data_mutex_;
  mutable std::mutex rng_mutex_;
};

// Keeps `slots.size()` batches ready ahead of the consumer. The slot memory belongs to the caller
// (pinned host memory on CUDA machines) and must outlive the Prefetcher.
//
// Protocol: acquire() blocks until the oldest filled slot is ready and returns its index; the
// consumer reads it, then release()s it so the worker may refill it. Batches come out in the order
// they were drawn. rng_state_after(slot) is the buffer RNG state right after that slot was drawn:
// restoring it reproduces every batch that follows.
class Prefetcher {
 public:
  Prefetcher(std::shared_ptr<ReplayBuffer> buffer, std::size_t batch_size, std::vector<BatchView> slots);
  ~Prefetcher();
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;

  std::size_t acquire();  // throws std::runtime_error once closed or if the worker failed
  void release(std::size_t slot);
  void close();           // idempotent; joins the worker
  bool closed() const { return stop_.load(); }

  Xoshiro256::State rng_state_after(std::size_t slot) const;
  std::size_t depth() const { return slots_.size(); }
  std::size_t batch_size() const { return batch_size_; }

 private:
  enum class SlotState { kFree, kReady, kInUse };
  void run();

  std::shared_ptr<ReplayBuffer> buffer_;
  const std::size_t batch_size_;
  std::vector<BatchView> slots_;
  std::vector<SlotState> state_;
  std::vector<Xoshiro256::State> rng_after_;
  std::size_t next_fill_ = 0, next_take_ = 0;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::atomic<bool> stop_{false};
  std::string error_;
  std::thread worker_;
};

}  // namespace misa
