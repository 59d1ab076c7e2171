"""Synthesis prompts, strict parsing of constructions, prefix checks, the rule constructor."""

from __future__ import annotations

import pytest

from tapo_jax.data.arithmetic import reflection_phrase, trace_response
from tapo_jax.construction import synthesis as S

Q = "Compute 85 - 19 + 4."
WRONG = "85 - 19 = 67\n67 + 4 = 71\n\\boxed{71}"
REF = "85 - 19 = 66\n66 + 4 = 70\n\\boxed{70}"
GOOD = ("<analysis>Step 1: arithmetic error.</analysis>\n<reconstruction>85 - 19 = 67\n"
        "Wait, 85 - 19 = 66, not 67.\n66 + 4 = 70\n\\boxed{70}</reconstruction>")


@pytest.mark.parametrize("text, reason", [
    (GOOD, "ok"),
    ("  \n" + GOOD + "\n<|im_end|>", "ok"),  # surrounding whitespace and end-of-turn token
    ("<reconstruction>x</reconstruction>", "missing_analysis"),
    ("<analysis>a</analysis>", "missing_reconstruction"),
    ("<analysis>a</analysis>\n<reconstruction>85 - 19 = 67\nWait,", "unclosed_tag"),
    ("<analysis>a\n<reconstruction>r</reconstruction>", "unclosed_tag"),
    ("</analysis>a<analysis><reconstruction>r</reconstruction>", "unclosed_tag"),
    ("<analysis>a<reconstruction>r</reconstruction></analysis>", "nested_tags"),
    ("<analysis>a</analysis><reconstruction>r<analysis>b</analysis></reconstruction>",
     "duplicate_tags"),
    ("<reconstruction>r<analysis>a</analysis></reconstruction>", "nested_tags"),
    ("<reconstruction>r</reconstruction><analysis>a</analysis>", "wrong_order"),
    ("<analysis>a</analysis><reconstruction>r</reconstruction><reconstruction>s"
     "</reconstruction>", "duplicate_tags"),
    ("<analysis>a</analysis>\n<reconstruction>  \n </reconstruction>", "empty_reconstruction"),
    ("<analysis> </analysis><reconstruction>r</reconstruction>", "empty_analysis"),
    ("<analysis>a</analysis><reconstruction>r</reconstruction>\nSo the answer is 70.",
     "text_after"),
    ("Sure!\n<analysis>a</analysis><reconstruction>r</reconstruction>", "text_before"),
    ("<analysis>a</analysis> and <reconstruction>r</reconstruction>", "text_between"),
    ("", "missing_analysis"),
])
def test_parsing_of_malformed_outputs(text, reason):
    p = S.parse_construction(text)
    assert p.reason == reason
    assert p.ok is (reason == "ok")


def test_parsed_fields_and_reason_counts():
    p = S.parse_construction(GOOD)
    assert p.analysis == "Step 1: arithmetic error."
    assert p.reconstruction.startswith("85 - 19 = 67\nWait,")
    assert p.reconstruction.endswith("\\boxed{70}")
    parsed = [S.parse_construction(t) for t in (GOOD, GOOD, "", "<analysis>a</analysis>")]
    counts = S.count_reasons(parsed)
    assert counts["ok"] == 2 and counts["missing_analysis"] == 1
    assert counts["missing_reconstruction"] == 1 and sum(counts.values()) == 4
    assert set(counts) == set(S.PARSE_REASONS)


def test_prefix_check():
    recon = S.parse_construction(GOOD).reconstruction
    c = S.prefix_check(WRONG, recon)
    assert c.lines == 1 and c.kept
    assert c.chars == len("85 - 19 = 67\n")  # the next characters differ ("6" vs "W")
    assert c.share == pytest.approx(c.chars / len(WRONG))
    full = S.prefix_check(WRONG, REF)
    assert full.lines == 0 and not full.kept and full.chars == len("85 - 19 = 6")
    same = S.prefix_check(WRONG, WRONG + "\n")
    assert same.share == 1.0 and same.lines == 3
    assert not S.prefix_check("", "x").kept


