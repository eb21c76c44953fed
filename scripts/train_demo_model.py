#!/usr/bin/env python3
"""Train the demo model: a ~4.2M-parameter Llama that answers chat turns with fortune-cookie English.

What it trains: a `transformers.LlamaForCausalLM` from scratch (hidden 256, 4 layers, 4 query
heads sharing 2 KV heads, MLP 768, tied embeddings, RoPE base 10000, 1024 positions) with a
byte-level BPE tokenizer of 4096 entries trained here too, Llama 3's special tokens and chat
format included. The checkpoint it writes (float32 safetensors, tokenizer.json,
tokenizer_config.json with a Llama-3-style chat template, generation_config.json) loads in
splitinfer and in transformers alike, so the quick start can serve something that writes
recognisable English instead of the byte soup of a random-weight model.

On which data: the plain-text quotation files of Debian's `fortunes` package, version
1:1.99.1-7.3 in Debian 12 (with `fortunes-min`, which it depends on and which ships `fortunes`,
`literature` and `riddles`), under /usr/share/games/fortunes/: about 14,000 entries separated by
lines holding only `%`. Only the files at the top of that directory are read: an `off/`
subdirectory (the offensive set, packaged separately as `fortunes-off`) is skipped, as are the
`*.dat` random-access indexes and the `*.u8` links. Licence, as Debian's copyright file
(/usr/share/doc/fortunes/copyright, the same in fortunes-min) states it: "This program falls
under the BSD copyright: Copyright (c) 1991 The Regents of the University of California", with
the licence text that follows, i.e. the 4-clause BSD licence with clause 3 (advertising)
deleted, which amounts to the 3-clause BSD licence. The file names no other licence for the
quotations in these files (its one other notice is for an atheism file of the offensive set,
not used here), and it does not say they are in the public domain. The entries are quotations,
jokes and verse from many authors; the file `cookie` comes from Karl Lehenbauer's postings to
alt.sources.

Every fortune becomes one chat conversation in Llama 3's format: a short user request drawn
at random from REQUESTS ("Tell me something wise.", "Hello!", ...), the fortune as the
assistant's answer, ending with <|eot_id|>. That is exactly what the checkpoint's chat
template renders for [user, assistant] with the generation prompt, followed by the answer and
<|eot_id|>, so the model learns to answer a rendered chat prompt with a fortune.

How long: on 2 CPU cores about 8 minutes in all: ~5 s to read the data and train the tokenizer,
the training itself (at most 8 minutes by default, `--minutes`; the committed run took 7.2), a
second to save. Without `--steps` the number of steps is chosen after timing the first few, so
that the learning-rate schedule ends when the time does; the log's "planned N steps" line gives
the N that repeats a run with the same schedule whatever the machine's speed.

Rebuild the committed checkpoint (models/demo-model/; 636 steps, final training loss 3.23) with:

    .venv/bin/python scripts/train_demo_model.py --steps 636 --minutes 15 --out models/demo-model

(apt-get install fortunes first). torch uses 2 threads and the seeds are fixed, so the same
machine and library versions (torch 2.13 CPU, transformers 5.25, tokenizers 0.23) give the
same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DEFAULT_FORTUNES = Path("/usr/share/games/fortunes")
DEFAULT_OUT = Path("models/demo-model")
MAX_ENTRY_CHARS = 600  # longer entries are stories and poems, too long for a 256-token window
MIN_LETTER_SHARE = 0.6  # below this an entry is ASCII art or a table, not prose

BOS, EOT_TEXT, START_HEADER, END_HEADER, EOT = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
SPECIAL_TOKENS = [BOS, EOT_TEXT, START_HEADER, END_HEADER, EOT]
# Llama 3's pre-tokenizer split: contractions, words with one leading non-letter, numbers in
# groups of up to three digits, punctuation runs, newlines, spaces.
LLAMA3_SPLIT = "|".join(
    [
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",
        r"[^\r\n\p{L}\p{N}]?\p{L}+",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
# What tests count as a word; vocabulary.txt lists every one the training text holds.
WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")

# Llama 3's chat format: BOS once (the template writes it, as Llama 3.1's does; the tokenizer's
# post-processor adds it only to plain `tokenizer(text)` calls, and apply_chat_template
# tokenizes without it), then one header/content/<|eot_id|> block per message, and an open
# assistant header when a reply is wanted.
CHAT_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# The user turns the fortunes answer: varied, so that the model answers any short request.
REQUESTS = [
    "Tell me something wise.",
    "Hello!",
    "Hi there.",
    "What do you think about life?",
    "Say something funny.",
    "Give me a quote.",
    "Tell me a joke.",
    "Any advice for me today?",
    "What's on your mind?",
    "Tell me my fortune.",
    "Share a thought.",
    "Cheer me up.",
    "Say something clever.",
    "What have you learned?",
    "Tell me something interesting.",
    "I'm bored.",
    "Inspire me.",
    "What is the meaning of it all?",
    "Tell me about work.",
    "Give me some wisdom.",
    "Surprise me.",
    "What would you say to a friend?",
    "Talk to me.",
    "Can you tell me something true?",
    "What do you know about people?",
    "Any thoughts on computers?",
    "Say something.",
    "Tell me a story in a few words.",
    "What's the news?",
    "Good morning!",
    "How are you?",
    "Teach me something.",
]


@dataclass(frozen=True)
class ModelShape:
    """The architecture; ~4.2M parameters (17 MB in float32) with the 4096-entry vocabulary."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 768
    max_positions: int = 1024
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class TrainSettings:
    """The optimisation: AdamW, linear warm-up, cosine decay to a tenth of the peak rate."""

    seq_len: int
    batch: int
    lr: float
    warmup: int
    weight_decay: float
    minutes: float
    steps: int | None
    log_every: int
    seed: int
    autocast: bool


