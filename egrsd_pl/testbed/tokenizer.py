"""A small byte-level BPE tokenizer with Qwen3's special tokens and chat template, built offline.

The tokenizer is trained with ``tokenizers`` on text from the synthetic generator and wrapped as a
``PreTrainedTokenizerFast``, so it loads with ``AutoTokenizer.from_pretrained`` (and in vLLM) like
any hub tokenizer. It mirrors Qwen3 where the trainer can tell:

- the same pre-tokenisation regex (digits one by one) and byte-level alphabet, so any text
  round-trips;
- ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` as special tokens, ``<think>`` and
  ``</think>`` as added *non-special* tokens (``skip_special_tokens`` keeps them, as in Qwen3);
- ``eos_token = <|im_end|>``, ``pad_token = <|endoftext|>``, no BOS;
- a chat template with Qwen3's rendering of the generation prompt and of ``enable_thinking``.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Qwen2/Qwen3's pre-tokenisation pattern: words, single digits, punctuation runs, newlines, spaces.
_QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's template without tool calls: system / user / assistant turns, the reasoning of the
# final assistant turn rendered inside <think>...</think>, and an empty thinking block in the
# generation prompt when enable_thinking is false.
CHAT_TEMPLATE = """\
{%- set ns = namespace(last_query_index=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_query_index = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}{{- raise_exception('The system message must come first.') }}{%- endif %}
        {{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- else %}
        {{- raise_exception('Unsupported role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 1024, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """Trains the byte-level BPE on ``texts`` and wraps it with Qwen3's special tokens and template.

    Deterministic for a given sequence of texts.

    Args:
        texts: Training text (plain, without special tokens).
        vocab_size: Total vocabulary size including the 256 byte symbols and the added tokens.
        model_max_length: Recorded in the tokenizer config (the model's context length).
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,  # room for <think> and </think>
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_tokens(
        [AddedToken(token, special=False, normalized=False) for token in (THINK_OPEN, THINK_CLOSE)]
    )
    # Constructor arguments, not attributes set afterwards: only these are saved (with transformers 5; e.g. ``padding_side`` set afterwards is lost).
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        padding_side="right",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
