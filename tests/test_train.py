"""The train stage on the tiny model: learning, masking, guards, resume, backend choice."""

import csv
import json
import sys

import pytest
import torch
from transformers import TrainerState

from conftest import offload_helpers, write_params
from stages import callbacks, modeling, paths, prepare, train
from stages.errors import UserError
from stages.params import load_params
from stages.prompt import IGNORE_INDEX, build_messages, encode


def _loss_curve(name="train/loss"):
    with open(paths.TRAIN_CURVES / f"{name}.tsv", encoding="utf-8") as handle:
        return [(int(row["step"]), float(row[name.split("/")[-1]])) for row in csv.DictReader(handle, delimiter="\t")]


def test_training_lowers_the_loss_and_writes_metrics_and_curves(pipeline_run, monkeypatch):
    monkeypatch.chdir(pipeline_run)
    curve = _loss_curve()
    assert [step for step, _ in curve] == list(range(1, 25))
    mean = lambda points: sum(loss for _, loss in points) / len(points)  # noqa: E731
    assert mean(curve[-4:]) < mean(curve[:4]) - 0.05, curve
    eval_curve = _loss_curve("eval/loss")
    assert [step for step, _ in eval_curve] == [8, 16, 24]
    base = json.loads(paths.EVAL_BASE_METRICS.read_text(encoding="utf-8"))
    assert eval_curve[-1][1] < base["base"]["validation"]["loss"] - 0.05  # better than the untrained base
    metrics = json.loads(paths.TRAIN_METRICS.read_text(encoding="utf-8"))["train"]
    info = json.loads(paths.TRAIN_INFO.read_text(encoding="utf-8"))
    cost = json.loads(paths.TRAIN_COST.read_text(encoding="utf-8"))["train"]
    assert info["steps"] == 24 and info["backend"] == "transformers"
    assert info["effective_batch_size"] == 4
    assert metrics["eval_loss_last"] == eval_curve[-1][1]
    assert metrics["eval_loss_best"] == min(loss for _, loss in eval_curve)
    # train loss: the mean over every optimizer step (each logged here), as the curve shows
    assert metrics["loss"] == pytest.approx(mean(curve), abs=1e-9)
    assert info["tokens_seen"] > 24 * 4 * 100 and cost["tokens_per_s"] > 0
    assert set(info["versions"]) >= {"torch", "transformers", "trl", "peft"}
    adapter_config = json.loads((paths.ADAPTER_DIR / "adapter_config.json").read_text())
    # sorted, so identical runs give a byte-identical adapter (PEFT keeps the names in a set)
    assert adapter_config["r"] == 16 and adapter_config["target_modules"] == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    # The adapter carries the training tokenizer: the same vocabulary and the same rendered chat.
    saved, trained_with = modeling.load_tokenizer(str(paths.ADAPTER_DIR)), modeling.load_tokenizer("tiny-base")
    chat = build_messages("시스템", "질문?", ["문단."], True, "답변입니다.")
    assert saved.get_vocab() == trained_with.get_vocab() and saved.pad_token == trained_with.pad_token
    assert saved.apply_chat_template(chat, tokenize=False) == trained_with.apply_chat_template(chat, tokenize=False)


def test_the_last_eval_loss_is_the_final_models_on_the_validation_rows(workspace):
    # 5 steps, validation every 2 and a log line every 2: steps 2 and 4 are eval steps and the final
    # model (step 5) must be measured too (transformers 5.17 does it; else the stage's trainer.evaluate()),
    # and the log windows are 2, 2 and 1 steps (the last step always logs): an unweighted mean is wrong.
    from stages.evaluation import answer_loss, read_split
    from stages.merge import merged_model

    write_params(workspace, {"train.max_steps": 5, "train.eval_steps": 2, "train.save_steps": 2,
                             "train.logging_steps": 2, "train.per_device_eval_batch_size": 16})
    prepare.main()
    train.main()
    metrics = json.loads(paths.TRAIN_METRICS.read_text(encoding="utf-8"))["train"]
    eval_curve, curve = _loss_curve("eval/loss"), _loss_curve()
    assert [step for step, _ in eval_curve] == [2, 4, 5]  # the final model measured too
    assert metrics["eval_loss_last"] == eval_curve[-1][1]
    # ... on the validation rows: the final adapter's answer loss there, computed here (one batch of
    # 5 rows, so the Trainer's batch mean is the mean over answer tokens)
    model, tokenizer = merged_model("tiny-base", torch.float32), modeling.load_tokenizer(str(paths.ADAPTER_DIR))
    on_validation = answer_loss(model, tokenizer, read_split("validation"), batch_size=16)
    assert on_validation["n"] == 5 and metrics["eval_loss_last"] == pytest.approx(on_validation["loss"], rel=1e-5)
    # train loss: each logged window's mean loss weighted by its steps
    assert [step for step, _ in curve] == [2, 4, 5]
    assert metrics["loss"] == pytest.approx((2 * curve[0][1] + 2 * curve[1][1] + curve[2][1]) / 5, abs=1e-9)


