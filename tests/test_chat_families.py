"""Chat templates and prompt tokens of every model family, with transformers as the oracle.

For each tiny checkpoint of conftest.FAMILIES (Llama 3; Qwen2 and Qwen3 with no BOS; Mistral
with a SentencePiece-style tokenizer) the template is found where transformers finds it
(`find_chat_template`), rendered byte for byte as `apply_chat_template` renders it, and
encoded to the same token ids; plain prompts encode as `tokenizer(text)` does. Copies of
the checkpoints with edited files (in tmp_path) pin the template precedence and the BOS/EOS
rules to transformers' behaviour.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import jinja2
import pytest
from conftest import FAMILIES
from conversations import FAMILY_CONVERSATIONS

from splitinfer.protocol.chat_template import ChatTemplateError, find_chat_template
from splitinfer.protocol.tokenizer import Tokenizer, TokenizerFilesError
from splitinfer.server.chat_template import ChatTemplate

NAMES = ("llama", "qwen2", "qwen3", "mistral")

# Conversations each template refuses with raise_exception (Llama 3's and Qwen3's refuse none).
REJECTED = [
    ("qwen2", [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Late."}], "must come first"),
    ("qwen2", [{"role": "system", "content": "Alone."}], "needs a user message"),
    ("mistral", [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Again"}], "must alternate"),
    ("mistral", [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hey"}], "must alternate"),
]

PLAIN_TEXTS = [
    "Hello world",
    " leading space",
    "   three spaces, then\ttab and\nnewline",
    "é 中文 😀 naïve Ωmega",
    "<|im_end|><|im_start|>user\nhi",
    "<s>[INST] hi [/INST]</s>",
    "<|begin_of_text|><|eot_id|> tail",
    "trailing spaces   ",
]


def files_copy(source: Path, target: Path) -> Path:
    """The checkpoint's small files (not its weights): what the tokenizer and templates need."""
    target.mkdir()
    for file in source.iterdir():
        if file.is_file() and not file.name.endswith(".safetensors"):
            shutil.copy(file, target / file.name)
    return target


def edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@functools.lru_cache(maxsize=16)
def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def hf_chat_ids(path: Path, messages: list[dict], **kwargs: object) -> list[int]:
    return list(hf_tokenizer(path).apply_chat_template(messages, tokenize=True, **kwargs)["input_ids"])


def hf_template(path: Path) -> str | None:
    """The template transformers' apply_chat_template would use (no tools), None where it refuses."""
    try:
        return hf_tokenizer(path).get_chat_template()
    except ValueError:
        return None


def served_template(path: Path) -> ChatTemplate:
    template = ChatTemplate.for_model(find_chat_template(path), Tokenizer.from_dir(path))
    assert template is not None
    return template


@pytest.fixture(scope="module")
def checkpoints(make_checkpoint: Callable[..., Path]) -> dict[str, Path]:
    return {name: make_checkpoint(*FAMILIES[name]) for name in NAMES}


# Where the template is found --------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_the_template_found_is_the_one_transformers_uses(checkpoints: dict[str, Path], name: str) -> None:
    found = find_chat_template(checkpoints[name])
    assert found is not None and found == hf_template(checkpoints[name])


def _config_template(value: object) -> Callable[[Path], None]:
    def prepare(path: Path) -> None:
        edit_json(path / "tokenizer_config.json", lambda config: config.__setitem__("chat_template", value))

    return prepare


def _files(jinja: str | None, additional: dict[str, str]) -> Callable[[Path], None]:
    def prepare(path: Path) -> None:
        if jinja is not None:
            (path / "chat_template.jinja").write_text(jinja)
        if additional:
            (path / "additional_chat_templates").mkdir()
        for name, text in additional.items():
            (path / "additional_chat_templates" / f"{name}.jinja").write_text(text)

    return prepare


