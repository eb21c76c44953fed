#!/usr/bin/env python3
"""Write a small, deterministic Hugging Face checkpoint of one model family for tests and benchmarks.

The directory it writes (config, safetensors weights, a BPE tokenizer with the family's
special tokens and conventions, a chat template in the family's style, generation config)
has the layout of a real checkpoint of that family and loads in ``transformers``, so
splitinfer can be compared with it token for token:

- llama: Llama 3.1 (byte-level BPE, BOS added by the post-processor, <|eom_id|> and
  <|python_tag|>, <|eom_id|> among generation_config.json's eos ids, Meta's template trimmed,
  with tools in the first user message and results under the ipython header, in
  tokenizer_config.json);
- qwen2: Qwen2.5 (biases on q/k/v, Qwen's NFC + regex byte-level BPE, no BOS, ChatML template
  using namespace, loop controls and raise_exception, tools in the system turn, <tool_call> and
  <tool_response> blocks, several eos ids, a config vocabulary larger than the tokenizer's);
- qwen3: Qwen3 (per-head q/k norms, head_dim not hidden/heads, Qwen2.5's tool conventions and
  Qwen3's think blocks, the template in chat_template.jinja as transformers 5 writes it);
- mistral: Mistral v0.3 (sliding window, SentencePiece-style BPE with byte fallback and the
  "▁" space marker, add_bos_token, [INST] template with [AVAILABLE_TOOLS], [TOOL_CALLS] and
  [TOOL_RESULTS] as a list of named templates).

Every family's template renders tools, tool calls and tool results as the real checkpoint's
does, with the family's tool tokens in the vocabulary.

The same arguments always give byte-identical files.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=512, max_position=2048),
    # About 100M parameters: big enough that CPU benchmarks measure compute, not overhead.
    "bench": dict(layers=12, hidden=768, heads=12, kv_heads=4, intermediate=2048, vocab=32000, max_position=4096),
    # Llama-3.2-1B's shapes (1.24B parameters, 2.5 GB in bf16) with random weights: what the GPU
    # check measures, without a download.
    "llama-3.2-1b": dict(
        layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=8192, vocab=128256, max_position=131072
    ),
}
# The other defaults a preset sets (explicit flags override them too).
PRESET_OPTIONS: dict[str, dict[str, str]] = {
    "tiny": dict(dtype="float32", rope_scaling="none"),
    "bench": dict(dtype="float32", rope_scaling="none"),
    "llama-3.2-1b": dict(dtype="bfloat16", rope_scaling="llama3"),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Weight scales, relative to 1/sqrt(fan_in) so every preset behaves alike. A gain of 2 keeps each
# layer's output larger than its input: with smaller weights random models fall into greedy
# loops of one or two tokens. The embedding gain gives logits a standard deviation of about 2,
# so the top two logits are rarely close enough for rounding to swap them between engines.
MATRIX_GAIN = 2.0
EMBED_GAIN = 2.0
JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
CHAT_TEMPLATE_JINJA = "chat_template.jinja"  # where transformers 5 writes a checkpoint's template
BYTE_ALPHABET = 256  # ByteLevel maps every byte to one printable character.

# Llama 3.1 Instruct, as Meta's template, trimmed: BOS once, a header/content/eot block per
# message, custom tools JSON-listed in the first user message (or, with tools_in_user_message
# false, in the system turn) under Meta's instructions, an assistant's tool call as
# {"name": ..., "parameters": ...} (one per message, as Meta's refuses more), and tool results
# under the ipython header (as JSON unless a plain value: a string is iterable, so it is quoted
# too, as in Meta's). Left out: the knowledge-cutoff and date lines, whose system turn Meta's
# writes even when there is no system message (here: only with one or with tools), and
# builtin_tools (<|python_tag|> calls ending in <|eom_id|>), which no request passes.
LLAMA3_TEMPLATE = """\
{{- bos_token }}
{%- if tools is not defined %}
    {%- set tools = none %}
{%- endif %}
{%- if tools_in_user_message is not defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = none %}
{%- endif %}
{%- if system_message is not none or tools is not none %}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
    {%- if tools is not none %}
        {{- 'Environment: ipython\\n\\n' }}
    {%- endif %}
    {%- if tools is not none and not tools_in_user_message %}
        {{- 'You have access to the following functions. To call a function, please respond with JSON for a '
            'function call.Respond in the format {"name": function name, "parameters": dictionary of argument '
            'name and its value}.Do not use variables.\\n\\n' }}
        {%- for t in tools %}
            {{- (t | tojson(indent=4)) + '\\n\\n' }}
        {%- endfor %}
    {%- endif %}
    {{- (system_message or '') + '<|eot_id|>' }}
{%- endif %}
{%- if tools is not none and tools_in_user_message %}
    {%- if messages | length == 0 %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {%- set first_user_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}
    {{- 'Given the following functions, please respond with a JSON for a function call with its proper '
        'arguments that best answers the given prompt.\\n\\nRespond in the format {"name": function name, '
        '"parameters": dictionary of argument name and its value}.Do not use variables.\\n\\n' }}
    {%- for t in tools %}
        {{- (t | tojson(indent=4)) + '\\n\\n' }}
    {%- endfor %}
    {{- first_user_message + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim
            + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls | length == 1 %}
            {{- raise_exception('This model only supports single tool-calls at once!') }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + '}<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# Qwen's tool list and calling instructions, the same in Qwen2.5's and Qwen3's system turn.
QWEN_TOOLS = """\
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided '
        'with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
        '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": '
        '<args-json-object>}\\n</tool_call>' }}
"""
# Consecutive tool results, as Qwen2.5 and Qwen3 write them: one user turn of <tool_response> blocks.
QWEN_TOOL_RESPONSES = """\
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
"""
# ChatML as Qwen2.5 writes it: a default system prompt, tools listed in the system turn, tool
# calls as <tool_call> blocks (arguments | tojson), and the jinja features real Qwen templates
# rely on (namespace, loop controls, raise_exception).
QWEN2_TEMPLATE = (
    """\
{%- if messages[0].role == 'system' %}
    {%- set system = messages[0].content %}
{%- else %}
    {%- set system = 'You are a helpful assistant.' %}
{%- endif %}
{{- '<|im_start|>system\\n' + system }}
{%- if tools %}
    {{- '\\n\\n' }}
"""
    + QWEN_TOOLS
    + """\
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}
            {{- raise_exception('The system message must come first.') }}
        {%- endif %}
        {%- continue %}
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' + tool_call.arguments | tojson
                + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
"""
    + QWEN_TOOL_RESPONSES
    + """\
    {%- endif %}
{%- endfor %}
{%- if ns.turns == 0 %}
    {{- raise_exception('A conversation needs a user message.') }}
{%- endif %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
)
# Qwen3's ChatML: no default system prompt, tools as in Qwen2.5, earlier assistant turns
# stripped of their <think> blocks, tool-call arguments written as given when they are a
# string, and an empty think block opened when thinking is turned off.
QWEN3_TEMPLATE = (
    """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
"""
    + QWEN_TOOLS
    + """\
    {{- '<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {%- set ns.last_user = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- if loop.index0 < ns.last_user and '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\\n' + content }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or not loop.first %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
"""
    + QWEN_TOOL_RESPONSES
    + """\
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""
)
# Mistral Instruct v0.3, trimmed: BOS, then [INST] user [/INST] assistant</s> with roles
# alternating (tool calls and results aside); a system message is prepended to the last user
# turn when it is the last message; tools as [AVAILABLE_TOOLS] before the last user message
# (string fields written unescaped, as in Mistral's), tool calls as [TOOL_CALLS] [...]</s> and
# results as [TOOL_RESULTS] {...}[/TOOL_RESULTS], each refusing an id that is not 9 characters
# long (Mistral's checks the length only, though its message says alphanumeric).
MISTRAL_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if tools is not defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr('role', 'equalto', 'user') | list %}
{%- set ns = namespace(index=0) %}
{%- for message in loop_messages %}
    {%- if not (message.role == 'tool' or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message['role'] == 'user') != (ns.index % 2 == 0) %}
            {{- raise_exception('After the optional system message, conversation roles must alternate '
                'user/assistant/user/assistant...') }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if tools is not none and message == user_messages[-1] %}
            {{- '[AVAILABLE_TOOLS] [' }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != 'return' %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val | tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ', ' }}
                    {%- endif %}
                {%- endfor %}
                {{- '}}' }}
                {%- if not loop.last %}
                    {{- ', ' }}
                {%- else %}
                    {{- ']' }}
                {%- endif %}
            {%- endfor %}
            {{- '[/AVAILABLE_TOOLS]' }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- '[TOOL_CALLS] [' }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function | tojson %}
            {{- out[:-1] }}
            {%- if tool_call.id is not defined or tool_call.id | length != 9 %}
                {{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ', ' }}
            {%- else %}
                {{- ']' + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] | trim + eos_token }}
    {%- elif message['role'] == 'tool' %}
        {{- '[TOOL_RESULTS] {"content": ' + message.content | string + ', ' }}
        {%- if message.tool_call_id is not defined or message.tool_call_id | length != 9 %}
            {{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial '
            'optional system message!') }}
    {%- endif %}
{%- endfor %}
"""
# Qwen's pre-tokenizer split, as its tokenizer.json (and transformers' Qwen2Tokenizer) has it.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class Family:
    """What one model family writes: its architecture, its config conventions and its tokenizer's."""

    architecture: str
    model_type: str
    tokenizer: str  # "llama3", "qwen" or "sentencepiece": its TOKENIZER_STYLES entry
    template: str
    template_file: str  # "tokenizer_config" (a string), "named" (a list of named templates) or "jinja"
    rope_theta: float
    qkv_bias: bool = False  # always (Qwen2); otherwise --attention-bias decides, where the family has the field
    has_attention_bias_field: bool = False
    qk_norm: bool = False
    head_dim_factor: float = 1.0  # default head_dim, relative to hidden / heads
    sliding_window: int | None = None  # default --sliding-window
    config_vocab_extra: int = 0  # config.json's vocab_size exceeds the tokenizer's by this much
    rms_norm_eps: float = 1e-6


