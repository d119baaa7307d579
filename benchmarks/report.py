"""The benchmark's outputs: ``benchmarks/results/<name>.json`` and the docs section.

``docs/benchmarks.md`` may hold sections of other benchmarks; this one owns only the
text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
DOC_TITLE = "# Benchmarks\n"


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = 0.0
    try:
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        memory_gib = round(int(first.split()[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model or platform.processor(),
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def update_doc(path: Path, section: str) -> None:
    """Replace the text between the markers (appending them when missing); keep the rest."""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    text = path.read_text() if path.exists() else DOC_TITLE
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)
