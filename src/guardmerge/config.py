"""The merge config: one typed format, read from YAML with command-line overrides.

.. code-block:: yaml

    base_model: PATH_OR_HUB_ID
    experts:
      - {model: PATH_OR_HUB_ID, task: hate}          # task = head name
      - {model: PATH_OR_HUB_ID, task: injection, weight: 1.0}
    method: task_arithmetic
    parameters: {scaling: 0.5}
    heads: multi

Relative paths are resolved against the config file's folder. Overrides use dotted keys:
``parameters.scaling=0.7``, ``method=ties``, ``experts.0.weight=0.5`` (values parsed as YAML).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from guardmerge.errors import ConfigError

TASK_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
DEFAULT_DEPTH = "default"
"""The key of ``share_layers``'s mapping form giving the depth of every task not named."""

Depth = Annotated[int, Field(ge=0)]
"""A sharing depth ``K``: the number of shared blocks (checked against ``L`` with the models)."""


class ExpertConfig(BaseModel):
    """One expert: a fine-tuned classifier and the name of its head."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(description="local folder or Hugging Face hub id of the classifier")
    task: str = Field(pattern=TASK_PATTERN, description="head name in the merged model")
    weight: float = Field(1.0, description="per-expert coefficient w_i")
    stats: str | None = Field(None, description="precomputed statistics file (guardmerge stats)")
    data: str | None = Field(None, description="unlabelled texts of this task (JSONL/CSV/TXT)")
    thresholds: dict[str, float] | None = Field(
        None,
        description="per-label flag thresholds of a sequence head (label -> value in [0, 1]), stored with the "
        "head: what predict and serve use for those labels (default 0.5)",
    )

    benign: list[str] | None = Field(
        None,
        description="labels of this head that never flag a text (stored with the head; serve and the LLM Guard "
        "scanners read them); default: guessed from the label names, and a single-label head whose benign label "
        "cannot be told is refused by serve until it is given",
    )

    @field_validator("thresholds")
    @classmethod
    def _thresholds_in_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for label, number in (value or {}).items():
            if not 0.0 <= number <= 1.0:
                raise ValueError(f"threshold of label '{label}' is {number}, outside [0, 1]")
        return value


class AlignConfig(BaseModel):
    """Closed-form head alignment after merging (docs/algorithms.md 3b)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["lstsq", "moments"] = Field(
        "lstsq",
        description="lstsq: ridge refit of the head (or an affine map for heads with a "
        "hidden layer); moments: per-feature mean/std matching of the head input",
    )
    examples: int = Field(400, ge=2, description="unlabelled texts per task used for the fit")
    ridge: float | None = Field(None, ge=0, description="ridge mu; default 1e-2 * mean(A^2); 0 = exact")
    max_length: int = Field(128, ge=8, description="tokens per text")
    batch_size: int = Field(64, ge=1, description="texts per forward pass")


class HealConfig(BaseModel):
    """Label-free multi-teacher distillation of the merged model from the experts, the one stage
    that trains weights (docs/algorithms.md 3c; issue 23 section 2)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    train: Literal["all", "top", "heads"] = Field(
        "all",
        description="what trains: all (encoder, branches, heads), top (the top `top_blocks` encoder blocks, "
        "the pooler, branches and heads) or heads (heads only: the encoder stays bit-identical)",
    )
    top_blocks: int = Field(2, ge=1, description="encoder blocks trained with train: top (counted from the top)")
    texts: int = Field(600, ge=1, description="unlabelled texts per task pooled (every head learns on every text)")
    epochs: int = Field(2, ge=1, le=1000, description="passes over the training slice of the pool")
    learning_rate: float = Field(3e-5, gt=0, le=1, description="AdamW peak learning rate")
    warmup: float = Field(0.1, ge=0, le=1, description="fraction of the steps with a linear warm-up; then linear decay")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient norm clip (null: none)")
    batch_size: int = Field(32, ge=1, description="texts per step (at most; see max_tokens)")
    max_tokens: int = Field(
        4096, ge=8, description="token budget of a step (texts x padded length): bounds memory on 12-layer bases"
    )
    max_length: int = Field(128, ge=8, description="tokens per text")
    temperature: float = Field(2.0, gt=0, description="distillation temperature T (softmax and token heads)")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="forward passes under bfloat16 autocast (loss and weights stay float32); auto: bfloat16 "
        "where the hardware has it natively (CPU AMX / AVX512-BF16, CUDA), else float32",
    )
    weights: dict[str, float] = Field(
        default_factory=dict, description="per-task loss weight (task -> weight >= 0; default 1 each)"
    )
    seed: int = Field(0, description="seed of the shuffles, the held-out slice and the dropout")
    holdout: float = Field(
        0.1, ge=0, lt=1, description="fraction of the pool held out for early stopping by mean agreement (0: none)"
    )
    eval_every: int | None = Field(None, ge=1, description="steps between held-out checks (default: once an epoch)")
    patience: int = Field(2, ge=1, description="held-out checks without improvement before stopping")
    cache: bool = Field(True, description="cache the experts' outputs on disk (keyed by expert fingerprint)")

    @field_validator("weights")
    @classmethod
    def _weights_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for task, number in value.items():
            if number < 0:
                raise ValueError(f"weight of task '{task}' is {number}; loss weights are >= 0")
        return value  # task names (and all-zero weights) are checked against the job's tasks


class StatsConfig(BaseModel):
    """How statistics are computed for experts that give `data` instead of `stats`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    examples: int = Field(1000, ge=1, description="unlabelled texts per expert")
    max_length: int = Field(128, ge=8, description="tokens per text")
    batch_size: int = Field(32, ge=1, description="texts per forward pass")
    include_padding: bool = Field(False, description="Gram parity with the RegMean reference code")
    fisher_labels: Literal["hard", "soft", "empirical"] = Field("hard", description="Fisher label mode")
    fisher_gradient: Literal["per_example", "batch"] = Field("per_example", description="batch = reference parity")


