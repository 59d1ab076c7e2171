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


PKG_DIRS = ("models", "sampling", "construction", "rewards", "rl", "data", "train", "evaluation")
PATH_REF = re.compile(r"`((?:tapo_jax|tests|benchmarks|configs|docs)/[\w/.\-]*\w)`")
SHORT_REF = re.compile(r"`((?:%s)/[\w.]*\w)`" % "|".join(PKG_DIRS))
DOTTED_REF = re.compile(r"(?<![\"'])\btapo_jax(?:\.\w+)+")  # not in string literals


def _resolves(dotted: str) -> bool:
    """``tapo_jax.a.b[.name]``: a module or package, or a name its module defines or imports."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:n])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else (
            base / "__init__.py" if (base / "__init__.py").is_file() else None)
        if module is None:
            continue
        if n == len(parts):
            return True
        name = parts[n]
        return re.search(rf"^\s*(?:def |class |async def )?{name}\b|\bimport .*\b{name}\b"
                         rf"|^\s+{name}[,:]|^{name}\s*[:=]", module.read_text(), re.M) is not None
    return False


def test_code_references_in_docs_and_docstrings_resolve():
    """Paths and dotted names of the package cited in README.md, docs/ and the code's own
    docstrings and comments name files and modules that exist (a moved module leaves none
    behind)."""
    docs = [ROOT / "README.md", *ROOT.glob("docs/*.md")]
    code = [*ROOT.glob("tapo_jax/**/*.py"), *ROOT.glob("tests/*.py"),
            *ROOT.glob("benchmarks/*.py")]
    missing, refs = [], 0
    for path in [p for p in docs + code if p != Path(__file__).resolve()]:
        text = path.read_text()
        if path in docs:
            for ref in PATH_REF.findall(text):
                refs += 1
                if not (ROOT / ref).exists():
                    missing.append(f"{path.name}: {ref}")
            for ref in SHORT_REF.findall(text):
                refs += 1
                if not (ROOT / "tapo_jax" / ref).exists():
                    missing.append(f"{path.name}: {ref}")
        for ref in DOTTED_REF.findall(text):
            refs += 1
            if not _resolves(ref.rstrip(".")):
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert refs >= 50, "no references found: the patterns no longer match"
    assert not missing, f"unresolved references: {sorted(set(missing))}"
