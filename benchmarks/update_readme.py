"""Regenerate README.md's result sections from benchmarks/results/*.md.

Each block between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in README.md is replaced
by the contents of benchmarks/results/NAME.md (its first heading dropped). Run after any benchmark:

    python benchmarks/update_readme.py
"""
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(.*?)(<!-- /results:(?P=name) -->)", re.S)


def render(name: str) -> str:
    path = REPO / "benchmarks" / "results" / f"{name}.md"
    if not path.is_file():
        return f"_not measured yet: run the benchmark that writes benchmarks/results/{name}.md_\n"
    lines = path.read_text().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    # the blocks sit under a level-3 heading: demote the file's own headings below it
    lines = ["##" + line if line.startswith("#") else line for line in lines]
    return "\n".join(lines).strip() + "\n"


def main() -> int:
    readme = REPO / "README.md"
    text = readme.read_text()
    new = BLOCK.sub(lambda m: m.group(1) + render(m.group("name")) + m.group(4), text)
    readme.write_text(new)
    print("README results updated" if new != text else "README results already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
