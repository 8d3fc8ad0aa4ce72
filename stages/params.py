"""params.yaml, loaded once and validated before any heavy work.

Every section is a frozen pydantic model that rejects unknown keys, so a typo such as
`lora.rank` fails at once instead of being silently ignored. `load_params()` turns any problem
into a `UserError` naming the key and the bad value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.errors import UserError
from stages.paths import PARAMS_FILE

# The seven linear projections of a Llama decoder layer: the only names LoRA can target here.
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    source: str = Field(min_length=1)
    split: str = "test"
    revision: Optional[str] = None
    include_contexts: bool = True
    min_chars: int = Field(5, ge=0)
    # A value below 1 is a fraction of the cleaned rows, 1 or more a row count.
    val_size: Union[int, float] = Field(0.1, gt=0)
    test_size: Union[int, float] = Field(0.1, gt=0)
    split_seed: int = 42

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
    name: str = Field(min_length=1)
    base_16bit: str = Field(min_length=1)
    max_seq_length: int = Field(2048, ge=64, le=131072)
    load_in_4bit: bool = True
    backend: Literal["auto", "unsloth", "transformers"] = "auto"


class PromptParams(_Section):
    system: str = ""


class LoraParams(_Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = LLAMA_LINEAR_MODULES
    bias: Literal["none", "all", "lora_only"] = "none"

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, modules: tuple[str, ...]) -> tuple[str, ...]:
        if not modules:
            raise ValueError("name at least one module")
        unknown = [m for m in modules if m not in LLAMA_LINEAR_MODULES]
        if unknown:
            raise ValueError(
                f"unknown module {unknown[0]!r}; choose from {', '.join(LLAMA_LINEAR_MODULES)}"
            )
        return modules


class TrainParams(_Section):
    per_device_train_batch_size: int = Field(3, gt=0)
    gradient_accumulation_steps: int = Field(4, gt=0)
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    warmup_steps: int = Field(5, ge=0)
    max_steps: int = 60
    num_train_epochs: float = Field(2, gt=0)
    lr_scheduler_type: str = "linear"
    optim: str = "adamw_8bit"
    weight_decay: float = Field(0.01, ge=0)
    eval_steps: int = Field(10, gt=0)
    save_steps: int = Field(10, gt=0)
    logging_steps: int = Field(1, gt=0)
    per_device_eval_batch_size: int = Field(8, gt=0)
    completion_only_loss: bool = True
    gradient_checkpointing: bool = True
    num_processes: int = Field(1, ge=1, le=4096)
    accelerate_config: Optional[str] = Field(None, min_length=1)


class MergeParams(_Section):
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class EvalParams(_Section):
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(256, gt=0)
    do_sample: bool = False
    cache: Literal["dynamic", "static"] = "dynamic"
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)
    rouge_tokenizer: Literal["morpheme", "whitespace", "char"] = "morpheme"
    report_examples: int = Field(3, ge=0)


class Params(_Section):
    seed: int = 3407
    data: DataParams
    model: ModelParams
    prompt: PromptParams = PromptParams()
    lora: LoraParams = LoraParams()
    train: TrainParams = TrainParams()
    merge: MergeParams = MergeParams()
    eval: EvalParams = EvalParams()


def _describe(error: dict, raw: dict) -> str:
    """One readable line for one pydantic error: the dotted key, the value, the reason."""
    key = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (check the spelling against the README's params table)"
    if error["type"] == "missing":
        return f"{key}: missing"
    value = raw
    for part in error["loc"]:
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
        problems = "; ".join(_describe(err, raw) for err in exc.errors())
        raise UserError(f"{source}: {problems}") from None


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run from the project root, where params.yaml is") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from None
    return parse_params(raw, str(path))
