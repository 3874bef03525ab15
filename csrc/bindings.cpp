// Thin pybind11 layer over the C++ core. Checks here are the last line of defence (the Python
// wrapper in misa_fast/buffer.py validates and converts user input with friendlier messages);
// the GIL is released around every copy, gather and wait.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <string>

#include "replay_buffer.h"

namespace py = pybind11;
using misa::BatchView;
using misa::ConstRows;
using misa::Prefetcher;
using misa::ReplayBuffer;
using misa::Xoshiro256;

namespace {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Returns the data pointer of a C-contiguous float32 array of shape (rows,) or (rows, width).
float* checked_ptr(const py::array& a, const char* name, std::size_t rows, std::size_t width, bool writable) {
  if (!py::isinstance<py::array_t<float>>(a) || a.dtype().kind() != 'f' || a.itemsize() != 4) {
    throw py::type_error(std::string(name) + ": expected a float32 array, got dtype " +
                         std::string(py::str(a.dtype())));
  }
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": expected a C-contiguous array");
  if (writable && !a.writeable()) throw py::value_error(std::string(name) + ": array is read-only");
  const bool vector_ok = width == 1 && a.ndim() == 1 && static_cast<std::size_t>(a.shape(0)) == rows;
  const bool matrix_ok = a.ndim() == 2 && static_cast<std::size_t>(a.shape(0)) == rows &&
                         static_cast<std::size_t>(a.shape(1)) == width;
  if (!vector_ok && !matrix_ok) {
    throw py::value_error(std::string(name) + ": expected shape (" + std::to_string(rows) +
                          (width == 1 ? ",)" : ", " + std::to_string(width) + ")") + ", got " + shape_str(a));
  }
  return static_cast<float*>(const_cast<void*>(a.data()));
}

BatchView batch_view(const ReplayBuffer& b, std::size_t rows, const py::array& obs, const py::array& act,
                     const py::array& rew, const py::array& next_obs, const py::array& term) {
  return BatchView{checked_ptr(obs, "observations", rows, b.obs_dim(), true),
                   checked_ptr(act, "actions", rows, b.act_dim(), true),
                   checked_ptr(rew, "rewards", rows, 1, true),
                   checked_ptr(next_obs, "next_observations", rows, b.obs_dim(), true),
                   checked_ptr(term, "terminals", rows, 1, true)};
}

py::array_t<uint64_t> state_to_array(const Xoshiro256::State& s) {
  py::array_t<uint64_t> out(4);
  for (int i = 0; i < 4; ++i) out.mutable_at(i) = s[i];
  return out;
}

Xoshiro256::State array_to_state(const py::array_t<uint64_t, py::array::c_style | py::array::forcecast>& a) {
  if (a.ndim() != 1 || a.shape(0) != 4) throw py::value_error("rng_state: expected 4 uint64 words");
  Xoshiro256::State s{};
  for (int i = 0; i < 4; ++i) s[i] = a.at(i);
  if ((s[0] | s[1] | s[2] | s[3]) == 0) throw py::value_error("rng_state: the all-zero state is invalid");
  return s;
}

// A zero-copy, strided numpy view of one field of the interleaved storage; keeps the buffer alive.
py::array field_view(py::object owner, ReplayBuffer& b, std::size_t offset, std::size_t width, bool matrix) {
  const auto row_bytes = static_cast<py::ssize_t>(b.row_stride() * sizeof(float));
  float* data = b.data() + offset;
  const auto rows = static_cast<py::ssize_t>(b.capacity());
  if (matrix) {
    return py::array_t<float>({rows, static_cast<py::ssize_t>(width)}, {row_bytes, static_cast<py::ssize_t>(sizeof(float))},
                              data, owner);
  }
  return py::array_t<float>({rows}, {row_bytes}, data, owner);
}

// Owns the Python arrays that back the prefetcher's slots. Members are destroyed in reverse
// order, so the worker thread is joined (core_) before the slot memory can be released.
class PyPrefetcher {
 public:
  PyPrefetcher(std::shared_ptr<ReplayBuffer> buffer, std::size_t batch_size, const py::list& slots) {
    std::vector<BatchView> views;
    for (const auto& item : slots) {
      auto arrays = item.cast<py::tuple>();
      if (arrays.size() != 5) throw py::value_error("each prefetcher slot needs 5 arrays");
      std::array<py::array, 5> a;
      for (int i = 0; i < 5; ++i) {
        a[i] = arrays[i].cast<py::array>();
        keep_alive_.push_back(a[i]);
      }
      views.push_back(batch_view(*buffer, batch_size, a[0], a[1], a[2], a[3], a[4]));
    }
    core_ = std::make_unique<Prefetcher>(std::move(buffer), batch_size, std::move(views));
  }
  ~PyPrefetcher() {
    py::gil_scoped_release release;
    core_.reset();
  }
  Prefetcher& core() { return *core_; }

 private:
  std::vector<py::array> keep_alive_;
  std::unique_ptr<Prefetcher> core_;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "misa-fast native core: ring replay buffer and batch prefetcher (see misa_fast.buffer)";

  m.def("seed_state", [](uint64_t seed) { return state_to_array(Xoshiro256(seed).state()); }, py::arg("seed"),
        "The index RNG state of a buffer created with this seed (a stream of sample_streams_into).");

