"""Any chat model: each family beside Llama, end to end through `dvc repro`, and what the pipeline
reads from each template (stages/chat_model.py).

The tiny models (tools/tiny_model.py) carry templates shaped like each family's own; the
expectations here come from that description of the family (its end of turn, its pad), never
from stages/chat_model.py, so a wrong reading of a template fails.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from stages.prompt import IGNORE_INDEX, build_messages, render_prompt_completion, tokenize_example
from tools.tiny_model import FAMILIES, GEMMA2_TEMPLATE

OTHER_FAMILIES = ["qwen3", "gemma3", "mistral", "exaone4"]
SYSTEM = "당신은 의학 질문에 답하는 도우미입니다."
# Small, fast settings on top of the smoke run's: the meaning of every stage stays the same.
FAMILY_PARAMS = {"train.max_steps": 4, "train.eval_steps": 4, "train.save_steps": 4, "eval.max_new_tokens": 12}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_tokenizer(request, tmp_path_factory):
    from tools.tiny_model import build_tokenizer, corpus_from
    from tests.conftest import SAMPLE

    from stages.modeling import prepare_tokenizer

    return request.param, prepare_tokenizer(build_tokenizer(corpus_from(SAMPLE), family=request.param))


def test_the_end_of_turn_pad_and_stops_come_from_the_template(family_tokenizer):
    from transformers import GenerationConfig

    from stages.chat_model import chat_format, stop_token_ids

    family, tokenizer = family_tokenizer
    spec = FAMILIES[family]
    found = chat_format(tokenizer)
    assert found.end_of_turn == spec.end_of_turn
    assert found.end_of_turn_ids == (tokenizer.convert_tokens_to_ids(spec.end_of_turn),)
    assert found.bos_prefix == ""  # every family's template writes its own bos, or has none
    # The pad: the family's own where it has one, else the unknown token; never an end of turn or eos.
    assert tokenizer.pad_token == (spec.pad or spec.unk)
    assert tokenizer.pad_token_id not in (*found.end_of_turn_ids, tokenizer.eos_token_id)
    config = GenerationConfig(eos_token_id=tokenizer.convert_tokens_to_ids(list(spec.stop_tokens)))
    expected = {tokenizer.convert_tokens_to_ids(t) for t in (*spec.stop_tokens, spec.end_of_turn, spec.eos)}
    assert stop_token_ids(config, tokenizer) == sorted(expected)


def test_the_loss_falls_on_the_answer_and_the_end_of_turn_only(family_tokenizer):
    family, tokenizer = family_tokenizer
    messages = build_messages(SYSTEM, "질문입니다?", ["초록 문단."], True, "답변입니다.")
    prompt, completion = render_prompt_completion(tokenizer, messages)
    assert completion.endswith(FAMILIES[family].end_of_turn) and "답변입니다." in completion
    assert SYSTEM in prompt and "질문입니다?" in prompt  # the system prompt reaches the model in every family
    example = tokenize_example(tokenizer, prompt, completion)
    scored = [token for token, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(scored).strip() == "답변입니다." + FAMILIES[family].end_of_turn
    assert example["labels"][: len(example["input_ids"]) - len(scored)] == [IGNORE_INDEX] * (
        len(example["input_ids"]) - len(scored))
    assert tokenizer.pad_token_id not in example["input_ids"]


def test_a_template_without_a_system_role_gets_the_system_prompt_in_the_first_user_turn(tiny_tokenizer, caplog):
    from stages.chat_model import chat_format
    from stages.prompt import render_prompt

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = GEMMA2_TEMPLATE.replace("<start_of_turn>", "<|start_header_id|>").replace(
        "<end_of_turn>", "<|eot_id|>")
    assert chat_format(tokenizer).system_role is False
    with caplog.at_level("INFO", logger="stages.chat_model"):
        prompt = render_prompt(tokenizer, build_messages(SYSTEM, "질문?", [], True))
        render_prompt(tokenizer, build_messages(SYSTEM, "둘째 질문?", [], True))
    assert prompt == f"<|begin_of_text|><|start_header_id|>user\n{SYSTEM}\n\n질문?<|eot_id|>\n<|start_header_id|>model\n"
    assert sum("has no system role" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_a_template_without_the_bos_gets_it_where_the_tokenizer_adds_one(tiny_tokenizer):
    from stages.chat_model import chat_format
    from stages.prompt import encode, render_prompt

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = tokenizer.chat_template.replace("{{- bos_token }}", "")
    assert chat_format(tokenizer).bos_prefix == "<|begin_of_text|>"
    ids = encode(tokenizer, render_prompt(tokenizer, build_messages("", "질문?", [], True)))
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_a_tokenizer_without_any_spare_token_gets_a_new_pad_and_the_model_a_zero_row(tiny_model):
    import torch
    from transformers import AutoTokenizer

    from stages.chat_model import chat_format
    from stages.modeling import load_for_inference, prepare_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.pad_token = None
    # A template that uses Llama's spare <|end_of_text|> and <|finetune_right_pad_id|>: none is left over.
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{{- bos_token }}", "{{- bos_token + '<|end_of_text|><|finetune_right_pad_id|>' }}")
    tokenizer = prepare_tokenizer(tokenizer)
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == len(tokenizer) - 1
    assert tokenizer.pad_token_id not in chat_format(tokenizer).end_of_turn_ids
    model = load_for_inference(str(tiny_model), "model.name", dtype=torch.float32, tokenizer=tokenizer)
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == len(tokenizer) and not embeddings[-1].any()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_targets_are_the_models_own_linear_layers(family):
    import torch
    import transformers

    from stages.chat_model import resolve_target_modules
    from stages.errors import UserError
    from stages.params import LLAMA_LINEAR_MODULES
    from tools.tiny_model import build_model, build_tokenizer

    tokenizer = build_tokenizer(["가나다 라마바"] * 4, vocab_size=300, family=family)
    with torch.device("meta"):
        model = build_model(tokenizer, family=family)
    assert isinstance(model, getattr(transformers, FAMILIES[family].model_class))
    assert resolve_target_modules(model, "all-linear") == sorted(LLAMA_LINEAR_MODULES)  # no lm_head, no embedding
    assert resolve_target_modules(model, ["v_proj", "q_proj"]) == ["v_proj", "q_proj"]
    with pytest.raises(UserError) as error:
        resolve_target_modules(model, ["q_proj", "qkv_proj"])
    assert str(error.value) == (
        f"lora.target_modules: {type(model).__name__} has no linear layer 'qkv_proj'; its own are "
        "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or set all-linear)")


def test_validate_names_the_models_own_layers_for_an_unknown_target(workspace):
    from tools.smoke import dvc_environment, write_params

    write_params(workspace / "params.yaml", {"lora.target_modules": ["q_proj", "query_key_value"]})
    result = subprocess.run([sys.executable, "-m", "stages.validate"], cwd=workspace, capture_output=True,
                            text=True, env=dvc_environment())
    assert result.returncode == 2  # a user's mistake: one line, exit 2 (stages/errors.py)
    assert result.stderr.strip().splitlines()[-1].endswith(
        "lora.target_modules: LlamaForCausalLM has no linear layer 'query_key_value'; its own are "
        "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or set all-linear)")


@pytest.fixture(scope="module", params=OTHER_FAMILIES)
def family_run(request, tmp_path_factory):
    """A workspace with a tiny model of the family, after `dvc repro evaluate evaluate_base`
    (validate, prepare, train, merge, evaluate_base, evaluate) with the all-linear LoRA targets."""
    from tools.smoke import dvc_environment, make_workspace

    family = request.param
    workspace = make_workspace(tmp_path_factory.mktemp(family) / "ws",
                               {**FAMILY_PARAMS, "prompt.system": SYSTEM, "lora.target_modules": "all-linear"},
                               family=family)
    result = subprocess.run([sys.executable, "-m", "dvc", "repro", "evaluate", "evaluate_base"], cwd=workspace,
                            capture_output=True, text=True, env=dvc_environment())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return family, workspace, result.stdout + result.stderr


def test_each_family_runs_the_pipeline_end_to_end(family_run):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.decision import option_examples
    from stages.evaluation import stop_token_ids
    from stages.params import load_params

    family, workspace, log = family_run
    spec = FAMILIES[family]
    rows = [json.loads(line) for line in (workspace / "data/prepared/test.jsonl").read_text().splitlines()]
    merged = workspace / "models/merged"
    # The merged model loads with plain transformers, as the family's own class.
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert isinstance(model, getattr(transformers, spec.model_class))
    adapter = json.loads((workspace / "models/adapter/adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                 "v_proj"]
    # The rendered chat: the family's own turns, the system prompt in it, the answer closed by its end of turn.
    for row in rows:
        messages = build_messages(SYSTEM, row["question"], row["contexts"], True, row["answer"])
        expected_full = tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=False)
        assert expected_full.startswith(row["prompt"] + row["completion"])
        assert row["completion"].endswith(spec.end_of_turn) and SYSTEM in row["prompt"]
        assert expected_full[len(row["prompt"] + row["completion"]):].strip() == ""  # at most a newline left out
    # The answers stop at the family's end of turn and never hold it, nor the pad.
    eot = tokenizer.convert_tokens_to_ids(spec.end_of_turn)
    assert eot in stop_token_ids(model, tokenizer)
    predictions = [json.loads(line) for line in (workspace / "metrics/predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(rows)
    for prediction in predictions:
        assert spec.end_of_turn not in prediction["answer"] and tokenizer.pad_token not in prediction["answer"]
    # The decision options scored as whole replies closed by the family's end of turn.
    params = load_params(workspace / "params.yaml")
    options = dict(params.eval.decision_options)
    for example, word in zip(option_examples(tokenizer, rows[0], SYSTEM, True, params.eval.decision_instruction,
                                             options), options.values()):
        scored = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
        assert scored[-1] == eot and tokenizer.decode(scored[:-1]).strip() == word
    # Training taught the answers: the fine-tuned model's answer loss is below the base model's.
    quality = json.loads((workspace / "metrics/eval.json").read_text())
    assert quality["vs_base"]["test"]["loss"]["ci_high"] < 0
    assert set(quality["tuned"]["test"]) >= {"rougeL", "accuracy", "macro_f1", "loss", "cut_off"}


@pytest.mark.parametrize("options, instruction", [
    ({"yes": "예", "no": "아니요", "maybe": "불확실"}, "위 초록의 결과에 근거하여 질문에 {options} 중 한 단어로만 답하세요."),
    ({"yes": "yes", "no": "no", "maybe": "maybe"}, "Answer the question with one word: {options}."),  # the English original
])
def test_the_decision_options_are_whole_replies_in_every_family(family_tokenizer, options, instruction):
    from stages.decision import option_examples

    family, tokenizer = family_tokenizer
    row = {"question": "질문입니다?", "contexts": ["초록 문단."]}
    examples = option_examples(tokenizer, row, SYSTEM, True, instruction, options)
    eot = tokenizer.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    for example, word in zip(examples, options.values()):
        scored = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
        assert scored[-1] == eot and tokenizer.decode(scored[:-1]).strip() == word
        asked = tokenizer.decode(example["input_ids"][: len(example["input_ids"]) - len(scored)])
        assert instruction.format(options=", ".join(options.values())) in asked and SYSTEM in asked
