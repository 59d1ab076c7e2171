"""benchmarks/analysis_decisions.py on hand-written constructions."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "analysis_decisions.py"
spec = importlib.util.spec_from_file_location("analysis_decisions", BENCH)
AD = importlib.util.module_from_spec(spec)
spec.loader.exec_module(AD)

PROMPT = ("Fix\nQ: Compute 2 - 1 + 17 + 16.\nWrong:\n2 - 1 = 1\n1 + 17 = 18\n18 + 16 = 33\n"
          "\\boxed{33}\nRef:\n2 - 1 = 1\n1 + 17 = 18\n18 + 16 = 34\n\\boxed{34}")
SLIPPED = PROMPT.replace("Ref:\n2 - 1 = 1\n1 + 17 = 18", "Ref:\n2 - 1 = 2\n2 + 17 = 18")


def rec(analysis, prompt=PROMPT):
    return dict(kind="construction", prompt=prompt,
                output=f"<analysis>{analysis}</analysis>\n<reconstruction>x</reconstruction>")


RECORDS = [
    # right: the first differing pair is line 3, y-'s first error
    rec("1. 1 | 1\n2. 18 | 18\n3. 33 | 34\nStep 3: sign error."),
    # a miscopied reference value (19) makes pair 2 differ, and it stops there, early
    rec("1. 1 | 1\n2. 18 | 19\nStep 2: sign error."),
    # a slipped reference: passes its differing line 1, names the true error at line 3
    rec("1. 1 | 2\n2. 18 | 18\n3. 33 | 34\nStep 3: arithmetic error.", SLIPPED),
    rec("Step 1: sign error."),  # no pairs written
    rec("no step named"),  # skipped: names no step
    dict(kind="reconstruction", prompt=PROMPT, output=""),  # skipped: not a construction
]


def test_counts_by_hand():
    assert AD.count(RECORDS) == dict(
        constructions=4, pairs=8, pairs_copied_right=7, names_first_differing_pair=2,
        stops_on_equal_pair=0, passes_differing_pair=1, names_first_error=2,
        clean_reference=3, names_first_error_clean_reference=1)


def test_stops_on_equal_pair():
    c = AD.count([rec("1. 1 | 1\n2. 18 | 18\nStep 2: sign error.")])
    assert c["stops_on_equal_pair"] == 1 and c["names_first_differing_pair"] == 0


def test_command_line(tmp_path):
    run = tmp_path / "tapo"
    run.mkdir()
    (run / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = subprocess.run([sys.executable, str(BENCH), str(run)], capture_output=True, text=True,
                         check=True).stdout.strip().split("\n")
    assert [json.loads(x)["constructions"] for x in out] == [4, 4]
    bad = subprocess.run([sys.executable, str(BENCH), str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no such file" in bad.stderr