FAMILIES: dict[str, Family] = {
    "llama": Family(
        "LlamaForCausalLM",
        "llama",
        "llama3",
        LLAMA3_TEMPLATE,
        "tokenizer_config",
        500000.0,
        has_attention_bias_field=True,
        rms_norm_eps=1e-5,
    ),
    "qwen2": Family(
        "Qwen2ForCausalLM",
        "qwen2",
        "qwen",
        QWEN2_TEMPLATE,
        "tokenizer_config",
        1000000.0,
        qkv_bias=True,
        config_vocab_extra=6,
    ),
    "qwen3": Family(
        "Qwen3ForCausalLM",
        "qwen3",
        "qwen",
        QWEN3_TEMPLATE,
        "jinja",
        1000000.0,
        has_attention_bias_field=True,
        qk_norm=True,
        head_dim_factor=1.5,
        config_vocab_extra=6,
    ),
    "mistral": Family(
        "MistralForCausalLM", "mistral", "sentencepiece", MISTRAL_TEMPLATE, "named", 1000000.0, sliding_window=40
    ),
}
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama 3.1's tool tokens, which took two of Llama 3's reserved ids: the end of a turn that
# awaits a tool's result, and the start of a call to a built-in tool.
LLAMA31_TOOL_SPECIALS = ["<|eom_id|>", "<|python_tag|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added, but not special (as in Qwen2.5 and Qwen3), so they survive skip_special_tokens.
QWEN_PLAIN_ADDED = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"]
SP_SPECIALS = ["<unk>", "<s>", "</s>"]
# Mistral v0.3's tool control tokens (special, as all its control tokens are), then [INST] [/INST].
SP_TOOL_CONTROL = ["[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
SP_CONTROL = ["[INST]", "[/INST]"]

ENGLISH_TEXT = """\
The morning train was late again, so Maria walked to the station café and ordered a cup of
coffee. She opened her notebook and wrote down the three things she had to finish before
Friday: the report for the council, the letter to her brother, and the list of books for the
school library. It was 7:45 when the train finally arrived, and the platform was crowded with
people who had been waiting for more than twenty minutes.

In the small town where she lived, everyone knew the baker, the postman and the woman who
repaired bicycles. The river ran along the eastern edge of the town, and in summer children
swam near the old stone bridge while their parents sat in the shade of the trees. Nobody could
remember when the bridge was built, but a sign on the wall said 1874.

Computers are very good at following instructions, but they only do exactly what they are
told. A program that reads a file, counts the words and prints the result can be written in a
few lines. What is hard is not the writing; it is knowing what the program should do when the
file is empty, when it is too large to fit in memory, or when it does not exist at all.

"Would you like some tea?" asked the old man. "Yes, please," she answered, "with a little milk
and no sugar." They talked for an hour about the weather, the price of bread, the new road to
the city and the football match on Saturday. When she left, he gave her a jar of honey from his
own bees and told her to come back next week.
"""
# Repeating the prose keeps its merges ahead of the synthetic filler, so real English
# tokenizes into plausible pieces even in the large-vocabulary preset.
ENGLISH_REPEATS = 64


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser; sizes default to None so the preset can fill them in."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    def size(flag: str, text: str) -> None:
        key = flag[2:].replace("-", "_")
        presets = ", ".join(f"{name}: {sizes[key]}" for name, sizes in PRESETS.items())
        p.add_argument(flag, type=int, help=f"{text} ({presets}).")

    p.add_argument("out", type=Path, help="Directory to write the checkpoint into (created if missing).")
    p.add_argument(
        "--family",
        choices=list(FAMILIES),
        default="llama",
        help="Model family: its architecture, tokenizer conventions and chat template (default: %(default)s).",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="Base sizes: 'tiny' (~0.4M parameters), 'bench' (~100M) or 'llama-3.2-1b' (Llama-3.2-1B's "
        "shapes, 1.24B, bf16, llama3 rope scaling); explicit flags override them (default: %(default)s).",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed for the weights and the synthetic tokenizer text (default: %(default)s).",
    )
    size("--layers", "Number of decoder layers")
    size("--hidden", "Hidden (model) dimension")
    size("--heads", "Number of query attention heads")
    size("--kv-heads", "Number of key/value heads, for grouped-query attention")
    p.add_argument(
        "--head-dim",
        type=int,
        help="Dimension of one attention head (default: hidden / heads; qwen3: 1.5 times that, as Qwen3's "
        "head_dim is not hidden / heads either).",
    )
    size("--intermediate", "Hidden dimension of the SwiGLU MLP")
    size("--vocab", "config.json's vocab_size, special tokens included (qwen: the tokenizer has 6 fewer), at least 300")
    size("--max-position", "max_position_embeddings in config.json and the tokenizer's model_max_length")
    p.add_argument(
        "--shards",
        type=int,
        default=1,
        help="Number of safetensors files; more than one also writes model.safetensors.index.json "
        "(default: %(default)s).",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="Dtype the weights are saved in (default: the preset's, float32 but for llama-3.2-1b).",
    )
    p.add_argument(
        "--no-tie",
        action="store_true",
        help="Write a separate lm_head.weight instead of tying it to the input embeddings.",
    )
    p.add_argument(
        "--rope-scaling",
        choices=["none", "llama3", "linear"],
        help="RoPE scaling in config.json: Llama 3.1 style (factor 8, original context a quarter of "
        "--max-position), linear (factor 2), or none (default: the preset's, none but for "
        "llama-3.2-1b).",
    )
    p.add_argument(
        "--rope-theta", type=float, help="RoPE base frequency (default: 500000 for llama, 1000000 for the others)."
    )
    p.add_argument(
        "--attention-bias",
        action="store_true",
        help="Give the q/k/v/o projections bias vectors (llama and qwen3, which have the config field; qwen2 "
        "always has q/k/v biases, mistral never any).",
    )
    p.add_argument(
        "--sliding-window",
        type=int,
        help="Sliding attention window in tokens, 0 for none (mistral: every layer, default 40; qwen2/qwen3: "
        "use_sliding_window with every layer after the first sliding, default none; llama has none).",
    )
    p.add_argument("--force", action="store_true", help="Write into OUT even if it already holds files.")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and validate the command line, filling unset sizes from the chosen preset."""
    p = build_parser()
    args = p.parse_args(argv)

    for key, value in (PRESETS[args.preset] | PRESET_OPTIONS[args.preset]).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    family = FAMILIES[args.family]
    if args.rope_theta is None:
        args.rope_theta = family.rope_theta
    if args.sliding_window is None:
        args.sliding_window = family.sliding_window or 0
    if args.sliding_window < 0:
        p.error(f"--sliding-window must be 0 (none) or positive, got {args.sliding_window}")
    if args.sliding_window and args.family == "llama":
        p.error("--sliding-window: llama has no sliding window")
    if args.attention_bias and not family.has_attention_bias_field:
        p.error(f"--attention-bias: {args.family} has no attention_bias field")
    for flag in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "max_position"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    # transformers' LlamaConfig rejects this even when head_dim is given explicitly.
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    if args.head_dim is None:
        args.head_dim = 2 * round(family.head_dim_factor * args.hidden / args.heads / 2)
    if args.head_dim < 2 or args.head_dim % 2:
        p.error(f"--head-dim must be even and positive (RoPE rotates pairs), got {args.head_dim}")
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not divisible by --kv-heads {args.kv_heads}")
    if args.vocab < 300:
        p.error(f"--vocab must be at least 300 (256 byte tokens + specials + merges), got {args.vocab}")
    if args.rope_theta <= 0:
        p.error(f"--rope-theta must be positive, got {args.rope_theta}")
    if args.rope_scaling == "llama3" and args.max_position < 4:
        p.error("--rope-scaling llama3 needs --max-position >= 4 (the original context is a quarter of it)")
    n_tensors = len(tensor_shapes(args))
    if not 1 <= args.shards <= n_tensors:
        p.error(f"--shards must be between 1 and the number of tensors ({n_tensors}), got {args.shards}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"{args.out} exists and is not a directory")
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        p.error(f"{args.out} is not empty; pass --force to write into it anyway")
    return args


def tensor_shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    """Return every weight name and shape, in the fixed order the random values are drawn."""
    family = FAMILIES[args.family]
    h, q_dim, kv_dim = args.hidden, args.heads * args.head_dim, args.kv_heads * args.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (args.vocab, h)}
    for i in range(args.layers):
        pre = f"model.layers.{i}."
        for proj, (rows, cols) in {"q": (q_dim, h), "k": (kv_dim, h), "v": (kv_dim, h), "o": (h, q_dim)}.items():
            shapes[f"{pre}self_attn.{proj}_proj.weight"] = (rows, cols)
            if args.attention_bias or (family.qkv_bias and proj != "o"):
                shapes[f"{pre}self_attn.{proj}_proj.bias"] = (rows,)
        if family.qk_norm:
            shapes[f"{pre}self_attn.q_norm.weight"] = (args.head_dim,)
            shapes[f"{pre}self_attn.k_norm.weight"] = (args.head_dim,)
        shapes[f"{pre}mlp.gate_proj.weight"] = (args.intermediate, h)
        shapes[f"{pre}mlp.up_proj.weight"] = (args.intermediate, h)
        shapes[f"{pre}mlp.down_proj.weight"] = (h, args.intermediate)
        shapes[f"{pre}input_layernorm.weight"] = (h,)
        shapes[f"{pre}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if args.no_tie:  # Drawn last, so tied and untied models share every other weight.
        shapes["lm_head.weight"] = (args.vocab, h)
    return shapes


def make_weights(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Draw all weights in float32 from one seeded generator, then cast to --dtype."""
    gen = torch.Generator().manual_seed(args.seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in tensor_shapes(args).items():
        t = torch.randn(shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            t = 1.0 + 0.1 * t  # Far enough from 1 that an engine ignoring norm weights disagrees.
        elif name.endswith(".bias"):
            t = t * 0.02
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = t * EMBED_GAIN / args.hidden**0.5
        else:
            t = t * MATRIX_GAIN / shape[1] ** 0.5
        tensors[name] = t.to(DTYPES[args.dtype]).contiguous()
    return tensors


def split_shards(sizes: list[int], n: int) -> list[int]:
    """Return n+1 cut indices splitting sizes, in order, into n non-empty groups of similar byte totals."""
    prefix = [0, *itertools.accumulate(sizes)]
    cuts = [0]
    for k in range(1, n):
        target = prefix[-1] * k / n
        cut = bisect.bisect_left(prefix, target)
        if cut > 0 and target - prefix[cut - 1] < prefix[cut] - target:
            cut -= 1  # The boundary before the crossing tensor lands nearer the target.
        # Leave at least one tensor for this shard and for each shard after it.
        cuts.append(min(max(cut, cuts[-1] + 1), len(sizes) - (n - k)))
    return [*cuts, len(sizes)]


def save_weights(out: Path, tensors: dict[str, torch.Tensor], n_shards: int) -> None:
    """Write model.safetensors, or HF-named shards plus model.safetensors.index.json."""
    metadata = {"format": "pt"}
    if n_shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
        return
    names = list(tensors)
    sizes = [t.numel() * t.element_size() for t in tensors.values()]
    cuts = split_shards(sizes, n_shards)
    weight_map = {}
    for k in range(n_shards):
        file = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        group = names[cuts[k] : cuts[k + 1]]
        save_file({name: tensors[name] for name in group}, str(out / file), metadata=metadata)
        weight_map.update(dict.fromkeys(group, file))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    write_json(out / "model.safetensors.index.json", index)


def training_text(target: int, seed: int, pre: pre_tokenizers.PreTokenizer, space: str) -> list[str]:
    """Return the English prose plus enough distinct synthetic words for BPE to reach target entries.

    BPE keeps merging until every distinct pre-token is one token, so the final vocabulary holds at
    least the alphabet plus one entry per distinct multi-character pre-token: counting those
    tells how many invented words are needed. `space` is how `pre` marks a leading space.
    """
    seen = {piece for line in ENGLISH_TEXT.splitlines() for piece, _ in pre.pre_tokenize_str(line) if len(piece) > 1}
    rng = random.Random(seed)
    onsets = "b c d f g h j k l m n p r s t v w z ch sh th st tr pl br".split()
    vowels = "a e i o u ai ea ou io".split()
    words: list[str] = []
    while BYTE_ALPHABET + len(seen) < target:
        word = "".join(
            rng.choice(onsets) + rng.choice(vowels) + rng.choice(["", "n", "r", "s", "t"])
            for _ in range(rng.randint(1, 4))
        )
        if space + word not in seen:  # Each word follows a space.
            seen.add(space + word)
            words.append(word)
    synthetic = [" " + " ".join(words[i : i + 16]) for i in range(0, len(words), 16)]
    return ENGLISH_TEXT.splitlines() * ENGLISH_REPEATS + synthetic


def train_bpe(tok: Tokenizer, target: int, seed: int, space: str, alphabet: list[str], tool_tokens: int = 0) -> None:
    """Train tok's BPE model on the English prose and synthetic words, to at most `target` entries.

    The text is sized for `target + tool_tokens` entries, as if the family's tool tokens were
    merges: BPE merges the same text in the same order whatever the target, so the tool tokens
    take the places of the last merges and every other token has the id it would have without them.
    """
    trainer = trainers.BpeTrainer(vocab_size=target, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(training_text(target + tool_tokens, seed, tok.pre_tokenizer, space), trainer)


def reserved(count: int, name: str) -> list[str]:
    """Padding tokens (as Llama 3 reserves), so every id below the vocabulary size decodes even if
    training fell short of the target."""
    return [f"<|{name}_{k}|>" for k in range(count)]


def special(tokens: list[str]) -> list[AddedToken]:
    return [AddedToken(t, special=True, normalized=False) for t in tokens]


def build_llama3_tokenizer(vocab: int, seed: int) -> Tokenizer:
    """Llama 3.1's: byte-level BPE, the special tokens last (the tool ones first, in place of
    reserved ids), BOS prepended by the post-processor."""
    target = vocab - len(LLAMA31_TOOL_SPECIALS) - len(LLAMA3_SPECIALS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    train_bpe(tok, target, seed, "Ġ", pre_tokenizers.ByteLevel.alphabet(), len(LLAMA31_TOOL_SPECIALS))
    padding = reserved(target - tok.get_vocab_size(), "reserved_special_token")
    tok.add_special_tokens(special(padding + LLAMA31_TOOL_SPECIALS + LLAMA3_SPECIALS))
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
            ),
        ]
    )
    return tok


def build_qwen_tokenizer(vocab: int, seed: int) -> Tokenizer:
    """Qwen's: NFC, a regex split then byte-level BPE, no BOS; ChatML specials, then tokens that
    are added but not special (tool calls, think blocks, tool responses)."""
    added = QWEN_SPECIALS + QWEN_PLAIN_ADDED
    target = vocab - len(added)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    train_bpe(tok, target, seed, "Ġ", pre_tokenizers.ByteLevel.alphabet())
    tok.add_special_tokens(special(reserved(target - tok.get_vocab_size(), "reserved") + QWEN_SPECIALS))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_PLAIN_ADDED])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def build_sentencepiece_tokenizer(vocab: int, seed: int) -> Tokenizer:
    """Mistral's (and Llama 2's): <unk> <s> </s>, the 256 byte-fallback tokens <0x00>..<0xFF>,
    then BPE over text whose spaces are "▁" (prepended to the first word), BOS prepended by the
    post-processor, and control tokens last (the tool ones, then [INST] [/INST]). Characters
    outside the vocabulary encode as bytes."""
    target = vocab - len(SP_SPECIALS) - BYTE_ALPHABET - len(SP_TOOL_CONTROL) - len(SP_CONTROL)
    trainer_tok = Tokenizer(models.BPE())
    # Trained word by word (split=True); the tokenizer written splits nothing, as Mistral's does,
    # which gives the same tokens since no merge crosses a "▁".
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    train_bpe(trainer_tok, target, seed, "▁", [], len(SP_TOOL_CONTROL))
    trained = json.loads(trainer_tok.to_str())["model"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(BYTE_ALPHABET)]
    learned = sorted(trained["vocab"], key=trained["vocab"].get)
    entries = SP_SPECIALS + byte_tokens + learned + reserved(target - len(learned), "reserved")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(entries)},
            merges=merges,
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    tok.add_special_tokens(special(SP_SPECIALS + SP_TOOL_CONTROL + SP_CONTROL))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


