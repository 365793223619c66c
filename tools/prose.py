"""Measure a notebook's prose against the house targets (CONTRIBUTING.md, "Prose"); tests/test_prose.py asserts them.

    python tools/prose.py                 # a table: every notebook, every measure, a * where a target is missed
    python tools/prose.py 03_style_transfer --worst 5    # one notebook, with its longest sentences and paragraphs

Prose is the text of the markdown cells without headings, code (fenced or `inline`), LaTeX, images, link targets,
HTML tags and tables. A sentence ends at . ! or ? followed by a space, or at the end of a line in a list item.
"""
from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent

TARGETS = {  # measure -> the largest value allowed
    "mean_sentence": 17.0, "p90_sentence": 28.0, "semicolons": 0, "parentheses_per_100": 1.5,
    "numbers_per_100": 2.5, "longest_paragraph": 100, "intro_words": 120, "run_time_words": 40,
    "imports_lines": 10, "settings_lines": 25, "settings_knobs": 12, "smoke_mentions": 3,
}
BANNED = ("review session", "reviewer", "load average", "build machine", "H100", "FLOP", "nbval", "this work",
          "earlier version", "_TO_COME", "TODO", "{{")
RUN_TIME = re.compile(r"^\s*(?:[-*]\s*)?(?:⏱|\*\*Run time)", re.M)
SETTINGS_MARK = "# Settings you may change"
ADVANCED_MARK = "#@title Advanced settings"


def prose_of(markdown: str) -> str:
    """The running text of a markdown cell (see the module docstring)."""
    text = re.sub(r"```.*?```", " ", markdown, flags=re.S)
    text = re.sub(r"\$\$.*?\$\$", " ", text, flags=re.S)
    text = re.sub(r"\$[^$\n]+\$", "x", text)                       # inline maths reads as one word
    text = re.sub(r"`[^`\n]+`", "x", text)                          # so does inline code
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", " ", text)               # images
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)            # links keep their text
    text = re.sub(r"<[^>\n]+>", " ", text)                         # HTML tags (details, summary, br)
    lines = [line for line in text.splitlines()
             if not line.lstrip().startswith(("#", "|")) and "colab-badge" not in line]
    return "\n".join(lines)


def paragraphs(prose: str) -> list[str]:
    """Blank-line separated blocks; each list item is a paragraph of its own."""
    out = []
    for block in re.split(r"\n\s*\n", prose):
        items = re.split(r"\n(?=\s*(?:[-*]|\d+\.)\s)", block)
        out += [item.strip() for item in items if item.strip()]
    return out


def words(text: str) -> list[str]:
    return re.findall(r"[\w’'][\w’'.,/×%-]*", text)


def sentences(prose: str) -> list[str]:
    found = []
    for paragraph in paragraphs(prose):
        flat = " ".join(paragraph.split())
        flat = re.sub(r"^(?:[-*]|\d+\.)\s+", "", flat)
        found += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9*_\"'(“])", flat) if words(s)]
    return found


def numbers(text: str) -> int:
    return len(re.findall(r"(?<![\w.])\d[\d,.]*(?:\s?%)?", text))


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else 0.0


def measure(name: str) -> dict:
    """Every measure of notebook NAME (notebooks/NAME.ipynb)."""
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    cells = nb.cells
    setup_at = next(i for i, c in enumerate(cells) if c.cell_type == "code")
    markdown = [prose_of(c.source) for c in cells if c.cell_type == "markdown"]
    prose = "\n\n".join(markdown)
    all_words = words(prose)
    n = max(len(all_words), 1)
    lengths = [len(words(s)) for s in sentences(prose)]
    intro = "\n\n".join(prose_of(c.source) for c in cells[:setup_at] if c.cell_type == "markdown")
    intro_source = "\n\n".join(c.source for c in cells[:setup_at] if c.cell_type == "markdown")
    run_time = RUN_TIME.search(intro_source)  # the paragraph that starts with the ⏱ line
    run_time_words = len(words(prose_of(intro_source[run_time.start():].split("\n\n")[0]))) if run_time else 999
    intro_words = len(words(intro)) - (run_time_words if run_time else 0)
    code = [c for c in cells[setup_at + 1:] if c.cell_type == "code"]
    visible = [c.source for c in code if not c.source.startswith("#@title")]
    settings = next((c.source for c in code if c.source.startswith(SETTINGS_MARK)), "")
    knobs = re.findall(r"^([A-Z][A-Z0-9_]*)\s*=", settings, re.M)
    text = "\n".join(c.source for c in cells if c.cell_type == "markdown")
    return {
        "words": len(all_words),
        "mean_sentence": round(statistics.mean(lengths), 1) if lengths else 0.0,
        "p90_sentence": percentile(lengths, 0.9),
        "semicolons": prose.count(";"),
        "parentheses_per_100": round(100 * prose.count("(") / n, 2),
        "numbers_per_100": round(100 * numbers(prose) / n, 2),
        "longest_paragraph": max((len(words(p)) for p in paragraphs(prose)), default=0),
        "intro_words": intro_words,
        "run_time_words": run_time_words,
        "imports_lines": len(code[0].source.splitlines()) if code else 999,
        "settings_lines": len(settings.splitlines()) if settings else 999,
        "settings_knobs": len(knobs) if settings else 999,
        "advanced_cell": any(c.source.startswith(ADVANCED_MARK) for c in code),
        "smoke_mentions": sum(len(re.findall(r"\bSMOKE\b", s)) for s in visible),
        "banned": sorted({w for w in BANNED if w.lower() in text.lower()}),
    }


def misses(values: dict) -> list[str]:
    """The measures of `values` over their target, and the other rules broken, in words."""
    out = [f"{k} {values[k]} > {limit}" for k, limit in TARGETS.items() if values[k] > limit]
    out += [] if values["advanced_cell"] else [f"no '{ADVANCED_MARK}' cell"]
    out += [f"banned words {values['banned']}"] if values["banned"] else []
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*")
    parser.add_argument("--worst", type=int, default=0, help="show the N longest sentences and paragraphs")
    args = parser.parse_args(argv)
    names = args.names or sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    keys = ["words", *TARGETS]
    print("| notebook | " + " | ".join(keys) + " |")
    for name in names:
        values = measure(name)
        cells = [f"{values[k]}{'*' if k in TARGETS and values[k] > TARGETS[k] else ''}" for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
        for line in misses(values):
            print(f"    {name}: {line}")
        if args.worst:
            nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
            prose = "\n\n".join(prose_of(c.source) for c in nb.cells if c.cell_type == "markdown")
            for s in sorted(sentences(prose), key=lambda s: -len(words(s)))[:args.worst]:
                print(f"    sentence ({len(words(s))} words): {s[:160]}")
            for p in sorted(paragraphs(prose), key=lambda p: -len(words(p)))[:args.worst]:
                print(f"    paragraph ({len(words(p))} words): {' '.join(p.split())[:160]}")


if __name__ == "__main__":
    main()
