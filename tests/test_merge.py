"""The merge stage: merged weights compute exactly what base + adapter computes."""

import subprocess
import sys
from collections import namedtuple

import pytest
import torch

from stages import merge, paths
from stages.errors import UserError

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _inputs(tokenizer):
    text = "<|begin_of_text|>폐경 후 여성에서 비타민 D 보충은 골절 위험을 낮추는가?"
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")


def test_merged_logits_equal_base_plus_adapter(pipeline_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = pipeline_run / "tiny-base"
    tokenizer = AutoTokenizer.from_pretrained(pipeline_run / paths.MERGED_DIR)
    inputs = _inputs(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(**inputs).logits
        with_adapter = PeftModel.from_pretrained(base, pipeline_run / paths.ADAPTER_DIR).eval()
        adapter_logits = with_adapter(**inputs).logits
        merged = AutoModelForCausalLM.from_pretrained(pipeline_run / paths.MERGED_DIR, dtype=torch.float32).eval()
        merged_logits = merged(**inputs).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-3, "the adapter must change something"
    assert (merged_logits - adapter_logits).abs().max() < 1e-4


def test_merged_folder_is_a_complete_model(pipeline_run):
    names = {p.name for p in (pipeline_run / paths.MERGED_DIR).iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= names
    assert any(name.endswith(".safetensors") for name in names)
    assert not any("adapter" in name for name in names)


def test_a_fresh_process_loads_the_adapter_and_the_merged_model(pipeline_run):
    script = f"""
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
merged = AutoModelForCausalLM.from_pretrained("{pipeline_run / paths.MERGED_DIR}")
tokenizer = AutoTokenizer.from_pretrained("{pipeline_run / paths.MERGED_DIR}")
base = AutoModelForCausalLM.from_pretrained("{pipeline_run / 'tiny-base'}")
adapted = PeftModel.from_pretrained(base, "{pipeline_run / paths.ADAPTER_DIR}")
prompt = tokenizer.apply_chat_template([{{"role": "user", "content": "질문"}}], tokenize=False, add_generation_prompt=True)
print(type(merged).__name__, type(adapted).__name__, prompt.endswith("assistant<|end_header_id|>\\n\\n"))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["LlamaForCausalLM", "PeftModelForCausalLM", "True"]


def test_too_little_memory_is_refused_before_loading(workspace, monkeypatch):
    import psutil

    Memory = namedtuple("Memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(available=1000))
    with pytest.raises(UserError, match="merge needs about .* GiB of free memory"):
        merge.check_resources(16 * 2**30, "cpu")


def test_merge_without_an_adapter_says_what_to_run(workspace, capsys):
    with pytest.raises(SystemExit):
        merge.main()
    assert "models/adapter holds no adapter; run `dvc repro train` first" in capsys.readouterr().err
