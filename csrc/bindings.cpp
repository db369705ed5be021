// pybind11 module appliance._core: only `.def`s (adapters live in py_scheduler).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "py_scheduler.h"
#include "py_suffix_tree.h"

namespace py = pybind11;
using ts::PyPlan;
using ts::PyScheduler;
using ts::PySuffixTree;
using ts::SchedulerConfig;

PYBIND11_MODULE(_core, m) {
  m.doc() = "TokenSpeed control plane: KV page pool, prefix cache, request FSM, scheduler.";

  // Every setting is a required keyword (its default lives in appliance/config.py); only the
  // internal knob min_prefill_chunk has a default, the C++ one.
  py::class_<SchedulerConfig>(m, "SchedulerConfig")
      .def(py::init([](int32_t num_pages, int32_t page_size, int32_t max_batch_tokens,
                       int32_t max_running, double tps_floor, double session_ttl_s,
                       int32_t max_seq_len, int32_t min_prefill_chunk) {
             SchedulerConfig c{.num_pages = num_pages,
                               .page_size = page_size,
                               .max_batch_tokens = max_batch_tokens,
                               .max_running = max_running,
                               .tps_floor = tps_floor,
                               .session_ttl_s = session_ttl_s,
                               .max_seq_len = max_seq_len,
                               .min_prefill_chunk = min_prefill_chunk};
             c.validate();
             return c;
           }),
           py::kw_only(), py::arg("num_pages"), py::arg("page_size"),
           py::arg("max_batch_tokens"), py::arg("max_running"), py::arg("tps_floor"),
           py::arg("session_ttl_s"), py::arg("max_seq_len"),
           py::arg("min_prefill_chunk") = SchedulerConfig::kDefaultMinPrefillChunk)
      .def_readonly("num_pages", &SchedulerConfig::num_pages)
      .def_readonly("page_size", &SchedulerConfig::page_size)
      .def_readonly("max_batch_tokens", &SchedulerConfig::max_batch_tokens)
      .def_readonly("max_running", &SchedulerConfig::max_running)
      .def_readonly("tps_floor", &SchedulerConfig::tps_floor)
      .def_readonly("session_ttl_s", &SchedulerConfig::session_ttl_s)
      .def_readonly("max_seq_len", &SchedulerConfig::max_seq_len)
      .def_readonly("min_prefill_chunk", &SchedulerConfig::min_prefill_chunk)
      .def("__repr__", &ts::config_repr);

  py::class_<PyPlan>(m, "Plan")
      .def_readonly("step", &PyPlan::step)
      .def_readonly("num_decode", &PyPlan::num_decode)
      .def_readonly("predicted_time_s", &PyPlan::predicted_time_s)
      .def_readonly("rids", &PyPlan::rids)
      .def_readonly("input_ids", &PyPlan::input_ids)
      .def_readonly("positions", &PyPlan::positions)
      .def_readonly("query_start", &PyPlan::query_start)
      .def_readonly("prefix_lens", &PyPlan::prefix_lens)
      .def_readonly("seq_lens", &PyPlan::seq_lens)
      .def_readonly("page_table", &PyPlan::page_table)
      .def_readonly("slot_mapping", &PyPlan::slot_mapping)
      .def_readonly("sample", &PyPlan::sample)
      .def_readonly("num_draft", &PyPlan::num_draft)
      .def_readonly("total_drafts", &PyPlan::total_drafts)
      .def_property_readonly("num_rows", &PyPlan::num_rows)
      .def_property_readonly("num_tokens", &PyPlan::num_tokens)
      .def("__repr__", &PyPlan::repr);

  py::class_<PyScheduler>(m, "Scheduler")
      .def(py::init<const SchedulerConfig&>(), py::arg("config"))
      .def_property_readonly("config", &PyScheduler::config)
      .def("submit", &PyScheduler::submit, py::arg("rid"), py::arg("prompt"),
           py::arg("max_new_tokens"), py::arg("stop_ids") = ts::I32Array(0),
           py::arg("session") = "")
      .def("set_drafts", &PyScheduler::set_drafts, py::arg("rid"), py::arg("drafts"))
      .def("plan", &PyScheduler::plan)
      .def("commit", &PyScheduler::commit, py::arg("step"), py::arg("tokens"),
           py::arg("step_time_s") = 0.0, py::arg("counts") = py::none())
      .def("abort", &PyScheduler::abort, py::arg("rid"))
      .def("expire_sessions", &PyScheduler::expire_sessions)
      .def("stats", &PyScheduler::stats)
      .def("cached_tokens", &PyScheduler::cached_tokens, py::arg("rid"))
      .def("progress", &PyScheduler::progress)
      .def("check_invariants", &PyScheduler::check_invariants)
      .def("evict_cache", &PyScheduler::evict_cache)
      .def("set_test_clock", &PyScheduler::set_test_clock, py::arg("now_s"))
      .def("clear_test_clock", &PyScheduler::clear_test_clock)
      .def("cost_coeffs", &PyScheduler::cost_coeffs)
      .def("set_cost_prior", &PyScheduler::set_cost_prior, py::arg("a"), py::arg("b"),
           py::arg("c"), py::arg("d"), py::arg("e"), py::arg("f") = py::none(),
           py::arg("g") = py::none())
      .def("state", &PyScheduler::state, py::arg("rid"))
      .def("inflight_steps", &PyScheduler::inflight_steps);

  py::class_<ts::Draft>(m, "Draft")
      .def_readonly("tokens", &ts::Draft::tokens)
      .def_readonly("probs", &ts::Draft::probs)
      .def_readonly("match_len", &ts::Draft::match_len)
      .def_readonly("score", &ts::Draft::score);

  py::class_<PySuffixTree>(m, "SuffixTree")
      .def(py::init<int32_t, int64_t>(), py::arg("max_depth"), py::arg("max_tokens") = 0)
      .def("add", &PySuffixTree::add, py::arg("tokens"))
      .def("extend", &PySuffixTree::extend, py::arg("tokens"))
      .def("propose", &PySuffixTree::propose, py::arg("context"), py::arg("max_draft"),
           py::arg("min_prob"), py::arg("tokens_per_match"))
      .def_property_readonly("max_depth", &PySuffixTree::max_depth)
      .def_property_readonly("max_tokens", &PySuffixTree::max_tokens)
      .def_property_readonly("num_tokens", &PySuffixTree::num_tokens)
      .def_property_readonly("num_sequences", &PySuffixTree::num_sequences)
      .def_property_readonly("open_length", &PySuffixTree::open_length)
      .def_property_readonly("num_nodes", &PySuffixTree::num_nodes)
      .def_property_readonly("memory_bytes", &PySuffixTree::memory_bytes)
      .def("check_invariants", &PySuffixTree::check_invariants);
}
