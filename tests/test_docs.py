"""The documentation stays true to the repository: every relative link resolves (file and, for
Markdown targets, heading anchor), every results block equals its results file, and the numbers
README quotes by hand from benchmarks/results/run_all.md are still in it. Reads files only (< 1 s)."""
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)|^\[[^\]]+\]:\s*(\S+)", re.M)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _load_update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", REPO / "benchmarks" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def anchors(path: Path) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-', repeats numbered."""
    seen, out = {}, set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(path: Path):
    text = FENCE.sub("", path.read_text())
    for m in LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if not re.match(r"[a-z]+:", target):
            yield target


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(doc):
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(REPO)})")
    assert not broken, f"{doc.relative_to(REPO)}: {len(broken)} broken link(s): {'; '.join(broken)}"


def test_results_blocks_are_current():
    update_readme = _load_update_readme()
    assert set(update_readme.documents()) == set(DOCS)
    stale = [d.relative_to(REPO).as_posix() for d in DOCS
             if d.is_file() and update_readme.update(d.read_text()) != d.read_text()]
    assert not stale, f"results blocks differ from benchmarks/results/: {stale}; run python benchmarks/update_readme.py"


def test_update_keeps_blocks_and_demotes_headings(tmp_path):
    update_readme = _load_update_readme()
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "x.md").write_text("# Title\n\nCommand: `x`\n\n## Part\n\n| a |\n")
    text = "# Doc\n\n## Section\n\n<!-- results:x -->\nold\n<!-- /results:x -->\n\n<!-- results:absent -->\n<!-- /results:absent -->\n"
    once = update_readme.update(text, tmp_path)
    assert "Command: `x`\n\n### Part\n\n| a |\n<!-- /results:x -->" in once and "old" not in once and "# Title" not in once
    assert "_not measured yet: run the benchmark that writes benchmarks/results/absent.md_" in once
    assert update_readme.update(once, tmp_path) == once


def _run_all_kws_section() -> str:
    text = (REPO / "benchmarks" / "results" / "run_all.md").read_text()
    start = text.index("## MLPerf Tiny DS-CNN on kws01")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_headline_table_quotes_run_all():
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Results")
    # the headline table only: the section's sub-sections (microcontroller firmware, ...) quote other results
    section = readme[start:readme.index("\n### ", start)]
    rows = [line for line in section.splitlines() if line.startswith("| ") and re.search(r"\d{2},\d{3}", line)]
    assert len(rows) == 6, rows
    source_rows = [line for line in _run_all_kws_section().splitlines() if line.startswith("| ")]
    for row in rows:
        numbers = re.findall(r"\d[\d,]*\.?\d*%?", row.replace("**", ""))
        numbers = [n for n in numbers if "," in n or "%" in n or n.startswith("0.0")]
        assert any(all(f" {n} " in src for n in numbers) for src in source_rows), \
            f"README row {row!r}: {numbers} are not in one row of run_all.md's DS-CNN table"
    kws = _run_all_kws_section()
    for quoted in ("0.0313 ms vs ours 0.0116 ms = 2.70x", "0.556", "+0.4 points below the official int8"):
        assert quoted in kws, quoted
    assert "0.0313 vs 0.0116 ms" in section and "2.70x" in section and "0.556" in section


def test_every_recipe_key_and_threshold_is_documented():
    """docs/recipes.md names every key of the default recipe and every verify kind and field, so a
    new key cannot land undocumented (imports stay light: no TensorFlow)."""
    from dataclasses import fields

    from toolchain.recipe import DEFAULT_RECIPE
    from toolchain.verify import DEFAULT_THRESHOLDS, Thresholds

    doc = (REPO / "docs" / "recipes.md").read_text()
    names = [k for k, v in DEFAULT_RECIPE.items() if not isinstance(v, dict)]
    names += [k for section in DEFAULT_RECIPE.values() if isinstance(section, dict) for k in section]
    names += list(DEFAULT_THRESHOLDS) + [f.name for f in fields(Thresholds)]
    missing = sorted({n for n in names if f"`{n}`" not in doc})
    assert not missing, f"docs/recipes.md does not mention {missing}"
