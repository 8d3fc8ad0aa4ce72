"""The fast decoding loop (stages/decoding.py) on the families beside Llama, against generate.

Tiny random models of tools/tiny_model (float32, CPU), 48 wide over 4 heads, so a family that sets
head_dim (16) has it differ from hidden / heads (12), and sliding windows far shorter than the
prompts (55 to 200 tokens), so the window cuts at every step. The checks are tests/test_decoding.py's
for Llama (late stop tokens, caps, slots refilled after a first answer ended); the families the
loop refuses are tested there too (test_sampling_the_param_and_other_models_go_through_generate).
"""

import pytest

from stages.decoding import layer_windows, unsupported
from test_decoding import _check_late_stops_and_refills, _free_and_late_stops, _prompts
from tests.conftest import SAMPLE

# Each: (tiny_model family, config changes (`kind`: another config class), expected layer windows).
FAMILY_CASES = {
    "qwen3": ("qwen3", {}, [None, None]),  # q/k norms; head_dim 16
    "qwen2": ("qwen3", {"kind": "Qwen2", "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
              [None, 16]),  # biased q/k/v; layers from max_window_layers on slide
    "mistral": ("mistral", {"sliding_window": 16}, [16, 16]),  # every layer slides
    "ministral": ("mistral", {"kind": "Ministral", "sliding_window": 16,
                              "layer_types": ["full_attention", "sliding_attention"]}, [None, 16]),
    "exaone4": ("exaone4", {}, [32, None]),  # q/k norms, head_dim 16; the global layer has no rotary embedding
}


def _family_model(name):
    import torch
    import transformers

    from tools.tiny_model import build_model, build_tokenizer, corpus_from

    family, changes, _ = FAMILY_CASES[name]
    tokenizer = build_tokenizer(corpus_from(SAMPLE), family=family)
    model = build_model(tokenizer, hidden_size=48, family=family, seed=2)
    if changes:
        changes = dict(changes)
        kind = changes.pop("kind", type(model.config).__name__.removesuffix("Config"))
        settings = {key: value for key, value in model.config.to_dict().items()
                    if key not in ("layer_types", "model_type", "architectures", "transformers_version")}
        torch.manual_seed(0)
        config = getattr(transformers, f"{kind}Config")(**{**settings, **changes})
        model = getattr(transformers, f"{kind}ForCausalLM")(config)
    return model.eval(), tokenizer


@pytest.fixture(scope="module", params=sorted(FAMILY_CASES))
def family_case(request):
    model, tokenizer = _family_model(request.param)
    prompts = _prompts(tokenizer)
    return request.param, model, prompts, _free_and_late_stops(model, prompts)


def test_each_family_writes_what_generate_writes_through_its_windows(family_case):
    name, model, prompts, (free, stops) = family_case
    assert unsupported(model) is None
    assert layer_windows(model.config) == FAMILY_CASES[name][2]
    assert min(map(len, prompts)) > max(window or 0 for window in FAMILY_CASES[name][2])
    _check_late_stops_and_refills(model, prompts, free, stops)
