import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from stages.errors import UserError
from stages.params import load_params, parse_params
from tools.smoke import set_key

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def test_shipped_params_are_the_reference_recipe():
    params = load_params(ROOT / "params.yaml")
    assert params.seed == 3407
    assert params.data.source == "ChuGyouk/PubMedQA-test-Ko"
    assert (params.data.val_size, params.data.test_size, params.data.split_seed) == (0.1, 0.1, 42)
    assert params.model.name == "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"
    assert params.model.base_16bit == "unsloth/Meta-Llama-3.1-8B-Instruct"
    assert (params.model.max_seq_length, params.model.load_in_4bit) == (2048, True)
    assert (params.lora.r, params.lora.alpha, params.lora.dropout, params.lora.bias) == (16, 16, 0.0, "none")
    assert len(params.lora.target_modules) == 7
    train = params.train
    # effective batch 12 as in the reference 3 x 4, taken as 12 x 1 (measured faster: benchmarks/README.md)
    assert (train.per_device_train_batch_size, train.gradient_accumulation_steps) == (12, 1)
    assert (train.learning_rate, train.warmup_steps, train.max_steps) == (2e-4, 5, 60)
    assert (train.optim, train.lr_scheduler_type, train.eval_steps) == ("adamw_8bit", "linear", 10)
    assert (train.num_processes, train.accelerate_config) == (1, None)  # one GPU of this machine
    assert params.eval.rouge_tokenizer == "morpheme" and params.eval.max_new_tokens == 256


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("lora.r", 0, "lora.r = 0"),
        ("lora.dropout", 1.0, "lora.dropout = 1.0: Input should be less than 1"),
        ("lora.dropout", -0.1, "lora.dropout = -0.1: Input should be greater than or equal to 0"),
        ("train.learning_rate", -1.0, "train.learning_rate = -1.0"),
        ("train.learning_rate", "fast", "train.learning_rate = 'fast'"),
        ("model.max_seq_length", 32, "model.max_seq_length = 32"),
        ("model.backend", "vllm", "model.backend = 'vllm'"),
        ("lora.target_modules", ["q_proj", "q proj"], "'q proj' is not a module name (such as q_proj)"),
        ("lora.target_modules", "all", "give a list of module names (such as [q_proj, v_proj]), or all-linear"),
        ("data.val_size", 0.95, "val_size + test_size = 1.05"),
        ("data.test_size", 2.5, "a row count must be a whole number"),
        ("eval.rouge_tokenizer", "default", "eval.rouge_tokenizer = 'default'"),
        ("train.accelerate_config", "", "train.accelerate_config = ''"),
    ],
)
def test_bad_values_name_the_key_and_value(raw, key, value, expected):
    with pytest.raises(UserError) as error:
        set_key(raw, key, value)
        parse_params(raw)
    assert expected in str(error.value)


# Every bounded key at its edge: the last value accepted, then the first refused. mutmut does not
# mutate these class-level bounds, so this table is what catches one dropped or moved.
EDGES = [
    ("data.source", "x", ""), ("data.min_chars", 0, -1), ("data.val_size", 0.01, 0), ("data.test_size", 0.01, 0),
    ("model.name", "x", ""), ("model.base_16bit", "x", ""),
    ("model.max_seq_length", 64, 63), ("model.max_seq_length", 131072, 131073),
    ("lora.r", 1, 0), ("lora.alpha", 0.5, 0), ("lora.dropout", 0.0, -0.01), ("lora.dropout", 0.99, 1.0),
    ("train.per_device_train_batch_size", 1, 0), ("train.gradient_accumulation_steps", 1, 0),
    ("train.learning_rate", 1e-8, 0), ("train.learning_rate", 0.99, 1.0), ("train.warmup_steps", 0, -1),
    ("train.num_train_epochs", 0.5, 0), ("train.weight_decay", 0.0, -0.01), ("train.eval_steps", 1, 0),
    ("train.save_steps", 1, 0), ("train.logging_steps", 1, 0), ("train.per_device_eval_batch_size", 1, 0),
    ("train.num_processes", 1, 0), ("train.num_processes", 4096, 4097),
    ("eval.batch_size", 1, 0), ("eval.max_new_tokens", 1, 0), ("eval.temperature", 0.01, 0),
    ("eval.top_p", 0.01, 0), ("eval.top_p", 1.0, 1.01), ("eval.report_examples", 0, -1),
]


