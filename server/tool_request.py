"""A chat request's `tools`, `tool_choice` and `parallel_tool_calls`, validated, and the
constraint that enforces a required or named call.

- `tool_choice: "none"`: the tools are still shown to the chat template (as vLLM does), but
  nothing the model writes is read as a call.
- `"auto"` (the default with tools): the model chooses; what it writes is parsed in its
  family's format (`tool_calls.py`), and a malformed call stays plain content.
- `"required"`, or a named function: a grammar over the family's call format and the tools'
  parameter schemas forces one call (one or more with `parallel_tool_calls`, the default;
  a named function always gets exactly one), so the call always parses and its arguments
  validate.

Each tool's parameters are compiled as a JSON schema here, so a schema llguidance cannot
enforce is a 400 naming `tools[i].function.parameters`, whatever the `tool_choice`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from splitinfer.protocol.constraint import Constraint, ConstraintKind
from splitinfer.protocol.errors import show
from splitinfer.server.errors import bad_request
from splitinfer.server.structured_output import schema_constraint
from splitinfer.server.tool_calls import ToolCallFormat, ToolSpec, ToolStreamParser

MAX_TOOLS = 128  # OpenAI's limit
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
CHOICES = ("none", "auto", "required")


@dataclass(frozen=True, slots=True)
class ToolRequest:
    tools: tuple[ToolSpec, ...]
    template_tools: list[dict]  # the tools as the client sent them, for the chat template
    choice: str  # "none", "auto", "required", or "function" (a named one)
    function: str | None  # the named function's name
    parallel: bool

    @property
    def enforced(self) -> bool:
        """Whether a grammar forces a call (`required`, or a named function)."""
        return self.choice in ("required", "function")

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"

    @property
    def callable_tools(self) -> tuple[ToolSpec, ...]:
        """The tools a call may name: the named one alone, else all."""
        return tuple(t for t in self.tools if self.function in (None, t.name))

    @property
    def names(self) -> frozenset[str]:
        return frozenset(tool.name for tool in self.callable_tools)

    @property
    def parallel_calls(self) -> bool:
        """Whether several calls may come back (never for a named function)."""
        return self.parallel and self.choice != "function"

    def constraint(self, fmt: ToolCallFormat, token_id: Callable[[str], int | None]) -> Constraint:
        """The grammar that forces a well-formed call in `fmt` (for `enforced` requests)."""
        try:
            grammar = fmt.grammar(self.callable_tools, self.parallel_calls, token_id)
        except ValueError as exc:  # the format needs a special token this tokenizer lacks
            raise bad_request(f"'tool_choice' cannot be enforced for this model: {exc}", param="tool_choice") from None
        return Constraint(ConstraintKind.GRAMMAR, grammar)

    def parser(self, fmt: ToolCallFormat) -> ToolStreamParser:
        """A parser for one choice's output: incremental when a grammar guarantees the calls."""
        return fmt.stream_parser(incremental=self.enforced, allowed_names=self.names, parallel=self.parallel_calls)


def parse_tools(body: Mapping) -> ToolRequest | None:
    """The request's tools, or None when it has none and `tool_choice` asks for nothing.
    Raises a 400 `APIError` naming the parameter."""
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or len(tools) > MAX_TOOLS):
        raise bad_request(f"'tools' must be a list of at most {MAX_TOOLS} tools", param="tools")
    specs = tuple(_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools or []))
    names = [spec.name for spec in specs]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise bad_request(f"'tools[{i}].function.name': {name!r} is given twice", param=f"tools[{i}].function.name")
    parallel = body.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise bad_request(
            f"'parallel_tool_calls' must be a boolean, got {_show(parallel)}", param="parallel_tool_calls"
        )
    choice, function = _tool_choice(body.get("tool_choice"), specs)
    if not specs:
        return None
    return ToolRequest(specs, list(tools), choice, function, parallel)


def _tool(tool: object, where: str) -> ToolSpec:
    if not isinstance(tool, Mapping):
        raise bad_request(f"'{where}' must be an object like {{'type': 'function', 'function': ...}}", param=where)
    if tool.get("type") != "function":
        raise bad_request(
            f"'{where}.type' must be 'function' (the only kind of tool), got {_show(tool.get('type'))}",
            param=f"{where}.type",
        )
    function = tool.get("function")
    if not isinstance(function, Mapping):
        raise bad_request(f"'{where}.function' must be an object with a 'name'", param=f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.match(name):
        raise bad_request(
            f"'{where}.function.name' must be 1 to 64 letters, digits, '_' or '-', got {_show(name)}",
            param=f"{where}.function.name",
        )
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"'{where}.function.description' must be a string", param=f"{where}.function.description")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request(f"'{where}.function.strict' must be a boolean", param=f"{where}.function.strict")
    parameters = function.get("parameters")
    if parameters is None:
        return ToolSpec(name, description)
    where = f"{where}.function.parameters"
    if not isinstance(parameters, Mapping):
        raise bad_request(f"'{where}' must be a JSON schema object, got {_show(parameters)}", param=where)
    schema_constraint(parameters, where)  # a 400 if llguidance cannot enforce it
    return ToolSpec(name, description, dict(parameters))


def _tool_choice(value: object, specs: tuple[ToolSpec, ...]) -> tuple[str, str | None]:
    if value is None:
        return ("auto" if specs else "none"), None
    if isinstance(value, str):
        if value not in CHOICES:
            raise bad_request(
                f"'tool_choice' must be 'none', 'auto', 'required' or a named function, got {show(value)}",
                param="tool_choice",
            )
        if value == "required" and not specs:
            raise bad_request("'tool_choice' is 'required' but the request gives no 'tools'", param="tool_choice")
        return value, None
    function = value.get("function") if isinstance(value, Mapping) and value.get("type") == "function" else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str):
        raise bad_request(
            "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    if name not in {spec.name for spec in specs}:
        given = ", ".join(repr(spec.name) for spec in specs) or "none"
        raise bad_request(
            f"'tool_choice' names the function {name!r}, which is not among the request's tools ({given})",
            param="tool_choice",
        )
    return "function", name


def _show(value: object) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {show(value)}"
