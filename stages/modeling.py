"""Loading tokenizers and models: hub ids or local folders, the training backends, the device.

Heavy libraries are imported inside the functions: unsloth must come before transformers, trl
and peft when it is used at all, and must never be imported on a machine without CUDA.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from contextlib import contextmanager
from pathlib import Path

from stages import unsloth_runtime
from stages.chat_model import fit_embeddings, prepare_tokenizer, resolve_target_modules
from stages.errors import UserError

log = logging.getLogger(__name__)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# A hub repository id: "owner/name" (letters, digits, '-', '_', '.'), never a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """True for "owner/name" that is not an existing path: an existing path is always local."""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def describe_load_error(what: str, name: str, exc: BaseException) -> str:
    """One line that says why `name` could not be loaded and what to do about it."""
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    first_line = text.splitlines()[0] if text else type(exc).__name__
    kind = "dataset" if what.startswith("data") else "model"
    if Path(name).expanduser().exists():
        return f"{what} = {name}: this local {kind} could not be loaded ({first_line})"
    if not is_hub_id(name):
        return f"{what} = {name}: no such file or folder; point it at a local {kind} or an owner/name hub id"
    if "gated" in lowered or "403" in lowered or "401" in lowered or "access to model" in lowered:
        return (
            f"{what} = {name} is gated or private: accept its licence on the Hugging Face Hub with "
            "your account, then export HF_TOKEN=<your token> (it is read from the environment only)"
        )
    if "offline" in lowered or "connect" in lowered or "couldn't find them in the cached" in lowered:
        return (
            f"{what} = {name}: the Hugging Face Hub cannot be reached and it is not in the local "
            "cache; on an offline server download it once elsewhere (hf download "
            f"{name} --local-dir DIR), copy DIR over and set {what} to DIR"
        )
    if "not a valid model identifier" in lowered or "repository not found" in lowered or "404" in lowered \
            or "doesn't exist on the hub" in lowered:
        return f"{what} = {name}: no such {kind} on the Hub or on disk; check the spelling"
    return f"{what} = {name}: could not be loaded ({first_line})"


@contextmanager
def load_errors(what: str, name: str):
    """Turn the hub's and transformers' loading failures into one-line UserErrors."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        raise UserError(describe_load_error(what, name, exc)) from None
    except Exception as exc:  # huggingface_hub's HTTP errors are not always OSErrors
        if type(exc).__module__.startswith(("huggingface_hub", "requests", "httpx")):
            raise UserError(describe_load_error(what, name, exc)) from None
        raise


def load_tokenizer(name: str, what: str = "model.name"):
    from transformers import AutoTokenizer

    with load_errors(what, name):
        tokenizer = AutoTokenizer.from_pretrained(name)
    return prepare_tokenizer(tokenizer)


def choose_backend(requested: str) -> str:
    """auto -> unsloth on CUDA when it is installed, else transformers (PEFT + bitsandbytes).

    The same holds for several processes (train.num_processes > 1): unsloth 2026.10 trains under
    accelerate's DDP with each rank on its own GPU (LOCAL_RANK), measured in benchmarks/README.md.
    """
    has_cuda = cuda_available()
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "unsloth":
        if not has_cuda:
            raise UserError(
                "model.backend = unsloth needs a CUDA GPU; on this machine use "
                "-S model.backend=transformers (or auto)"
            )
        if not has_unsloth:
            raise UserError("model.backend = unsloth but unsloth is not installed: pip install -e '.[gpu]'")
        return "unsloth"
    if requested == "auto":
        return "unsloth" if has_cuda and has_unsloth else "transformers"
    return requested


def check_can_load(model_params) -> None:
    if model_params.load_in_4bit and not cuda_available():
        # The shipped model.name holds weights quantized already, which need CUDA too: name 16-bit ones.
        weights = f" -S model.name={model_params.base_16bit}" if model_params.name != model_params.base_16bit else ""
        raise UserError(
            "model.load_in_4bit = true needs a CUDA GPU (bitsandbytes NF4); this machine has none. On a CPU "
            f"set -S model.load_in_4bit=false{weights} (full precision: an 8B model then needs ~32 GB of memory), "
            "or run `make smoke` to see the pipeline work (a tiny model, no GPU)"
        )


def compute_dtype():
    """bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_for_training(model_params, lora_params, gradient_checkpointing: bool, seed: int):
    """Load the base model, attach fresh LoRA adapters, and return (model, tokenizer, backend)."""
    check_can_load(model_params)
    backend = choose_backend(model_params.backend)
    log.info("loading %s with the %s backend", model_params.name, backend)
    if backend == "unsloth":
        model, tokenizer = _load_unsloth(model_params, lora_params, gradient_checkpointing, seed)
    else:
        model, tokenizer = _load_transformers(model_params, lora_params, gradient_checkpointing, seed)
    return model, tokenizer, backend


def _load_unsloth(model_params, lora_params, gradient_checkpointing, seed):
    # Imported first, as unsloth asks, so that it can patch transformers, trl and peft.
    from unsloth import FastLanguageModel

    unsloth_runtime.before_training()

    with load_errors("model.name", model_params.name):
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=model_params.name,
            max_seq_length=model_params.max_seq_length,
            dtype=None,  # unsloth picks bf16 where supported, else fp16
            load_in_4bit=model_params.load_in_4bit,
        )
    tokenizer = prepare_tokenizer(tokenizer)
    fit_embeddings(model, tokenizer)
    model = FastLanguageModel.get_peft_model(
        model,
        r=lora_params.r,
        lora_alpha=lora_params.alpha,
        lora_dropout=lora_params.dropout,
        target_modules=resolve_target_modules(model, lora_params.target_modules),
        bias=lora_params.bias,
        use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
        random_state=seed,
        max_seq_length=model_params.max_seq_length,
    )
    return model, tokenizer


def _load_transformers(model_params, lora_params, gradient_checkpointing, seed):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed

    set_seed(seed)
    dtype = compute_dtype()
    kwargs = {"dtype": dtype}
    if model_params.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    tokenizer = load_tokenizer(model_params.name)
    with load_errors("model.name", model_params.name):
        model = AutoModelForCausalLM.from_pretrained(model_params.name, **kwargs)
    fit_embeddings(model, tokenizer)
    if model_params.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora_config = LoraConfig(
        r=lora_params.r,
        lora_alpha=lora_params.alpha,
        lora_dropout=lora_params.dropout,
        target_modules=resolve_target_modules(model, lora_params.target_modules),
        bias=lora_params.bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config), tokenizer


def load_for_inference(name: str, what: str, dtype=None, tokenizer=None):
    """A plain transformers causal LM in eval mode: bf16/fp16 on GPU, fp32 on CPU, with room for
    `tokenizer`'s pad token if prepare_tokenizer had to add one."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype or compute_dtype()}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    with load_errors(what, name):
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    model.eval()
    return model
