"""`tokenspeed bench agentic --workload edit`: the conversations it builds, and a run against the
real daemon through the chat API."""

from __future__ import annotations

import json

import pytest

from appliance.bench import EDIT_SYSTEM, edit_messages, edit_tasks
from daemon_process import REPO


def test_each_user_edits_a_file_of_this_repository():
    tasks = edit_tasks(6, seed=0)
    assert len({t.path for t in tasks}) == 6
    for task in tasks:
        assert (REPO / task.path).read_text() == task.text
        assert task.names and all(f"def {n}" in task.text or f"class {n}" in task.text
                                  for n in task.names)
    assert [t.path for t in edit_tasks(6, seed=0)] == [t.path for t in tasks]  # reproducible


def test_each_turn_resends_the_chat_and_asks_for_another_rename():
    task = edit_tasks(1, seed=3)[0]
    first = edit_messages(task, [])
    assert first[0] == {"role": "system", "content": EDIT_SYSTEM}
    assert task.text in first[1]["content"] and f"`{task.names[0]}_v2`" in first[1]["content"]
    third = edit_messages(task, ["answer one", "answer two"])
    assert third[:2] == first[:2]  # the next turn extends the previous prompt
    assert [m["role"] for m in third] == ["system", *["user", "assistant"] * 2, "user"]
    assert third[2]["content"] == "answer one" and third[4]["content"] == "answer two"
    name = task.names[2 % len(task.names)]
    assert f"rename `{name}` to `{name}_v2`" in third[5]["content"]


@pytest.mark.slow  # the daemon fixture spawns a process
def test_edit_workload_against_the_daemon(daemon):
    result = daemon.cli("bench", "agentic", "--workload", "edit", "--users", "2", "--turns", "2",
                        "--output-len", "8", "--tool-time", "0", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["workload"] == "edit" and summary["requests"] == 4
    assert summary["prompt_tokens"] > 4 * 300  # the file is in every prompt
    assert 4 <= summary["output_tokens"] <= 4 * 8
    assert summary["ttft_p50_s"] > 0
    assert summary["prefix_cache_hit_rate"] > 0.2  # the second turn resends the first
