#include "py_scheduler.h"

#include <sstream>
#include <utility>
#include <vector>

namespace ts {
namespace {

// Hands a vector to numpy without copying: the array owns it via a capsule.
template <class T>
py::array to_numpy(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule free_it(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(shape, owned->data(), free_it);
}

// The first `rows` rows of an arena buffer; the array keeps the buffer alive
// (and so out of the arena's reuse) until numpy frees it.
py::array arena_to_numpy(std::shared_ptr<PageTableArena::Buffer>&& buf, py::ssize_t rows,
                         py::ssize_t width) {
  auto* owned = new std::shared_ptr<PageTableArena::Buffer>(std::move(buf));
  py::capsule free_it(owned, [](void* p) {
    delete static_cast<std::shared_ptr<PageTableArena::Buffer>*>(p);
  });
  return py::array_t<int32_t>({rows, width}, (*owned)->data.data(), free_it);
}

std::span<const int32_t> view(const I32Array& a) {
  if (a.ndim() != 1) throw std::invalid_argument("expected a 1-D int32 array");
  return {a.data(), static_cast<size_t>(a.shape(0))};
}

}  // namespace

std::string PyPlan::repr() const {
  std::ostringstream o;
  o << "Plan(step=" << step << ", rows=" << num_rows() << ", num_decode=" << num_decode
    << ", tokens=" << num_tokens() << ")";
  return o.str();
}

std::string config_repr(const SchedulerConfig& c) {
  std::ostringstream o;
  o << "SchedulerConfig(num_pages=" << c.num_pages << ", page_size=" << c.page_size
    << ", max_batch_tokens=" << c.max_batch_tokens << ", max_running=" << c.max_running
    << ", tps_floor=" << c.tps_floor << ", session_ttl_s=" << c.session_ttl_s
    << ", max_seq_len=" << c.max_seq_len << ", min_prefill_chunk=" << c.min_prefill_chunk
    << ")";
  return o.str();
}

void PyScheduler::submit(int64_t rid, const I32Array& prompt, int32_t max_new_tokens,
                         const I32Array& stop_ids, const std::string& session) {
  auto p = view(prompt);
  auto s = view(stop_ids);
  py::gil_scoped_release nogil;
  std::lock_guard lock(mu_);
  s_.submit(rid, p, max_new_tokens, s, session);
}

int32_t PyScheduler::set_drafts(int64_t rid, const I32Array& drafts) {
  auto d = view(drafts);
  py::gil_scoped_release nogil;
  std::lock_guard lock(mu_);
  return s_.set_drafts(rid, d);
}

std::optional<PyPlan> PyScheduler::plan() {
  std::optional<PlanData> d;
  {
    py::gil_scoped_release nogil;
    std::lock_guard lock(mu_);
    d = s_.plan();
  }
  if (!d) return std::nullopt;
  auto b = static_cast<py::ssize_t>(d->rids.size());
  auto t = static_cast<py::ssize_t>(d->input_ids.size());
  PyPlan p;
  p.step = d->step;
  p.num_decode = d->num_decode;
  p.predicted_time_s = d->predicted_time_s;
  p.rids = to_numpy(std::move(d->rids), {b});
  p.input_ids = to_numpy(std::move(d->input_ids), {t});
  p.positions = to_numpy(std::move(d->positions), {t});
  p.query_start = to_numpy(std::move(d->query_start), {b + 1});
  p.prefix_lens = to_numpy(std::move(d->prefix_lens), {b});
  p.seq_lens = to_numpy(std::move(d->seq_lens), {b});
  p.page_table = arena_to_numpy(std::move(d->page_table), b, d->page_table_width);
  p.slot_mapping = to_numpy(std::move(d->slot_mapping), {t});
  p.sample = to_numpy(std::move(d->sample), {b});
  p.num_draft = to_numpy(std::move(d->num_draft), {b});
  p.total_drafts = d->total_drafts;
  return p;
}

py::list PyScheduler::commit(int64_t step, const I32Array& tokens, double step_time_s,
                             const std::optional<I32Array>& counts) {
  auto tok = view(tokens);
  std::span<const int32_t> cnt;
  if (counts) cnt = view(*counts);
  std::vector<Event> events;
  {
    py::gil_scoped_release nogil;
    std::lock_guard lock(mu_);
    events = s_.commit(step, tok, cnt, step_time_s);
  }
  // Leaked on purpose: Python objects must not be destroyed after finalization.
  static PyObject* const kWhy[3] = {py::str("").release().ptr(),
                                    py::str("stop").release().ptr(),
                                    py::str("length").release().ptr()};
  // Raw C API: this list is built every step (one tuple per running request).
  py::list out(events.size());
  for (size_t i = 0; i < events.size(); ++i) {
    const Event& e = events[i];
    PyObject* why = kWhy[static_cast<int>(e.kind)];
    Py_INCREF(why);
    PyObject* t = PyTuple_New(3);
    if (!t) throw py::error_already_set();
    PyTuple_SET_ITEM(t, 0, PyLong_FromLongLong(e.rid));
    PyTuple_SET_ITEM(t, 1, PyLong_FromLong(e.token));
    PyTuple_SET_ITEM(t, 2, why);
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), t);
  }
  return out;
}

