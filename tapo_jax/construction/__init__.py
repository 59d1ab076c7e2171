"""Trajectory construction: candidate selection (DCS), synthesis prompts and parsing, and the
mechanism diagnostics of the constructed rows (paper §3.2-3.3). The rows become a training
batch in :mod:`tapo_jax.data.batching`."""

from tapo_jax.construction.selection import Pair, Selection, select_candidates, selection_rng
from tapo_jax.construction.synthesis import (
    PARSE_REASONS,
    ParsedConstruction,
    PrefixCheck,
    build_synthesis_prompt,
    count_reasons,
    format_construction,
    parse_construction,
    prefix_check,
    resolve_style,
    rule_construct,
)

__all__ = [
    "PARSE_REASONS",
    "Pair",
    "ParsedConstruction",
    "PrefixCheck",
    "Selection",
    "build_synthesis_prompt",
    "count_reasons",
    "format_construction",
    "parse_construction",
    "prefix_check",
    "resolve_style",
    "rule_construct",
    "select_candidates",
    "selection_rng",
]
