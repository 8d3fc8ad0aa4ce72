"""params.yaml, loaded once and validated before any heavy work.

Every section is a frozen pydantic model that rejects unknown keys, so a typo such as
`lora.rank` fails at once instead of being silently ignored. `load_params()` turns any problem
into a `UserError` naming the key and the bad value. Every default equals the shipped
params.yaml (a test checks it), so a section left out means the reference recipe, not some
other code-only setting.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from stages.errors import UserError
from stages.paths import PARAMS_FILE

# The seven linear projections of a Llama decoder layer (Qwen, Gemma, Mistral and EXAONE name
# theirs the same): the shipped targets. Any other name is checked against the model's own layers
# by validate (stages/chat_model.py), as is `all-linear`.
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# transformers' SchedulerType and OptimizerNames (5.17), checked here so that a misspelling fails
# with the other params instead of after the model has loaded; a test keeps them equal.
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy",
)
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor", "adamw_anyprecision",
    "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad", "adamw_bnb_8bit", "adamw_8bit",
    "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit",
    "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw",
    "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise",
    "stable_adamw",
)
DEFAULT_SYSTEM_PROMPT = (
    "당신은 의학 연구 초록을 근거로 임상 질문에 답하는 의료 전문가입니다. "
    "주어진 초록의 결과에 근거하여 한국어로 정확하고 간결하게 결론을 서술하세요."
)


def _a_number(value):
    # YAML's true/false would otherwise pass as 1/0 (`val_size: true` = one row).
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    # YAML's .nan / .inf (or "nan" as text) would otherwise fail a bound with a misleading reason
    # ("should be less than 1"), or pass one (inf > 0): checked before the bounds.
    if isinstance(value, (int, float, str)):
        try:
            finite = math.isfinite(float(value))
        except (ValueError, OverflowError):  # not a number at all (pydantic says so), or a huge int
            finite = True
        if not finite:
            raise ValueError("not a finite number")
    return value


Int = Annotated[int, BeforeValidator(_a_number)]
Float = Annotated[float, BeforeValidator(_a_number)]
# The longest context of any model this recipe targets (Llama 3.1: 128k positions). A ceiling for
# values that count tokens, so that a slip such as 1000000000 never reaches an allocation; the
# model's own limit (its config's max_position_embeddings) is checked by stages/preflight.py.
MAX_TOKENS = 131072


def _one_of(choices: tuple[str, ...], what: str):
    def check(value: str) -> str:
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(choices)}"
            raise ValueError(f"unknown {what}; {hint}")
        return value

    return check


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    source: str = Field("ChuGyouk/PubMedQA-test-Ko", min_length=1)
    split: str = "test"
    revision: Optional[str] = None
    include_contexts: bool = True
    min_chars: Int = Field(5, ge=0)
    # A value below 1 is a fraction of the cleaned rows, 1 or more a row count.
    val_size: Union[Int, Float] = Field(0.1, gt=0)
    test_size: Union[Int, Float] = Field(0.1, gt=0)
    split_seed: Int = 42

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self):
        if self.val_size < 1 and self.test_size < 1 and self.val_size + self.test_size >= 1:
            raise ValueError(
                f"val_size + test_size = {self.val_size + self.test_size:g} leaves no training "
                "rows; make the sum below 1"
            )
        for name in ("val_size", "test_size"):
            value = getattr(self, name)
            if value >= 1 and value != int(value):
                raise ValueError(f"{name} = {value}: a row count must be a whole number")
        return self


class ModelParams(_Section):
    name: str = Field("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit", min_length=1)
    base_16bit: str = Field("unsloth/Meta-Llama-3.1-8B-Instruct", min_length=1)
    max_seq_length: Int = Field(2048, ge=64, le=MAX_TOKENS)
    load_in_4bit: bool = True
    backend: Literal["auto", "unsloth", "transformers"] = "auto"


class PromptParams(_Section):
    system: str = DEFAULT_SYSTEM_PROMPT


class LoraParams(_Section):
    r: Int = Field(16, gt=0)
    alpha: Float = Field(16, gt=0)
    dropout: Float = Field(0.0, ge=0, lt=1)
    target_modules: Literal["all-linear"] | tuple[str, ...] = LLAMA_LINEAR_MODULES
    bias: Literal["none", "all", "lora_only"] = "none"

    @field_validator("target_modules", mode="before")
    @classmethod
    def _module_names(cls, modules):
        if modules == "all-linear":
            return modules
        if not isinstance(modules, (list, tuple)):
            raise ValueError("give a list of module names (such as [q_proj, v_proj]), or all-linear")
        if not modules:
            raise ValueError("name at least one module, or all-linear")
        bad = [m for m in modules if not _MODULE_NAME.match(m)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a module name (such as q_proj); or set all-linear")
        return modules


class TrainParams(_Section):
    per_device_train_batch_size: Int = Field(12, gt=0)
    gradient_accumulation_steps: Int = Field(1, gt=0)
    learning_rate: Float = Field(2e-4, gt=0, lt=1)
    warmup_steps: Int = Field(5, ge=0)
    max_steps: Int = 60
    num_train_epochs: Float = Field(2, gt=0)
    lr_scheduler_type: Annotated[str, BeforeValidator(_one_of(SCHEDULERS, "scheduler"))] = "linear"
    optim: Annotated[str, BeforeValidator(_one_of(OPTIMIZERS, "optimizer"))] = "adamw_8bit"
    weight_decay: Float = Field(0.01, ge=0)
    eval_steps: Int = Field(10, gt=0)
    save_steps: Int = Field(10, gt=0)
    logging_steps: Int = Field(1, gt=0)
    per_device_eval_batch_size: Int = Field(8, gt=0)
    completion_only_loss: bool = True
    gradient_checkpointing: bool = True
    num_processes: Int = Field(1, ge=1, le=4096)
    accelerate_config: Optional[str] = Field(None, min_length=1)


class MergeParams(_Section):
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class EvalParams(_Section):
    # "auto": as many answers at once as free GPU memory holds (stages/evaluation.py); a number: that many.
    batch_size: Union[Literal["auto"], Annotated[Int, Field(gt=0)]] = "auto"
    max_new_tokens: Int = Field(256, gt=0, le=MAX_TOKENS)
    do_sample: bool = False
    decoder: Literal["fast", "generate"] = "fast"
    temperature: Float = Field(0.7, gt=0)
    top_p: Float = Field(0.9, gt=0, le=1)
    rouge_tokenizer: Literal["morpheme", "whitespace", "char"] = "morpheme"
    report_examples: Int = Field(3, ge=0)
    # Dataset label (final_decision) -> the one-word reply the model is scored on.
    decision_options: dict[str, str] = {"yes": "예", "no": "아니요", "maybe": "불확실"}
    # Appended to the training chat's user turn; {options} becomes the option words.
    decision_instruction: str = "위 초록의 결과에 근거하여 질문에 {options} 중 한 단어로만 답하세요."
    bootstrap_samples: Int = Field(1000, ge=100, le=100_000)

    @field_validator("decision_options", mode="before")
    @classmethod
    def _yaml_booleans_are_words(cls, options):
        # YAML 1.1 (PyYAML) reads an unquoted yes / no as a boolean: take it as the word it was.
        if not isinstance(options, dict):
            return options
        word = lambda value: {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else value  # noqa: E731
        return {word(label): word(option) for label, option in options.items()}

    @field_validator("decision_options")
    @classmethod
    def _distinct_options(cls, options: dict[str, str]) -> dict[str, str]:
        options = {label.strip().lower(): option.strip() for label, option in options.items()}
        if len(options) < 2:
            raise ValueError("give at least two labels, e.g. {yes: 예, no: 아니요, maybe: 불확실}")
        if not all(options) or not all(options.values()):
            raise ValueError("labels and option words must not be empty")
        if len(set(options.values())) < len(options):
            raise ValueError("two labels share one option word; the decision would be ambiguous")
        return options

    @field_validator("decision_instruction")
    @classmethod
    def _names_the_options(cls, instruction: str) -> str:
        try:
            filled = instruction.format(options="")
        except (KeyError, IndexError, ValueError):
            filled = None
        if "{options}" not in instruction or filled is None:
            raise ValueError("must contain {options} (the option words) and no other {...} field")
        return instruction


class Params(_Section):
    seed: Int = 3407
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    prompt: PromptParams = PromptParams()
    lora: LoraParams = LoraParams()
    train: TrainParams = TrainParams()
    merge: MergeParams = MergeParams()
    eval: EvalParams = EvalParams()


def _describe(error: dict, raw: dict) -> str:
    """One readable line for one pydantic error: the dotted key, the value, the reason."""
    # A union's branches add their own names to loc ("function-before[...]", "int"): keep the keys.
    loc = [part for part in error["loc"] if isinstance(part, int) or part.isidentifier() and part not in ("int", "float")]
    key = ".".join(str(part) for part in loc)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (check the spelling against docs/parameters.md)"
    if error["type"] == "missing":
        return f"{key}: missing"
    value = raw
    for part in loc:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            value = error.get("input")
            break
    if isinstance(value, dict):  # a section-level check: the message names the keys
        return f"{key}: {message}" if key else message
    return f"{key} = {value!r}: {message}"


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(dict.fromkeys(_describe(err, raw) for err in exc.errors()))
        raise UserError(f"{source}: {problems}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: PyYAML would keep the last one
    silently, so `r: 16` and, further down, `r: 8` would train at 8 with 16 in plain sight."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _refuse_duplicate_keys(node, "")
        return node


def _refuse_duplicate_keys(node, where: str) -> None:
    if isinstance(node, yaml.MappingNode):
        lines = {}
        for key_node, value_node in node.value:
            key = f"{where}.{key_node.value}" if where else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise UserError(f"{key} is set twice (lines {lines[key]} and {line}); keep one")
            lines[key] = line
            _refuse_duplicate_keys(value_node, key)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{where}[{index}]")


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run from the project root, where params.yaml is") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from None
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    return parse_params(raw, str(path))