def test_the_train_loss_weights_each_logged_window_by_its_steps():
    # transformers logs the mean loss of the steps since the last log line: 3 steps at 1.0, then 1 at 5.0
    history = [{"loss": 1.0, "step": 3}, {"eval_loss": 9.0, "step": 3}, {"loss": 5.0, "step": 4},
               {"train_runtime": 1.0, "step": 4}]
    assert callbacks.mean_train_loss(history) == pytest.approx((3 * 1.0 + 5.0) / 4)  # not (1 + 5) / 2
    with pytest.raises(ValueError, match="no training loss was logged"):
        callbacks.mean_train_loss([{"eval_loss": 1.0, "step": 2}])


def test_unsloth_is_never_imported_on_cpu(pipeline_run):
    assert "unsloth" not in sys.modules
    assert json.loads((pipeline_run / ".imported.json").read_text()) == []  # nor by the process that ran every stage
    assert modeling.choose_backend("auto") == "transformers"
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        modeling.choose_backend("unsloth")


@pytest.mark.parametrize(
    "requested, cuda, unsloth_installed, expected",
    [
        ("auto", True, True, "unsloth"),  # one process or several (unsloth trains under DDP too)
        ("auto", True, False, "transformers"),
        ("auto", False, True, "transformers"),
        ("unsloth", True, True, "unsloth"),
        ("transformers", True, True, "transformers"),
        ("unsloth", False, True, "model.backend = unsloth needs a CUDA GPU"),
        ("unsloth", True, False, "unsloth is not installed: pip install -e '.[gpu]'"),
    ],
)
def test_backend_choice_on_each_kind_of_machine(monkeypatch, requested, cuda, unsloth_installed, expected):
    # The GPU machine's decisions, taken on this CPU: CUDA and an installed unsloth are what
    # choose_backend looks at, and both are faked here; nothing is imported.
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        if name == "unsloth":
            return real_find_spec("json") if unsloth_installed else None  # any spec stands for "installed"
        return real_find_spec(name, *args)

    monkeypatch.setattr(modeling, "cuda_available", lambda: cuda)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    if expected in ("unsloth", "transformers"):
        assert modeling.choose_backend(requested) == expected
    else:
        with pytest.raises(UserError) as error:
            modeling.choose_backend(requested)
        assert expected in str(error.value) and "\n" not in str(error.value)
    assert "unsloth" not in sys.modules


def test_unsloth_trains_with_attention_off_cudnn_and_whole_offload_slots_and_transformers_leaves_both(
        workspace, tiny_tokenizer, monkeypatch):
    # Both are changes to unsloth's runtime (stages/unsloth_runtime.py; benchmarks/README.md): the
    # unsloth backend makes them before it loads the model. unsloth cannot be imported without a GPU,
    # so stand-ins record what the backend switch and the offload helpers were at load time.
    seen = []
    zoo, _ = offload_helpers()
    shipped = zoo._grow_host_buffer

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(**kwargs):
            from transformers import AutoModelForCausalLM

            seen.append((torch.backends.cuda.cudnn_sdp_enabled(), zoo._grow_host_buffer is shipped))
            return AutoModelForCausalLM.from_pretrained(kwargs["model_name"]), tiny_tokenizer

        @staticmethod
        def get_peft_model(model, **kwargs):
            return model

    monkeypatch.setitem(sys.modules, "unsloth", type(sys)("unsloth"))
    monkeypatch.setitem(sys.modules, "unsloth_zoo", type(sys)("unsloth_zoo"))
    monkeypatch.setitem(sys.modules, "unsloth_zoo.gradient_checkpointing", zoo)
    sys.modules["unsloth"].FastLanguageModel = FastLanguageModel
    sys.modules["unsloth_zoo"].gradient_checkpointing = zoo
    monkeypatch.setattr(modeling, "choose_backend", lambda requested: "unsloth")
    params = load_params()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        model, _, backend = modeling.load_for_training(params.model, params.lora, True, params.seed)
        assert backend == "unsloth" and model.config.model_type == "llama"
        assert seen == [(False, False)] and not torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(True)
        zoo._grow_host_buffer = shipped
        monkeypatch.setattr(modeling, "choose_backend", lambda requested: "transformers")
        modeling.load_for_training(params.model, params.lora, False, params.seed)
        # the transformers backend was not measured with either: both unchanged
        assert torch.backends.cuda.cudnn_sdp_enabled() and zoo._grow_host_buffer is shipped
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def test_4bit_on_a_cpu_says_a_gpu_is_needed(workspace):
    write_params(workspace, {"model.load_in_4bit": True})
    with pytest.raises(UserError, match="needs a CUDA GPU.*make smoke"):
        modeling.check_can_load(load_params().model)