def test_prompt_templates_fill_slots_and_keep_braces():
    p = S.build_synthesis_prompt(Q, WRONG, REF, style="compact", mode="micro")
    assert p == f"Fix\nQ: {Q}\nWrong:\n{WRONG}\nRef:\n{REF}"
    assert S.build_synthesis_prompt(Q, WRONG, REF, style="compact", mode="full").startswith("Redo")
    nat = S.build_synthesis_prompt("Find {x} in \\boxed{}.", "{reference}", REF)
    assert "Find {x} in \\boxed{}." in nat and "Incorrect solution:\n{reference}\n" in nat
    assert "<analysis>" in nat and "<reconstruction>" in nat
    full = S.build_synthesis_prompt(Q, WRONG, REF, mode="full")
    assert "copy the incorrect solution" in S.build_synthesis_prompt(Q, WRONG, REF)
    assert "copy the incorrect solution" not in full and "from the beginning" in full
    custom = S.build_synthesis_prompt(Q, WRONG, REF, template="[{question}|{reference}]")
    assert custom == f"[{Q}|{REF}]"
    with pytest.raises(ValueError):
        S.build_synthesis_prompt(Q, WRONG, REF, mode="rule")
    assert S.resolve_style("auto", "arithmetic") == "compact"
    assert S.resolve_style("auto", "file") == "natural"
    assert S.resolve_style("aligned", "arithmetic") == "aligned"
    with pytest.raises(ValueError, match="aligned"):
        S.resolve_style("sideways", "arithmetic")


def test_aligned_template_puts_line_i_of_each_solution_on_line_i():
    wrong = "2 + 8 = 11\n\n11 - 10 = 1\n\\boxed{1}"
    ref = "2 + 8 = 10\n10 - 10 = 0\n10 - 0 = 10\n\\boxed{10}"
    p = S.build_synthesis_prompt("Compute 2 + 8 - 10 - 0.", wrong, ref, style="aligned")
    assert p == ("Fix\nQ: Compute 2 + 8 - 10 - 0.\n"
                 "2 + 8 = 11 | 2 + 8 = 10\n11 - 10 = 1 | 10 - 10 = 0\n"
                 "\\boxed{1} | 10 - 0 = 10\n| \\boxed{10}")
    assert S.build_synthesis_prompt("Q", wrong, ref, style="aligned", mode="full").startswith(
        "Redo\nQ: Q\n2 + 8 = 11 | 2 + 8 = 10\n")
    assert S.align_lines("a\nb", "a") == "a | a\nb |"


def test_rule_constructor_splices_prefix_reflection_and_reference():
    out = S.rule_construct(WRONG, REF, reflect=reflection_phrase)
    assert out == "85 - 19 = 67\nWait, 85 - 19 = 66, not 67.\n66 + 4 = 70\n\\boxed{70}"
    t = trace_response(Q, out)
    assert t.recovered and t.first_error == 0
    generic = S.rule_construct(WRONG, REF)
    phrase = S.generic_reflection("", "")[0]
    assert generic.split("\n") == ["85 - 19 = 67", phrase] + REF.split("\n")
    # divergence later: the shared prefix is kept once
    wrong2 = "85 - 19 = 66\n66 + 4 = 80\n\\boxed{80}"
    assert S.rule_construct(wrong2, REF, reflect=reflection_phrase) == (
        "85 - 19 = 66\n66 + 4 = 80\nWait, 66 + 4 = 70, not 80.\n\\boxed{70}")
    # truncated incorrect response: keep it all, then continue from the reference
    assert S.rule_construct("85 - 19 = 66", REF) == (
        "85 - 19 = 66\n" + S.generic_reflection("", "")[0] + "\n66 + 4 = 70\n\\boxed{70}")
    assert S.rule_construct(REF, REF) is None
    assert S.prefix_check(WRONG, out).kept