class MergeConfig(BaseModel):
    """A whole merge job as written: a typed schema (field types, ranges, unknown fields refused,
    unique tasks, weights that do not sum to 0). What needs the method registry or the models is
    checked once, by :meth:`guardmerge.merge.job.MergeJob.of`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base_model: str = Field(description="the shared pretrained checkpoint theta_0")
    experts: list[ExpertConfig] = Field(min_length=1)
    method: str = "task_arithmetic"
    parameters: dict[str, Any] = Field(default_factory=dict)
    heads: Literal["multi", "hm3", "shared"] = Field(
        "multi",
        description="multi: one head per expert; hm3: zero-padded heads merged (HM3); shared: "
        "experts with the same head, merged like any tensor into one stock transformers model",
    )
    allow_pickle: bool = Field(False, description="accept pytorch_model.bin pickle checkpoints")
    seed: int = Field(0, description="seed for stochastic methods (DARE)")
    dtype: Literal["float32", "float64", "float16", "bfloat16"] = Field(
        "float32", description="dtype the task vectors are merged in"
    )
    out_dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="dtype of the written weights (default: each tensor's dtype in the base)"
    )
    statistics: StatsConfig = Field(default_factory=StatsConfig)
    align_heads: AlignConfig | bool | None = Field(
        None, description="head alignment: on by default when every expert gives `data`; false to disable"
    )
    share_layers: Depth | dict[str, Depth] | None = Field(
        None,
        description="sharing depth K: blocks below K are merged and shared, each task runs its "
        "expert's own blocks K.. (and pooler) on the shared trunk's output; or a depth per task "
        "({default: K, TASK: K_t}); unset = every layer shared",
    )
    branch_align: bool = Field(
        False,
        description="fit a per-feature affine map at the branch point (expert's hidden states at "
        "depth K from the trunk's), on each task's `data`; needs share_layers",
    )
    heal: HealConfig | None = Field(
        None,
        description="label-free distillation from the experts after the training-free merge (trains weights; "
        "needs `data` on every expert); unset = off",
    )

    @model_validator(mode="after")
    def _check(self) -> MergeConfig:
        tasks = [e.task for e in self.experts]
        dupes = sorted({t for t in tasks if tasks.count(t) > 1})
        if dupes:
            raise ValueError(f"duplicate task names: {', '.join(dupes)} (each head needs its own)")
        total = sum(e.weight for e in self.experts)
        if abs(total) <= 1e-12 * max(1.0, max(abs(e.weight) for e in self.experts)):
            raise ConfigError(
                f"experts.*.weight: the expert weights {[e.weight for e in self.experts]} sum to 0; "
                "weighted means (average, model_stock, regmean...) divide by the sum"
            )
        return self

    def share_depths(self) -> dict[str, int] | None:
        """``share_layers`` per task (task -> ``K_t``), None when unset.

        Raises:
            ConfigError: the mapping form names an unknown task, or lacks ``default`` while some
                task is not named.
        """
        given = self.share_layers
        tasks = [e.task for e in self.experts]
        if given is None or isinstance(given, int):
            return None if given is None else dict.fromkeys(tasks, given)
        unknown = sorted(set(given) - {*tasks, DEFAULT_DEPTH})
        if unknown:
            raise ConfigError(
                f"share_layers: unknown task(s) {', '.join(unknown)}; the tasks are {', '.join(tasks)} "
                f"(and '{DEFAULT_DEPTH}')"
            )
        unnamed = [t for t in tasks if t not in given]
        if unnamed and DEFAULT_DEPTH not in given:
            raise ConfigError(
                f"share_layers: no depth for task(s) {', '.join(unnamed)}; add '{DEFAULT_DEPTH}: K' or name them"
            )
        return {t: given.get(t, given.get(DEFAULT_DEPTH, 0)) for t in tasks}

    def input_paths(self) -> list[str]:
        """Every path the merge reads (base, experts, their statistics and data): what an output
        must never be, contain or lie inside (:func:`guardmerge.io.check_output`)."""
        paths = [self.base_model]
        for e in self.experts:
            paths += [p for p in (e.model, e.stats, e.data) if p]
        return paths

    def dump(self) -> str:
        """The config as YAML (what ``guardmerge merge`` stores beside the model)."""
        return yaml.safe_dump(self.model_dump(exclude_defaults=False), sort_keys=False)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        nxt = keys[i + 1]
        if isinstance(node, list):
            node = node[int(key)]
            continue
        if key not in node or node[key] is None:
            node[key] = [] if nxt.isdigit() else {}
        node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def split_assignment(item: str, option: str, shape: str = "key=value") -> tuple[str, str]:
    """``"a.b=0.7"`` -> ``("a.b", "0.7")``: the one reader of ``KEY=VALUE`` arguments (``option``
    and ``shape`` name the argument and its form in the error)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{option} '{item[:200]}' must look like {shape}")
    return key.strip(), value


