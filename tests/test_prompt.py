"""The one chat format shared by prepare, train, evaluate and predict."""

from stages.prompt import (IGNORE_INDEX, build_messages, decision_messages, encode, render_prompt,
                           render_prompt_completion, tokenize_example)


def test_user_turn_holds_question_and_abstract_when_asked():
    with_abstract = build_messages("시스템", "질문?", ["첫 문단.", "둘째 문단."], True, "답.")
    assert [m["role"] for m in with_abstract] == ["system", "user", "assistant"]
    assert with_abstract[1]["content"] == "질문: 질문?\n\n초록:\n첫 문단.\n\n둘째 문단."
    assert with_abstract[0] == {"role": "system", "content": "시스템"}
    assert with_abstract[2] == {"role": "assistant", "content": "답."}
    bare = build_messages("", "질문?", ["첫 문단."], False)
    assert bare == [{"role": "user", "content": "질문?"}]
    assert build_messages("", "질문?", ["첫 문단."]) == build_messages("", "질문?", ["첫 문단."], True)  # default
    assert build_messages("", "질문?", [], True) == bare  # no abstract: the bare question


def test_a_template_that_renders_the_answer_turn_differently_is_refused(tiny_tokenizer):
    import copy

    import pytest

    from stages.errors import UserError

    tokenizer = copy.deepcopy(tiny_tokenizer)
    # The generation prompt says "assistant", the rendered answer turn "model": no prompt + answer split.
    tokenizer.chat_template = (
        "{%- for m in messages %}{{ m['role'] if m['role'] != 'assistant' else 'model' }}: {{ m['content'] }}<|eot_id|>"
        "{%- endfor %}{%- if add_generation_prompt %}assistant: {%- endif %}"
    )
    with pytest.raises(UserError) as error:
        render_prompt_completion(tokenizer, build_messages("", "질문?", [], True, "답."))
    assert str(error.value) == ("the tokenizer's chat template does not render the conversation as prompt + answer "
                                "(it writes the answer's turn differently from the generation prompt); fix its "
                                "chat_template")


def test_the_decision_instruction_follows_the_training_users_turn():
    asked = decision_messages("시스템", "질문?", ["초록."], True, "{options} 중 하나로.", ["예", "아니요"])
    assert asked == [{"role": "system", "content": "시스템"},
                     {"role": "user", "content": "질문: 질문?\n\n초록:\n초록.\n\n예, 아니요 중 하나로."}]
    # without a system prompt the user's turn is the only one; without contexts, the bare question
    assert decision_messages("", "질문?", ["초록."], False, "{options}?", ["yes", "no"]) == [
        {"role": "user", "content": "질문?\n\nyes, no?"}]


def test_prompt_plus_completion_is_the_whole_chat(tiny_tokenizer):
    messages = build_messages("시스템", "질문?", ["문단."], True, "답변입니다.")
    prompt, completion = render_prompt_completion(tiny_tokenizer, messages)
    assert prompt + completion == tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert completion == "답변입니다.<|eot_id|>"
    # Inference builds the same prompt from the chat without the answer.
    assert render_prompt(tiny_tokenizer, messages[:-1]) == prompt
    assert prompt.count("<|begin_of_text|>") == 1


def test_tokenize_example_masks_exactly_the_prompt(tiny_tokenizer):
    prompt, completion = render_prompt_completion(
        tiny_tokenizer, build_messages("시스템", "질문?", [], True, "답변입니다.")
    )
    example = tokenize_example(tiny_tokenizer, prompt, completion)
    n_prompt = len(encode(tiny_tokenizer, prompt))
    assert example["input_ids"][0] == tiny_tokenizer.bos_token_id
    # Plain tokenizer(text) prepends <|begin_of_text|>, as Llama 3's does; the rendered chat already
    # holds it, so encoding must not add a second one.
    assert tiny_tokenizer("질문")["input_ids"][0] == tiny_tokenizer.bos_token_id
    assert example["input_ids"].count(tiny_tokenizer.bos_token_id) == 1
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:] == encode(tiny_tokenizer, completion)
    unmasked = tokenize_example(tiny_tokenizer, prompt, completion, completion_only_loss=False)
    assert unmasked["labels"] == unmasked["input_ids"]