@dataclass(frozen=True)
class TokenizerStyle:
    """One family's tokenizer conventions: how it is built, which tokens config.json (bos, eos)
    and generation_config.json (eos) name, and tokenizer_config.json's own fields."""

    build: Callable[[int, int], Tokenizer]
    bos: str  # config.json's bos_token_id (Qwen names <|endoftext|>, which it never prepends)
    eos: list[str]
    generation_eos: list[str]
    config: dict


TOKENIZER_STYLES = {
    "llama3": TokenizerStyle(
        build_llama3_tokenizer,
        "<|begin_of_text|>",
        ["<|end_of_text|>", "<|eot_id|>"],
        ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],  # Llama 3.1's: a turn may end awaiting a tool
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "tokenizer_class": "PreTrainedTokenizerFast"},
    ),
    "qwen": TokenizerStyle(
        build_qwen_tokenizer,
        "<|endoftext|>",
        ["<|im_end|>"],
        ["<|im_end|>", "<|endoftext|>"],
        {
            "add_bos_token": False,
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "errors": "replace",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
        },
    ),
    "sentencepiece": TokenizerStyle(
        build_sentencepiece_tokenizer,
        "<s>",
        ["</s>"],
        ["</s>"],
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "legacy": False,
            "tokenizer_class": "LlamaTokenizer",
        },
    ),
}


