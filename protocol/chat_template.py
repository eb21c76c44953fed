"""Chat templates where both sides need them: finding a checkpoint's template (the engine, to
send it in HelloReply) and compiling one in the environment that renders it (the engine checks a
template at start; the servers render it per request, `server/chat_template.py`).

    source = find_chat_template("path/to/checkpoint")
    template = compile_chat_template(source)     # raises ChatTemplateError if it cannot compile

Templates run the way `transformers`' `apply_chat_template` runs them, so a checkpoint renders
here exactly as it does there: a sandboxed, immutable Jinja environment with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, the `{% generation %}` tag (which only marks
assistant text for training masks, so it renders its body), a `tojson` filter that leaves
non-ASCII and HTML characters alone, the globals `raise_exception` and `strftime_now` (Llama 3.1
templates date their system prompt with it), and `namespace` and `dict` limited as transformers
limits them. Templates come from checkpoints, i.e. from strangers, hence the sandbox.
`compile_chat_template` is the one way in.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from splitinfer.protocol.tokenizer import TOKENIZER_CONFIG_JSON, TokenizerFilesError, json_object

# Where transformers 5 writes a checkpoint's chat template, and its other named templates.
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
ADDITIONAL_CHAT_TEMPLATES = "additional_chat_templates"
DEFAULT_TEMPLATE_NAME = "default"
TOOL_TEMPLATE_NAME = "tool_use"  # what transformers renders with when the caller passes tools

logger = logging.getLogger(__name__)


class ChatTemplateError(ValueError):
    """A chat request the template cannot render. `param` names the offending field
    (`messages`, `messages[1].role`, `messages[0].content[2].type`); it is None only when the
    template itself does not compile, which is the operator's problem, not the client's."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def find_chat_template(path: str | Path) -> str | None:
    """The chat template of the checkpoint in `path`, found where transformers 5 finds it;
    None when it has none.

    Template files win, as in transformers' `from_pretrained`: `chat_template.jinja` is the
    template named "default" and `additional_chat_templates/NAME.jinja` the others, and when
    any of them exists tokenizer_config.json's `chat_template` is not read. Otherwise that
    field counts: a string, or a list of `{"name", "template"}` objects.

    This is the template named "default". transformers uses another named template when the
    caller passes tools ("tool_use", which `find_tool_chat_template` finds and the engine
    serves beside this one) or asks for it by name, which a request here cannot; the others
    ("rag", ...) are ignored, with a log line (the engine's --chat-template serves one of them
    instead). Named templates without a "default" give None, where transformers refuses to
    render.

    Raises `TokenizerFilesError` naming the file when one is not UTF-8 or not JSON, or when
    `chat_template` is neither a string nor a list of named templates.
    """
    templates = _named_templates(Path(path))
    ignored = sorted(set(templates) - {DEFAULT_TEMPLATE_NAME, TOOL_TEMPLATE_NAME})
    if ignored:
        logger.info("%s: serving the chat template named 'default'; ignoring %s", path, ", ".join(ignored))
    return templates.get(DEFAULT_TEMPLATE_NAME)


def find_tool_chat_template(path: str | Path) -> str | None:
    """The checkpoint's template named "tool_use", which transformers renders with instead of
    the default one when the caller passes tools; None when it has none (then the default
    template renders tools too). Raises as `find_chat_template`."""
    return _named_templates(Path(path)).get(TOOL_TEMPLATE_NAME)


def _named_templates(path: Path) -> dict[str, str]:
    return _template_files(path) or _tokenizer_config_templates(path / TOKENIZER_CONFIG_JSON)


def _template_files(path: Path) -> dict[str, str]:
    # The same order as transformers: additional_chat_templates/default.jinja would override.
    files = [(DEFAULT_TEMPLATE_NAME, path / CHAT_TEMPLATE_JINJA)]
    files += [(f.name.removesuffix(".jinja"), f) for f in sorted((path / ADDITIONAL_CHAT_TEMPLATES).glob("*.jinja"))]
    return {name: _read_text(file) for name, file in files if file.is_file()}


def _tokenizer_config_templates(file: Path) -> dict[str, str]:
    if not file.is_file():
        return {}
    value = json_object(file.read_bytes()).get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {DEFAULT_TEMPLATE_NAME: value}
    if isinstance(value, list) and all(_is_named_template(entry) for entry in value):
        return {entry["name"]: entry["template"] for entry in value}
    if isinstance(value, dict) and all(isinstance(template, str) for template in value.values()):
        return value  # name -> template, which transformers reads as such too
    raise TokenizerFilesError(
        TOKENIZER_CONFIG_JSON,
        f"chat_template must be a string or a list of {{'name': ..., 'template': ...}} objects, got {value!r:.200}",
    )


def _is_named_template(entry: object) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("template"), str)


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerFilesError(str(file), f"not UTF-8 text ({exc})") from None


def compile_chat_template(source: str) -> jinja2.Template:
    """`source` compiled in the environment that renders it; raises `ChatTemplateError` (param
    None) when it does not compile."""
    try:
        return _environment().from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}", None) from None


# The environment ---------------------------------------------------------------------


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers records where assistant text is,
    for training masks; rendering a prompt needs only its body, in a scope of its own as there."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` and nothing else of the type, as in transformers."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's `namespace`, refusing underscore names (a way into CPython's internals), as
    transformers' does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's own trick: `namespace(self=1)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_namespace_name(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a chat template cannot store {name!r} on a namespace")


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; a prompt wants the JSON as it is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)
