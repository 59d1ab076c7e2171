"""How the policy's `compare` analyses decide: read from a study's logged constructions.

For every construction a TAPO run logged (``examples.jsonl``: the first of each RL step) whose
analysis names a step and whose wrong response has an error the task's oracle locates, the
analysis's value pairs (``2. 24 | 24``) are checked against the two responses the prompt quotes
(:func:`tapo_jax.data.sft_examples.line_results`), and its verdict against the pairs it wrote:

- ``pairs_copied_right`` / ``pairs``: a pair equals the wrong response's and the reference's
  values at that line;
- ``names_first_differing_pair``: the named step is the first pair whose values differ;
- ``stops_on_equal_pair``: the last pair before the verdict has equal values;
- ``passes_differing_pair``: a pair before the last one differs;
- ``names_first_error`` (``..._clean_reference``): the named step is the oracle's first error
  (over constructions whose reference the oracle finds clean).

Prints one JSON line per run directory and one for all of them.

    python benchmarks/analysis_decisions.py runs/study16_compare/seed*/tapo
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from tapo_jax.construction.diagnostics import analysis_error_step
from tapo_jax.data.arithmetic import first_error_step
from tapo_jax.data.sft_examples import line_results

KEYS = ("constructions", "pairs", "pairs_copied_right", "names_first_differing_pair",
        "stops_on_equal_pair", "passes_differing_pair", "names_first_error", "clean_reference",
        "names_first_error_clean_reference")
_PROMPT = re.compile(r"Q: (.*)\nWrong:\n(.*)\nRef:\n(.*)$", re.S)
_ANALYSIS = re.compile(r"<analysis>(.*?)</analysis>", re.S)
_PAIR = re.compile(r"^(\d+)\. (\S+) \| (\S+)$", re.M)


def count(records) -> dict[str, int]:
    out = dict.fromkeys(KEYS, 0)
    for r in records:
        if r.get("kind") != "construction":
            continue
        m, a = _PROMPT.search(r["prompt"]), _ANALYSIS.search(r["output"])
        if not m or not a:
            continue
        question, wrong, ref = m.groups()
        named, error = analysis_error_step(a.group(1)), first_error_step(question, wrong)
        if named is None or error is None:
            continue
        out["constructions"] += 1
        wv, rv = line_results(wrong), line_results(ref)
        differ = []
        for i, x, y in _PAIR.findall(a.group(1)):
            i = int(i) - 1
            out["pairs"] += 1
            out["pairs_copied_right"] += i < len(wv) and i < len(rv) and (x, y) == (wv[i], rv[i])
            differ.append(x != y)
        first = next((k + 1 for k, d in enumerate(differ) if d), None)
        out["names_first_differing_pair"] += first == named
        if differ:
            out["stops_on_equal_pair"] += not differ[-1]
            out["passes_differing_pair"] += any(differ[:-1])
        out["names_first_error"] += named == error + 1
        clean = first_error_step(question, ref) is None
        out["clean_reference"] += clean
        out["names_first_error_clean_reference"] += clean and named == error + 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories holding examples.jsonl")
    args = ap.parse_args()
    total = dict.fromkeys(KEYS, 0)
    for run in args.runs:
        path = Path(run) / "examples.jsonl"
        if not path.is_file():
            raise SystemExit(f"{path}: no such file (a TAPO run directory logs it)")
        with open(path) as f:
            c = count(json.loads(line) for line in f if line.strip())
        print(json.dumps(dict(run=run, **c)), flush=True)
        for k in KEYS:
            total[k] += c[k]
    print(json.dumps(dict(run="all", **total)))


if __name__ == "__main__":
    main()
