"""What the dashboard reads from the scheduler: pages pinned by sessions, per-request progress."""
from core_helpers import Driver, i32, make


def test_progress_follows_a_request_from_queue_to_decode():
    ps = 4
    s = make(num_pages=64, page_size=ps, max_batch_tokens=8, max_running=1)
    s.submit(1, i32(range(100, 120)), 3, i32([]))    # 20 tokens: three chunks of 8
    s.submit(2, i32(range(200, 205)), 3, i32([]))    # waits: max_running 1
    assert s.progress() == [(1, "queued", 20, 0, 0), (2, "queued", 5, 0, 0)]
    d = Driver(s)
    d.step()
    assert s.progress()[0] == (1, "prefilling", 20, 0, 8)
    d.step()
    assert s.progress()[0] == (1, "prefilling", 20, 0, 16)
    d.step()  # last chunk: the first token is sampled, the request decodes
    assert s.progress()[0] == (1, "decoding", 21, 0, 20)
    d.step()
    assert s.progress()[0] == (1, "decoding", 22, 0, 21)
    d.run()
    assert s.progress() == []


def test_cached_tokens_of_a_second_turn_and_pinned_pages():
    ps = 4
    s = make(num_pages=64, page_size=ps, session_ttl_s=30.0)
    prompt = list(range(500, 533))  # 33 tokens
    s.submit(1, i32(prompt), 4, i32([]), "agent")
    d = Driver(s)
    d.run()
    answer = d.outputs[1]
    stats = s.stats()
    # The finished turn's full pages are pinned for the session and held by nothing else.
    pinned = (len(prompt) + len(answer) - 1) // ps
    assert stats["pages_pinned"] == pinned and stats["pages_used"] == pinned
    s.submit(2, i32(prompt + answer + [9, 9]), 2, i32([]), "agent")
    d.step()
    rid, state, context, cached, kv = s.progress()[0]
    assert (rid, state, context, cached) == (2, "decoding", len(prompt) + len(answer) + 3, pinned * ps)
    # Admitted: the request holds the pages itself, the pin has done its job.
    assert s.stats()["pages_pinned"] == 0
    d.run()
    assert s.stats()["pages_pinned"] > pinned  # the second turn is pinned in its turn
    s.check_invariants()


def test_pages_shared_with_a_running_request_are_not_counted_as_pinned():
    ps = 4
    s = make(num_pages=64, page_size=ps, session_ttl_s=30.0)
    prompt = list(range(500, 533))
    s.submit(1, i32(prompt), 1, i32([]), "agent")
    Driver(s).run()
    pinned = s.stats()["pages_pinned"]
    assert pinned == len(prompt) // ps
    s.submit(2, i32(prompt + [7] * 8), 4, i32([]), "other")  # another session, same prefix
    Driver(s).step()
    assert s.progress()[0][3] == pinned * ps  # its cached tokens
    assert s.stats()["pages_pinned"] == 0  # every pinned page is also read by request 2
