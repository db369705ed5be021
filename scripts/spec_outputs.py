#!/usr/bin/env python3
"""Greedy answers of a running daemon to the edit workload's first turn (real text), saved, and
two such files compared: speculation must not change a token of greedy output.

    python scripts/spec_outputs.py save off.json --port 8126 --users 16 --max-tokens 512
    python scripts/spec_outputs.py compare off.json suffix.json

`save` sends every user's request at once (or --concurrency at a time) to
/v1/chat/completions (temperature 0; httpx, which the daemon itself installs, so it runs on a
box without the test extras) and writes each answer's text and completion token count.
`compare` prints how many answers match and where each differing one parts. A daemon in float32
should match exactly; in bfloat16 a verify step's kernels round differently from a decode
step's, so a near-tie can flip a greedy token and the rest follows, as a different batch does
without speculation (compare one-at-a-time answers with all-at-once ones of the same daemon).
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.bench import edit_messages, edit_tasks  # noqa: E402


def save(path: str, port: int, users: int, max_tokens: int, concurrency: int) -> None:
    import httpx

    base = f"http://127.0.0.1:{port}/v1"
    model = httpx.get(f"{base}/models").json()["data"][0]["id"]

    def answer(task) -> dict:
        body = {"model": model, "messages": edit_messages(task, []), "max_tokens": max_tokens,
                "temperature": 0.0}
        reply = httpx.post(f"{base}/chat/completions", json=body, timeout=600.0)
        reply.raise_for_status()
        reply = reply.json()
        return {"text": reply["choices"][0]["message"]["content"],
                "tokens": reply["usage"]["completion_tokens"]}

    with ThreadPoolExecutor(concurrency or users) as pool:
        answers = list(pool.map(answer, edit_tasks(users, seed=0)))
    Path(path).write_text(json.dumps(answers))
    print(f"{path}: {users} answers, {concurrency or users} at a time, "
          f"{sum(a['tokens'] for a in answers)} tokens")


def compare(a_path: str, b_path: str) -> int:
    a, b = json.loads(Path(a_path).read_text()), json.loads(Path(b_path).read_text())
    same = sum(x["text"] == y["text"] for x, y in zip(a, b))
    print(f"{same} of {len(a)} answers identical ({a_path} vs {b_path})")
    for user, (x, y) in enumerate(zip(a, b)):
        if x["text"] != y["text"]:
            at = next(i for i, (p, q) in enumerate(zip(x["text"] + "\0", y["text"] + "\1"))
                      if p != q)
            print(f"  user {user}: {x['tokens']} vs {y['tokens']} tokens, first difference at "
                  f"character {at}: {x['text'][max(0, at - 30):at + 30]!r} vs "
                  f"{y['text'][max(0, at - 30):at + 30]!r}")
    return 0 if same == len(a) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("save")
    s.add_argument("path")
    s.add_argument("--port", type=int, default=8126)
    s.add_argument("--users", type=int, default=16)
    s.add_argument("--max-tokens", type=int, default=512)
    s.add_argument("--concurrency", type=int, default=0,
                   help="requests in flight at once (default: all users)")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = parser.parse_args()
    if args.command == "save":
        save(args.path, args.port, args.users, args.max_tokens, args.concurrency)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
