"""Problem datasets: loading, field mapping, prompt formatting, seeded order, accuracy filtering.

A dataset is a list of :class:`Record` (prompt, gold answer, id) read from JSONL, JSON (a list of
objects), Parquet or a Hugging Face hub dataset, with user-named fields. :class:`DataIterator`
walks it in a seeded order, epoch after epoch; its position is a small dict stored in checkpoints,
so a resumed run sees exactly the batches the uninterrupted run would have seen.

Over 400 lines on purpose: every step from a file to a batch of records (reading, field
mapping, prompt formatting, seeded order, filtering) is short and uses :class:`Record`; one file
keeps the data contract in one place.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DataError",
    "DataIterator",
    "Record",
    "encode_prompts",
    "epoch_order",
    "extract_gsm8k_answer",
    "filter_by_pass_rate",
    "filter_dataset",
    "format_prompt",
    "load_from_config",
    "load_hf_records",
    "load_records",
    "map_records",
    "read_rows",
    "write_records",
]


class DataError(ValueError):
    """A data file or record is missing, empty or lacks a named field. The message names both."""


@dataclass(frozen=True)
class Record:
    """One problem: the prompt text shown to the policy, the gold answer and a stable id."""

    prompt: str
    answer: str
    id: str


# --------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg}") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON: {e.msg} (line {e.lineno})") from e
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}: expected a JSON list of records (or one list inside an object)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects")
    return data


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
    return pq.read_table(path).to_pylist()


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a .jsonl / .json / .parquet file as dicts (format chosen by the file extension)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(p)
    if suffix == ".json":
        return _read_json(p)
    if suffix in (".parquet", ".pq"):
        return _read_parquet(p)
    raise DataError(f"{p}: unknown data format '{suffix}' (use .jsonl, .json or .parquet)")


def load_hf_records(name: str, split: str = "train", **kwargs: Any) -> list[dict]:
    """Rows of a Hugging Face hub dataset (or a local dataset directory) via ``datasets``."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"data.kind = hf ('{name}') needs the `datasets` package: pip install datasets"
        ) from e
    try:
        ds = datasets.load_dataset(name, split=split, **kwargs)
    except Exception as e:  # network, unknown name, unknown split
        raise DataError(f"could not load HF dataset '{name}' (split '{split}'): {e}") from e
    return [dict(r) for r in ds]


# --------------------------------------------------------------------------------------------
# Field mapping
# --------------------------------------------------------------------------------------------

_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.S)


def extract_gsm8k_answer(text: str) -> str | None:
    """The final answer after GSM8K's ``####`` marker (thousands separators removed), or None."""
    m = _GSM8K.search(text)
    if m is None:
        return None
    return m.group(1).strip().replace(",", "")


def _field(row: dict, name: str, source: str, index: int) -> Any:
    value: Any = row
    for part in name.split("."):  # dotted names reach into nested objects
        if not isinstance(value, dict) or part not in value:
            keys = sorted(row)[:12]
            raise DataError(
                f"{source}: record {index} has no field '{name}' (its fields: {keys}); "
                "set data.prompt_field / data.answer_field / data.id_field"
            )
        value = value[part]
    return value


def map_records(
    rows: Sequence[dict],
    *,
    source: str,
    prompt_field: str = "problem",
    answer_field: str = "answer",
    id_field: str | None = None,
    answer_format: str = "auto",
) -> list[Record]:
    """Map raw rows to :class:`Record`.

    ``answer_format``: ``"raw"`` keeps the answer field as is; ``"gsm8k"`` takes the text after
    ``####`` (error when absent); ``"auto"`` does so only when ``####`` is present.
    """
    if answer_format not in ("auto", "raw", "gsm8k"):
        raise DataError(f"answer_format must be auto, raw or gsm8k, got {answer_format!r}")
    if not rows:
        raise DataError(f"{source}: dataset is empty")
    out = []
    for i, row in enumerate(rows):
        prompt = _field(row, prompt_field, source, i)
        answer = _field(row, answer_field, source, i)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{source}: record {i} field '{prompt_field}' is empty or not text")
        if answer is None:
            raise DataError(f"{source}: record {i} field '{answer_field}' is null")
        answer = str(answer)
        if answer_format == "gsm8k" or (answer_format == "auto" and "####" in answer):
            extracted = extract_gsm8k_answer(answer)
            if extracted is None:
                raise DataError(
                    f"{source}: record {i} field '{answer_field}' has no '#### answer' marker"
                )
            answer = extracted
        rid = str(_field(row, id_field, source, i)) if id_field else str(i)
        out.append(Record(prompt=prompt, answer=answer, id=rid))
    return out


