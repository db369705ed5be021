"""SVG snapshots of the dashboard, compared by what they show.

`app.export_screenshot()` gives an SVG (kept under tests/tui/snapshots/ for people to look at).
Two SVGs are compared through `screen_of`: each terminal line's text, and under it the colour
of every character (a letter per colour, the palette listed after), with volatile text (the
clock) masked. So a change of what is drawn or of its colours fails, a change of the SVG's
markup (ids, ordering, fonts) does not. Set TOKENSPEED_UPDATE_SNAPSHOTS=1 to rewrite them.
"""

from __future__ import annotations

import os
import re
import string
import xml.etree.ElementTree as ET
from pathlib import Path

SNAPSHOTS = Path(__file__).parent / "snapshots"
CLOCK = re.compile(r"\b\d\d:\d\d:\d\d\b")
_SVG = "{http://www.w3.org/2000/svg}"
_STYLE = re.compile(r"\.(terminal-\d+-r\d+) \{ ([^}]*) \}")


def screen_of(svg: str) -> list[str]:
    """The screen as text lines, each followed by its colour line, then the palette."""
    root = ET.fromstring(svg)
    styles = {name: body.strip().rstrip(";") for name, body in _STYLE.findall(svg)}
    rows: dict[float, list[tuple[int, str, str]]] = {}
    for text in root.iter(f"{_SVG}text"):
        name = text.get("class", "")
        content = (text.text or "").replace("\xa0", " ")
        if not name.startswith("terminal-") or not content or text.get("textLength") is None:
            continue  # the window title and chrome
        cell = float(text.get("textLength")) / len(content)
        column = round(float(text.get("x")) / cell)
        rows.setdefault(float(text.get("y")), []).append((column, content, styles.get(name, "")))
    palette: list[str] = []
    lines = []
    for y in sorted(rows):
        chars: dict[int, tuple[str, str]] = {}
        for column, content, style in rows[y]:
            for i, char in enumerate(content):
                chars[column + i] = (char, style)
        width = max(chars) + 1
        text = "".join(chars.get(i, (" ", ""))[0] for i in range(width))
        colours = ""
        for i in range(width):
            char, style = chars.get(i, (" ", ""))
            if char == " ":
                colours += " "
                continue
            if style not in palette:
                palette.append(style)
            colours += string.ascii_letters[palette.index(style) % 52]
        masked = CLOCK.sub("##:##:##", text)
        lines += [masked.rstrip(), colours.rstrip()]
    return lines + [f"{string.ascii_letters[i % 52]} = {style}" for i, style in enumerate(palette)]


def check_snapshot(name: str, svg: str) -> None:
    """Assert `svg` shows what snapshots/<name>.svg shows (or write it when updating)."""
    path = SNAPSHOTS / f"{name}.svg"
    if os.environ.get("TOKENSPEED_UPDATE_SNAPSHOTS") == "1" or not path.exists():
        if not os.environ.get("TOKENSPEED_UPDATE_SNAPSHOTS") and os.environ.get("CI"):
            raise AssertionError(f"{path} is missing (run with TOKENSPEED_UPDATE_SNAPSHOTS=1)")
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(svg)
    expected, actual = screen_of(path.read_text()), screen_of(svg)
    assert actual == expected, f"the {name} screen differs from {path}:\n" + "\n".join(actual)
