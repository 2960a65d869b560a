"""``testbed:qwen3-shape``: Qwen3's vocabulary size, special ids and chat template, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from egrsd_pl.prompts import PromptBuilder
from egrsd_pl.testbed.build import resolve_model_path
from egrsd_pl.testbed.qwen3_shape import build_qwen3_shape, qwen3_shape_tokenizer, resolve_qwen3_shape

# Qwen3's added tokens (tokenizer_config.json of Qwen/Qwen3-4B), by id.
QWEN3_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|vision_pad|>": 151654,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|file_sep|>": 151664,
    "<tool_response>": 151665,
    "</tool_response>": 151666,
    "<think>": 151667,
    "</think>": 151668,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen3_shape(tmp_path_factory.mktemp("qwen3_shape"))


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


def test_special_tokens_sit_at_qwen3s_ids(tokenizer):
    for text, token_id in QWEN3_IDS.items():
        assert tokenizer.convert_tokens_to_ids(text) == token_id, text
        assert tokenizer.encode(text, add_special_tokens=False) == [token_id], text
    assert len(tokenizer) == 151669  # 151,643 BPE entries + 26 added tokens, as Qwen3
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert tokenizer.bos_token is None
    # As in Qwen3, <think> / </think> are not special: skip_special_tokens keeps them, drops <|im_end|>.
    assert tokenizer.decode([151667, 151668, 151645], skip_special_tokens=True) == "<think></think>"


def test_ordinary_text_round_trips(tokenizer):
    text = "Tom has 12 apples and buys 7 more. How many?\n\nSo \\boxed{19} — done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert max(ids) < 151643 and tokenizer.decode(ids) == text


def test_config_has_qwen3s_shapes(model_dir: Path):
    config = AutoConfig.from_pretrained(model_dir)
    assert config.architectures == ["Qwen3ForCausalLM"] and config.model_type == "qwen3"
    assert config.vocab_size == 151936
    assert config.max_position_embeddings == 40960 and config.head_dim == 128
    assert (config.bos_token_id, config.eos_token_id) == (151643, 151645)


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "<think>\n2 plus 3.\n</think>\n\nIt is 5."},
    {"role": "user", "content": "And 2+4?"},
]


def test_chat_template_renders_as_qwen3(tokenizer):
    # Written by hand from Qwen3's template: the earlier assistant turn loses its reasoning (it comes
    # before the last user query); the generation prompt opens the assistant turn, and with thinking off
    # it also holds the empty thinking block.
    history = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 5.<|im_end|>\n"
        "<|im_start|>user\nAnd 2+4?<|im_end|>\n"
    )
    on = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert on == history + "<|im_start|>assistant\n"
    off = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert off == history + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    # A final assistant turn keeps its reasoning inside <think> ... </think>.
    answered = [*CONVERSATION, {"role": "assistant", "content": "<think>\nfour more\n</think>\n\n6"}]
    assert tokenizer.apply_chat_template(answered, tokenize=False) == (
        history + "<|im_start|>assistant\n<think>\nfour more\n</think>\n\n6<|im_end|>\n"
    )


def test_prompt_builder_ids_end_with_qwen3s_generation_prompt(tokenizer):
    # <|im_start|> assistant \n: 151644, then the ids of "assistant\n"; thinking off adds <think>\n\n</think>\n\n.
    assistant = tokenizer.encode("assistant\n", add_special_tokens=False)
    newlines = tokenizer.encode("\n\n", add_special_tokens=False)
    student = PromptBuilder(tokenizer, student_thinking=True).student_prompt_ids("What is 2+3?")
    assert student[0] == 151644 and student[-1 - len(assistant) :] == [151644, *assistant]
    quiet = PromptBuilder(tokenizer, student_thinking=False).student_prompt_ids("What is 2+3?")
    assert quiet[-(len(newlines) * 2 + 2) :] == [151667, *newlines, 151668, *newlines]


def test_build_is_deterministic(model_dir: Path, tmp_path: Path):
    again = build_qwen3_shape(tmp_path)
    assert (again / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    from safetensors.torch import load_file

    first, second = (
        load_file(str(model_dir / "model.safetensors")),
        load_file(str(again / "model.safetensors")),
    )
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_testbed_name_resolves_and_rejects_unknown_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EGRSD_PL_CACHE", str(tmp_path))
    folder = Path(resolve_model_path("testbed:qwen3-shape?hidden_size=64&num_layers=1"))
    assert folder.parent == tmp_path and (folder / "config.json").is_file()
    assert AutoConfig.from_pretrained(folder).hidden_size == 64
    with pytest.raises(ValueError, match="hidden_width"):
        resolve_qwen3_shape("hidden_width=64")
    assert qwen3_shape_tokenizer().chat_template == AutoTokenizer.from_pretrained(folder).chat_template


@pytest.mark.parametrize(
    ("like", "parameters"),
    # Qwen3-4B: embedding 151,936 x 2,560 (tied) + 36 layers x 100,930,816 + final norm 2,560 = 4,022,468,096;
    # Qwen3-8B: 2 x 151,936 x 4,096 (untied head) + 36 x 192,946,432 + 4,096 = 8,190,735,360 (the model cards' 4.0B / 8.2B).
    [("qwen3-4b", 4_022_468_096), ("qwen3-8b", 8_190_735_360)],
)
def test_like_a_real_model_has_its_exact_shape(like: str, parameters: int):
    from transformers import Qwen3ForCausalLM

    from egrsd_pl.testbed.qwen3_shape import qwen3_shape_config, qwen3_shape_options

    options = qwen3_shape_options(f"like={like}")
    assert options.pop("seed") == 0
    config = qwen3_shape_config(**options)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 128)


def test_single_options_override_like_and_defaults_keep_their_cache_folder(tmp_path: Path):
    from egrsd_pl.testbed.qwen3_shape import cached_qwen3_shape_dir, qwen3_shape_options

    options = qwen3_shape_options("like=qwen3-8b&num_layers=2&seed=3")
    assert options == dict(
        seed=3,
        hidden_size=4096,
        num_layers=2,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=12288,
        tie_embeddings=False,
    )
    assert cached_qwen3_shape_dir(tmp_path, **options).name == "qwen3-shape-v1-h4096-l2-a32-kv8-untied-seed3"
    assert cached_qwen3_shape_dir(tmp_path, **qwen3_shape_options("")).name == "qwen3-shape-v1-h128-l2-seed0"
    with pytest.raises(ValueError, match="like='qwen3-30b-a3b'"):  # a mixture of experts: not a dense shape
        qwen3_shape_options("like=qwen3-30b-a3b")
    # Qwen3-14B / 32B (config.json): 5120 wide, 40 / 64 layers, 40 / 64 query heads, 8 KV heads
    assert qwen3_shape_options("like=qwen3-14b")["num_layers"] == 40
    assert qwen3_shape_options("like=qwen3-32b")["intermediate_size"] == 25600
    with pytest.raises(ValueError, match="must divide"):
        cached_qwen3_shape_dir(tmp_path, **qwen3_shape_options("num_heads=4&num_kv_heads=3"))