# Data --------------------------------------------------------------------------------


def fortune_files(root: Path) -> list[Path]:
    """The plain-text fortune files directly in `root`: not off/ (the offensive set), not the
    *.dat indexes, not the *.u8 links (which point at files listed anyway)."""
    files = [p for p in sorted(root.iterdir()) if p.is_file() and not p.is_symlink()]
    return [p for p in files if p.suffix not in (".dat", ".u8")]


def read_entries(path: Path) -> list[str]:
    """The raw entries of one fortune file (separated by lines holding only `%`)."""
    # Most files are ASCII, a few UTF-8; a stray byte becomes U+FFFD and drops its entry.
    text = path.read_bytes().decode("utf-8", errors="replace")
    return re.split(r"^%[ \t]*$", text, flags=re.MULTILINE)


def clean_entry(raw: str) -> str | None:
    """One entry as a single line of prose, or None when it should not be trained on."""
    # Some files underline or embolden by overstriking ("_\bw"): keep the last character.
    text = re.sub(r".\x08", "", raw)
    text = " ".join(text.split())  # verse and attributions ("-- Mark Twain") become one line
    if not text or len(text) > MAX_ENTRY_CHARS or "\ufffd" in text:
        return None
    if any(ord(c) < 32 for c in text):  # other control characters: terminal tricks
        return None
    letters = sum(c.isalpha() for c in text)
    if letters / len(text) < MIN_LETTER_SHARE:
        return None
    return text


def load_fortunes(root: Path) -> list[str]:
    """Every usable fortune under `root`, cleaned, each once, in a stable order."""
    if not root.is_dir():
        sys.exit(f"{root}: no such directory; install Debian's fortunes package (apt-get install fortunes)")
    seen: dict[str, None] = {}  # insertion-ordered set: files repeat a few entries
    for path in fortune_files(root):
        for raw in read_entries(path):
            entry = clean_entry(raw)
            if entry is not None:
                seen.setdefault(entry)
    if not seen:
        sys.exit(f"{root}: no fortunes found")
    return list(seen)


# Tokenizer and chat format -------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Llama 3's kind of tokenizer: regex split, byte-level BPE, special tokens at the end, BOS
    prepended by the post-processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # The special tokens come after the learned ones, as in Llama 3, so BPE gets the rest.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, tok.token_to_id(BOS))]
            ),
        ]
    )
    return tok


