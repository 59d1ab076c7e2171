"""Trajectory construction: candidate selection (DCS), synthesis prompts and parsing, and the
assembly of the training batch (paper §3.2-3.4)."""

from tapo_jax.tapo.batch import BatchStats, Row, build_batch_arrays, build_train_batch
from tapo_jax.tapo.selection import Pair, Selection, select_candidates, selection_rng
from tapo_jax.tapo.synthesis import (
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
    "BatchStats",
    "Pair",
    "ParsedConstruction",
    "PrefixCheck",
    "Row",
    "Selection",
    "build_batch_arrays",
    "build_synthesis_prompt",
    "build_train_batch",
    "count_reasons",
    "format_construction",
    "parse_construction",
    "prefix_check",
    "resolve_style",
    "rule_construct",
    "select_candidates",
    "selection_rng",
]
