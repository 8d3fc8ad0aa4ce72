"""The one place a QA row becomes a chat, a prompt string and token ids.

prepare, train, evaluate and predict all go through these functions, so the model is asked
at test time exactly what it was trained on (the reference notebook trained on "질문/답변" text
and then tested on a bare question).
"""

from __future__ import annotations

from typing import Sequence

from stages.chat_model import chat_format, render
from stages.errors import UserError

IGNORE_INDEX = -100  # label value that the loss skips (prompt tokens)


def user_turn(question: str, contexts: Sequence[str], include_contexts: bool) -> str:
    """The user's message: the question, then the abstract paragraphs when asked for."""
    if not include_contexts or not contexts:
        return question
    abstract = "\n\n".join(contexts)
    return f"질문: {question}\n\n초록:\n{abstract}"


def build_messages(
    system: str,
    question: str,
    contexts: Sequence[str] = (),
    include_contexts: bool = True,
    answer: str | None = None,
) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user_turn(question, contexts, include_contexts)})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def decision_messages(
    system: str,
    question: str,
    contexts: Sequence[str],
    include_contexts: bool,
    instruction: str,
    options: Sequence[str],
) -> list[dict]:
    """The training chat with a one-word-answer instruction after the question and abstract.

    `instruction` is `eval.decision_instruction`; its `{options}` becomes the option words in
    order, e.g. "예, 아니요, 불확실". Each option is then scored as the assistant's whole reply.
    """
    messages = build_messages(system, question, contexts, include_contexts)
    asked = instruction.format(options=", ".join(options))
    messages[-1] = {"role": "user", "content": f"{messages[-1]['content']}\n\n{asked}"}
    return messages


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat up to and including the assistant header the model continues from."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return render(tokenizer, messages, add_generation_prompt=True)


def render_prompt_completion(tokenizer, messages: list[dict]) -> tuple[str, str]:
    """Split a chat that ends with the answer into (prompt, completion) text.

    The completion is what the chat template adds after the generation prompt: the answer and
    the end-of-turn token (what a template writes after that, such as a newline, is left out: the
    model stops at the end of turn and never writes it). Splitting the rendered text (rather than
    rendering the answer alone) keeps whatever the template puts around the answer.
    """
    prompt = render_prompt(tokenizer, messages)
    full = render(tokenizer, messages, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise UserError(
            "the tokenizer's chat template does not render the conversation as prompt + answer "
            "(it writes the answer's turn differently from the generation prompt); fix its chat_template"
        )
    completion = full[len(prompt):]
    end = chat_format(tokenizer).end_of_turn
    cut = completion.rfind(end)
    return prompt, completion[: cut + len(end)] if cut >= 0 else completion


def encode(tokenizer, text: str) -> list[int]:
    # The rendered chat holds the bos where the model needs one (stages/chat_model.py): adding
    # special tokens would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_example(
    tokenizer, prompt: str, completion: str, completion_only_loss: bool = True
) -> dict[str, list[int]]:
    """input_ids and labels for one row; prompt labels are IGNORE_INDEX when completion_only_loss.

    Prompt and completion are encoded separately so the boundary never moves with BPE merges;
    train (through TRL) and evaluate both score exactly these labels.
    """
    prompt_ids = encode(tokenizer, prompt)
    completion_ids = encode(tokenizer, completion)
    prompt_labels = [IGNORE_INDEX] * len(prompt_ids) if completion_only_loss else prompt_ids
    return {"input_ids": prompt_ids + completion_ids, "labels": prompt_labels + completion_ids}
