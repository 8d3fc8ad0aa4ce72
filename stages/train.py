"""Train: QLoRA fine-tuning with TRL's SFTTrainer (unsloth on CUDA, transformers + PEFT elsewhere).

    python -m stages.train          (or: dvc repro train)

Reads data/prepared/{train,validation}.jsonl and the seed, model, prompt, lora and train params;
writes models/adapter/ (PEFT adapter + tokenizer), metrics/train.json (losses),
metrics/cost/train.json (speed, memory; kept as it is when a rerun reproduces the locked result,
see stages/outputs.py), metrics/info/train.json (steps, tokens, backend, device, versions, the
run fingerprint) and DVCLive loss curves in dvclive/train/plots/metrics, all together and only at
the end (stages/outputs.py). While it runs, checkpoints and the curves so far go to
models/checkpoints/ (outside DVC): rerunning an interrupted train with the same params, data,
code and libraries continues from the last complete one; a finished run deletes them.
"""

from __future__ import annotations

import json
import logging
import shutil

from stages import checkpoints, launch, paths
from stages.cli import no_arguments
from stages.errors import UserError, gpu_memory_advice, progress_bars, stage_entrypoint, writing
from stages.modeling import choose_backend, cuda_available, load_for_training
from stages.outputs import check_writable, read_jsonl, staged
from stages.params import load_params
from stages.prompt import IGNORE_INDEX, tokenize_example

log = logging.getLogger("stages.train")

def tokenized_split(split: str, tokenizer, completion_only_loss: bool, max_tokens: int):
    """A datasets.Dataset of input_ids and labels; rows with no answer token left are dropped."""
    from datasets import Dataset

    path = paths.split_file(split)  # main() has checked it exists, before loading the model
    rows = []
    for row in read_jsonl(path):
        example = tokenize_example(tokenizer, row["prompt"], row["completion"], completion_only_loss)
        example = {key: ids[:max_tokens] for key, ids in example.items()}
        if any(label != IGNORE_INDEX for label in example["labels"]):
            rows.append(example)
    if not rows:
        raise UserError(
            f"every answer token of {path} is masked or cut off at model.max_seq_length = {max_tokens}: "
            "there is nothing to learn; rerun prepare with this max_seq_length or raise it"
        )
    return Dataset.from_list(rows)


def sft_config(train, seed: int, max_length: int, on_cuda: bool):
    import torch
    from trl import SFTConfig

    optim = train.optim
    if not on_cuda and ("8bit" in optim or "bnb" in optim):
        log.info("optim %s needs CUDA; using adamw_torch on this CPU", optim)
        optim = "adamw_torch"
    bf16 = on_cuda and torch.cuda.is_bf16_supported()
    return SFTConfig(
        output_dir=str(paths.CHECKPOINT_DIR),
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_eval_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        warmup_steps=train.warmup_steps,
        max_steps=train.max_steps if train.max_steps > 0 else -1,
        num_train_epochs=train.num_train_epochs,
        lr_scheduler_type=train.lr_scheduler_type,
        optim=optim,
        weight_decay=train.weight_decay,
        bf16=bf16,
        fp16=on_cuda and not bf16,
        eval_strategy="steps",
        eval_steps=train.eval_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=2,
        logging_steps=train.logging_steps,
        seed=seed,
        data_seed=seed,
        max_length=max_length,
        completion_only_loss=train.completion_only_loss,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=not progress_bars(),  # a bar on a terminal; in a log file the step lines say as much
        use_cpu=not on_cuda,  # also what makes accelerate run several CPU processes as DDP (gloo)
        ddp_find_unused_parameters=False,  # LoRA leaves the frozen base's parameters without gradients
    )


