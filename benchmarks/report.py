"""BENCHMARKS.md is one section per benchmark; each run replaces its own section, keeping the rest."""
from __future__ import annotations

from pathlib import Path

HEADER = "# Benchmarks\n\nRatios measured side by side in one run (the machines are shared and noisy).\n\n"


def update_section(path: str | Path, section: str) -> None:
    """Replace the section whose '## ' title line starts `section` (or append it)."""
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    section = section.rstrip("\n") + "\n\n"  # a blank line before whatever section follows
    title = section.splitlines()[0]
    if title in text:
        start = text.index(title)
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