def test_prompt_tokens_are_masked_in_real_training_batches(workspace, tiny_tokenizer):
    from trl import SFTTrainer

    prepare.main()
    params = load_params()
    model, tokenizer, _ = modeling.load_for_training(params.model, params.lora, False, params.seed)
    dataset = train.tokenized_split("train", tokenizer, True, params.model.max_seq_length)
    trainer = SFTTrainer(model=model, args=train.sft_config(params.train, params.seed, 512, False),
                         train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    rows = {len(encode(tokenizer, r["prompt"])): r for r in map(json.loads, paths.split_file("train").open())}
    for input_ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n_real = int(mask.sum())
        answer = labels[:n_real] != IGNORE_INDEX
        n_prompt = int((~answer).sum())
        assert n_prompt in rows, "the masked span is exactly one row's prompt"
        assert not answer[:n_prompt].any() and answer[n_prompt:].all()
        assert torch.equal(labels[:n_real][answer], input_ids[:n_real][answer])
        assert (labels[n_real:] == IGNORE_INDEX).all()  # padding never counts


@pytest.mark.parametrize("completion_only_loss", [False, True])
def test_train_computes_the_loss_on_the_tokens_completion_only_loss_says(workspace, monkeypatch, completion_only_loss):
    from trl import SFTTrainer

    write_params(workspace, {"train.completion_only_loss": completion_only_loss, "train.max_steps": 1,
                             "train.eval_steps": 1, "train.save_steps": 1})
    prepare.main()
    seen, original = [], SFTTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):  # every batch the loss is computed on
        seen.append({key: inputs[key].detach().clone() for key in ("input_ids", "labels", "attention_mask")})
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "compute_loss", recording)
    train.main()
    assert len(seen) >= 2  # a training step and the validation batches
    for batch in seen:
        for input_ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            n_real = int(mask.sum())
            target = labels[:n_real] != IGNORE_INDEX
            assert torch.equal(labels[:n_real][target], input_ids[:n_real][target])
            assert (labels[n_real:] == IGNORE_INDEX).all()  # padding never counts
            if completion_only_loss:  # a masked prompt, then the answer
                n_prompt = int((~target).sum())
                assert n_prompt > 0 and not target[:n_prompt].any() and target[n_prompt:].all()
            else:  # every real token is a target, the prompt's included
                assert target.all()


def test_all_masked_data_stops_with_a_clear_message(workspace, capsys):
    prepare.main()
    # params changed after prepare: at 64 tokens every answer is cut off behind its prompt
    write_params(workspace, {"model.max_seq_length": 64})
    with pytest.raises(SystemExit):
        train.main()
    assert "every answer token of data/prepared/train.jsonl is masked" in capsys.readouterr().err
    assert not paths.ADAPTER_DIR.exists()


def test_steady_speed_leaves_out_warmup_validation_and_checkpoint_saves(monkeypatch):
    """The Trainer validates and saves after a step ends (the last save after the last step):
    that time counts in tokens_per_s, the whole session's, but not in steady_tokens_per_s."""
    now = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: now[0])
    meter, state = callbacks.Throughput(), TrainerState(max_steps=6)
    meter.on_train_begin(None, state, None)
    for step in range(1, 7):
        now[0] += 10.0 if step == 1 else 1.0  # step 1 compiles
        state.global_step, state.num_input_tokens_seen = step, state.num_input_tokens_seen + 1000
        meter.on_step_end(None, state, None)
        if step in (3, 6):
            now[0] += 4.0  # validation
            meter.on_evaluate(None, state, None)
            now[0] += 2.0  # checkpoint save
            meter.on_save(None, state, None)
    meter.on_train_end(None, state, None)
    now[0] += 30.0
    meter.on_evaluate(None, state, None)  # the stage's own evaluation after training: not in the run
    summary = meter.summary()
    assert summary["runtime_s"] == 27.0  # 10 + 5 x 1 + 2 x (4 + 2)
    assert summary["tokens_per_s"] == round(6000 / 27.0, 1)
    assert summary["steady_tokens_per_s"] == 1000.0  # steps 3-6: 4,000 tokens in 4 s of training
