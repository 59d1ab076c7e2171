"""Problem datasets, the embedded arithmetic task, tokenizers, cold-start SFT examples and the
padding and bucketing of rows into batches."""

from tapo_jax.data.datasets import (
    DataError,
    DataIterator,
    Record,
    encode_prompts,
    filter_by_pass_rate,
    filter_dataset,
    format_prompt,
    load_from_config,
    load_records,
    write_records,
)

__all__ = [
    "DataError",
    "DataIterator",
    "Record",
    "encode_prompts",
    "filter_by_pass_rate",
    "filter_dataset",
    "format_prompt",
    "load_from_config",
    "load_records",
    "write_records",
]
