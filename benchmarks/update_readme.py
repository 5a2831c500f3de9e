"""Regenerate the results blocks of the documentation from benchmarks/results/*.md.

Every block between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in README.md,
docs/*.md and benchmarks/README.md is replaced by the contents of benchmarks/results/NAME.md (its
first heading dropped, its other headings demoted to sit below the heading the block is under).
Files without markers are left alone; running it twice changes nothing. Run after any benchmark:

    python benchmarks/update_readme.py
"""
import re
import sys
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(.*?)(<!-- /results:(?P=name) -->)", re.S)
HEADING = re.compile(r"^(#{1,6}) ", re.M)
#: a results file's own section headings are level 2 (its title, level 1, is dropped)
RESULTS_SECTION_LEVEL = 2


def documents(repo: Path = REPO) -> List[Path]:
    """The files whose results blocks are kept current."""
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md")), repo / "benchmarks" / "README.md"]


def render(name: str, level: int, repo: Path = REPO) -> str:
    """benchmarks/results/NAME.md without its title, headings placed below a level-``level`` heading."""
    path = repo / "benchmarks" / "results" / f"{name}.md"
    if not path.is_file():
        return f"_not measured yet: run the benchmark that writes benchmarks/results/{name}.md_\n"
    lines = path.read_text().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    shift = max(level + 1 - RESULTS_SECTION_LEVEL, 0)
    lines = ["#" * shift + line if HEADING.match(line) else line for line in lines]
    return "\n".join(lines).strip() + "\n"


def _enclosing_level(text: str, pos: int) -> int:
    """Level of the last heading before ``pos`` outside code fences (0 when there is none)."""
    level, fenced = 0, False
    for line in text[:pos].splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and HEADING.match(line):
            level = len(HEADING.match(line).group(1))
    return level


def update(text: str, repo: Path = REPO) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("name"), _enclosing_level(text, m.start()), repo)
                     + m.group(4), text)


def main() -> int:
    changed = []
    for doc in documents():
        if not doc.is_file():
            continue
        text = doc.read_text()
        if not BLOCK.search(text):
            continue
        new = update(text)
        if new != text:
            doc.write_text(new)
            changed.append(doc.relative_to(REPO).as_posix())
    print("results updated in " + ", ".join(changed) if changed else "results blocks already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
