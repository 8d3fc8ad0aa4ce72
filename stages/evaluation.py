"""Scoring a model on the prepared splits: answer-token loss, yes/no/maybe decisions, batched
generation, ROUGE.

Shared by stages/evaluate.py (the fine-tuned, merged model) and stages/evaluate_base.py (the
16-bit base model without the adapter), so both are measured the same way.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from stages import chat_model, paths
from stages.decision import check_same_chat, choose, decision_summary, option_examples, reference_label
from stages.errors import UserError, gpu_memory_advice, progress_bars
from stages.outputs import read_jsonl
from stages.prompt import IGNORE_INDEX, encode, tokenize_example
from stages.rouge import RougeScorer, mean_scores

log = logging.getLogger("stages.evaluate")


def read_split(split: str) -> list[dict]:
    path = paths.split_file(split)
    if not path.exists():
        raise UserError(f"{path} is missing; run `dvc repro prepare` first")
    return read_jsonl(path)


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def progress_bar(total: int, desc: str, unit: str):
    """A tqdm bar on a terminal (stderr), none in a log file: as the train stage's."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress_bars(), dynamic_ncols=True)


def completion_logprobs(model, tokenizer, examples: list[dict], batch_size: int | str, desc: str = "scoring"
                        ) -> list[tuple[float, int]]:
    """(sum of log-probabilities, token count) of each example's labelled tokens, in input order.

    `examples` are `tokenize_example` outputs: prompt tokens masked, completion tokens scored.
    Logits are computed only at scored positions: a full 128k-vocabulary logits tensor for a
    batch of 2k-token rows would need many GB. `batch_size`: rows per pass, or "auto".
    """
    import torch
    import torch.nn.functional as F

    from stages.memory import LOGIT_CHUNK, scoring_rows

    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # less padding
    results: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    device, longest = model.device, max((len(e["input_ids"]) for e in examples), default=1)
    with torch.inference_mode(), progress_bar(len(examples), desc, "row") as bar:
        for batch in _batches(order, scoring_rows(model, longest, batch_size)):
            width = max(len(examples[i]["input_ids"]) for i in batch)
            pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
            input_ids = torch.tensor([pad(examples[i]["input_ids"], tokenizer.pad_token_id) for i in batch],
                                     device=device)
            labels = torch.tensor([pad(examples[i]["labels"], IGNORE_INDEX) for i in batch], device=device)
            attention_mask = torch.tensor([pad([1] * len(examples[i]["input_ids"]), 0) for i in batch], device=device)
            hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                         use_cache=False).last_hidden_state  # a KV cache would only take memory
            # Position t predicts token t+1.
            targets = labels[:, 1:]
            scored = targets != IGNORE_INDEX
            # The head over LOGIT_CHUNK positions at a time: float32 logits take ~0.5 MB a position.
            positions, wanted = hidden[:, :-1][scored], targets[scored]
            token_logprobs = torch.cat([
                -F.cross_entropy(model.get_output_embeddings()(positions[k:k + LOGIT_CHUNK]).float(),
                                 wanted[k:k + LOGIT_CHUNK], reduction="none")
                for k in range(0, len(wanted), LOGIT_CHUNK)]) if len(wanted) else wanted.float()
            sums = torch.zeros(len(batch), dtype=torch.float64, device=device)
            sums.index_add_(0, scored.nonzero()[:, 0], token_logprobs.double())
            for i, total, count in zip(batch, sums.tolist(), scored.sum(dim=1).tolist()):
                results[i] = (total, count)
            bar.update(len(batch))
    return results


def loss_summary(per_row: list[tuple[float, int]]) -> dict[str, float]:
    """Mean cross-entropy per answer token over rows of (sum of log-probabilities, tokens)."""
    total_tokens = sum(count for _, count in per_row)
    if total_tokens == 0:  # a mean over nothing: loss 0 and perplexity 1 would read as a perfect model
        raise UserError(
            f"no answer token to score in {len(per_row)} prepared rows (an empty split, or every answer cut "
            "off); rerun `dvc repro prepare`"
        )
    loss = -sum(total for total, _ in per_row) / total_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "n": len(per_row), "answer_tokens": total_tokens}


def answer_scores(model, tokenizer, rows: list[dict], batch_size: int | str, desc: str = "answer loss"
                  ) -> list[tuple[float, int]]:
    """Per row: (sum of log-probabilities, count) of the reference answer's tokens, as in training."""
    examples = [tokenize_example(tokenizer, r["prompt"], r["completion"]) for r in rows]
    return completion_logprobs(model, tokenizer, examples, batch_size, desc)


def answer_loss(model, tokenizer, rows: list[dict], batch_size: int | str, desc: str = "answer loss"
                ) -> dict[str, float]:
    """Mean cross-entropy per answer token (prompt tokens masked, as in training) and perplexity."""
    return loss_summary(answer_scores(model, tokenizer, rows, batch_size, desc))


def stop_token_ids(model, tokenizer) -> list[int]:
    """Where generation stops: the template's end of turn, the eos, the model's eos ids."""
    return chat_model.stop_token_ids(model.generation_config, tokenizer)


