#include "replay_buffer.h"

#include <algorithm>
#include <cstring>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace misa {

FloatStorage::FloatStorage(std::size_t count) {
  constexpr std::size_t kHugePage = std::size_t{2} << 20;
  const std::size_t bytes = std::max<std::size_t>(count * sizeof(float), 1);
  const std::size_t alignment = bytes >= kHugePage ? kHugePage : 64;
  const std::size_t rounded = (bytes + alignment - 1) / alignment * alignment;
  void* p = std::aligned_alloc(alignment, rounded);
  if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (alignment == kHugePage) madvise(p, rounded, MADV_HUGEPAGE);  // a hint: failure is harmless
#endif
  std::memset(p, 0, rounded);
  data_.reset(static_cast<float*>(p));
}

void FloatStorage::Free::operator()(float* p) const { std::free(p); }

namespace {
std::size_t checked_positive(std::size_t value, const char* name) {
  if (value == 0) throw std::invalid_argument(std::string(name) + " must be positive, got 0");
  return value;
}

constexpr std::size_t kFloatsPerLine = 64 / sizeof(float);

std::size_t padded_row(std::size_t obs_dim, std::size_t act_dim) {
  const std::size_t used = 2 * obs_dim + act_dim + 2;
  return (used + kFloatsPerLine - 1) / kFloatsPerLine * kFloatsPerLine;
}
}  // namespace

ReplayBuffer::ReplayBuffer(std::size_t capacity, std::size_t obs_dim, std::size_t act_dim, uint64_t seed)
    : capacity_(checked_positive(capacity, "capacity")),
      obs_dim_(checked_positive(obs_dim, "obs_dim")),
      act_dim_(checked_positive(act_dim, "act_dim")),
      row_stride_(padded_row(obs_dim, act_dim)),
      storage_(capacity * row_stride_),
      rng_(seed) {}

void ReplayBuffer::add(const ConstRows& rows, std::size_t n) {
  if (n == 0) return;
  std::unique_lock lock(data_mutex_);
  // Rows that would be overwritten within this same call are skipped.
  const std::size_t skip = n > capacity_ ? n - capacity_ : 0;
  std::size_t pos = (position_ + skip) % capacity_;
  float* base = storage_.data();
  for (std::size_t src = skip; src < n; ++src) {
    float* row = base + pos * row_stride_;
    std::memcpy(row + observations_offset(), rows.observations + src * obs_dim_, obs_dim_ * sizeof(float));
    std::memcpy(row + actions_offset(), rows.actions + src * act_dim_, act_dim_ * sizeof(float));
    row[rewards_offset()] = rows.rewards[src];
    std::memcpy(row + next_observations_offset(), rows.next_observations + src * obs_dim_, obs_dim_ * sizeof(float));
    row[terminals_offset()] = rows.terminals[src];
    pos = pos + 1 == capacity_ ? 0 : pos + 1;
  }
  position_ = pos;
  size_ = std::min(capacity_, size_ + n);
}

void ReplayBuffer::draw_indices(std::size_t batch_size, uint64_t* out, Xoshiro256::State* state_after) {
  std::lock_guard lock(rng_mutex_);
  for (std::size_t i = 0; i < batch_size; ++i) out[i] = rng_.below(size_);
  if (state_after) *state_after = rng_.state();
}

void ReplayBuffer::sample_into(std::size_t batch_size, const BatchView& out, Xoshiro256::State* state_after) {
  if (batch_size == 0) throw std::invalid_argument("batch_size must be positive, got 0");
  std::shared_lock lock(data_mutex_);
  if (size_ == 0) throw std::out_of_range("cannot sample from an empty replay buffer; add() transitions first");
  // Indices on the stack for the usual batch sizes; the heap only for huge batches.
  constexpr std::size_t kStack = 4096;
  uint64_t stack_indices[kStack];
  std::vector<uint64_t> heap_indices;
  uint64_t* indices = stack_indices;
  if (batch_size > kStack) {
    heap_indices.resize(batch_size);
    indices = heap_indices.data();
  }
  draw_indices(batch_size, indices, state_after);
  gather_unlocked(indices, batch_size, out);
}

void ReplayBuffer::sample_streams_into(std::size_t batch_size, Xoshiro256::State* states, std::size_t streams,
                                       const BatchView& out) {
  if (batch_size == 0) throw std::invalid_argument("batch_size must be positive, got 0");
  if (streams == 0) throw std::invalid_argument("streams must be positive, got 0");
  std::shared_lock lock(data_mutex_);
  if (size_ == 0) throw std::out_of_range("cannot sample from an empty replay buffer; add() transitions first");
  std::vector<uint64_t> indices(batch_size * streams);
  for (std::size_t m = 0; m < streams; ++m) {
    Xoshiro256 rng;
    rng.set_state(states[m]);
    for (std::size_t i = 0; i < batch_size; ++i) indices[m * batch_size + i] = rng.below(size_);
    states[m] = rng.state();
  }
  gather_unlocked(indices.data(), indices.size(), out);
}

void ReplayBuffer::gather(const uint64_t* indices, std::size_t batch_size, const BatchView& out) const {
  std::shared_lock lock(data_mutex_);
  for (std::size_t i = 0; i < batch_size; ++i) {
    if (indices[i] >= size_) {
      throw std::out_of_range("index " + std::to_string(indices[i]) + " out of range for replay buffer of size " +
                              std::to_string(size_));
    }
  }
  gather_unlocked(indices, batch_size, out);
}