def load_records(
    path: str | Path,
    *,
    prompt_field: str = "problem",
    answer_field: str = "answer",
    id_field: str | None = None,
    answer_format: str = "auto",
    kind: str = "file",
    split: str = "train",
) -> list[Record]:
    """Load a dataset (``kind`` = ``file`` or ``hf``) and map its fields to :class:`Record`."""
    if kind == "hf":
        rows, source = load_hf_records(str(path), split), f"HF dataset '{path}' ({split})"
    elif kind == "file":
        rows, source = read_rows(path), str(path)
    else:
        raise DataError(f"unknown dataset kind {kind!r} (file or hf)")
    return map_records(rows, source=source, prompt_field=prompt_field, answer_field=answer_field,
                       id_field=id_field, answer_format=answer_format)


def write_records(
    path: str | Path,
    records: Sequence[Record],
    *,
    prompt_field: str = "problem",
    answer_field: str = "answer",
    id_field: str = "id",
) -> Path:
    """Write records as JSONL (default field names match the DataConfig defaults)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for r in records:
            row = {prompt_field: r.prompt, answer_field: r.answer, id_field: r.id}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p


# --------------------------------------------------------------------------------------------
# Prompt formatting
# --------------------------------------------------------------------------------------------


def format_prompt(
    prompt: str,
    tokenizer: Any = None,
    *,
    template: str = "{prompt}",
    chat: bool = True,
    system: str | None = None,
) -> str:
    """Prompt text as the policy sees it: ``template`` (``{prompt}`` is substituted, other braces
    are kept, so LaTeX such as ``\\boxed{}`` is safe), then the tokenizer's chat template as one
    user turn with the assistant turn opened. Qwen3 templates get ``enable_thinking=False``."""
    text = template.replace("{prompt}", prompt)
    if not chat or tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return text
    messages = [{"role": "user", "content": text}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    kwargs = {}
    if "enable_thinking" in str(tokenizer.chat_template):
        kwargs["enable_thinking"] = False
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **kwargs)


def encode_prompts(
    prompts: Sequence[str],
    tokenizer: Any,
    *,
    template: str = "{prompt}",
    chat: bool = True,
    max_len: int | None = None,
) -> list[list[int]]:
    """Token ids of formatted prompts. Prompts longer than ``max_len`` raise, naming the count."""
    out = []
    for text in prompts:
        ids = tokenizer(format_prompt(text, tokenizer, template=template, chat=chat),
                        add_special_tokens=False)["input_ids"]
        out.append(list(ids))
    if max_len is not None:
        too_long = [i for i, ids in enumerate(out) if len(ids) > max_len]
        if too_long:
            raise DataError(
                f"{len(too_long)} prompt(s) exceed sampling.max_prompt_len = {max_len} tokens "
                f"(longest {max(len(out[i]) for i in too_long)}; first index {too_long[0]})"
            )
    return out


# --------------------------------------------------------------------------------------------
# Seeded, resumable order
# --------------------------------------------------------------------------------------------


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The permutation of ``range(n)`` used in ``epoch`` (a pure function of seed and epoch)."""
    if not shuffle:
        return np.arange(n)
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x7A90]))
    return rng.permutation(n)


