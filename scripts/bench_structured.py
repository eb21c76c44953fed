#!/usr/bin/env python3
"""What grammar-constrained sampling costs: N concurrent requests under one JSON schema
against the same N unconstrained, in one engine, taking turns.

    python scripts/bench_structured.py                    # the ~100M 'bench' checkpoint on CPU
    python scripts/bench_structured.py --model DIR --device cuda --dtype bfloat16

Prints output tokens/s of both and their ratio (each measure --repeats times, taking turns,
the best run counting), the time llguidance spends filling one step's masks (on a thread,
while the forward runs) against the step's whole time, and the compile time of a typical
schema: cold (its first use, after the grammar tokenizer is built) and cached (a repeat,
which costs a lookup and a matcher copy). Greedy decoding; the unconstrained requests
ignore eos, and the schema's language is open-ended (arrays of free strings), so both
sides generate --max-tokens tokens per request.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from bench_engine import add_checkpoint_arguments, build_bench_checkpoint, sync

from splitinfer.engine import EngineConfig, EngineCore, SamplingParams
from splitinfer.engine.grammar import GrammarCompiler
from splitinfer.protocol.constraint import Constraint, ConstraintKind

# A typical response schema: a few typed fields, an enum, and open-ended text.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "verdict": {"enum": ["buy", "skip", "wait"]},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "rating", "verdict", "notes"],
    "additionalProperties": False,
}


def run(
    core: EngineCore, prompts: list[list[int]], max_tokens: int, constraint: Constraint | None
) -> tuple[float, int]:
    """(seconds, output tokens) for every prompt submitted at once."""
    ids = []
    for prompt in prompts:
        rid = f"r{random.getrandbits(64)}"
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=constraint is None, constraint=constraint
        )
        core.add_request(rid, prompt, params)
        ids.append(rid)
    sync(core.device)
    start = time.perf_counter()
    tokens = 0
    while core.has_unfinished():
        tokens += sum(len(out.new_token_ids) for out in core.step())
    sync(core.device)
    return time.perf_counter() - start, tokens


def compile_times(core: EngineCore) -> dict[str, float]:
    """Milliseconds: the grammar tokenizer's build, a cold compile of SCHEMA and a cached one."""
    c = core.model_config
    start = time.perf_counter()
    compiler = GrammarCompiler(c.path / "tokenizer.json", c.vocab_size, sorted(core.stop_ids))
    compiler._tokenizer.result()
    tokenizer_ms = 1e3 * (time.perf_counter() - start)
    constraint = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA))
    start = time.perf_counter()
    compiler.compile(constraint).result().deep_copy()
    cold_ms = 1e3 * (time.perf_counter() - start)
    start = time.perf_counter()
    compiler.compile(constraint).result().deep_copy()
    cached_ms = 1e3 * (time.perf_counter() - start)
    compiler.close()
    return {"grammar_tokenizer_ms": tokenizer_ms, "compile_cold_ms": cold_ms, "compile_cached_ms": cached_ms}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p, "the engine's")
    p.add_argument("--concurrency", type=int, default=32, help="Concurrent requests (default: %(default)s).")
    p.add_argument("--prompt-tokens", type=int, default=64, help="Prompt length (default: %(default)s).")
    p.add_argument("--max-tokens", type=int, default=128, help="Output tokens per request (default: %(default)s).")
    p.add_argument("--repeats", type=int, default=3, help="Runs of each side, taking turns (default: %(default)s).")
    p.add_argument("--json", type=Path, help="Also write the results as JSON to this file.")
    args = p.parse_args()
    model = args.model or build_bench_checkpoint()
    core = EngineCore(
        EngineConfig(
            model=model,
            device=args.device,
            dtype=args.dtype,
            max_num_seqs=max(args.concurrency, 1),
            kv_cache_gb=2.0,
            enable_prefix_caching=False,
        )
    )
    vocab = core.model_config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(args.concurrency)]
    constraint = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA))
    run(core, prompts[:2], 4, constraint)  # warm: the grammar tokenizer, the compile, the kernels

    plain, constrained, mask_ms, step_ms = [], [], [], []
    for repeat in range(args.repeats):
        seconds, tokens = run(core, prompts, args.max_tokens, None)
        plain.append(tokens / seconds)
        filled, fill_s = core.masks.masks_filled, core.masks.mask_seconds
        seconds, tokens = run(core, prompts, args.max_tokens, constraint)
        constrained.append(tokens / seconds)
        rows = core.masks.masks_filled - filled
        steps = rows / args.concurrency
        mask_ms.append(1e3 * (core.masks.mask_seconds - fill_s) / steps)
        step_ms.append(1e3 * seconds / steps)
        print(
            f"repeat {repeat + 1}: unconstrained {plain[-1]:.1f} tok/s, constrained {constrained[-1]:.1f} tok/s "
            f"({tokens} tokens)",
            file=sys.stderr,
        )
    results = {
        "device": str(core.device),
        "dtype": str(core.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "unconstrained_tok_s": max(plain),
        "constrained_tok_s": max(constrained),
        "ratio": max(constrained) / max(plain),
        "mask_fill_ms_per_step": min(mask_ms),
        "step_ms_constrained": min(step_ms),
        **compile_times(core),
    }
    print(f"{args.concurrency} concurrent requests, {args.max_tokens} output tokens each, greedy, {results['device']}")
    print(f"  unconstrained        {results['unconstrained_tok_s']:8.1f} output tok/s")
    print(f"  one JSON schema      {results['constrained_tok_s']:8.1f} output tok/s  (ratio {results['ratio']:.2f})")
    print(
        f"  masks per step       {results['mask_fill_ms_per_step']:8.2f} ms for {args.concurrency} rows "
        f"(step {results['step_ms_constrained']:.1f} ms; filled while the forward runs)"
    )
    print(f"  grammar tokenizer    {results['grammar_tokenizer_ms']:8.1f} ms (once per engine, at start)")
    print(f"  schema compile cold  {results['compile_cold_ms']:8.2f} ms, cached {results['compile_cached_ms']:.3f} ms")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
