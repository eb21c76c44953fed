"""JSON schemas, regexes and grammars the structured-output tests share.

Each language is bounded (enums, integer ranges, strings with maxLength, arrays with
maxItems), so that even a random model sampling at temperature 1.5 finishes it within a
few hundred tokens: the tests can demand that every output completes and validates.
"""

from __future__ import annotations

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "email": {"type": "string", "pattern": "^[a-z]{1,6}@[a-z]{1,5}\\.(com|org)$"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo", "Lima"]},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "role", "address"],
    "additionalProperties": False,
}

INVENTORY = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                    "count": {"type": "integer", "minimum": 0, "maximum": 500},
                    "price": {"type": "number", "minimum": 0, "maximum": 1000},
                },
                "required": ["sku", "count"],
                "additionalProperties": False,
            },
        },
        "status": {"enum": ["open", "closed", None]},
    },
    "required": ["items", "status"],
    "additionalProperties": False,
}

SCHEMAS = {"person": PERSON, "inventory": INVENTORY}

EMAIL_REGEX = r"[a-z]{2,8}@[a-z]{2,6}\.(com|net)"
DATE_REGEX = r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
CHOICES = ("positive", "negative", "neutral")

# One grammar in llguidance's Lark and the same language in GBNF (vLLM's guided_grammar).
ARITHMETIC_LARK = """
start: expr
expr: NUMBER (OP NUMBER){0,3}
OP: "+" | "-"
NUMBER: /[1-9][0-9]{0,2}/
"""
ARITHMETIC_GBNF = """
root ::= number (op number)?
op ::= "+" | "-"
number ::= [1-9] [0-9]?
"""
ARITHMETIC_PATTERN = r"[1-9][0-9]{0,2}([+-][1-9][0-9]{0,2}){0,3}"