def yaml_value(item: str, raw: str, option: str) -> Any:
    """The YAML value of one ``KEY=VALUE`` argument, or a :class:`ConfigError` naming it."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{option} '{item[:200]}': not a YAML value ({' '.join(str(exc).split())[:200]})") from None
    except RecursionError:
        raise ConfigError(f"{option} '{item[:200]}': not a YAML value (nested too deeply)") from None


def parse_assignments(items: list[str], option: str = "--set") -> dict[str, Any]:
    """``["density=0.5", "scaling=1"]`` -> ``{"density": 0.5, "scaling": 1}`` (values as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, raw = split_assignment(item, option)
        out[key] = yaml_value(item, raw, option)
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        key, raw = split_assignment(item, "override")
        value = yaml_value(item, raw, "override")
        try:
            _set_dotted(data, key, value)
        except (IndexError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            raise ConfigError(f"override '{item[:200]}': {str(exc)[:200]}") from None
    return data


def _resolve_paths(data: dict[str, Any], root: Path) -> None:
    def fix(value: Any) -> Any:
        try:
            if not isinstance(value, str) or Path(value).is_absolute():
                return value
            candidate = root / value
            return str(candidate) if candidate.exists() else value
        except (OSError, ValueError):  # a name the file system cannot hold: validation says why
            return value

    data["base_model"] = fix(data.get("base_model"))
    experts = data.get("experts")
    for expert in experts if isinstance(experts, list) else []:
        if isinstance(expert, dict):
            for key in ("model", "stats", "data"):
                if key in expert:
                    expert[key] = fix(expert[key])


def parse_config(data: dict[str, Any], source: str = "config") -> MergeConfig:
    """Validate a raw dict into a :class:`MergeConfig`, or raise :class:`ConfigError`."""
    try:
        return MergeConfig.model_validate(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> MergeConfig:
    """Read a YAML merge config, apply overrides, resolve relative paths, validate."""
    path = Path(path)
    try:
        found = path.is_file()
    except OSError as exc:  # a name too long for the file system
        raise ConfigError(f"config file '{str(path)[:120]}': {exc.strerror}") from None
    if not found:
        raise ConfigError(f"config file '{path}' not found")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (binary file? bad byte at offset {exc.start})") from None
    except RecursionError:
        raise ConfigError(f"{path} is not valid YAML: nested too deeply") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())[:300]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    apply_overrides(data, list(overrides or []))
    _resolve_paths(data, path.parent)
    return parse_config(data, source=str(path))
