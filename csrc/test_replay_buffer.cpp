// C++ test of the buffer core, built by CMake and run with ctest, also under ASan and TSan:
//   cmake -S . -B build/asan -DMISA_FAST_BUILD_PYTHON=OFF -DMISA_FAST_SANITIZE=address && \
//     cmake --build build/asan && ctest --test-dir build/asan --output-on-failure
// (same with build/tsan and -DMISA_FAST_SANITIZE=thread). Plain asserts: no test framework needed.
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <set>
#include <thread>
#include <vector>

#include "replay_buffer.h"

using namespace misa;

#define CHECK(cond)                                                               \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                               \
    }                                                                             \
  } while (0)

namespace {

constexpr std::size_t kObs = 3, kAct = 2;

// Row i carries the value i in every field (offset per field), so a sampled row reveals its index
// and whether all five fields came from the same transition.
struct Rows {
  std::vector<float> obs, act, rew, next_obs, term;
  explicit Rows(std::size_t n, std::size_t start = 0) {
    for (std::size_t i = 0; i < n; ++i) {
      const float v = static_cast<float>(start + i);
      for (std::size_t j = 0; j < kObs; ++j) obs.push_back(v), next_obs.push_back(v + 0.5f);
      for (std::size_t j = 0; j < kAct; ++j) act.push_back(-v);
      rew.push_back(2 * v);
      term.push_back(static_cast<float>((start + i) % 2));
    }
  }
  ConstRows view() const { return {obs.data(), act.data(), rew.data(), next_obs.data(), term.data()}; }
};

struct Batch {
  std::vector<float> obs, act, rew, next_obs, term;
  explicit Batch(std::size_t b) : obs(b * kObs), act(b * kAct), rew(b), next_obs(b * kObs), term(b) {}
  BatchView view() { return {obs.data(), act.data(), rew.data(), next_obs.data(), term.data()}; }
  // Returns the transition id of row i after checking the row is internally consistent.
  long row_id(std::size_t i) const {
    const float v = obs[i * kObs];
    for (std::size_t j = 0; j < kObs; ++j) CHECK(obs[i * kObs + j] == v && next_obs[i * kObs + j] == v + 0.5f);
    for (std::size_t j = 0; j < kAct; ++j) CHECK(act[i * kAct + j] == -v);
    CHECK(rew[i] == 2 * v);
    CHECK(term[i] == static_cast<float>(static_cast<long>(v) % 2));
    return static_cast<long>(v);
  }
};

void test_add_and_sample_rows_consistent() {
  ReplayBuffer buf(100, kObs, kAct, 7);
  Rows rows(60);
  buf.add(rows.view(), 60);
  CHECK(buf.size() == 60 && buf.position() == 60);
  Batch batch(512);
  buf.sample_into(512, batch.view());
  std::set<long> seen;
  for (std::size_t i = 0; i < 512; ++i) {
    const long id = batch.row_id(i);
    CHECK(id >= 0 && id < 60);
    seen.insert(id);
  }
  CHECK(seen.size() > 50);  // 512 draws from 60 rows miss almost none
}

void test_ring_overwrite() {
  ReplayBuffer buf(10, kObs, kAct, 1);
  Rows first(7, 0), second(7, 100);
  buf.add(first.view(), 7);
  buf.add(second.view(), 7);
  CHECK(buf.size() == 10 && buf.position() == 4);
  // Live rows: ids 3..6 from the first add, 100..106 from the second.
  Batch batch(2000);
  buf.sample_into(2000, batch.view());
  std::set<long> seen;
  for (std::size_t i = 0; i < 2000; ++i) seen.insert(batch.row_id(i));
  std::set<long> expected{4, 5, 6, 100, 101, 102, 103, 104, 105, 106};
  // capacity 10: 14 rows added, the first 4 (ids 0..3) are gone.
  CHECK(seen == expected);

  // One add larger than the capacity keeps only its last rows.
  ReplayBuffer small(4, kObs, kAct, 1);
  Rows many(10, 50);
  small.add(many.view(), 10);
  CHECK(small.size() == 4 && small.position() == 2);
  Batch b2(500);
  small.sample_into(500, b2.view());
  std::set<long> seen2;
  for (std::size_t i = 0; i < 500; ++i) seen2.insert(b2.row_id(i));
  CHECK((seen2 == std::set<long>{56, 57, 58, 59}));
}

void test_determinism_and_rng_state() {
  ReplayBuffer a(1000, kObs, kAct, 42), b(1000, kObs, kAct, 42), c(1000, kObs, kAct, 43);
  Rows rows(1000);
  a.add(rows.view(), 1000), b.add(rows.view(), 1000), c.add(rows.view(), 1000);
  Batch ba(64), bb(64), bc(64);
  a.sample_into(64, ba.view());
  b.sample_into(64, bb.view());
  c.sample_into(64, bc.view());
  CHECK(ba.obs == bb.obs);
  CHECK(ba.obs != bc.obs);
  const auto saved = a.rng_state();
  a.sample_into(64, ba.view());
  b.set_rng_state(saved);
  b.sample_into(64, bb.view());
  CHECK(ba.obs == bb.obs);
}

void test_uniformity() {
  const std::size_t n = 50, draws = 200000;
  ReplayBuffer buf(n, kObs, kAct, 3);
  Rows rows(n);
  buf.add(rows.view(), n);
  Batch batch(draws);
  buf.sample_into(draws, batch.view());
  std::vector<double> counts(n, 0);
  for (std::size_t i = 0; i < draws; ++i) counts[static_cast<std::size_t>(batch.obs[i * kObs])] += 1;
  const double expected = static_cast<double>(draws) / n;
  double chi2 = 0;
  for (double c : counts) chi2 += (c - expected) * (c - expected) / expected;
  // 49 degrees of freedom: P(chi2 > 94) < 1e-4.
  CHECK(chi2 < 94.0);
}

void test_errors() {
  bool threw = false;
  try {
    ReplayBuffer bad(0, kObs, kAct, 0);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
  ReplayBuffer empty(10, kObs, kAct, 0);
  Batch batch(4);
  threw = false;
  try {
    empty.sample_into(4, batch.view());
  } catch (const std::out_of_range&) {
    threw = true;
  }
  CHECK(threw);
  Rows rows(3);
  empty.add(rows.view(), 3);
  threw = false;
  try {
    empty.sample_into(0, batch.view());
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
}

void test_prefetcher_order_matches_direct_sampling() {
  auto buf = std::make_shared<ReplayBuffer>(500, kObs, kAct, 11);
  ReplayBuffer twin(500, kObs, kAct, 11);
  Rows rows(500);
  buf->add(rows.view(), 500);
  twin.add(rows.view(), 500);
  const std::size_t bs = 32, depth = 3;
  std::vector<Batch> slots(depth, Batch(bs));
  std::vector<BatchView> views;
  for (auto& s : slots) views.push_back(s.view());
  Prefetcher pf(buf, bs, views);
  Batch direct(bs);
  for (int step = 0; step < 20; ++step) {
    const std::size_t slot = pf.acquire();
    twin.sample_into(bs, direct.view());
    CHECK(slots[slot].obs == direct.obs);
    CHECK(pf.rng_state_after(slot) == twin.rng_state());
    pf.release(slot);
  }
  pf.close();
  bool threw = false;
  try {
    pf.acquire();
  } catch (const std::runtime_error&) {
    threw = true;
  }
  CHECK(threw);
}

void test_concurrent_add_while_prefetching() {
  auto buf = std::make_shared<ReplayBuffer>(256, kObs, kAct, 5);
  Rows seed_rows(64);
  buf->add(seed_rows.view(), 64);
  const std::size_t bs = 16;
  std::vector<Batch> slots(4, Batch(bs));
  std::vector<BatchView> views;
  for (auto& s : slots) views.push_back(s.view());
  Prefetcher pf(buf, bs, views);
  std::atomic<bool> done{false};
  std::thread writer([&] {
    for (std::size_t k = 0; k < 200; ++k) {
      Rows more(8, 1000 + 8 * k);
      buf->add(more.view(), 8);
    }
    done = true;
  });
  std::size_t taken = 0;
  while (!done || taken < 200) {
    const std::size_t slot = pf.acquire();
    for (std::size_t i = 0; i < bs; ++i) slots[slot].row_id(i);  // every row consistent
    pf.release(slot);
    ++taken;
  }
  writer.join();
  pf.close();
  CHECK(buf->size() == 256);
}

void test_prefetcher_close_while_blocked() {
  auto buf = std::make_shared<ReplayBuffer>(16, kObs, kAct, 5);
  Rows rows(16);
  buf->add(rows.view(), 16);
  std::vector<Batch> slots(2, Batch(4));
  std::vector<BatchView> views{slots[0].view(), slots[1].view()};
  auto pf = std::make_unique<Prefetcher>(buf, 4, views);
  // Never acquire: the worker fills both slots and blocks; destruction must not hang.
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  pf.reset();
}

void test_streams_match_buffers_of_their_seeds() {
  const std::size_t bs = 16, streams = 3;
  const uint64_t seeds[streams] = {0, 3, 7};
  ReplayBuffer shared(64, kObs, kAct, 99);
  Rows rows(64);
  shared.add(rows.view(), 64);
  std::vector<Xoshiro256::State> states;
  for (uint64_t seed : seeds) states.push_back(Xoshiro256(seed).state());
  std::vector<std::unique_ptr<ReplayBuffer>> singles;
  for (uint64_t seed : seeds) {
    singles.push_back(std::make_unique<ReplayBuffer>(64, kObs, kAct, seed));
    singles.back()->add(rows.view(), 64);
  }
  const auto own_before = shared.rng_state();
  for (int round = 0; round < 3; ++round) {
    Batch together(bs * streams);
    shared.sample_streams_into(bs, states.data(), streams, together.view());
    for (std::size_t m = 0; m < streams; ++m) {
      Batch alone(bs);
      singles[m]->sample_into(bs, alone.view());
      for (std::size_t i = 0; i < bs * kObs; ++i) CHECK(together.obs[m * bs * kObs + i] == alone.obs[i]);
      CHECK(states[m] == singles[m]->rng_state());
    }
  }
  CHECK(shared.rng_state() == own_before);  // the buffer's own stream is untouched
}

}  // namespace

int main() {
  test_add_and_sample_rows_consistent();
  test_ring_overwrite();
  test_determinism_and_rng_state();
  test_uniformity();
  test_errors();
  test_prefetcher_order_matches_direct_sampling();
  test_concurrent_add_while_prefetching();
  test_prefetcher_close_while_blocked();
  test_streams_match_buffers_of_their_seeds();
  std::puts("replay buffer: all C++ checks passed");
  return 0;
}