bool PyScheduler::abort(int64_t rid) {
  py::gil_scoped_release nogil;
  std::lock_guard lock(mu_);
  return s_.abort(rid);
}

py::dict PyScheduler::stats() const {
  Stats s;
  {
    py::gil_scoped_release nogil;
    std::lock_guard lock(mu_);
    s = s_.stats();
  }
  py::dict d;
  d["pages_total"] = s.pages_total;
  d["pages_used"] = s.pages_used;
  d["pages_cached"] = s.pages_cached;
  d["pages_free"] = s.pages_free;
  d["requests_running"] = s.requests_running;
  d["requests_waiting"] = s.requests_waiting;
  d["prompt_tokens_total"] = s.prompt_tokens_total;
  d["prefix_cache_hit_tokens_total"] = s.prefix_cache_hit_tokens_total;
  d["generation_tokens_total"] = s.generation_tokens_total;
  d["preemptions_total"] = s.preemptions_total;
  d["steps_total"] = s.steps_total;
  d["spec_draft_tokens_total"] = s.spec_draft_tokens_total;
  d["spec_accepted_tokens_total"] = s.spec_accepted_tokens_total;
  d["spec_verify_rows_total"] = s.spec_verify_rows_total;
  d["pages_pinned"] = s.pages_pinned;
  return d;
}

std::optional<int32_t> PyScheduler::cached_tokens(int64_t rid) const {
  std::lock_guard lock(mu_);  // a map lookup: no need to drop the GIL
  return s_.cached_tokens(rid);
}

py::list PyScheduler::progress() const {
  std::vector<RequestProgress> rows;
  {
    py::gil_scoped_release nogil;
    std::lock_guard lock(mu_);
    rows = s_.progress();
  }
  py::list out(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    const RequestProgress& r = rows[i];
    out[i] = py::make_tuple(r.rid, r.state, r.context_tokens, r.cached_tokens, r.kv_tokens);
  }
  return out;
}

void PyScheduler::check_invariants() const {
  py::gil_scoped_release nogil;
  std::lock_guard lock(mu_);
  try {
    s_.check_invariants();
  } catch (const std::logic_error& e) {
    throw std::runtime_error(e.what());  // RuntimeError in Python
  }
}

py::tuple PyScheduler::cost_coeffs() const {
  CostModel::Vec c;
  {
    std::lock_guard lock(mu_);  // no Python calls inside: safe under the GIL
    c = s_.cost_model().coeffs();
  }
  return py::make_tuple(c[0], c[1], c[2], c[3], c[4], c[5], c[6]);
}

void PyScheduler::set_cost_prior(double a, double b, double c, double d, double e,
                                 std::optional<double> f, std::optional<double> g) {
  std::lock_guard lock(mu_);
  s_.set_cost_model(CostModel({a, b, c, d, e, f.value_or(0.0), g.value_or(0.0)}));
}

void PyScheduler::expire_sessions() {
  std::lock_guard lock(mu_);
  s_.expire_sessions();
}

int32_t PyScheduler::evict_cache() {
  std::lock_guard lock(mu_);
  return s_.evict_cache();
}

void PyScheduler::set_test_clock(double now_s) {
  std::lock_guard lock(mu_);
  s_.set_test_clock(now_s);
}

void PyScheduler::clear_test_clock() {
  std::lock_guard lock(mu_);
  s_.clear_test_clock();
}

std::string PyScheduler::state(int64_t rid) const {
  std::lock_guard lock(mu_);
  return s_.state_name(rid);
}

int64_t PyScheduler::inflight_steps() const {
  std::lock_guard lock(mu_);
  return static_cast<int64_t>(s_.inflight_steps());
}

}  // namespace ts
