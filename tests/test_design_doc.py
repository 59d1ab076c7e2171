"""Every reference to docs/design.md in the code names a section the document has."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF = re.compile(r"docs/design\.md,?\s*\(?((?:\"[^\"]+\"(?:\s*(?:,|and)\s*)?)+)")


def test_design_doc_references_resolve():
    sections = set(re.findall(r"^## (.+)$", (ROOT / "docs" / "design.md").read_text(), re.M))
    files = [*ROOT.glob("tapo_jax/**/*.py"), *ROOT.glob("tests/*.py"),
             *ROOT.glob("benchmarks/*.py")]
    refs, missing = 0, []
    for path in files:
        if path == Path(__file__).resolve():
            continue
        text = path.read_text()
        old = "DESIGN" + ".md"  # no file of that name exists
        assert old not in text, f"{path.name} cites {old}; the design is docs/design.md"
        for m in REF.finditer(text):
            for name in re.findall(r"\"([^\"]+)\"", m.group(1)):
                refs += 1
                if name not in sections:
                    missing.append(f"{path.relative_to(ROOT)}: {name!r}")
    assert refs >= 5, "no references found: the pattern no longer matches the docstrings"
    assert not missing, f"sections {sorted(sections)}; unresolved: {missing}"
