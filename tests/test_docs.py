"""README is the product's front page and docs/ its reference: what a user reads must match the code.

- every subcommand of `gitseg` is in README's command table, and nothing else is;
- every relative link (and its #anchor) in README and docs/ leads somewhere;
- README stays a page (about 200 lines), names no commit (dated figures live in BENCHMARKS.md)
  and, like docs/, speaks to the user, not in the first person.
"""

from __future__ import annotations

import re
from pathlib import Path

from gitseg.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
COMMIT = re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
FIRST_PERSON = re.compile(r"(?<!, )\bI\b|\b([Mm]y|[Mm]e|[Ww]e|[Oo]ur|[Uu]s)\b")  # not the axis code in "L, P, I"


def subcommands() -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return set(sub.choices)


def readme_commands(text: str) -> set[str]:
    """The commands of README's table under "## Commands": rows that start with | `gitseg NAME."""
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    return {m.group(1) for m in re.finditer(r"^\| `gitseg ([a-z-]+)", section, re.MULTILINE)}


def anchors(page: Path) -> set[str]:
    """GitHub's ids for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    found = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{page.relative_to(root)}: {target} (no {resolved.relative_to(root)})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{page.relative_to(root)}: {target} (no heading #{anchor})")
    return broken


def test_readme_lists_every_command_and_only_those():
    listed = readme_commands((ROOT / "README.md").read_text())
    assert listed == subcommands(), (f"missing from README: {sorted(subcommands() - listed)}; "
                                     f"not a command: {sorted(listed - subcommands())}")


def test_every_relative_link_resolves():
    problems = [p for page in PAGES for p in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_broken_link_and_a_missing_command(tmp_path):
    (tmp_path / "search.md").write_text("# Searching\n\n## On a cluster\n")
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](search.md#on-a-cluster) [gone](nowhere.md) [bad](search.md#no-such-heading)\n")
    assert [p.split(": ")[1] for p in broken_links(page, tmp_path)] == [
        "nowhere.md (no nowhere.md)", "search.md#no-such-heading (no heading #no-such-heading)"]
    table = "# gitseg\n\n## Commands\n\n| `gitseg synth --out DIR` | x |\n\n## Next\n| `gitseg demo` |"
    assert readme_commands(table) == {"synth"}
    assert FIRST_PERSON.search("my tests") and not FIRST_PERSON.search("the axes are L, P, I: as")


def test_readme_is_a_page_without_commits_and_docs_speak_to_the_user():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert not COMMIT.findall(readme), COMMIT.findall(readme)
    first_person = [f"{page.relative_to(ROOT)}:{n}: {line.strip()}" for page in PAGES
                    for n, line in enumerate(page.read_text().splitlines(), 1) if FIRST_PERSON.search(line)]
    assert not first_person, "\n".join(first_person)