@pytest.mark.parametrize("key, accepted, refused", EDGES)
def test_each_bound_accepts_its_edge_and_refuses_what_is_past_it(raw, key, accepted, refused):
    set_key(raw, key, accepted)
    section, name = key.split(".")
    assert getattr(getattr(parse_params(raw), section), name) == accepted
    set_key(raw, key, refused)
    with pytest.raises(UserError, match=f"^params.yaml: {re.escape(key)} = {re.escape(repr(refused))}: "):
        parse_params(raw)


def test_fractions_must_leave_training_rows(raw):
    set_key(raw, "data.val_size", 0.5)
    set_key(raw, "data.test_size", 0.49)
    assert parse_params(raw).data.test_size == 0.49
    set_key(raw, "data.test_size", 0.5)
    with pytest.raises(UserError, match="val_size \\+ test_size = 1 leaves no training rows"):
        parse_params(raw)
    set_key(raw, "data.test_size", 3)  # a count: no sum with a fraction
    assert parse_params(raw).data.test_size == 3


def test_every_problem_is_reported_in_one_line(raw):
    raw["lora"]["r"] = 0
    raw["eval"]["top_p"] = 2
    raw["data"]["val_size"] = "abc"
    with pytest.raises(UserError) as error:
        parse_params(raw)
    message = str(error.value)
    assert message.startswith("params.yaml: data.val_size")  # in the order of params.yaml's sections
    assert message.endswith("; lora.r = 0: Input should be greater than 0; "
                            "eval.top_p = 2: Input should be less than or equal to 1")
    assert "= 'abc': Input should be a valid integer" in message and "\n" not in message


def test_a_check_on_a_whole_section_names_the_section(raw):
    raw["data"]["val_size"] = 0.95
    with pytest.raises(UserError) as error:
        parse_params(raw, "exp.yaml")
    assert str(error.value) == "exp.yaml: data: val_size + test_size = 1.05 leaves no training rows; make the sum below 1"


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"^params.yaml: expected a mapping of sections, got list$"):
        parse_params([1])
    (tmp_path / "params.yaml").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match=r"params.yaml: expected a mapping of sections, got NoneType$"):
        load_params(tmp_path / "params.yaml")


def test_load_params_names_the_file_in_every_error(tmp_path, raw):
    path = tmp_path / "params.yaml"
    with pytest.raises(UserError) as error:
        load_params(path)
    assert str(error.value) == f"{path}: not found; run from the project root, where params.yaml is"
    path.write_text("lora: [r: 8\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}: not valid YAML \("):
        load_params(path)
    raw["lora"]["r"] = 0
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}: lora.r = 0: "):
        load_params(path)
    raw["lora"]["r"] = 8
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    assert load_params(path).lora.r == 8


def test_unknown_keys_are_rejected(raw):
    raw["lora"]["rank"] = 8
    with pytest.raises(UserError, match=r"lora\.rank: unknown key"):
        parse_params(raw)


def test_every_code_default_is_the_shipped_recipe(raw):
    """A section or key left out of params.yaml means the shipped value, never another code default."""
    from stages.params import Params

    assert Params() == load_params(ROOT / "params.yaml")
    for section in list(raw):
        partial = {key: value for key, value in raw.items() if key != section}
        assert parse_params(partial) == load_params(ROOT / "params.yaml"), section


def test_optimizer_and_scheduler_choices_are_transformers_own():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from stages.params import OPTIMIZERS, SCHEDULERS

    assert set(SCHEDULERS) == {s.value for s in SchedulerType}
    assert set(OPTIMIZERS) == {o.value for o in OptimizerNames}


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("train.optim", "adamw8bit", "train.optim = 'adamw8bit': unknown optimizer; did you mean 'adamw_8bit'?"),
        ("train.lr_scheduler_type", "cosin", "train.lr_scheduler_type = 'cosin': unknown scheduler; did you mean 'cosine'?"),
        ("train.lr_scheduler_type", 7, "train.lr_scheduler_type = 7: unknown scheduler; choose one of linear, cosine, "
         "cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt, reduce_lr_on_plateau, "
         "cosine_with_min_lr, cosine_warmup_with_min_lr, warmup_stable_decay, greedy"),
        # YAML reads the key `yes` as true; the message names it as written, with the bad value under it
        ("eval.decision_options", {True: 1, False: "아니요"}, "eval.decision_options.yes = 1: Input should be a valid string"),
        ("data.val_size", True, "data.val_size = True: expected a number, not true/false"),
        ("lora.r", True, "lora.r = True: expected a number, not true/false"),
        ("train.learning_rate", False, "train.learning_rate = False: expected a number, not true/false"),
    ],
)
def test_misspelled_choices_and_booleans_fail_with_the_other_params(raw, key, value, expected):
    set_key(raw, key, value)
    with pytest.raises(UserError) as error:
        parse_params(raw)
    assert str(error.value) == f"params.yaml: {expected}"