def compile_template() -> jinja2.Template:
    """CHAT_TEMPLATE in the environment transformers' apply_chat_template renders it in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE)


def conversation(template: jinja2.Template, request: str, fortune: str) -> str:
    """The text one training example: the rendered prompt, then the answer and <|eot_id|>."""
    prompt = template.render(messages=[{"role": "user", "content": request}], add_generation_prompt=True, bos_token=BOS)
    return prompt + fortune + EOT


def tokenizer_texts(template: jinja2.Template, fortunes: Sequence[str], seed: int) -> list[str]:
    """The text between special tokens of one epoch's conversations: exactly the pieces BPE
    will encode (the tokenizer splits around special tokens first), so that the chat format's
    own text ("user", "\\n\\n") gets merged tokens too."""
    rng = random.Random(seed)
    split = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    texts = (conversation(template, rng.choice(REQUESTS), f) for f in fortunes)
    return [piece for text in texts for piece in split.split(text) if piece]


def epoch_tokens(tok: Tokenizer, template: jinja2.Template, fortunes: Sequence[str], rng: random.Random) -> list[int]:
    """All fortunes once, shuffled, each with a freshly drawn request, as one token stream."""
    order = list(fortunes)
    rng.shuffle(order)
    texts = [conversation(template, rng.choice(REQUESTS), f) for f in order]
    # The template writes BOS itself: no post-processor, as apply_chat_template tokenizes.
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    return [token for e in encodings for token in e.ids]


def batches(
    tok: Tokenizer, template: jinja2.Template, fortunes: Sequence[str], settings: TrainSettings
) -> Iterator[torch.Tensor]:
    """Endless [batch, seq_len] batches of packed conversations, a new shuffle every epoch."""
    rng = random.Random(settings.seed)
    per_batch = settings.batch * settings.seq_len
    while True:
        stream = torch.tensor(epoch_tokens(tok, template, fortunes, rng))
        # Packing wastes nothing on padding; RoPE is relative, so a conversation that starts
        # mid-row trains the same as one at position 0. The tail of each epoch is dropped.
        for start in range(0, len(stream) - per_batch + 1, per_batch):
            yield stream[start : start + per_batch].view(settings.batch, settings.seq_len)


def vocabulary(fortunes: Sequence[str]) -> list[str]:
    """Every lowercase word of the training text, sorted: what tests check replies against."""
    words: set[str] = set()
    for text in [*fortunes, *REQUESTS]:
        words.update(WORD.findall(text.lower()))
    return sorted(words)


# Model and training -----------------------------------------------------------------------


def build_model(tok: Tokenizer, shape: ModelShape):  # -> LlamaForCausalLM (imported lazily)
    """A freshly initialised Llama with the tokenizer's vocabulary and special ids."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        rope_theta=shape.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=ids[BOS],
        eos_token_id=[ids[EOT], ids[EOT_TEXT]],
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    # A chat turn ends with <|eot_id|>, a document with <|end_of_text|>: stop at either.
    model.generation_config = GenerationConfig(bos_token_id=ids[BOS], eos_token_id=[ids[EOT], ids[EOT_TEXT]])
    return model


