"""What differs from one chat model to another, read from its tokenizer, template and layers.

Nothing here names a model family. Each fact is found the way a person would check it:
- the end of turn: render a chat with a marker as the answer and read what the template writes
  right after it (`<|eot_id|>` for Llama 3, `<|im_end|>` for Qwen, `<end_of_turn>` for Gemma,
  `</s>` for Mistral, `[|endofturn|]` for EXAONE 4);
- the system role: render a system message; a template that refuses it or drops it (Gemma 2)
  gets the system prompt at the start of the first user turn instead (logged once);
- the bos: a template that does not write it, for a tokenizer that adds it to plain text, gets
  it in front of the rendered prompt (the rendered text is encoded without special tokens);
- the pad: the model's own, else a spare special token that is neither end of turn nor eos nor
  used by the template, else a new one (an embedding row of zeros where the model has no spare);
- the LoRA targets: the linear layers of the decoder blocks, for `all-linear` and to check names.
Templates with a thinking mode (Qwen3, EXAONE 4) are rendered with `enable_thinking=false`: the
answers are trained and asked for directly; templates without one ignore the flag.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from stages.errors import UserError

log = logging.getLogger(__name__)

TEMPLATE_FLAGS = {"enable_thinking": False}
ALL_LINEAR = "all-linear"
_ANSWER = "ZQXJ answer ZQXJ"  # plain words no template changes, to find in the rendered text
_SYSTEM = "ZQXJ system ZQXJ"
_folded_logged: set[str] = set()  # models whose folding was logged


@dataclass(frozen=True)
class ChatFormat:
    end_of_turn: str  # the text the template writes right after an answer, up to its special token
    end_of_turn_ids: tuple[int, ...]
    system_role: bool  # False: the system prompt goes at the start of the first user turn
    bos_prefix: str  # "" or the bos the template leaves out but the model was trained with


def _apply(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **TEMPLATE_FLAGS)


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def _has_system_role(tokenizer) -> bool:
    try:
        text = _apply(tokenizer, [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": "?"}], True)
    except Exception:  # jinja's raise_exception: "System role not supported"
        return False
    return _SYSTEM in text


def _end_of_turn(tokenizer) -> tuple[str, tuple[int, ...]]:
    text = _apply(tokenizer, [{"role": "user", "content": "?"}, {"role": "assistant", "content": _ANSWER}], False)
    if _ANSWER not in text:
        raise UserError("the tokenizer's chat template does not write the assistant's answer; use a chat model "
                        "whose template renders a user and an assistant turn")
    after = text[text.index(_ANSWER) + len(_ANSWER):]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    special = _special_ids(tokenizer)
    for k, token_id in enumerate(ids):
        if token_id in special:
            end = tokenizer.decode(ids[: k + 1], skip_special_tokens=False)
            return end, tuple(ids[: k + 1])
    raise UserError(f"the tokenizer's chat template ends an answer with {after!r}, which holds no special token: "
                    "the pipeline cannot tell where an answer ends; use a chat model with an end-of-turn token")


def chat_format(tokenizer) -> ChatFormat:
    """The template's facts, worked out once per tokenizer object and template."""
    cached = getattr(tokenizer, "_chat_format", None)
    if cached is not None and cached[0] == tokenizer.chat_template:
        return cached[1]
    if tokenizer.chat_template is None:
        raise UserError("the tokenizer has no chat template; use an instruction-tuned chat model")
    end, end_ids = _end_of_turn(tokenizer)
    system_role = _has_system_role(tokenizer)
    bos_prefix = ""
    bos = tokenizer.bos_token
    if bos and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        rendered = _apply(tokenizer, [{"role": "user", "content": "?"}], True)
        bos_prefix = "" if rendered.startswith(bos) else bos
    found = ChatFormat(end, end_ids, system_role, bos_prefix)
    tokenizer._chat_format = (tokenizer.chat_template, found)
    return found


def fold_system(messages: list[dict], name: str = "") -> list[dict]:
    """The system message at the start of the first user turn, for a template without a system role."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    if not rest or rest[0]["role"] != "user":
        return rest
    if name not in _folded_logged:
        _folded_logged.add(name)
        log.info("the chat template %shas no system role: the system prompt starts the first user turn",
                 f"of {name} " if name else "")
    return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat as the model's template writes it, with this module's corrections."""
    found = chat_format(tokenizer)
    if not found.system_role:
        messages = fold_system(messages, tokenizer.name_or_path)
    return found.bos_prefix + _apply(tokenizer, messages, add_generation_prompt)


def stop_token_ids(generation_config, tokenizer) -> list[int]:
    """Where an answer ends: the end of turn the template writes, the eos, the model's own eos ids."""
    configured = generation_config.eos_token_id if generation_config is not None else None
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    ids.add(chat_format(tokenizer).end_of_turn_ids[-1])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def pick_pad_token(tokenizer) -> tuple[str, bool]:
    """(pad token, whether it is new): never the end of turn or the eos, which padding would blur."""
    ends = {*chat_format(tokenizer).end_of_turn_ids, tokenizer.eos_token_id}
    if tokenizer.pad_token is not None and tokenizer.pad_token_id not in ends:
        return tokenizer.pad_token, False
    used = render(tokenizer, [{"role": "system", "content": "?"}, {"role": "user", "content": "?"},
                              {"role": "assistant", "content": "?"}], False)
    spare = [token.content for i, token in sorted(tokenizer.added_tokens_decoder.items())
             if token.special and i not in ends and i != tokenizer.bos_token_id and token.content not in used]
    for hint in ("pad", "reserved", "unused", "unk"):
        for content in spare:
            if hint in content.lower():
                return content, False
    if tokenizer.unk_token is not None and tokenizer.unk_token_id not in ends:
        return tokenizer.unk_token, False
    return "<|pad|>", True


def prepare_tokenizer(tokenizer):
    """The tokenizer with its template checked and a pad token that is neither end of turn nor eos."""
    pad, new = pick_pad_token(tokenizer)
    if new:
        tokenizer.add_special_tokens({"pad_token": pad})
        log.info("the tokenizer has no pad token and no spare one: added %s (id %d)", pad, tokenizer.pad_token_id)
    elif tokenizer.pad_token != pad:
        tokenizer.pad_token = pad
    return tokenizer


def fit_embeddings(model, tokenizer) -> None:
    """Room for a pad token added by prepare_tokenizer: new embedding rows of zeros (a padded
    position is masked, so the row is never read; zeros keep the saved weights the same every run)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return
    import torch

    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[rows:] = 0
        output = model.get_output_embeddings()
        if output is not None and output.weight.shape[0] > rows:
            output.weight[rows:] = 0


def linear_layer_names(model) -> list[str]:
    """The names of the linear layers inside the model's decoder blocks (q_proj, ..., down_proj)."""
    import torch

    names = set()
    for path, module in model.named_modules():
        parts = path.split(".")
        if isinstance(module, torch.nn.Linear) and any(part.isdigit() for part in parts[:-1]):
            names.add(parts[-1])
    return sorted(names)


def resolve_target_modules(model, requested) -> list[str]:
    """lora.target_modules as module names: `all-linear` is every linear layer of the decoder
    blocks; named modules must be among them (one line naming the model's own otherwise)."""
    available = linear_layer_names(model)
    if requested == ALL_LINEAR:
        return available
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise UserError(f"lora.target_modules: {type(model).__name__} has no linear layer {unknown[0]!r}; "
                        f"its own are {', '.join(available)} (or set all-linear)")
    return list(requested)
