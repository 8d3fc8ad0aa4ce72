"""What the validate stage checks beyond params.yaml itself: the machine, the model folders and
their configs, the accelerate config file, and the params against the data and the model.

Each check raises a UserError naming the key and what to set, before DVC replaces any output and
long before 16 GB of weights load. Nothing here loads weights: a model is known by its config.json.
"""

from __future__ import annotations

from pathlib import Path

from stages import launch, paths
from stages.errors import UserError
from stages.modeling import check_can_load, choose_backend, cuda_available, is_hub_id, load_errors
from stages.outputs import check_writable


def check_machine(params) -> None:
    """What the params ask of this machine: CUDA for 4-bit weights or unsloth, a readable accelerate
    config, as many GPUs as processes (the same checks, with the same messages, as train's)."""
    check_can_load(params.model)
    if params.model.backend == "unsloth":
        choose_backend("unsloth")
    train = params.train
    machines = launch.machines(train.num_processes, train.accelerate_config)
    if train.num_processes > 1:
        launch.check_devices(train.num_processes, cuda_available(), machines)


def model_configs(params) -> dict[str, tuple[str, object]]:
    """{key: (name, transformers config)} for model.name and model.base_16bit.

    A local folder must hold a config transformers loads (else the key is refused here, not after
    training, at merge). A hub id's config is used when it is in the local Hugging Face cache, and
    skipped otherwise: validate never goes online, and an offline server has no cache to ask.
    """
    configs = {}
    for key, name in (("model.name", params.model.name), ("model.base_16bit", params.model.base_16bit)):
        config = _cached_config(name) if is_hub_id(name) else _local_config(key, name)
        if config is not None:
            configs[key] = (name, config)
    return configs


def _local_config(key: str, name: str):
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise UserError(f"{key} = {name}: no such folder; point it at a local model folder or an owner/name hub id")
    if not (folder / "config.json").is_file():  # transformers would speak of a missing model_type
        raise UserError(f"{key} = {name}: not a model folder (no config.json in it); point it at the folder "
                        "that holds the model's config.json and weights")
    from transformers import AutoConfig

    with load_errors(key, name):
        return AutoConfig.from_pretrained(str(folder))


def _cached_config(name: str):
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if not isinstance(cached, str):
        return None  # not downloaded yet: nothing to check against
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(Path(cached).parent))  # the cached snapshot's folder
    except (OSError, ValueError):  # a cache entry transformers cannot read: the stage that loads it will say
        return None


def check_model_limits(params, configs: dict[str, tuple[str, object]]) -> None:
    """Values that only a slip can make larger than the model allows (1000000000 new tokens is a
    640 GB allocation, not a long answer)."""
    for key, (name, config) in configs.items():
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        positions = getattr(text, "max_position_embeddings", None)
        hidden = getattr(text, "hidden_size", None)
        limits = (
            ("model.max_seq_length", params.model.max_seq_length, positions, "max_position_embeddings"),
            ("eval.max_new_tokens", params.eval.max_new_tokens, positions, "max_position_embeddings"),
            # A rank above the hidden size adds weights but no rank: the update is hidden x hidden at most.
            ("lora.r", params.lora.r, hidden, "hidden_size"),
        )
        for param, value, limit, attr in limits:
            if isinstance(limit, int) and value > limit:
                raise UserError(f"{param} = {value}: more than {key} = {name} allows (its config's {attr} is "
                                f"{limit}); set -S {param}={limit} or lower")


def check_lora_targets(params, configs: dict[str, tuple[str, object]]) -> None:
    """lora.target_modules against model.name's own linear layers, from an empty copy of the model
    built on the meta device out of its config (no memory, no weights)."""
    if "model.name" not in configs:
        return
    import torch
    from transformers import AutoModelForCausalLM

    from stages.chat_model import resolve_target_modules

    name, config = configs["model.name"]
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError):  # not a causal LM transformers can build: the loading stage will say
        return
    resolve_target_modules(model, params.lora.target_modules)


def check_batch_sizes(params, n_train: int, n_rows: int) -> None:
    """Batch sizes the data can never fill, which only a slip makes (an extra digit, 1000000000).
    A training batch larger than the train split would make every optimizer step more than one
    epoch, silently. An evaluation batch is bounded by all the usable rows only: a split smaller
    than the batch is normal on small data (the shipped 8 against the sample's 5 validation rows)
    and gives one short batch. (Counted before prepare drops rows too long for max_seq_length.)"""
    train = params.train
    limits = (
        ("train.per_device_train_batch_size", train.per_device_train_batch_size, n_train, "the train split's"),
        ("train.per_device_eval_batch_size", train.per_device_eval_batch_size, n_rows, "all the usable"),
        ("eval.batch_size", params.eval.batch_size, n_rows, "all the usable"),
    )
    for param, value, rows, which in limits:
        if isinstance(value, int) and value > rows:
            raise UserError(f"{param} = {value}: more than {which} {rows} rows; a batch can never be fuller, "
                            f"set -S {param}={rows} or lower")


def check_outputs_writable() -> None:
    """Every output dvc.yaml declares can be written (its folder made, a file created there), so an
    unwritable metrics/cost/ is found now, not by the stage that writes it after DVC deleted the rest."""
    if not paths.DVC_YAML.is_file():  # run outside a DVC project (python -m stages.validate in a copy)
        return
    import yaml

    stages = yaml.safe_load(paths.DVC_YAML.read_text(encoding="utf-8"))["stages"]
    declared = [out for stage in stages.values() for kind in ("outs", "metrics", "plots") for out in stage.get(kind, [])]
    check_writable(*(Path(next(iter(out)) if isinstance(out, dict) else out) for out in declared))
