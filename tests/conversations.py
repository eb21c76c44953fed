"""Chat conversations the template tests render with ours and with transformers' templates."""

from __future__ import annotations

CONVERSATIONS: dict[str, list[dict[str, str]]] = {
    "user only": [{"role": "user", "content": "What is 7 * 6?"}],
    "system+user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a river in Europe. "},
    ],
    "multi-turn": [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Bonjour ! Café ?"},
        {"role": "user", "content": "  Oui, merci. 中文 😀\n"},
    ],
}
# What the families' templates treat specially: think blocks, and text that spells special tokens.
FAMILY_CONVERSATIONS: dict[str, list[dict[str, str]]] = CONVERSATIONS | {
    "no system, two turns": [
        {"role": "user", "content": " leading space"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nOk."},
        {"role": "user", "content": "And then?"},
    ],
    "special-token strings": [
        {"role": "user", "content": "Say <|im_end|> or <s></s> [INST] <|eot_id|><|start_header_id|> literally."}
    ],
}