void ReplayBuffer::gather_unlocked(const uint64_t* indices, std::size_t batch_size, const BatchView& out) const {
  const float* base = storage_.data();
  const std::size_t lines_per_row = row_stride_ / kFloatsPerLine;
  // Random rows of a large buffer miss every cache level; prefetching a few rows ahead keeps
  // several misses in flight instead of paying them one after another.
  constexpr std::size_t kAhead = 8;
  auto prefetch = [&](std::size_t row) {
    const float* p = base + row * row_stride_;
    for (std::size_t line = 0; line < lines_per_row; ++line) __builtin_prefetch(p + line * kFloatsPerLine);
  };
  for (std::size_t i = 0; i < std::min(kAhead, batch_size); ++i) prefetch(indices[i]);
  for (std::size_t i = 0; i < batch_size; ++i) {
    if (i + kAhead < batch_size) prefetch(indices[i + kAhead]);
    const float* row = base + indices[i] * row_stride_;
    std::memcpy(out.observations + i * obs_dim_, row + observations_offset(), obs_dim_ * sizeof(float));
    std::memcpy(out.actions + i * act_dim_, row + actions_offset(), act_dim_ * sizeof(float));
    out.rewards[i] = row[rewards_offset()];
    std::memcpy(out.next_observations + i * obs_dim_, row + next_observations_offset(), obs_dim_ * sizeof(float));
    out.terminals[i] = row[terminals_offset()];
  }
}

std::size_t ReplayBuffer::size() const {
  std::shared_lock lock(data_mutex_);
  return size_;
}

std::size_t ReplayBuffer::position() const {
  std::shared_lock lock(data_mutex_);
  return position_;
}

Xoshiro256::State ReplayBuffer::rng_state() const {
  std::lock_guard lock(rng_mutex_);
  return rng_.state();
}

void ReplayBuffer::set_rng_state(const Xoshiro256::State& s) {
  std::lock_guard lock(rng_mutex_);
  rng_.set_state(s);
}

void ReplayBuffer::restore(std::size_t size, std::size_t position) {
  if (size > capacity_) throw std::invalid_argument("restored size exceeds capacity");
  if (position >= capacity_) throw std::invalid_argument("restored position must be < capacity");
  if (size < capacity_ && position != size) {
    throw std::invalid_argument("a buffer that is not full must have position == size");
  }
  std::unique_lock lock(data_mutex_);
  size_ = size;
  position_ = position;
}

// ---------------------------------------------------------------------------------------------
// Prefetcher

Prefetcher::Prefetcher(std::shared_ptr<ReplayBuffer> buffer, std::size_t batch_size, std::vector<BatchView> slots)
    : buffer_(std::move(buffer)),
      batch_size_(batch_size),
      slots_(std::move(slots)),
      state_(slots_.size(), SlotState::kFree),
      rng_after_(slots_.size()) {
  if (!buffer_) throw std::invalid_argument("Prefetcher needs a buffer");
  if (batch_size_ == 0) throw std::invalid_argument("batch_size must be positive, got 0");
  if (slots_.empty()) throw std::invalid_argument("Prefetcher needs at least one slot");
  worker_ = std::thread([this] { run(); });
}

Prefetcher::~Prefetcher() { close(); }

void Prefetcher::run() {
  for (;;) {
    std::size_t slot;
    {
      std::unique_lock lock(mutex_);
      cv_.wait(lock, [&] { return stop_.load() || state_[next_fill_] == SlotState::kFree; });
      if (stop_.load()) return;
      slot = next_fill_;
    }
    Xoshiro256::State after;
    try {
      buffer_->sample_into(batch_size_, slots_[slot], &after);
    } catch (const std::exception& e) {
      std::lock_guard lock(mutex_);
      error_ = e.what();
      stop_.store(true);
      cv_.notify_all();
      return;
    }
    {
      std::lock_guard lock(mutex_);
      rng_after_[slot] = after;
      state_[slot] = SlotState::kReady;
      next_fill_ = (next_fill_ + 1) % slots_.size();
    }
    cv_.notify_all();
  }
}

std::size_t Prefetcher::acquire() {
  std::unique_lock lock(mutex_);
  cv_.wait(lock, [&] { return stop_.load() || state_[next_take_] == SlotState::kReady; });
  if (stop_.load()) {
    throw std::runtime_error(error_.empty() ? "prefetcher is closed" : "prefetcher worker failed: " + error_);
  }
  const std::size_t slot = next_take_;
  state_[slot] = SlotState::kInUse;
  next_take_ = (next_take_ + 1) % slots_.size();
  return slot;
}

void Prefetcher::release(std::size_t slot) {
  {
    std::lock_guard lock(mutex_);
    if (slot >= slots_.size() || state_[slot] != SlotState::kInUse) {
      throw std::invalid_argument("release() of a slot that was not acquired");
    }
    state_[slot] = SlotState::kFree;
  }
  cv_.notify_all();
}

void Prefetcher::close() {
  {
    std::lock_guard lock(mutex_);
    stop_.store(true);
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

Xoshiro256::State Prefetcher::rng_state_after(std::size_t slot) const {
  if (slot >= slots_.size()) throw std::out_of_range("slot index out of range");
  std::lock_guard lock(mutex_);
  return rng_after_[slot];
}

}  // namespace misa