def fast_path_refusal(model, eval_params) -> str | None:
    """Why answers go through transformers' generate instead of stages/decoding.py, or None."""
    from stages.decoding import unsupported

    if eval_params.decoder == "generate":
        return "eval.decoder = generate"
    if eval_params.do_sample:
        return "eval.do_sample = true (the fast loop is greedy)"
    return unsupported(model)


def generate_answers(model, tokenizer, prompts: list[str], eval_params, seed: int, caps: list[int] | None = None
                     ) -> tuple[list[str], dict]:
    """Answer each prompt, greedy unless eval.do_sample, in input order; `caps` (default
    eval.max_new_tokens each) bounds each answer's tokens."""
    from stages.decoding import CHECK_EVERY, SlotDecoder
    from stages.memory import answer_plan, generate_rows

    encoded = [encode(tokenizer, prompt) for prompt in prompts]
    caps = caps or [eval_params.max_new_tokens] * len(prompts)
    stop_ids, longest = stop_token_ids(model, tokenizer), max((len(ids) for ids in encoded), default=1)
    max_len = -(-(longest + max(caps, default=1) + CHECK_EVERY) // 256) * 256  # rounded: splits of similar length plan alike
    refusal = fast_path_refusal(model, eval_params)
    temperature, top_p = eval_params.temperature, eval_params.top_p  # read always: dvc.yaml lists them
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} \
        if eval_params.do_sample else {"do_sample": False, "temperature": None, "top_p": None}
    started = time.perf_counter()
    if refusal is None:
        slots, prefill_tokens = answer_plan(model, len(prompts), longest, max_len, eval_params.batch_size)
        with progress_bar(len(prompts), "generating", "answer") as bar:
            tokens, decoded = SlotDecoder(model, slots, max_len, prefill_tokens).run(encoded, caps, stop_ids,
                                                                                     progress=bar.update)
        cut_off, warmup_s = decoded.cut_off, decoded.warmup_s
    else:
        log.info("answers through transformers' generate: %s", refusal)
        slots = generate_rows(model, len(prompts), longest, max_len, eval_params.batch_size)
        tokens, cut_off = generate_batched(model, tokenizer, encoded, caps, stop_ids, slots, sampling, seed)
        warmup_s = 0.0
    seconds = time.perf_counter() - started
    new_tokens = sum(len(t) for t in tokens)
    answers = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    stats = {
        "new_tokens_per_s": round(new_tokens / seconds, 1) if seconds else 0.0,
        "mean_new_tokens": new_tokens / max(len(prompts), 1),
        "batch_size": slots, "warmup_s": round(warmup_s, 2),
        "decoder": "fast" if refusal is None else "generate", "cut_off": cut_off,
    }
    return answers, stats


def generate_batched(model, tokenizer, encoded: list[list[int]], caps: list[int], stop_ids: list[int],
                     batch_size: int, sampling: dict, seed: int) -> tuple[list[list[int]], list[bool]]:
    """transformers' generate: batches of similar length, left-padded, with `sampling`'s settings."""
    import torch
    from transformers import set_seed

    from stages.slots import until_stop

    set_seed(seed)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    answers, cut_off = [[] for _ in encoded], [False] * len(encoded)
    with torch.inference_mode(), progress_bar(len(encoded), "generating", "answer") as bar:
        for batch in _batches(order, batch_size):
            width = max(len(encoded[i]) for i in batch)
            # Left padding: every prompt ends where generation starts.
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(encoded[i])) + encoded[i] for i in batch])
            attention_mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in batch])
            output = model.generate(
                input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                max_new_tokens=max(caps[i] for i in batch), eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id, top_k=None, **sampling,
            )
            for i, generated in zip(batch, output[:, width:].tolist()):
                answers[i], stopped = until_stop(generated[:caps[i]], stop_ids)
                cut_off[i] = not stopped  # ran into its cap before its end of turn
            bar.update(len(batch))
    return answers, cut_off


def score_decisions(model, tokenizer, rows: list[dict], params) -> tuple[list[dict | None], dict[str, int]]:
    """Per row: the decision and each option's summed log-probability (None for a row without a
    reference decision among the options); and how many tokens each option's reply takes."""
    options, instruction = params.eval.decision_options, params.eval.decision_instruction
    system, include_contexts = params.prompt.system, params.data.include_contexts
    scored = [row for row in rows if reference_label(row, options) is not None]
    examples = []
    for row in scored:
        check_same_chat(tokenizer, row, system, include_contexts)
        examples += option_examples(tokenizer, row, system, include_contexts, instruction, options)
    logprobs = completion_logprobs(model, tokenizer, examples, params.eval.batch_size, "decisions")
    labels = list(options)
    by_id = {}
    for k, row in enumerate(scored):
        per_option = {label: logprobs[k * len(labels) + j][0] for j, label in enumerate(labels)}
        by_id[row["id"]] = {"decision": choose(per_option), "option_logprobs": per_option}
    option_tokens = {label: logprobs[j][1] for j, label in enumerate(labels)} if scored else {}
    return [by_id.get(row["id"]) for row in rows], option_tokens