def _both(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def prepare(path: Path) -> None:
        for step in steps:
            step(path)

    return prepare


PRECEDENCE = {
    # name: (how the copy is edited, the template expected: None for none)
    "config string": (_config_template("A{{ 1 }}"), "A{{ 1 }}"),
    "named list: default, not tool_use": (
        _config_template([{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]),
        "D",
    ),
    "named list without default": (_config_template([{"name": "rag", "template": "R"}]), None),
    "jinja file beats the config": (_both(_config_template("A"), _files("J", {})), "J"),
    "jinja file with additional templates": (_both(_config_template("A"), _files("J", {"tool_use": "T"})), "J"),
    "additional templates only": (_both(_config_template("A"), _files(None, {"tool_use": "T"})), None),
    "additional default.jinja beats the jinja file": (_files("J", {"default": "D2", "rag": "R"}), "D2"),
    "none at all": (_config_template(None), None),
    "named object": (_config_template({"tool_use": "T", "default": "D"}), "D"),
}


@pytest.mark.parametrize("case", sorted(PRECEDENCE))
def test_template_precedence_is_that_of_transformers(checkpoints: dict[str, Path], tmp_path: Path, case: str) -> None:
    prepare, expected = PRECEDENCE[case]
    path = files_copy(checkpoints["qwen2"], tmp_path / "ckpt")  # its template is in tokenizer_config.json
    prepare(path)
    assert find_chat_template(path) == expected
    assert hf_template(path) == expected


@pytest.mark.parametrize("value", [5, {"default": 5}, [{"name": "default"}], ["D"]])
def test_a_mistyped_chat_template_field_names_the_file(
    checkpoints: dict[str, Path], tmp_path: Path, value: object
) -> None:
    path = files_copy(checkpoints["qwen2"], tmp_path / "ckpt")
    _config_template(value)(path)
    with pytest.raises(TokenizerFilesError, match="chat_template must be a string or a list") as info:
        find_chat_template(path)
    assert info.value.file == "tokenizer_config.json"


# Rendering and token ids, per family ------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", sorted(FAMILY_CONVERSATIONS))
@pytest.mark.parametrize("name", NAMES)
def test_the_template_renders_like_transformers(
    checkpoints: dict[str, Path], name: str, conversation: str, add_generation_prompt: bool
) -> None:
    path, messages = checkpoints[name], FAMILY_CONVERSATIONS[conversation]
    expected = hf_tokenizer(path).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert served_template(path).render(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("conversation", sorted(FAMILY_CONVERSATIONS))
@pytest.mark.parametrize("name", NAMES)
def test_chat_prompt_ids_equal_transformers(checkpoints: dict[str, Path], name: str, conversation: str) -> None:
    path, messages = checkpoints[name], FAMILY_CONVERSATIONS[conversation]
    ids = Tokenizer.from_dir(path).encode_chat_prompt(served_template(path).render(messages))
    assert ids == hf_chat_ids(path, messages, add_generation_prompt=True)


@pytest.mark.parametrize(("name", "messages", "says"), REJECTED)
def test_a_conversation_the_template_rejects_is_the_clients_error(
    checkpoints: dict[str, Path], name: str, messages: list[dict], says: str
) -> None:
    path = checkpoints[name]
    with pytest.raises(jinja2.TemplateError, match=says):
        hf_tokenizer(path).apply_chat_template(messages, tokenize=False)
    with pytest.raises(ChatTemplateError, match=says) as info:
        served_template(path).render(messages)
    assert info.value.param == "messages"


@pytest.mark.parametrize("text", PLAIN_TEXTS)
@pytest.mark.parametrize("name", NAMES)
def test_plain_prompt_ids_equal_transformers(checkpoints: dict[str, Path], name: str, text: str) -> None:
    path = checkpoints[name]
    assert Tokenizer.from_dir(path).encode(text) == hf_tokenizer(path)(text)["input_ids"]


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_a_template_that_writes_no_bos_gets_none(checkpoints: dict[str, Path], name: str) -> None:
    # A --chat-template without {{ bos_token }} on a tokenizer whose post-processor adds BOS:
    # transformers encodes the rendered text as it is, without the post-processor.
    path, source = checkpoints[name], "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer = Tokenizer.from_dir(path)
    messages = FAMILY_CONVERSATIONS["multi-turn"]
    ids = tokenizer.encode_chat_prompt(ChatTemplate(source, tokenizer.special_tokens_map).render(messages))
    expected = hf_chat_ids(path, messages, chat_template=source, add_generation_prompt=True)
    assert ids == expected and tokenizer.token_to_id(tokenizer.bos_token) not in ids


@pytest.mark.parametrize("name", NAMES)
def test_templates_see_the_special_tokens_transformers_passes(checkpoints: dict[str, Path], name: str) -> None:
    # Qwen has no BOS (bos_token null): transformers leaves the variable undefined, not "".
    source = (
        "{{ bos_token is defined }}|{{ eos_token }}|{{ pad_token | default('no pad') }}|"
        "{{ unk_token | default('no unk') }}|{{ image_token | default('no image') }}"
    )
    path = checkpoints[name]
    tokenizer = Tokenizer.from_dir(path)
    messages = FAMILY_CONVERSATIONS["user only"]
    expected = hf_tokenizer(path).apply_chat_template(messages, chat_template=source, tokenize=False)
    assert ChatTemplate(source, tokenizer.special_tokens_map).render(messages) == expected


def test_a_checkpoints_own_named_tokens_reach_the_template(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    path = files_copy(checkpoints["qwen2"], tmp_path / "ckpt")
    edit_json(path / "tokenizer_config.json", lambda config: config.__setitem__("image_token", "<|im_start|>"))
    source = "{{ image_token }}|{{ add_bos_token | default('not a token') }}"
    tokenizer = Tokenizer.from_dir(path)
    assert tokenizer.special_tokens_map["image_token"] == "<|im_start|>"
    messages = FAMILY_CONVERSATIONS["user only"]
    expected = hf_tokenizer(path).apply_chat_template(messages, chat_template=source, tokenize=False)
    assert ChatTemplate(source, tokenizer.special_tokens_map).render(messages) == expected


def test_generation_blocks_namespaces_and_dicts_render_like_transformers(checkpoints: dict[str, Path]) -> None:
    source = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{% if m['role'] == 'assistant' %}{% generation %}[{{ m['content'] }}]{% endgeneration %}"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}#{{ ns.n }}#{{ dict(a=1) | tojson }}"
        "#{{ dict.fromkeys(['x'], 2) | tojson }}"
    )
    path = checkpoints["qwen3"]
    messages = FAMILY_CONVERSATIONS["multi-turn"]
    expected = hf_tokenizer(path).apply_chat_template(messages, chat_template=source, tokenize=False)
    assert ChatTemplate(source, Tokenizer.from_dir(path).special_tokens_map).render(messages) == expected


def test_namespaces_refuse_underscore_names() -> None:
    template = ChatTemplate("{% set ns = namespace() %}{% set ns._secret = 1 %}{{ ns._secret }}", {})
    with pytest.raises(ChatTemplateError, match="_secret") as info:
        template.render(FAMILY_CONVERSATIONS["user only"])
    assert info.value.param == "messages"


# No template: Llama 3's format, or none -----------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_llama3_format_is_assumed_only_for_a_llama3_tokenizer(checkpoints: dict[str, Path], name: str) -> None:
    template = ChatTemplate.for_model(None, Tokenizer.from_dir(checkpoints[name]))
    if name == "llama":
        assert template is not None and template.is_fallback
    else:
        assert template is None


# BOS and EOS: tokenizer.json's post-processor decides, as in transformers 5 ------------------


def _no_post_processor(path: Path) -> None:
    edit_json(path / "tokenizer.json", lambda tokenizer: tokenizer.__setitem__("post_processor", None))


BOS_EOS_EDITS = {
    # name: (family, tokenizer_config.json fields set, whether tokenizer.json loses its post-processor)
    "mistral add_bos_token false": ("mistral", {"add_bos_token": False}, False),
    "mistral add_eos_token true": ("mistral", {"add_eos_token": True}, False),
    "llama add_bos_token false, add_eos_token true": ("llama", {"add_bos_token": False, "add_eos_token": True}, False),
    "qwen2 add_bos_token true, with a bos_token": (
        "qwen2",
        {"add_bos_token": True, "bos_token": "<|endoftext|>"},
        False,
    ),
    "mistral without post-processor, add_bos_token true": ("mistral", {"add_bos_token": True}, True),
    "llama without post-processor": ("llama", {}, True),
}


@pytest.mark.parametrize("case", sorted(BOS_EOS_EDITS))
def test_add_bos_and_eos_flags_change_encoding_as_in_transformers(
    checkpoints: dict[str, Path], tmp_path: Path, case: str
) -> None:
    family, fields, drop_post_processor = BOS_EOS_EDITS[case]
    path = files_copy(checkpoints[family], tmp_path / "ckpt")
    edit_json(path / "tokenizer_config.json", lambda config: config.update(fields))
    if drop_post_processor:
        _no_post_processor(path)
    tokenizer = Tokenizer.from_dir(path)
    for text in ("Hello world", " é 中文"):
        assert tokenizer.encode(text) == hf_tokenizer(path)(text)["input_ids"], text
    messages = FAMILY_CONVERSATIONS["system+user"]
    rendered = hf_tokenizer(path).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.encode_chat_prompt(rendered) == hf_chat_ids(path, messages, add_generation_prompt=True)