def test_yaml_exponent_without_dot_still_parses_as_a_number(raw):
    # PyYAML reads `2e-4` as a string; the params loader must still accept it as a float.
    raw["train"]["learning_rate"] = "2e-4"
    assert parse_params(raw).train.learning_rate == pytest.approx(2e-4)


def test_params_are_frozen(raw):
    params = parse_params(raw)
    with pytest.raises(ValidationError, match="frozen"):
        params.lora.r = 8
    assert params.lora.r == 16


def test_a_stage_reports_bad_params_in_one_line_and_exits_non_zero(tmp_path, raw):
    raw["lora"]["r"] = -4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "stages.prepare"], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error_lines == ["error: params.yaml: lora.r = -4: Input should be greater than 0"]


def test_params_yaml_is_in_the_form_dvc_writes_it_back(tmp_path):
    """`dvc exp run -S key=value` rewrites params.yaml through ruamel.yaml and replaces every list:
    in any other form, an experiment's diff also reformats untouched lines (null, flow lists)."""
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` calls
    from dvc.utils.serialize._yaml import dumps_yaml, parse_yaml_for_update

    text = (ROOT / "params.yaml").read_text(encoding="utf-8")
    assert dumps_yaml(parse_yaml_for_update(text, "params.yaml")) == text

    for overrides, expected in [
        (["lora.r=8"], [("  r: 16                    # adapter rank", "  r: 8                     # adapter rank")]),
        (["train.learning_rate=1e-4"], [("  learning_rate: 2.0e-4              # peak learning rate",
                                         "  learning_rate: 0.0001              # peak learning rate")]),
    ]:
        (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
        apply_overrides(tmp_path / "params.yaml", overrides)
        after = (tmp_path / "params.yaml").read_text(encoding="utf-8").splitlines()
        assert len(after) == len(text.splitlines())
        assert [(old, new) for old, new in zip(text.splitlines(), after) if old != new] == expected


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    # PyYAML keeps the last value silently: lora.r 8 would train while 16 stands in plain sight.
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\nlora:\n  r: 16\n  alpha: 16\n  r: 8\n", encoding="utf-8")
    with pytest.raises(UserError) as error:
        load_params(path)
    assert str(error.value) == f"{path}: lora.r is set twice (lines 3 and 5); keep one"
    path.write_text("seed: 1\nlora:\n  r: 16\nseed: 2\n", encoding="utf-8")
    with pytest.raises(UserError, match=r": seed is set twice \(lines 1 and 4\)"):
        load_params(path)
    # the same key in two sections, or in two items of a list, is no duplicate
    path.write_text("data:\n  seed: 1\nlora:\n  target_modules:\n  - q_proj\n  - k_proj\n", encoding="utf-8")
    with pytest.raises(UserError, match="data.seed: unknown key"):  # parsed, then refused for what it is
        load_params(path)


@pytest.mark.parametrize("key, value", [
    ("train.learning_rate", float("nan")), ("train.learning_rate", "nan"), ("lora.alpha", float("inf")),
    ("lora.r", float("-inf")), ("data.val_size", float("nan")), ("eval.temperature", "Infinity"),
])
def test_a_number_that_is_not_finite_says_so(raw, key, value):
    set_key(raw, key, value)
    with pytest.raises(UserError) as error:
        parse_params(raw)
    assert str(error.value) == f"params.yaml: {key} = {value!r}: not a finite number"


def test_yaml_nan_read_from_the_file_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text(encoding="utf-8").replace("learning_rate: 2.0e-4", "learning_rate: .nan")
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=r"train.learning_rate = nan: not a finite number$"):
        load_params(path)
