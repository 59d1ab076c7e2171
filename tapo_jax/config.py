"""Typed configuration for tapo-jax.

Every run is described by one :class:`Config` built once in ``main`` and passed down explicitly.
Configs come from YAML files plus dotted command-line overrides (``model.num_layers=2``).
Unknown keys, wrong types and impossible values raise :class:`ConfigError` naming the key and the
file they came from.

A file may start from another: ``base: tapo.yaml`` (a path relative to the file that names it)
loads the base first, chains of bases included, and the file's own keys then replace the base's
key by key (mappings merge, everything else is replaced). A cycle of bases is an error that lists
the files in it. ``base`` is not a config field: it never appears in a loaded :class:`Config`.

One file past 400 lines on purpose: the schema, its loading and its validation stay side by side,
so a key's type, default and checks are read in one place.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible. The message names key and file."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(unsafe_hash=True)  # hashable: stored as a static attribute of the model
class ModelConfig:
    """Qwen3 dense decoder dimensions (names follow HF ``Qwen3Config``).

    ``preset`` fills every dimension from :mod:`tapo_jax.models.presets` (explicit keys in the same
    section override the preset). ``hf_path`` loads weights and dimensions from a local HF directory.
    """

    preset: Optional[str] = None
    hf_path: Optional[str] = None
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None  # None = hidden_size // num_heads
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 4096
    dtype: Literal["float32", "bfloat16"] = "float32"  # activation / compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # storage dtype of the weights
    init_std: float = 0.02
    # Memory and compile time at scale (docs/design.md, "Model and memory")
    attention: Literal["auto", "xla", "blockwise", "cudnn", "splash"] = "auto"
    attention_block: int = 512  # query / key block of the blockwise implementation
    remat: Literal["none", "full", "dots"] = "none"  # per-layer rematerialisation policy
    scan_layers: bool = False  # layer params stacked [L, ...] and run by one lax.scan

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


@dataclass
class MeshConfig:
    """Device mesh axes. One axis may be -1, meaning 'all remaining devices'."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclass
