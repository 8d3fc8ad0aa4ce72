"""Scoring a model on the prepared splits: answer-token loss, batched generation, ROUGE.

Shared by stages/evaluate.py (the fine-tuned, merged model) and stages/evaluate_base.py (the
16-bit base model without the adapter), so both are measured the same way.
"""

from __future__ import annotations

import logging
import math
import time

from stages import paths
from stages.errors import UserError
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


def answer_loss(model, tokenizer, rows: list[dict], batch_size: int) -> dict[str, float]:
    """Mean cross-entropy per answer token (prompt tokens masked, as in training) and perplexity.

    Logits are computed only at answer positions: a full 128k-vocabulary logits tensor for a
    batch of 2k-token rows would need many GB.
    """
    import torch
    import torch.nn.functional as F

    examples = [tokenize_example(tokenizer, r["prompt"], r["completion"]) for r in rows]
    examples.sort(key=lambda e: len(e["input_ids"]))  # similar lengths together: less padding
    device = model.device
    total_loss, total_tokens = 0.0, 0
    with torch.inference_mode():
        for batch in _batches(examples, batch_size):
            width = max(len(e["input_ids"]) for e in batch)
            pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
            input_ids = torch.tensor([pad(e["input_ids"], tokenizer.pad_token_id) for e in batch], device=device)
            labels = torch.tensor([pad(e["labels"], IGNORE_INDEX) for e in batch], device=device)
            attention_mask = torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in batch], device=device)
            hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            # Position t predicts token t+1.
            targets = labels[:, 1:]
            scored = targets != IGNORE_INDEX
            logits = model.get_output_embeddings()(hidden[:, :-1][scored]).float()
            total_loss += F.cross_entropy(logits, targets[scored], reduction="sum").item()
            total_tokens += int(scored.sum())
    if total_tokens == 0:  # a mean over nothing: loss 0 and perplexity 1 would read as a perfect model
        raise UserError(
            f"no answer token to score in {len(rows)} prepared rows (an empty split, or every answer cut "
            "off); rerun `dvc repro prepare`"
        )
    loss = total_loss / total_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "n": len(rows), "answer_tokens": total_tokens}


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-turn and end-of-text ids: generation stops at whichever comes first."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    for token in ("<|eot_id|>", tokenizer.eos_token):
        token_id = tokenizer.convert_tokens_to_ids(token) if token else None
        if token_id is not None and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(ids)


def generate_answers(model, tokenizer, prompts: list[str], eval_params, seed: int) -> tuple[list[str], dict]:
    """Answer each prompt: batched, left-padded, greedy unless eval.do_sample. Keeps input order."""
    import torch
    from tqdm.auto import tqdm
    from transformers import set_seed

    set_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers, new_tokens = [""] * len(prompts), 0
    sampling = {"do_sample": True, "temperature": eval_params.temperature, "top_p": eval_params.top_p} \
        if eval_params.do_sample else {"do_sample": False, "temperature": None, "top_p": None}
    stop_ids = stop_token_ids(model, tokenizer)
    started = time.perf_counter()
    with torch.inference_mode(), tqdm(total=len(prompts), desc="generating", unit="answer") as bar:
        for batch in _batches(order, eval_params.batch_size):
            encoded = [encode(tokenizer, prompts[i]) for i in batch]
            width = max(len(ids) for ids in encoded)
            # Left padding: every prompt ends where generation starts.
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in encoded])
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
            output = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                max_new_tokens=eval_params.max_new_tokens,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                top_k=None,
                # A static KV cache lets generate() compile the decoding step on a GPU.
                cache_implementation="static" if eval_params.cache == "static" else None,
                **sampling,
            )
            for i, generated in zip(batch, output[:, width:].tolist()):
                kept = []
                for token in generated:
                    if token in stop_ids:
                        break
                    kept.append(token)
                new_tokens += len(kept)
                answers[i] = tokenizer.decode(kept, skip_special_tokens=True).strip()
            bar.update(len(batch))
    seconds = time.perf_counter() - started
    stats = {
        "new_tokens_per_s": round(new_tokens / seconds, 1) if seconds else 0.0,
        "mean_new_tokens": new_tokens / max(len(prompts), 1),
    }
    return answers, stats


def evaluate_model(model, tokenizer, params) -> tuple[dict, list[dict]]:
    """metrics (nested metric -> split) and one prediction record per test row."""
    eval_params = params.eval
    validation, test = read_split("validation"), read_split("test")
    started = time.perf_counter()
    metrics = {
        "validation": answer_loss(model, tokenizer, validation, eval_params.batch_size),
        "test": answer_loss(model, tokenizer, test, eval_params.batch_size),
    }
    log.info("loss: validation %.4f, test %.4f (%.1fs)", metrics["validation"]["loss"],
             metrics["test"]["loss"], time.perf_counter() - started)
    answers, generation = generate_answers(model, tokenizer, [r["prompt"] for r in test], eval_params, params.seed)
    scorer = RougeScorer(eval_params.rouge_tokenizer)
    predictions = []
    for row, answer in zip(test, answers):
        predictions.append({
            "id": row["id"], "question": row["question"], "reference": row["answer"], "answer": answer,
            **scorer.score(row["answer"], answer),
        })
    metrics["test"].update(mean_scores(predictions))
    metrics["generation"] = {
        **generation, "batch_size": eval_params.batch_size, "max_new_tokens": eval_params.max_new_tokens,
    }
    metrics["rouge_tokenizer"] = scorer.describe()
    log.info("test ROUGE-1/2/L %.4f/%.4f/%.4f; %.1f new tokens/s", metrics["test"]["rouge1"],
             metrics["test"]["rouge2"], metrics["test"]["rougeL"], generation["new_tokens_per_s"])
    return metrics, predictions