def out_of_memory_advice(train, max_seq_length: int) -> str:
    smaller = max(1, train.per_device_train_batch_size // 2)
    return (
        f"out of GPU memory at train.per_device_train_batch_size = {train.per_device_train_batch_size} and "
        f"model.max_seq_length = {max_seq_length}: try -S train.per_device_train_batch_size={smaller} "
        f"-S train.gradient_accumulation_steps={train.gradient_accumulation_steps * 2} (the same effective "
        "batch), or a lower model.max_seq_length; rerunning with the same params resumes from the last checkpoint"
    )


def save_adapter(model, tokenizer, folder) -> None:
    """The adapter and tokenizer, byte-identical between identical runs.

    PEFT keeps target_modules in a set and writes it in hash order, which changes from run to run
    (and with it the adapter's DVC hash, rerunning merge for nothing): sort it.
    """
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_outputs(trainer, tokenizer, metrics: dict, cost: dict, info: dict) -> None:
    """The adapter, then the numbers and curves that describe it, renamed into place only when all are written."""
    with staged() as out:
        save_adapter(trainer.model, tokenizer, out.dir(paths.ADAPTER_DIR))
        shutil.copytree(paths.CURVES_SCRATCH / "plots/metrics", out.dir(paths.TRAIN_CURVES), dirs_exist_ok=True)
        out.json(paths.TRAIN_METRICS, metrics)
        out.measurement(paths.TRAIN_COST, cost)
        out.json(paths.TRAIN_INFO, info)
    log.info("wrote %s and %s: train loss %.4f, eval loss %.4f, %s tokens/s", paths.ADAPTER_DIR,
             paths.TRAIN_METRICS, metrics["train"]["loss"], metrics["train"]["eval_loss_last"],
             cost["train"]["tokens_per_s"])


@stage_entrypoint
def main() -> None:
    params = load_params()
    train = params.train
    for split in ("train", "validation"):
        if not paths.split_file(split).exists():
            raise UserError(f"{paths.split_file(split)} is missing; run `dvc repro prepare` first")
    check_writable(paths.ADAPTER_DIR, paths.TRAIN_METRICS, paths.TRAIN_COST, paths.TRAIN_INFO, paths.TRAIN_CURVES,
                   paths.CHECKPOINT_DIR / checkpoints.FINGERPRINT_FILE)
    launch.use_one_gpu(train.num_processes)
    on_cuda = cuda_available()
    if launch.needs_launch(train.num_processes, train.accelerate_config):
        machines = launch.machines(train.num_processes, train.accelerate_config)
        launch.check_devices(train.num_processes, on_cuda, machines)
        backend = choose_backend(params.model.backend)  # fail here, not in N processes
        raise SystemExit(launch.launch(train.num_processes, train.accelerate_config, backend))
    launch.bind_device(on_cuda)
    model, tokenizer, backend = load_for_training(params.model, params.lora, train.gradient_checkpointing, params.seed)
    # Only now, after unsloth (when used) has patched them, import trl and transformers' pieces.
    import torch
    from accelerate import PartialState
    from trl import SFTTrainer

    from stages.callbacks import LogLine, LossCurves, ResumableAccounting, Throughput, mean_train_loss, quiet_progress

    max_length = params.model.max_seq_length
    train_set = tokenized_split("train", tokenizer, train.completion_only_loss, max_length)
    eval_set = tokenized_split("validation", tokenizer, train.completion_only_loss, max_length)
    with PartialState(cpu=not on_cuda).main_process_first():  # the main process clears or keeps checkpoints first
        fingerprint = checkpoints.run_fingerprint(params)
        resume_from = checkpoints.checkpoint_to_resume(fingerprint)
    main_process = launch.is_main_process()
    throughput = Throughput()
    curves = LossCurves(str(paths.CURVES_SCRATCH))
    trainer = SFTTrainer(
        model=model,
        args=sft_config(train, params.seed, max_length, on_cuda),
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        callbacks=[ResumableAccounting(), LogLine(), throughput, curves],
    )
    quiet_progress(trainer)
    processes = launch.world_size()
    effective_batch = train.per_device_train_batch_size * train.gradient_accumulation_steps * processes
    log.info("training %d rows (validation %d), effective batch %d = %d per device x %d accumulation x %d "
             "processes, backend %s", len(train_set), len(eval_set), effective_batch,
             train.per_device_train_batch_size, train.gradient_accumulation_steps, processes, backend)
    with gpu_memory_advice(lambda: out_of_memory_advice(train, params.model.max_seq_length)), \
            writing(paths.CHECKPOINT_DIR):  # the checkpoints' optimizer state: the stage's largest writes
        trainer.train(resume_from_checkpoint=resume_from)
    state = trainer.state
    if not any("eval_loss" in e and e["step"] == state.global_step for e in state.log_history):
        trainer.evaluate()  # the last step was not an eval step: measure the final model too
    curves.end()
    eval_losses = [entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry]
    if main_process:  # one process writes the adapter and the metrics
        write_outputs(
            trainer, tokenizer,
            metrics={"train": {"loss": mean_train_loss(state.log_history),
                               "eval_loss_best": min(eval_losses), "eval_loss_last": eval_losses[-1]}},
            cost={"train": {
                **throughput.summary(),
                "peak_gpu_memory_gib": {
                    "allocated": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_cuda else 0.0,
                    "reserved": round(torch.cuda.max_memory_reserved() / 2**30, 2) if on_cuda else 0.0,
                },
            }},
            info={
                "steps": state.global_step,
                "epochs": state.epoch,
                "tokens_seen": state.num_input_tokens_seen,
                "effective_batch_size": effective_batch,
                "num_processes": processes,
                "backend": backend,
                "device": torch.cuda.get_device_name() if on_cuda else "cpu",  # what the cost was measured on
                "versions": checkpoints.library_versions(),
                "fingerprint": fingerprint,  # params, data, code, versions: a change means a new cost measurement
            },
        )
        checkpoints.clear()  # a finished run leaves nothing to resume
    launch.finish()


if __name__ == "__main__":
    no_arguments(__spec__.name, __doc__)
    main()