class SamplingConfig:
    """Rollout sampling (the engine in :mod:`tapo_jax.sampling`)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k truncation
    min_p: float = 0.0
    max_new_tokens: int = 256
    max_prompt_len: int = 256
    num_slots: int = 64
    prefill_buckets: tuple[int, ...] = ()  # empty = powers of two
    # Construction (synthesis) generation budget; 0 = 2 * max_new_tokens.
    construction_max_new_tokens: int = 0
    construction_max_prompt_len: int = 0  # 0 = max_prompt_len + 2 * max_new_tokens + 128
    # decoding of the constructions (None = the rollouts' temperature / top_p); a construction
    # is the policy's best-effort rewrite, not exploration, so recipes may decode it like an
    # evaluation (docs/design.md, "Decisions")
    construction_temperature: Optional[float] = None
    construction_top_p: Optional[float] = None
    # speculative decoding of the constructions with prompt-lookup drafts: up to this many
    # tokens copied from the synthesis prompt (where a reconstruction repeats the wrong
    # response) are verified per forward; the samples keep their distribution. 0 = off
    construction_draft_tokens: int = 0


@dataclass
class RLConfig:
    """Algorithm and objective (docs/design.md, "Method"). The algorithm is config, not code."""

    algorithm: Literal["grpo", "tapo", "opsd"] = "tapo"
    num_samples: int = 8  # K responses per query
    # DCS (difficulty-aware candidate selection)
    n_pos: int = 2
    n_neg: int = 4
    m_max: int = 4
    # Objective
    lam: float = 1.0  # weight of the reflection loss
    eps_low: float = 0.2
    eps_high: float = 0.2  # clip-higher: e.g. 0.28
    dual_clip_c: Optional[float] = None
    adv_eps: float = 1e-6
    std_normalize: bool = True
    std_ddof: int = 0
    loss_agg: Literal[
        "seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    ] = "seq-mean-token-mean"
    ots: bool = True
    w_min: float = 0.01
    w_max: float = 10.0
    # Ablations (paper Tables 3-5)
    decoupled: bool = True
    negatives: bool = True
    construction: Literal["micro", "full", "rule"] = "micro"
    # synthesis prompt wording: auto = compact for data.kind=arithmetic, natural otherwise;
    # aligned = compact with y- and y+ side by side, line by line
    synthesis_template: Literal["auto", "compact", "natural", "aligned"] = "auto"
    sft_only: bool = False
    ref_group_includes_originals: bool = False
    # train a reconstruction only from its reflection line on; the erroneous prefix it copies
    # stays in the sequence as context but carries no loss
    ref_loss_from_reflection: bool = False
    # Regularisers
    kl_coef: float = 0.0
    kl_kind: Literal["k1", "k2", "k3"] = "k3"
    # with kl_coef = 0 the KL is only measured: the reference forward (and the ``kl`` metric)
    # runs on every kl_every-th step (1 = every step)
    kl_every: int = 10
    entropy_coef: float = 0.0
    # Peer options
    dynamic_sampling: bool = False  # skip groups with zero reward spread, refill the batch
    max_resample_rounds: int = 3
    overlong_filter: bool = False  # mask responses cut by the length limit
    # OPSD (on-policy self-distillation)
    opsd_beta: float = 0.5
    opsd_temperature: float = 1.0
    opsd_top_k: int = 0


@dataclass
class OptimConfig:
    learning_rate: float = 1e-6
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0


@dataclass
class DataConfig:
    """Training / evaluation data. ``kind=arithmetic`` is the embedded synthetic task."""

    kind: Literal["arithmetic", "file", "hf"] = "arithmetic"
    path: Optional[str] = None
    eval_path: Optional[str] = None
    split: str = "train"
    prompt_field: str = "problem"
    answer_field: str = "answer"
    id_field: Optional[str] = None
    prompt_template: str = "{prompt}"
    chat_template: bool = True
    tokenizer_path: Optional[str] = None
    shuffle: bool = True
    # arithmetic task knobs
    num_train: int = 4096
    num_eval: int = 128
    min_steps: int = 2
    max_steps: int = 3
    operand_min: int = 1
    operand_max: int = 50
    operators: str = "+-"
    # seed of the arithmetic task's evaluation problems; None: the run's seed (train.seed). A
    # fixed value gives every seed of a study the same held-out problems, so that seed-to-seed
    # differences are the models' own, not the problem sets'
    eval_seed: Optional[int] = None


@dataclass
class ColdStartConfig:
    """Cold-start SFT (ordinary solutions + trajectory-construction examples)."""

    enabled: bool = False
    steps: int = 0
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    # after warmup: cosine down to optim.min_lr_ratio * learning_rate at the last step, or constant
    schedule: Literal["constant", "cosine"] = "cosine"
    construction_fraction: float = 0.5
    # arithmetic task: problems the cold start is built from. 0 = the RL training problems
    # (data.num_train); N > 0 = N problems of its own (disjoint from the evaluation problems), so
    # that a long cold start sees fresh problems instead of repeating a small set for epochs
    num_problems: int = 0
    # arithmetic task: share of construction examples whose reference is a correct-answer solution
    # with a compensated slip of its own (as the policy's correct rollouts often are), so that the
    # copied prefix can only come from the wrong response (tapo_jax.data.sft_examples)
    reference_slip_fraction: float = 0.0
    # arithmetic task: the construction examples' analysis. "step" names the erroneous step
    # ("Step 3: sign error."); "walk" checks every step before it first ("Step 1 ok. Step 2 ok.
    # Step 3: sign error."), one decision per line instead of the step number in one token;
    # "compare" first writes each line's value in the wrong response and in the reference side
    # by side ("1. 17 | 17", "2. 24 | 24", "3. 10 | 9", then "Step 3: sign error.")
    analysis: Literal["step", "walk", "compare"] = "step"
    # arithmetic task: the loss weight of the construction targets' decision tokens, the few
    # tokens where a target places the error (the analysis's step number, and each line start of
    # the reconstruction up to its reflection: tapo_jax.data.sft_examples.decision_offsets);
    # every other token weighs 1 and the loss is still divided by the token count
    decision_weight: float = 1.0
    # arithmetic task: the loss weight of the erroneous line each micro-reflective target copies
    # from the wrong response right before its reflection (decision tokens keep decision_weight)
    error_line_weight: float = 1.0
    # arithmetic task: the slips of the construction examples' wrong solutions, a comma-separated
    # list of kinds drawn uniformly (a repeat weights its kind): digit, sign, skipped, operand,
    # carry (the result off by one), tens (off by ten). "" = the first four, uniformly.
    # `benchmarks/error_profile.py` shows which slips a policy makes itself.
    slip_kinds: str = ""
    max_len: int = 0  # 0 = derived from the data
    data_path: Optional[str] = None  # prompt/response records (needed unless data.kind = arithmetic)
    # Each batch is drawn from one length group (examples padded to a multiple of
    # `length_quantum` tokens; powers of two when that gives more than 6 groups), so each batch is
    # padded only to its own group's length and the step compiles once per group.
    length_quantum: int = 32
    # Pack a batch's rows in pairs (as train.packing does for RL). Rows of one length group leave
    # little padding to save, and a packed row doubles the span attention runs over.
    packing: bool = False
    # Stop at a target accuracy instead of a step count: every `check_every` steps the policy
    # samples `check_samples` answers (eval.temperature / eval.top_p) to each of the first
    # `check_problems` RL training problems (never the evaluation problems), and the cold start
    # ends at the first check whose Pass@1 is >= target_pass1. `steps` stays the cap (and the
    # length of the learning-rate schedule). None = always run `steps` steps. No check runs
    # before step `check_from` (0 = from the first multiple of `check_every`): the checks never
    # touch the training batches or the params, so skipping early ones that cannot reach the
    # target saves their time and changes nothing else.
    target_pass1: Optional[float] = None
    check_every: int = 50
    check_from: int = 0
    check_problems: int = 128
    check_samples: int = 4


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 32  # queries per RL step
    micro_batch_size: int = 0  # sequences per micro-batch; 0 = whole batch
    ppo_epochs: int = 1
    mini_batches: int = 1
    # rows packed end to end in rows of twice the batch length (segment ids keep them apart): the
    # forwards and the update skip most padding (tapo_jax.rl.packing); needs mini_batches = 1
    packing: bool = False
    seed: int = 0
    output_dir: str = "runs/default"
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    resume: bool = False  # continue from the newest checkpoint in output_dir
    # start RL from these weights (an HF directory, a run directory or its checkpoints/), with
    # no cold start; they are also the KL reference
    init_from: Optional[str] = None
    overwrite: bool = False  # start over in an output_dir that holds an earlier run
    log_every: int = 1  # cold start: log every max(log_every, 10) steps
    wandb_project: str = ""  # also log to this wandb project (when wandb is installed)
    export_hf: bool = True
    progress: bool = True


@dataclass
class EvalConfig:
    num_samples: int = 5  # n per problem
    k_max: int = 5
    runs: int = 1  # R independent runs
    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 0  # 0 = sampling.max_new_tokens
    num_problems: int = 0  # 0 = all
    before_and_after: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = "run"
    description: str = ""


# --------------------------------------------------------------------------------------------
# Building from dicts with type checks
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (with the few safe coercions YAML needs)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{source}: '{key}' = {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' = {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, f"{key}[{i}]", source) for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-6 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
    raise ConfigError(f"{source}: '{key}' has unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str, source: str, base: Any = None) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    obj = base if base is not None else cls()
    if cls is ModelConfig and data.get("preset") is not None:
        # A preset sets every dimension; explicit keys of the same mapping then override it.
        obj = _apply_preset(obj, data["preset"], source)
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in fields:
            near = [n for n in fields if n.startswith(str(k)[:3])]
            hint = f" (did you mean {near}?)" if near else ""
            raise ConfigError(f"{source}: unknown key '{key}'{hint}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, f"{key}.", source, getattr(obj, k))
        else:
            kwargs[k] = _coerce(v, tp, key, source)
    return dataclasses.replace(obj, **kwargs)


def from_dict(data: dict[str, Any], source: str = "<dict>", base: Config | None = None) -> Config:
    cfg = _build(Config, data or {}, "", source, base)
    return cfg


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.strip().split("."), value


def _override(cfg: Config, overrides: list[str]) -> Config:
    """Dotted ``key=value`` overrides (values parsed as YAML scalars), type-checked one by one."""
    for item in overrides:
        path, value = _parse_override(item)
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        cfg = _build(Config, nested, "", f"override '{item}'", cfg)
    return cfg


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: nested mappings merge key by key, any other value replaces."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(p: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of the YAML file ``p`` with its ``base:`` chain merged in (base first).

    ``chain`` holds the files that named ``p`` as their base (resolved paths, outermost first).
    """
    if p.resolve() in chain:
        cycle = " -> ".join(str(c) for c in (*chain[chain.index(p.resolve()):], p.resolve()))
        raise ConfigError(f"{chain[-1]}: 'base' makes a cycle: {cycle}")
    if not p.is_file():
        if chain:
            raise ConfigError(f"{chain[-1]}: 'base' names a file that does not exist: {p}")
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{p}: 'base' must be a file name, got {base!r}")
    return _merge(_read_yaml(p.parent / base, (*chain, p.resolve())), data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or defaults when ``path`` is None), apply overrides, validate.

    The file's ``base:`` chain is resolved first (see the module docstring).
    """
    source = "<defaults>"
    cfg = Config()
    if path is not None:
        source = str(path)
        cfg = from_dict(_read_yaml(Path(path)), source)
    if overrides:  # values are checked once, after every override (they may fix each other)
        cfg = _override(cfg, overrides)
        source = f"{source} with overrides {' '.join(overrides)}"
    validate(cfg, source)
    return cfg


def _apply_preset(model: ModelConfig, name: Any, source: str) -> ModelConfig:
    from tapo_jax.models.presets import PRESETS

    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(
            f"{source}: 'model.preset' = {name!r} is unknown; known: {sorted(PRESETS)}")
    return dataclasses.replace(model, **PRESETS[name])


def sampler_max_len(cfg: Config) -> int:
    """Cache slots per sequence of the run's sampler: prompt + response, or for TAPO the longer
    synthesis prompt (question, wrong and right responses) plus its construction budget."""
    s = cfg.sampling
    max_len = s.max_prompt_len + s.max_new_tokens
    if cfg.rl.algorithm == "tapo":
        prompt = s.construction_max_prompt_len or (s.max_prompt_len + 2 * s.max_new_tokens + 128)
        max_len = max(max_len, prompt + construction_budget(cfg))
    return max_len


def construction_budget(cfg: Config) -> int:
    """New tokens a construction may have (``sampling.construction_max_new_tokens``, else twice
    a response's)."""
    s = cfg.sampling
    return s.construction_max_new_tokens or 2 * s.max_new_tokens


def training_kind(cfg: Config) -> str:
    """The update the RL stage runs: ``"opsd"`` (distillation) or ``"rl"`` (GRPO / TAPO)."""
    return "opsd" if cfg.rl.algorithm == "opsd" else "rl"


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------
# Validation of values (impossible combinations)
# --------------------------------------------------------------------------------------------


def slip_kind_list(text: str) -> tuple[str, ...]:
    """``cold_start.slip_kinds`` as a tuple of kinds (``"carry, carry,tens"`` -> three)."""
    return tuple(k.strip() for k in text.split(",") if k.strip())


def _require(cond: bool, source: str, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: '{key}' {msg}")


def validate_model(m: ModelConfig, source: str = "<model>") -> None:
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "max_position_embeddings"):
        _require(getattr(m, k) > 0, source, f"model.{k}", f"must be positive, got {getattr(m, k)}")
    if m.head_dim is None:
        _require(
            m.hidden_size % m.num_heads == 0, source, "model.num_heads",
            f"= {m.num_heads} must divide model.hidden_size = {m.hidden_size} "
            "(or set model.head_dim explicitly)",
        )
    else:
        _require(m.head_dim > 0, source, "model.head_dim", f"must be positive, got {m.head_dim}")
    _require(m.resolved_head_dim % 2 == 0, source, "model.head_dim",
             f"must be even for rotary embeddings, got {m.resolved_head_dim}")
    _require(
        m.num_heads % m.num_kv_heads == 0, source, "model.num_kv_heads",
        f"= {m.num_kv_heads} must divide model.num_heads = {m.num_heads}",
    )
    _require(m.rope_theta > 0, source, "model.rope_theta", "must be positive")
    _require(m.rms_norm_eps > 0, source, "model.rms_norm_eps", "must be positive")
    _require(m.attention_block >= 8 and m.attention_block % 8 == 0, source,
             "model.attention_block", f"must be a positive multiple of 8, got {m.attention_block}")


def validate_mesh(m: MeshConfig, source: str = "<mesh>") -> None:
    """Axis sizes are >= 1, or -1 ('the remaining devices') for at most one axis.

    The one check of a mesh's values: :func:`tapo_jax.models.sharding.make_mesh` calls it before
    it checks the sizes against the devices it is given.
    """
    axes = {"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor}
    _require(sum(a == -1 for a in axes.values()) <= 1, source, "mesh",
             f"may have at most one axis = -1, got {axes}")
    for name, a in axes.items():
        _require(a == -1 or a >= 1, source, f"mesh.{name}", f"must be >= 1 or -1, got {a}")


def validate(cfg: Config, source: str = "<config>") -> None:
    validate_model(cfg.model, source)
    validate_mesh(cfg.mesh, source)
    s = cfg.sampling
    _require(s.temperature >= 0, source, "sampling.temperature", "must be >= 0")
    _require(0 < s.top_p <= 1, source, "sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    _require(s.top_k >= 0, source, "sampling.top_k", "must be >= 0")
    _require(0 <= s.min_p < 1, source, "sampling.min_p", "must be in [0, 1)")
    _require(s.max_new_tokens > 0, source, "sampling.max_new_tokens", "must be positive")
    _require(s.max_prompt_len > 0, source, "sampling.max_prompt_len", "must be positive")
    _require(s.num_slots > 0, source, "sampling.num_slots", "must be positive")
    r = cfg.rl
    _require(r.num_samples >= 1, source, "rl.num_samples", "must be >= 1")
    _require(r.n_pos >= 1, source, "rl.n_pos", "must be >= 1")
    _require(r.n_neg >= 1, source, "rl.n_neg", "must be >= 1")
    _require(r.n_pos <= r.num_samples, source, "rl.n_pos",
             f"= {r.n_pos} exceeds rl.num_samples (K) = {r.num_samples}")
    _require(r.n_neg <= r.num_samples, source, "rl.n_neg",
             f"= {r.n_neg} exceeds rl.num_samples (K) = {r.num_samples}")
    _require(r.n_pos + r.n_neg <= r.num_samples, source, "rl.n_neg",
             f"n_pos + n_neg = {r.n_pos + r.n_neg} exceeds rl.num_samples (K) = {r.num_samples}")
    _require(r.m_max >= 1, source, "rl.m_max", "must be >= 1")
    _require(0 <= r.eps_low < 1, source, "rl.eps_low", "must be in [0, 1)")
    _require(r.eps_high >= 0, source, "rl.eps_high", "must be >= 0")
    _require(r.dual_clip_c is None or r.dual_clip_c > 1, source, "rl.dual_clip_c", "must be > 1")
    _require(0 < r.w_min <= r.w_max, source, "rl.w_min", "must satisfy 0 < w_min <= w_max")
    _require(r.kl_coef >= 0, source, "rl.kl_coef", "must be >= 0")
    _require(r.kl_every >= 1, source, "rl.kl_every", "must be >= 1")
    _require(0 <= r.opsd_beta <= 1, source, "rl.opsd_beta", "must be in [0, 1]")
    _require(r.std_ddof in (0, 1), source, "rl.std_ddof", "must be 0 or 1")
    o = cfg.optim
    _require(o.learning_rate > 0, source, "optim.learning_rate", "must be positive")
    _require(o.warmup_steps >= 0, source, "optim.warmup_steps", "must be >= 0")
    _require(o.grad_clip > 0, source, "optim.grad_clip", "must be positive")
    d = cfg.data
    if d.kind in ("file", "hf"):
        _require(d.path is not None, source, "data.path", f"is required when data.kind = {d.kind}")
    _require(1 <= d.min_steps <= d.max_steps, source, "data.min_steps",
             "must satisfy 1 <= min_steps <= max_steps")
    _require(d.operand_min <= d.operand_max, source, "data.operand_min", "must be <= operand_max")
    _require(d.operators != "" and set(d.operators) <= set("+-*"), source, "data.operators",
             f"must be a non-empty subset of '+-*', got {d.operators!r}")
    _require(d.eval_seed is None or d.eval_seed >= 0, source, "data.eval_seed",
             f"must be >= 0 or null, got {d.eval_seed}")
    t = cfg.train
    _require(t.steps >= 0, source, "train.steps", "must be >= 0")
    _require(t.batch_size >= 1, source, "train.batch_size", "must be >= 1")
    _require(t.micro_batch_size >= 0, source, "train.micro_batch_size", "must be >= 0")
    _require(t.ppo_epochs >= 1, source, "train.ppo_epochs", "must be >= 1")
    _require(t.mini_batches >= 1, source, "train.mini_batches", "must be >= 1")
    _require(not t.packing or t.mini_batches == 1, source, "train.packing",
             "needs train.mini_batches = 1 (a packed batch is not split into mini-batches)")
    _require(t.checkpoint_every >= 1, source, "train.checkpoint_every", "must be >= 1")
    _require(t.keep_checkpoints >= 1, source, "train.keep_checkpoints", "must be >= 1")
    e = cfg.eval
    _require(e.k_max >= 1, source, "eval.k_max", "must be >= 1")
    _require(e.num_samples >= e.k_max, source, "eval.num_samples",
             f"= {e.num_samples} must be >= eval.k_max = {e.k_max} for the unbiased Pass@k")
    _require(e.runs >= 1, source, "eval.runs", "must be >= 1")
    c = cfg.cold_start
    _require(0 <= c.construction_fraction <= 1, source, "cold_start.construction_fraction",
             "must be in [0, 1]")
    _require(c.num_problems >= 0, source, "cold_start.num_problems", "must be >= 0")
    _require(0 <= c.reference_slip_fraction <= 1, source, "cold_start.reference_slip_fraction",
             "must be in [0, 1]")
    _require(c.analysis == "step" or (cfg.data.kind == "arithmetic" and c.data_path is None),
             source, "cold_start.analysis", f"{c.analysis!r} writes the arithmetic task's "
             "construction examples: it needs data.kind: arithmetic and no cold_start.data_path")
    for key in ("decision_weight", "error_line_weight"):
        w = getattr(c, key)
        _require(w > 0, source, f"cold_start.{key}", f"must be > 0, got {w}")
        _require(w == 1.0 or (cfg.data.kind == "arithmetic" and c.data_path is None), source,
                 f"cold_start.{key}", "weights the arithmetic task's construction examples: it "
                 "needs data.kind: arithmetic and no cold_start.data_path")
    if c.slip_kinds:
        from tapo_jax.data.arithmetic import ALL_SLIP_KINDS
        kinds = slip_kind_list(c.slip_kinds)
        bad = sorted(set(kinds) - set(ALL_SLIP_KINDS))
        _require(not bad and kinds, source, "cold_start.slip_kinds",
                 f"unknown kinds {bad} in {c.slip_kinds!r}; known: {', '.join(ALL_SLIP_KINDS)}")
        _require(cfg.data.kind == "arithmetic" and c.data_path is None, source,
                 "cold_start.slip_kinds", "writes the arithmetic task's construction examples: "
                 "it needs data.kind: arithmetic and no cold_start.data_path")
    _require(c.target_pass1 is None or 0 < c.target_pass1 <= 1, source, "cold_start.target_pass1",
             f"must be in (0, 1] or null, got {c.target_pass1}")
    for key in ("check_every", "check_problems", "check_samples", "length_quantum"):
        _require(getattr(c, key) >= 1, source, f"cold_start.{key}",
                 f"must be >= 1, got {getattr(c, key)}")
    _require(c.check_from >= 0, source, "cold_start.check_from",
             f"must be >= 0, got {c.check_from}")
    s = cfg.sampling
    _require(s.construction_draft_tokens >= 0, source, "sampling.construction_draft_tokens",
             "must be >= 0")
    for key in ("construction_temperature", "construction_top_p"):
        v = getattr(s, key)
        _require(v is None or v >= 0, source, f"sampling.{key}", f"must be >= 0, got {v}")
    _require(s.construction_top_p is None or 0 < s.construction_top_p <= 1, source,
             "sampling.construction_top_p", "must be in (0, 1]")