class DataIterator:
    """Endless batches of records in a seeded order; ``state_dict()`` is the resume position.

    Batches cross epoch boundaries: the tail of one epoch is completed by the head of the next,
    so every batch has exactly ``batch_size`` records.
    """

    def __init__(self, records: Sequence[Any], batch_size: int, *, seed: int = 0,
                 shuffle: bool = True):
        if len(records) == 0:
            raise DataError("DataIterator: dataset is empty")
        if batch_size < 1:
            raise DataError(f"DataIterator: batch_size must be >= 1, got {batch_size}")
        self.records = list(records)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order = epoch_order(len(self.records), seed, 0, shuffle)

    def _set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._order = epoch_order(len(self.records), self.seed, epoch, self.shuffle)

    def next_indices(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.index >= len(self.records):
                self._set_epoch(self.epoch + 1)
                self.index = 0
            take = min(self.batch_size - len(out), len(self.records) - self.index)
            out.extend(int(i) for i in self._order[self.index:self.index + take])
            self.index += take
        return out

    def __iter__(self):
        return self

    def __next__(self) -> list[Any]:
        return [self.records[i] for i in self.next_indices()]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "num_records": len(self.records), "shuffle": int(self.shuffle)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = int(state.get("num_records", len(self.records)))
        if n != len(self.records):
            raise DataError(f"DataIterator: checkpoint was taken on {n} records, dataset has "
                            f"{len(self.records)} (did the data file change?)")
        if int(state.get("seed", self.seed)) != self.seed:
            raise DataError(f"DataIterator: checkpoint seed {state['seed']} != seed {self.seed}")
        if "shuffle" in state:
            self.shuffle = bool(state["shuffle"])
        index = int(state["index"])
        if not 0 <= index <= len(self.records):
            raise DataError(f"DataIterator: index {index} outside [0, {len(self.records)}]")
        self._set_epoch(int(state["epoch"]))
        self.index = index


# --------------------------------------------------------------------------------------------
# Accuracy filtering (keep problems of intermediate difficulty)
# --------------------------------------------------------------------------------------------


def filter_by_pass_rate(
    records: Sequence[Record], pass_rates: Sequence[float], lo: float = 0.125, hi: float = 0.875
) -> list[Record]:
    """Records whose pass rate lies in the closed interval [lo, hi]."""
    if len(records) != len(pass_rates):
        raise DataError(f"{len(records)} records but {len(pass_rates)} pass rates")
    if not 0.0 <= lo <= hi <= 1.0:
        raise DataError(f"need 0 <= lo <= hi <= 1, got lo={lo}, hi={hi}")
    return [r for r, p in zip(records, pass_rates) if lo <= float(p) <= hi]


def filter_dataset(
    records: Sequence[Record],
    sample_fn: Callable[[list[str], int], list[list[str]]],
    n: int,
    lo: float = 0.125,
    hi: float = 0.875,
    *,
    score_fn: Callable[[list[str], list[str]], tuple[Any, Any]] | None = None,
) -> tuple[list[Record], np.ndarray]:
    """Sample ``n`` answers per problem, score them, keep problems with pass rate in [lo, hi].

    ``sample_fn(prompts, n)`` gets the records' raw prompt texts (it applies the prompt and
    chat templates) and returns, per prompt, a list of ``n`` completion texts;
    ``score_fn(responses, golds) -> (rewards, reasons)`` defaults to
    :func:`tapo_jax.rewards.verifier.score`.
    Returns (kept records, pass rates float64[len(records)]).
    """
    if n < 1:
        raise DataError(f"filter_dataset: n must be >= 1, got {n}")
    if score_fn is None:
        from tapo_jax.rewards.verifier import score as score_fn
    samples = sample_fn([r.prompt for r in records], n)
    if len(samples) != len(records) or any(len(s) != n for s in samples):
        raise DataError(f"sample_fn must return {len(records)} lists of {n} completions")
    flat = [t for s in samples for t in s]
    golds = [r.answer for r in records for _ in range(n)]
    rewards, _ = score_fn(flat, golds)
    pass_rates = (np.asarray(rewards, np.float64).reshape(len(records), n) > 0).mean(axis=1)
    return filter_by_pass_rate(records, pass_rates, lo, hi), pass_rates


def load_from_config(data_cfg: Any, *, seed: int = 0, eval_split: bool = False) -> list[Record]:
    """Records of a ``DataConfig``: the embedded arithmetic task (train / eval problems from
    ``seed``), a local file (``data.path``; ``data.eval_path`` for evaluation, else the same
    file) or an HF hub dataset (split ``data.split``; split ``test`` for evaluation)."""
    if data_cfg.kind == "arithmetic":
        from tapo_jax.data.arithmetic import make_splits

        train, ev = make_splits(data_cfg, seed)
        return [p.record() for p in (ev if eval_split else train)]
    path = data_cfg.eval_path if eval_split and data_cfg.eval_path else data_cfg.path
    if path is None:
        raise DataError(f"data.path is required when data.kind = {data_cfg.kind}")
    # HF datasets keep evaluation problems in their "test" split
    split = "test" if eval_split and data_cfg.kind == "hf" else data_cfg.split
    return load_records(path, prompt_field=data_cfg.prompt_field,
                        answer_field=data_cfg.answer_field, id_field=data_cfg.id_field,
                        kind=data_cfg.kind, split=split)
