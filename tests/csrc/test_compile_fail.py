"""Compile-time guarantees of the control plane, proven by invoking the compiler.

Each case is a snippet that must NOT compile, and the error must name the
reason we expect (so a snippet that fails for an unrelated typo cannot pass).
The control snippet, a full legal lifecycle, must compile, so the harness
itself is shown to work.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CXX = shutil.which("g++")
pytestmark = [pytest.mark.skipif(CXX is None, reason="g++ not found"),
              pytest.mark.slow]  # runs the compiler per case: skipped by -m 'not slow'

PRELUDE = """
#include <utility>
#include "request_state.h"
#include "scheduler_config.h"
using namespace ts;
inline RequestData req() { RequestData d; d.rid = 1; d.tokens = {1, 2, 3}; return d; }
void consume_decoding(Decoding&&);
int main() {
  PagePool pool(8);
"""
EPILOGUE = "\n  return 0;\n}\n"
# csrc/CMakeLists.txt builds with this: a config field left out is an error.
STRICT = ("-Werror=missing-field-initializers",)


def compile_snippet(body, tmp_path, extra=()):
    src = tmp_path / "snippet.cpp"
    src.write_text(PRELUDE + body + EPILOGUE)
    r = subprocess.run([CXX, "-std=c++20", "-fsyntax-only", "-I", str(CSRC), *extra, str(src)],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "LC_ALL": "C", "LANG": "C"})  # ASCII quotes
    return r.returncode, r.stderr


CONTROL = """
  PageLease lease = pool.empty_lease();
  if (!pool.allocate_into(lease, 1)) return 1;
  Queued q(req());
  Prefilling p = std::move(q).admit(std::move(lease), 0);
  PageLease more = pool.empty_lease();
  if (!pool.allocate_into(more, 1)) return 1;
  p.grow(std::move(more));                 // the one in-place change of a running lease
  if (p.lease().size() != 2) return 1;     // read through the const view
  p.advance(3);
  Decoding d = std::move(p).finish_prefill();
  d.advance(1);
  d.propose({7, 8});                       // drafts: the next step verifies them
  Verifying v = std::move(d).verify();
  Retired<Decoding> settled = std::move(v).settle(1, 4);  // one accepted
  settled.pages.release_all();
  d = std::move(settled.state);
  Retired<Finished> f = std::move(d).finish(FinishReason::kLength);
  f.pages.release_all();
  Retired<Preempted> pr = Prefilling(req(), pool.empty_lease(), 0).preempt();
  Prefilling again = std::move(pr.state).readmit(std::move(pr.pages), 0);
  Retired<Aborted> ab = std::move(again).abort();
  PageLease moved = std::move(ab.pages);   // moving a lease is fine
  (void)f.state.reason();
  SchedulerConfig cfg{.num_pages = 8, .page_size = 4, .max_batch_tokens = 16,
                      .max_running = 2, .tps_floor = 0, .session_ttl_s = 0,
                      .max_seq_len = 32};  // min_prefill_chunk: its C++ default
  cfg.validate();
"""

CASES = {
    "lease_copy_construct": (
        "PageLease a = pool.empty_lease();\n  PageLease b = a;", "deleted"),
    "lease_copy_assign": (
        "PageLease a = pool.empty_lease();\n  PageLease b = pool.empty_lease();\n  b = a;",
        "deleted"),
    "state_copy": (
        "Decoding d(req(), pool.empty_lease(), 3);\n  Decoding d2 = d;", "deleted"),
    "invalid_transition_queued_to_finished": (
        "Queued q(req());\n  auto f = std::move(q).finish(FinishReason::kStop);",
        "has no member named 'finish'"),
    "invalid_transition_queued_is_not_decoding": (
        "Queued q(req());\n  Decoding d = std::move(q).admit(pool.empty_lease(), 0);",
        "conversion from"),
    "invalid_transition_finished_is_terminal": (
        "Finished f(req(), FinishReason::kStop);\n"
        "  auto p = std::move(f).readmit(pool.empty_lease(), 0);",
        "has no member named 'readmit'"),
    "invalid_transition_aborted_is_terminal": (
        "Aborted a(req());\n  auto p = std::move(a).admit(pool.empty_lease(), 0);",
        "has no member named 'admit'"),
    "finished_owns_no_pages": (
        "Finished f(req(), FinishReason::kStop);\n  auto n = f.lease().size();",
        "has no member named 'lease'"),
    "preempted_owns_no_pages": (
        "Preempted p(req());\n  auto n = p.lease().size();", "has no member named 'lease'"),
    "wrong_state_passed": (
        "Queued q(req());\n  consume_decoding(std::move(q));",
        "invalid initialization of reference of type 'ts::Decoding&&'"),
    "transition_on_lvalue": (
        "Queued q(req());\n  Prefilling p = q.admit(pool.empty_lease(), 0);",
        "discards qualifiers"),
    "use_after_move_transition": (
        "Queued q(req());\n  Prefilling p = std::move(q).admit(pool.empty_lease(), 0);\n"
        "  Prefilling p2 = q.admit(pool.empty_lease(), 0);",
        "discards qualifiers"),
    "running_lease_release_without_transition": (
        "Decoding d(req(), pool.empty_lease(), 3);\n  d.lease().release_all();",
        "passing 'const ts::PageLease' as 'this' argument discards qualifiers"),
    "running_lease_append_in_place": (
        "Prefilling p(req(), pool.empty_lease(), 0);\n  p.lease().append(pool.empty_lease());",
        "passing 'const ts::PageLease' as 'this' argument discards qualifiers"),
    "running_lease_moved_out": (
        "Prefilling p(req(), pool.empty_lease(), 0);\n  PageLease stolen = std::move(p.lease());",
        "use of deleted function 'ts::PageLease::PageLease(const ts::PageLease&)'"),
    "running_lease_replaced": (
        "Decoding d(req(), pool.empty_lease(), 3);\n  d.lease() = pool.empty_lease();",
        "passing 'const ts::PageLease' as 'this' argument discards qualifiers"),
    "verifying_finishes_only_after_settle": (
        "Verifying v(req(), pool.empty_lease(), 4, {7});\n"
        "  auto f = std::move(v).finish(FinishReason::kStop);",
        "has no member named 'finish'"),
    "rejected_pages_leave_only_through_settle": (
        "Verifying v(req(), pool.empty_lease(), 4, {7});\n"
        "  PageLease rejected = v.lease().take_tail(0);",
        "passing 'const ts::PageLease' as 'this' argument discards qualifiers"),
    "settle_on_lvalue": (
        "Verifying v(req(), pool.empty_lease(), 4, {7});\n  auto r = v.settle(0, 4);",
        "discards qualifiers"),
    "decoding_has_no_speculative_slots_to_settle": (
        "Decoding d(req(), pool.empty_lease(), 3);\n  auto r = std::move(d).settle(0, 4);",
        "has no member named 'settle'"),
    "use_after_move_finish_twice": (
        "Decoding d(req(), pool.empty_lease(), 3);\n"
        "  auto f1 = std::move(d).finish(FinishReason::kStop);\n"
        "  auto f2 = d.finish(FinishReason::kStop);",
        "discards qualifiers"),
}


def test_control_snippet_compiles(tmp_path):
    rc, err = compile_snippet(CONTROL, tmp_path, extra=STRICT)
    assert rc == 0, err


@pytest.mark.parametrize("name", sorted(CASES))
def test_must_not_compile(name, tmp_path):
    body, reason = CASES[name]
    rc, err = compile_snippet(body, tmp_path)
    assert rc != 0, f"{name} compiled but must not"
    assert reason in err, f"{name}: expected {reason!r} in:\n{err}"


def test_discarded_transition_is_diagnosed(tmp_path):
    # [[nodiscard]]: dropping the new state on the floor is an error under -Werror.
    body = "Queued q(req());\n  std::move(q).abort();"
    rc, err = compile_snippet(body, tmp_path, extra=("-Werror=unused-result",))
    assert rc != 0 and "ignoring return value" in err


def test_scheduler_config_has_no_second_defaults(tmp_path):
    # The settings' defaults live in appliance/config.py only: a C++ config that leaves one
    # out does not build (the control snippet shows a complete one does).
    body = "SchedulerConfig cfg{.num_pages = 8, .page_size = 4, .max_batch_tokens = 16};"
    rc, err = compile_snippet(body, tmp_path, extra=STRICT)
    assert rc != 0 and "missing initializer for member 'ts::SchedulerConfig::max_running'" in err
