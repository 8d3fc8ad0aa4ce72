"""Train: QLoRA fine-tuning with TRL's SFTTrainer (unsloth on CUDA, transformers + PEFT elsewhere).

    python -m stages.train          (or: dvc repro train)

Reads data/prepared/{train,validation}.jsonl and the seed, model, prompt, lora and train params;
writes models/adapter/ (PEFT adapter + tokenizer), metrics/train.json and DVCLive loss curves
in dvclive/train/. Resumable checkpoints go to models/checkpoints/: rerunning an interrupted
train with the same params and data continues from the last one.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

from stages import launch, paths
from stages.checkpoints import checkpoint_to_resume, run_fingerprint
from stages.errors import UserError, stage_entrypoint
from stages.modeling import choose_backend, cuda_available, load_for_training
from stages.outputs import atomic_dir, read_jsonl, write_json
from stages.params import load_params
from stages.prompt import IGNORE_INDEX, tokenize_example

log = logging.getLogger("stages.train")

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "unsloth")


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


def library_versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def write_outputs(trainer, tokenizer, metrics: dict) -> None:
    with atomic_dir(paths.ADAPTER_DIR) as adapter_dir:
        trainer.model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
    write_json(paths.TRAIN_METRICS, metrics)
    log.info("wrote %s and %s: train_loss %.4f, eval_loss %.4f, %s tokens/s", paths.ADAPTER_DIR,
             paths.TRAIN_METRICS, metrics["train_loss"], metrics["eval_loss"]["last"], metrics["tokens_per_s"])


@stage_entrypoint
def main() -> None:
    params = load_params()
    train = params.train
    for split in ("train", "validation"):
        if not paths.split_file(split).exists():
            raise UserError(f"{paths.split_file(split)} is missing; run `dvc repro prepare` first")
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
    from dvclive import Live
    from trl import SFTTrainer

    from stages.callbacks import LogLine, LossCurves, Throughput, quiet_progress

    max_length = params.model.max_seq_length
    train_set = tokenized_split("train", tokenizer, train.completion_only_loss, max_length)
    eval_set = tokenized_split("validation", tokenizer, train.completion_only_loss, max_length)
    from accelerate import PartialState

    with PartialState(cpu=not on_cuda).main_process_first():  # the main process clears or keeps checkpoints first
        resume_from = checkpoint_to_resume(run_fingerprint(params))
    main_process = launch.is_main_process()
    throughput = Throughput()
    curves = [LossCurves(Live(str(paths.DVCLIVE_TRAIN_DIR), resume=resume_from is not None,
                              save_dvc_exp=False, dvcyaml=None))] if main_process else []
    trainer = SFTTrainer(
        model=model,
        args=sft_config(train, params.seed, max_length, on_cuda),
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        callbacks=[LogLine(), throughput, *curves],
    )
    quiet_progress(trainer)
    processes = launch.world_size()
    effective_batch = train.per_device_train_batch_size * train.gradient_accumulation_steps * processes
    log.info("training %d rows (validation %d), effective batch %d = %d per device x %d accumulation x %d "
             "processes, backend %s", len(train_set), len(eval_set), effective_batch,
             train.per_device_train_batch_size, train.gradient_accumulation_steps, processes, backend)
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except torch.cuda.OutOfMemoryError:
        raise UserError(out_of_memory_advice(train, params.model.max_seq_length)) from None
    state = trainer.state
    if not any("eval_loss" in e and e["step"] == state.global_step for e in state.log_history):
        trainer.evaluate()  # the last step was not an eval step: measure the final model too
    eval_losses = [entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry]
    if main_process:  # one process writes the adapter and the metrics
        write_outputs(trainer, tokenizer, {
            "train_loss": result.training_loss,
            "eval_loss": {"best": min(eval_losses), "last": eval_losses[-1]},
            "steps": state.global_step,
            "epochs": state.epoch,
            "tokens_seen": state.num_input_tokens_seen,
            **throughput.summary(),
            "effective_batch_size": effective_batch,
            "num_processes": processes,
            "peak_gpu_memory_gib": {
                "allocated": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_cuda else 0.0,
                "reserved": round(torch.cuda.max_memory_reserved() / 2**30, 2) if on_cuda else 0.0,
            },
            "backend": backend,
            "versions": library_versions(),
        })
    launch.finish()


if __name__ == "__main__":
    main()