def build_tokenizer(family: Family, vocab: int, seed: int) -> Tokenizer:
    """The family's tokenizer, with `vocab` entries less the family's config surplus."""
    return TOKENIZER_STYLES[family.tokenizer].build(vocab - family.config_vocab_extra, seed)


@dataclass(frozen=True)
class SpecialIds:
    """The ids config.json and generation_config.json name."""

    bos: int | None  # config.json's bos_token_id
    eos: list[int]  # config.json's
    generation_eos: list[int]  # generation_config.json's


def special_ids(family: Family, tok: Tokenizer) -> SpecialIds:
    style = TOKENIZER_STYLES[family.tokenizer]
    ids = tok.token_to_id
    return SpecialIds(ids(style.bos), [ids(t) for t in style.eos], [ids(t) for t in style.generation_eos])


def tokenizer_config(family: Family, tok: Tokenizer, max_position: int) -> dict:
    """Return tokenizer_config.json as transformers writes it for the family's fast tokenizer."""
    added = {
        str(i): {
            "content": t.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t.special,
        }
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }
    config: dict = {"added_tokens_decoder": added} | TOKENIZER_STYLES[family.tokenizer].config
    if family.template_file == "tokenizer_config":
        config["chat_template"] = family.template
    elif family.template_file == "named":
        config["chat_template"] = [{"name": "default", "template": family.template}]
    config |= {
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_position,
    }
    return config


