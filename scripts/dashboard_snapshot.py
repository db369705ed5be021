"""Draw a running daemon's dashboard (`tokenspeed top`) headless into an SVG, and write the /stats
snapshot it shows next to it as JSON: a record of the screen under load, e.g. on a GPU box
without a terminal.

    python scripts/dashboard_snapshot.py --out /tmp/out/top [-c CONFIG] [--set key=value ...]
    -> /tmp/out/top.svg, /tmp/out/top.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from appliance.config import load_config
from appliance.tui.app import TopApp
from appliance.tui.source import StatsSource


async def snapshot(socket: str, api_key: str | None, out: Path, size: tuple[int, int], settle_s: float) -> bool:
    app = TopApp(StatsSource(socket, api_key))
    async with app.run_test(size=size) as pilot:
        for _ in range(100):
            if app.reachable is not None:
                break
            await pilot.pause(0.1)
        await pilot.pause(settle_s)  # a few more polls: the screen shows a fresh snapshot
        out.with_suffix(".svg").write_text(app.export_screenshot())
        out.with_suffix(".json").write_text(json.dumps(app.stats, indent=2))
        return bool(app.reachable)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="path without suffix")
    parser.add_argument("-c", "--config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--size", default="130x42", help="terminal columns x lines")
    parser.add_argument("--settle", type=float, default=1.5, help="seconds of polling before the shot")
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    columns, lines = (int(n) for n in args.size.split("x"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    reached = asyncio.run(snapshot(config.server.socket, config.server.api_key, args.out, (columns, lines),
                                   args.settle))
    print(f"{args.out.with_suffix('.svg')} ({'live' if reached else 'daemon unreachable'})")
    return 0 if reached else 1


if __name__ == "__main__":
    raise SystemExit(main())