def peak_memory(model) -> dict:
    """The most GPU memory this process allocated (weights included), when on a GPU."""
    import torch

    if model.device.type != "cuda":
        return {}
    return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@dataclass(frozen=True)
class Evaluation:
    quality: dict  # split -> metric: the numbers a reviewer compares (metrics/eval*.json)
    cost: dict  # speed and seconds per phase (metrics/cost/)
    info: dict  # counts, options, versions (metrics/info/)
    predictions: list[dict]  # one record per test row


def out_of_memory_advice(eval_params) -> str:
    """What to change when evaluation (evaluate or evaluate_base) runs out of GPU memory."""
    size = eval_params.batch_size
    smaller = f"-S eval.batch_size={max(1, size // 2)}" if size != "auto" else (
        "a fixed -S eval.batch_size=4 (auto sizes batches to the memory free when it starts, which another "
        "process may take)")
    return (f"out of GPU memory evaluating at eval.batch_size = {size} and eval.max_new_tokens = "
            f"{eval_params.max_new_tokens}: try {smaller}, or a smaller -S eval.max_new_tokens (each answer "
            "being written holds that many tokens of cache)")


def evaluate_model(model, tokenizer, params) -> Evaluation:
    """Answer loss on validation and test; decisions, answers and ROUGE on test."""
    with gpu_memory_advice(lambda: out_of_memory_advice(params.eval)):
        return _evaluate(model, tokenizer, params)


def _evaluate(model, tokenizer, params) -> Evaluation:
    eval_params, seconds = params.eval, {}
    validation, test = read_split("validation"), read_split("test")
    started = time.perf_counter()
    validation_loss = answer_loss(model, tokenizer, validation, eval_params.batch_size, "validation loss")
    test_scores = answer_scores(model, tokenizer, test, eval_params.batch_size, "test loss")
    test_loss = loss_summary(test_scores)
    seconds["loss"] = time.perf_counter() - started
    log.info("loss: validation %.4f, test %.4f (%.1fs)", validation_loss["loss"], test_loss["loss"], seconds["loss"])

    started = time.perf_counter()
    decisions, option_tokens = score_decisions(model, tokenizer, test, params)
    seconds["decision"] = time.perf_counter() - started
    log.info("decisions: %d of %d test questions scored (%.1fs)",
             sum(d is not None for d in decisions), len(test), seconds["decision"])

    started = time.perf_counter()
    answers, generation = generate_answers(model, tokenizer, [r["prompt"] for r in test], eval_params, params.seed)
    seconds["generation"] = time.perf_counter() - started
    scorer = RougeScorer(eval_params.rouge_tokenizer)
    predictions = []
    for row, answer, cut_off, (logprob, tokens), decided in zip(
            test, answers, generation["cut_off"], test_scores, decisions):
        decided = decided or {}
        predictions.append({
            "id": row["id"], "question": row["question"], "reference": row["answer"], "answer": answer,
            **scorer.score(row["answer"], answer), "cut_off": cut_off,
            "answer_nll": -logprob, "answer_tokens": tokens,
            "reference_decision": row.get("final_decision"),
            "decision": decided.get("decision"), "option_logprobs": decided.get("option_logprobs"),
        })

    decision_quality, decision_info = decision_summary(predictions, eval_params.decision_options)
    if not decision_quality:
        log.warning("no test row has a final_decision among eval.decision_options: no decision accuracy")
    quality = {
        "validation": {key: validation_loss[key] for key in ("loss", "perplexity")},
        "test": {**{key: test_loss[key] for key in ("loss", "perplexity")}, **mean_scores(predictions),
                 "cut_off": sum(generation["cut_off"]) / len(test), **decision_quality},
    }
    log.info("test ROUGE-1/2/L %.4f/%.4f/%.4f, decision accuracy %s; %.1f new tokens/s (%s, %d at once)",
             quality["test"]["rouge1"], quality["test"]["rouge2"], quality["test"]["rougeL"],
             decision_quality.get("accuracy", "n/a"), generation["new_tokens_per_s"], generation["decoder"],
             generation["batch_size"])
    info = {
        "validation": {key: validation_loss[key] for key in ("n", "answer_tokens")},
        "test": {key: test_loss[key] for key in ("n", "answer_tokens")},
        "decision": {**decision_info, "option_tokens": option_tokens},
        "generation": {"mean_new_tokens": generation["mean_new_tokens"], "cut_off": sum(generation["cut_off"]),
                       "max_new_tokens": eval_params.max_new_tokens, "decoder": generation["decoder"]},
        "rouge": scorer.describe(),
        "device": _device_name(model.device),  # what metrics/cost/ was measured on: another one measures anew
    }
    cost = {
        "new_tokens_per_s": generation["new_tokens_per_s"], "batch_size": generation["batch_size"],
        "warmup_s": generation["warmup_s"], "seconds": {phase: round(value, 1) for phase, value in seconds.items()},
        **peak_memory(model),
    }
    return Evaluation(quality, cost, info, predictions)
