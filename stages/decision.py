"""The yes / no / maybe decision: PubMedQA's own metric, scored by option log-likelihood.

Each test question is asked in the training chat (system prompt, question, abstract) with
`eval.decision_instruction` appended; every option word of `eval.decision_options` is then
scored as the assistant's whole reply (the word and the end-of-turn token, as the chat template
renders it), and the option with the highest summed log-probability is the model's decision.

The sum, not the per-token mean: the sum is log P(reply = option), so its argmax is the reply
the model finds most likely among the options. A per-token mean favours options split into more
tokens (after the first token the rest of a word is nearly certain), so the decision would
depend on how the tokenizer splits 예 / 아니요 / 불확실 rather than on the model.

stages/evaluation.py runs the model (one forward pass per option and question, batched); this
module builds the chats and turns log-probabilities into decisions and metrics. Rows without a
reference decision among the options are skipped and counted, never guessed.
"""

from __future__ import annotations

from collections import Counter

from stages.errors import UserError
from stages.prompt import build_messages, decision_messages, render_prompt, render_prompt_completion, tokenize_example


def choose(option_logprobs: dict[str, float]) -> str:
    """The option with the highest summed log-probability; a tie goes to the first option."""
    return max(option_logprobs, key=option_logprobs.get)


def reference_label(row: dict, labels) -> str | None:
    label = row.get("final_decision")
    return label if label in labels else None


def skipped_counts(references: list, labels) -> dict[str, int]:
    """Reference decisions that cannot be scored: missing, or not among the labels."""
    missing = sum(label is None for label in references)
    return {"missing": missing, "not_an_option": sum(label not in labels for label in references) - missing}


def check_same_chat(tokenizer, row: dict, system: str, include_contexts: bool) -> None:
    training = render_prompt(tokenizer, build_messages(system, row["question"], row["contexts"], include_contexts))
    if training != row["prompt"]:
        raise UserError(
            f"question {row['id']}: the training chat rendered now differs from data/prepared's "
            "(another prompt.system, data.include_contexts or chat template); run `dvc repro` so "
            "prepare renders the chats again"
        )


def option_examples(tokenizer, row: dict, system: str, include_contexts: bool, instruction: str,
                    options: dict[str, str]) -> list[dict]:
    """Token ids and labels of the decision chat followed by each option as the reply, in option order."""
    messages = decision_messages(system, row["question"], row["contexts"], include_contexts, instruction,
                                 list(options.values()))
    examples = []
    for word in options.values():
        prompt, completion = render_prompt_completion(tokenizer, [*messages, {"role": "assistant", "content": word}])
        examples.append(tokenize_example(tokenizer, prompt, completion))
    return examples


def decision_metrics(pairs: list[tuple[str, str]], labels) -> dict:
    """Accuracy, macro-F1, per-class counts and the confusion matrix of (reference, decision) pairs.

    Macro-F1 averages the F1 of every class that occurs among the references or the decisions (as
    scikit-learn does by default): a class the data never holds and the model never says does
    not count as a zero.
    """
    if not pairs:
        raise ValueError("no (reference, decision) pairs to score")
    confusion = {ref: {dec: 0 for dec in labels} for ref in labels}
    for reference, decision in pairs:
        confusion[reference][decision] += 1
    references, decisions = Counter(r for r, _ in pairs), Counter(d for _, d in pairs)
    f1 = []
    for label in labels:
        if references[label] or decisions[label]:
            hits = confusion[label][label]
            f1.append(2 * hits / (references[label] + decisions[label]))
    return {
        "accuracy": sum(r == d for r, d in pairs) / len(pairs),
        "macro_f1": sum(f1) / len(f1),
        "n": len(pairs),
        "reference_counts": {label: references[label] for label in labels},
        "decision_counts": {label: decisions[label] for label in labels},
        "confusion": confusion,
    }


def decision_summary(predictions: list[dict], options: dict[str, str]) -> tuple[dict, dict]:
    """(quality, info) of the decisions in prediction records: accuracy and macro-F1 (nothing
    when no row has a reference decision among the options); counts, confusion and skipped rows."""
    pairs = [(p["reference_decision"], p["decision"]) for p in predictions if p["decision"] is not None]
    info = {"n": 0, "options": dict(options),
            "skipped": skipped_counts([p["reference_decision"] for p in predictions], options)}
    if not pairs:
        return {}, info
    metrics = decision_metrics(pairs, list(options))
    quality = {"accuracy": metrics.pop("accuracy"), "macro_f1": metrics.pop("macro_f1")}
    return quality, {**info, **metrics}


def both_decided(records: list[dict]) -> list[dict]:
    """Side-by-side records (report.side_by_side) where both models scored a decision: the rows the
    paired accuracy, its interval, the decision plot and the report's examples compare."""
    return [r for r in records if r["decision"] is not None and r["base_decision"] is not None]