def model_config(args: argparse.Namespace, ids: SpecialIds) -> dict:
    """Return config.json in the family's layout (legacy rope_theta/rope_scaling keys)."""
    family = FAMILIES[args.family]
    rope_scaling = {
        "none": None,
        # original_max_position_embeddings below max_position, so the scaling really changes frequencies.
        "llama3": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": args.max_position // 4,
        },
        "linear": {"rope_type": "linear", "factor": 2.0},
    }[args.rope_scaling]
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab,
        "max_position_embeddings": args.max_position,
        "rms_norm_eps": family.rms_norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": not args.no_tie,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos if len(ids.eos) > 1 else ids.eos[0],
        "torch_dtype": args.dtype,
        # Only used by transformers to initialise weights missing from a checkpoint; none are.
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if family.has_attention_bias_field:
        config["attention_bias"] = args.attention_bias
    if args.family == "llama":
        config["mlp_bias"] = False
    elif args.family == "mistral":
        config["sliding_window"] = args.sliding_window or None
    else:  # Qwen: a window only with use_sliding_window, on the layers from max_window_layers on
        config |= {
            "use_sliding_window": bool(args.sliding_window),
            "sliding_window": args.sliding_window or None,
            "max_window_layers": 1 if args.sliding_window else args.layers,
        }
    return config