  py::class_<ReplayBuffer, std::shared_ptr<ReplayBuffer>>(m, "ReplayBuffer")
      .def(py::init<std::size_t, std::size_t, std::size_t, uint64_t>(), py::arg("capacity"), py::arg("obs_dim"),
           py::arg("act_dim"), py::arg("seed") = 0)
      .def(
          "add",
          [](ReplayBuffer& b, const py::array& obs, const py::array& act, const py::array& rew,
             const py::array& next_obs, const py::array& term) {
            if (obs.ndim() < 1) throw py::value_error("observations: expected a 2-D array");
            const auto n = static_cast<std::size_t>(obs.shape(0));
            ConstRows rows{checked_ptr(obs, "observations", n, b.obs_dim(), false),
                           checked_ptr(act, "actions", n, b.act_dim(), false),
                           checked_ptr(rew, "rewards", n, 1, false),
                           checked_ptr(next_obs, "next_observations", n, b.obs_dim(), false),
                           checked_ptr(term, "terminals", n, 1, false)};
            py::gil_scoped_release release;
            b.add(rows, n);
          },
          py::arg("observations"), py::arg("actions"), py::arg("rewards"), py::arg("next_observations"),
          py::arg("terminals"))
      .def(
          "sample_into",
          [](ReplayBuffer& b, std::size_t batch_size, const py::array& obs, const py::array& act,
             const py::array& rew, const py::array& next_obs, const py::array& term) {
            BatchView view = batch_view(b, batch_size, obs, act, rew, next_obs, term);
            py::gil_scoped_release release;
            b.sample_into(batch_size, view);
          })
      .def(
          "sample_streams_into",
          [](ReplayBuffer& b, std::size_t batch_size, py::array_t<uint64_t, py::array::c_style> states,
             const py::array& obs, const py::array& act, const py::array& rew, const py::array& next_obs,
             const py::array& term) {
            if (states.ndim() != 2 || states.shape(1) != 4 || states.shape(0) < 1) {
              throw py::value_error("states: expected a (streams, 4) uint64 array, got shape " + shape_str(states));
            }
            if (!states.writeable()) throw py::value_error("states: array is read-only (it is advanced in place)");
            const auto streams = static_cast<std::size_t>(states.shape(0));
            std::vector<Xoshiro256::State> rng(streams);
            for (std::size_t m = 0; m < streams; ++m) {
              for (int i = 0; i < 4; ++i) rng[m][i] = states.at(m, i);
              if ((rng[m][0] | rng[m][1] | rng[m][2] | rng[m][3]) == 0) {
                throw py::value_error("states: the all-zero state is invalid (stream " + std::to_string(m) + ")");
              }
            }
            BatchView view = batch_view(b, batch_size * streams, obs, act, rew, next_obs, term);
            {
              py::gil_scoped_release release;
              b.sample_streams_into(batch_size, rng.data(), streams, view);
            }
            for (std::size_t m = 0; m < streams; ++m) {
              for (int i = 0; i < 4; ++i) states.mutable_at(m, i) = rng[m][i];
            }
          },
          py::arg("batch_size"), py::arg("states"), py::arg("observations"), py::arg("actions"), py::arg("rewards"),
          py::arg("next_observations"), py::arg("terminals"))
      .def("gather",
           [](ReplayBuffer& b, const py::array_t<uint64_t, py::array::c_style | py::array::forcecast>& indices,
              const py::array& obs, const py::array& act, const py::array& rew, const py::array& next_obs,
              const py::array& term) {
             const auto n = static_cast<std::size_t>(indices.size());
             BatchView view = batch_view(b, n, obs, act, rew, next_obs, term);
             const uint64_t* idx = indices.data();
             py::gil_scoped_release release;
             b.gather(idx, n, view);
           })
      .def_property_readonly("capacity", &ReplayBuffer::capacity)
      .def_property_readonly("obs_dim", &ReplayBuffer::obs_dim)
      .def_property_readonly("act_dim", &ReplayBuffer::act_dim)
      .def_property_readonly("size", &ReplayBuffer::size)
      .def_property_readonly("position", &ReplayBuffer::position)
      .def("rng_state", [](const ReplayBuffer& b) { return state_to_array(b.rng_state()); })
      .def("set_rng_state", [](ReplayBuffer& b, const py::array_t<uint64_t, py::array::c_style | py::array::forcecast>& a) {
        b.set_rng_state(array_to_state(a));
      })
      .def("restore", &ReplayBuffer::restore, py::arg("size"), py::arg("position"))
      .def_property_readonly("row_stride", &ReplayBuffer::row_stride)
      .def("storage", [](py::object self) {
        auto& b = self.cast<ReplayBuffer&>();
        return py::make_tuple(field_view(self, b, b.observations_offset(), b.obs_dim(), true),
                              field_view(self, b, b.actions_offset(), b.act_dim(), true),
                              field_view(self, b, b.rewards_offset(), 1, false),
                              field_view(self, b, b.next_observations_offset(), b.obs_dim(), true),
                              field_view(self, b, b.terminals_offset(), 1, false));
      });

  py::class_<PyPrefetcher>(m, "Prefetcher")
      .def(py::init<std::shared_ptr<ReplayBuffer>, std::size_t, const py::list&>(), py::arg("buffer"),
           py::arg("batch_size"), py::arg("slots"))
      .def("acquire", [](PyPrefetcher& p) { return p.core().acquire(); },
           py::call_guard<py::gil_scoped_release>())
      .def("release", [](PyPrefetcher& p, std::size_t slot) { p.core().release(slot); }, py::arg("slot"))
      .def("close", [](PyPrefetcher& p) { p.core().close(); }, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("closed", [](PyPrefetcher& p) { return p.core().closed(); })
      .def_property_readonly("depth", [](PyPrefetcher& p) { return p.core().depth(); })
      .def("rng_state_after", [](PyPrefetcher& p, std::size_t slot) {
        return state_to_array(p.core().rng_state_after(slot));
      });

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::out_of_range& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
}