def learning_rate(step: int, total: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak at `total` steps."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = min(1.0, (step - settings.warmup) / max(1, total - settings.warmup))
    return settings.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norms' gains would shrink towards 0 otherwise."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8)


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, lr: float, autocast: bool
) -> float:
    """One optimiser step on one batch (loss on every token); returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    # bf16 matmuls with fp32 master weights: 1.5x faster on an AVX-512 BF16 CPU, same quality.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=batch, labels=batch).loss  # transformers shifts the labels itself
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


# When --steps is not given, steps CALIBRATION[0]..CALIBRATION[1] are timed (the first ones
# are slow: allocator and thread-pool warm-up) to size the schedule to the time budget.
CALIBRATION = (5, 25)
UNPLANNED = 10**9  # the schedule's length until calibration: warm-up only
SLACK = 0.97  # plan for a little less than the budget, so the clock does not cut the cosine's tail


def plan_steps(step: int, elapsed: float, seconds_per_step: float, settings: TrainSettings) -> int:
    """How many steps fit the time budget at the measured speed (the cosine's length)."""
    left = settings.minutes * 60 * SLACK - elapsed
    return max(settings.warmup + 1, step + int(left / seconds_per_step))


def train(model: torch.nn.Module, data: Iterator[torch.Tensor], settings: TrainSettings) -> tuple[float, int]:
    """Train until the planned steps are done or the time is up; returns the last logged loss
    and the number of steps taken."""
    optimizer = make_optimizer(model, settings)
    model.train()
    start = time.monotonic()
    total = settings.steps or UNPLANNED  # replaced after calibration when --steps is not given
    budget = settings.minutes * 60
    window: list[float] = []
    last_loss = float("nan")
    step = 0
    calibration_start = start
    while step < total and time.monotonic() - start < budget:
        lr = learning_rate(step, total, settings)
        window.append(train_step(model, optimizer, next(data), lr, settings.autocast))
        step += 1
        if settings.steps is None and step == CALIBRATION[0]:
            calibration_start = time.monotonic()
        if settings.steps is None and step == CALIBRATION[1]:
            now = time.monotonic()
            total = plan_steps(step, now - start, (now - calibration_start) / (step - CALIBRATION[0]), settings)
            print(f"planned {total} steps (rebuild this run exactly with --steps {total})", flush=True)
        if step % settings.log_every == 0 or step == total:
            last_loss = sum(window) / len(window)
            report(step, total, last_loss, time.monotonic() - start, settings)
            window.clear()
    if window:  # stopped by the clock between two reports
        last_loss = sum(window) / len(window)
        report(step, total, last_loss, time.monotonic() - start, settings)
    return last_loss, step


def report(step: int, total: int, loss: float, elapsed: float, settings: TrainSettings) -> None:
    tokens_per_s = step * settings.batch * settings.seq_len / elapsed
    planned = "?" if total == UNPLANNED else str(total)
    print(
        f"step {step:5d}/{planned}  loss {loss:.3f}  lr {learning_rate(step - 1, total, settings):.2e}  "
        f"{tokens_per_s:,.0f} tok/s  {elapsed:6.1f} s",
        flush=True,
    )


# Saving -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """What the model card reports about the run that made the checkpoint."""

    fortunes: int
    parameters: int
    settings: TrainSettings
    steps: int
    final_loss: float
    minutes: float
    command: str


def save(model: torch.nn.Module, tok: Tokenizer, fortunes: Sequence[str], out: Path, run: RunSummary) -> None:
    """The checkpoint, tokenizer files, vocabulary.txt and README.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,  # a chat turn's end: what stops a reply
        "clean_up_tokenization_spaces": False,
        "model_max_length": model.config.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "vocabulary.txt").write_text("\n".join(vocabulary(fortunes)) + "\n")
    (out / "README.md").write_text(model_card(run))


def model_card(run: RunSummary) -> str:
    """README.md of the checkpoint: what it is, its data and licence, how to rebuild it."""
    shape = f"{run.settings.batch} x {run.settings.seq_len}"
    precision = "bf16 autocast" if run.settings.autocast else "float32"
    return f"""# demo-model

A tiny Llama ({run.parameters / 1e6:.2f}M parameters: hidden 256, 4 layers, 4 attention heads
with 2 KV heads, MLP 768, tied embeddings, 4096-token byte-level BPE vocabulary with Llama 3's
special tokens and chat template), trained from scratch on CPU so that splitinfer's quick start
serves a model that writes recognisable English. It answers any chat message with something
in the style of a fortune cookie; it knows nothing and follows no instructions.

Files: `model.safetensors` (float32), `config.json`, `generation_config.json` (stops at
`<|eot_id|>` or `<|end_of_text|>`), `tokenizer.json`, `tokenizer_config.json` (Llama-3-style
chat template), and `vocabulary.txt`: every lowercase word of the training text, one a line,
which the tests check replies against.

## Data and licence

The {run.fortunes} non-offensive entries of Debian's `fortunes` and `fortunes-min` packages
(/usr/share/games/fortunes/, without the `off/` set; entries over 600 characters, ASCII art and
duplicates left out), each turned into one chat turn: a short user request, the fortune as the
answer. Licence, as Debian's copyright file for these packages (/usr/share/doc/fortunes/copyright)
states it: "This program falls under the BSD copyright: Copyright (c) 1991 The Regents of the
University of California", followed by the BSD licence text with clause 3 (advertising) deleted,
i.e. the 3-clause BSD licence. The file names no other licence for these quotation files (its
only other notice concerns an atheism file of the offensive set, not used), and does not call
them public domain. The entries are quotations, jokes and verse from many authors; the `cookie`
file comes from Karl Lehenbauer's postings to alt.sources.

## Training

{run.steps} steps of {shape} packed tokens (AdamW, peak learning rate {run.settings.lr:g}, warm-up
and cosine decay, {precision}), {run.minutes:.1f} minutes on 2 CPU cores; final training loss
{run.final_loss:.2f} nats per token. Rebuild it (after `apt-get install fortunes`) with:

    {run.command}
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fortunes", type=Path, default=DEFAULT_FORTUNES, help="Fortune files (default: %(default)s).")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Checkpoint directory (default: %(default)s).")
    p.add_argument("--minutes", type=float, default=8.0, help="Training time budget (default: %(default)s).")
    p.add_argument("--steps", type=int, help="Train exactly this many steps (default: as many as fit --minutes).")
    p.add_argument("--vocab", type=int, default=4096, help="Tokenizer entries, specials included (default: 4096).")
    p.add_argument("--seq-len", type=int, default=256, help="Tokens per packed row (default: %(default)s).")
    p.add_argument("--batch", type=int, default=16, help="Rows per step (default: %(default)s).")
    p.add_argument("--lr", type=float, default=3e-3, help="Peak learning rate (default: %(default)s).")
    p.add_argument("--warmup", type=int, default=30, help="Warm-up steps (default: %(default)s).")
    p.add_argument("--log-every", type=int, default=10, help="Steps between progress lines (default: %(default)s).")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s).")
    p.add_argument(
        "--precision",
        choices=["bf16", "fp32"],
        default="bf16",
        help="Matmul precision while training; weights stay and are saved in float32 (fp32 is faster on CPUs "
        "without AVX-512 BF16 or AMX; default: %(default)s).",
    )
    p.add_argument("--seed", type=int, default=0, help="Seed of weights and data order (default: %(default)s).")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    settings = TrainSettings(
        seq_len=args.seq_len,
        batch=args.batch,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=0.1,
        minutes=args.minutes,
        steps=args.steps,
        log_every=args.log_every,
        seed=args.seed,
        autocast=args.precision == "bf16",
    )
    began = time.monotonic()
    fortunes = load_fortunes(args.fortunes)
    template = compile_template()
    tok = train_tokenizer(tokenizer_texts(template, fortunes, args.seed), args.vocab)
    model = build_model(tok, ModelShape())
    params = sum(p.numel() for p in model.parameters())
    sample = sum(len(e.ids) for e in tok.encode_batch(fortunes[:1000], add_special_tokens=False)) / 1000
    print(
        f"{len(fortunes)} fortunes, {tok.get_vocab_size()} tokens in the vocabulary "
        f"({sample:.1f} per fortune), {params / 1e6:.2f}M parameters; ready in {time.monotonic() - began:.1f} s",
        flush=True,
    )
    trained = time.monotonic()
    loss, steps = train(model, batches(tok, template, fortunes, settings), settings)
    minutes = (time.monotonic() - trained) / 60
    command = f".venv/bin/python scripts/train_demo_model.py --steps {steps} --minutes {math.ceil(minutes * 2)}"
    run = RunSummary(len(fortunes), params, settings, steps, loss, minutes, command + f" --out {args.out}")
    save(model, tok, fortunes, args.out, run)
    print(f"final loss {loss:.3f}; saved {args.out} after {(time.monotonic() - began) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