def write_json(path: Path, obj: dict) -> None:
    """Write obj as indented JSON with a trailing newline."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_checkpoint(args: argparse.Namespace) -> tuple[int, int]:
    """Write every file of the checkpoint into args.out; return (parameter count, bytes written)."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors*"), out / CHAT_TEMPLATE_JINJA]:  # left by an earlier --force run
        stale.unlink(missing_ok=True)

    family = FAMILIES[args.family]
    tok = build_tokenizer(family, args.vocab, args.seed)
    tok.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", tokenizer_config(family, tok, args.max_position))
    if family.template_file == "jinja":
        (out / CHAT_TEMPLATE_JINJA).write_text(family.template, encoding="utf-8")
    ids = special_ids(family, tok)
    write_json(out / "config.json", model_config(args, ids))
    generation = {"bos_token_id": ids.bos, "eos_token_id": ids.generation_eos}
    write_json(out / "generation_config.json", generation | {"do_sample": True, "temperature": 0.6, "top_p": 0.9})

    tensors = make_weights(args)
    save_weights(out, tensors, args.shards)
    # safetensors creates its files owner-only (0600); give them the umask-derived mode of the JSON files.
    mode = (out / "config.json").stat().st_mode & 0o777
    for weights_file in out.glob("model*.safetensors"):
        weights_file.chmod(mode)
    n_params = sum(t.numel() for t in tensors.values())
    written = [*out.glob("model*.safetensors*"), *(out / name for name in JSON_FILES)]
    n_bytes = sum(f.stat().st_size for f in written)
    return n_params, n_bytes


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    args = parse_args(argv)
    start = time.perf_counter()
    n_params, n_bytes = write_checkpoint(args)
    print(
        f"wrote {args.out}: {n_params:,} parameters, {n_bytes:,} bytes ({time.perf_counter() - start:.2f}s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
