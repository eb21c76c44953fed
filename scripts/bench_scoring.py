#!/usr/bin/env python3
"""Scoring prompts as evaluation harnesses do (log-likelihoods of multiple-choice endings):
the engine's prompt logprobs (`max_tokens` 0) against transformers' batched forward over the
same prompts, on the same machine, in one run.

    python scripts/bench_scoring.py                       # the ~100M 'bench' checkpoint on CPU
    python scripts/bench_scoring.py --model DIR --device cuda --dtype bfloat16

The workload is --questions multiple-choice questions of --choices endings each (a shared
context of --context-tokens random tokens, then an ending of --ending-tokens): one prompt
per (question, ending), as lm-eval sends them, so the default is 1,000 prompts. Both sides
score every token of every prompt (the engine with prompt_logprobs=0, transformers by a
log-softmax over its logits), in fp32 unless --dtype says otherwise. transformers runs padded
batches of --hf-batch prompts (right padding, an attention mask). Each side runs --repeats
times, taking turns, and its best run counts. Prints prompts/s and
scored tokens/s of each, their ratio, and how closely the two agree: the largest difference
of an ending's summed log-likelihood, and the share of questions whose best ending agrees.
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


def workload(vocab: int, questions: int, choices: int, context: int, ending: int) -> list[list[int]]:
    rng = random.Random(0)
    prompts = []
    for _ in range(questions):
        shared = [rng.randrange(vocab) for _ in range(context)]
        prompts += [shared + [rng.randrange(vocab) for _ in range(ending)] for _ in range(choices)]
    return prompts


def engine_scores(core: EngineCore, prompts: list[list[int]]) -> tuple[float, list[list[float]]]:
    """(seconds, each prompt's token logprobs after the first) for every prompt submitted at once."""
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    scores: dict[str, list[float]] = {}
    sync(core.device)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        core.add_request(f"p{i}", prompt, params)
        scores[f"p{i}"] = []
    while core.has_unfinished():
        for out in core.step():
            scores[out.request_id] += [entry.logprob for entry in out.prompt_logprobs or ()]
            if out.finish_reason not in (None, "length"):
                raise RuntimeError(f"{out.request_id} ended with {out.finish_reason}: {out.error}")
    sync(core.device)
    return time.perf_counter() - start, [scores[f"p{i}"] for i in range(len(prompts))]


@torch.inference_mode()
def hf_scores(model, prompts: list[list[int]], batch: int, device: torch.device) -> tuple[float, list[list[float]]]:
    """The same with transformers: padded batches, log-softmax over every position's logits."""
    out: list[list[float]] = []
    sync(device)
    start = time.perf_counter()
    for first in range(0, len(prompts), batch):
        group = prompts[first : first + batch]
        width = max(map(len, group))
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, prompt in enumerate(group):
            ids[row, : len(prompt)] = torch.tensor(prompt)
            mask[row, : len(prompt)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logprobs = model(ids, attention_mask=mask).logits.float().log_softmax(dim=-1)
        picked = logprobs[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2).cpu()
        out += [picked[row, : len(prompt) - 1].tolist() for row, prompt in enumerate(group)]
    sync(device)
    return time.perf_counter() - start, out


def agreement(ours: list[list[float]], theirs: list[list[float]], choices: int, ending: int) -> dict[str, float]:
    """The largest difference of an ending's log-likelihood, and how often the best ending agrees."""
    ll_ours = [sum(s[-ending:]) for s in ours]
    ll_theirs = [sum(s[-ending:]) for s in theirs]
    questions = len(ours) // choices
    same = 0
    for q in range(questions):
        span = range(q * choices, (q + 1) * choices)
        same += max(span, key=ll_ours.__getitem__) == max(span, key=ll_theirs.__getitem__)
    return {
        "max_loglikelihood_difference": max(abs(a - b) for a, b in zip(ll_ours, ll_theirs)),
        "same_best_ending": same / questions,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p, "Both sides'")
    p.add_argument("--questions", type=int, default=250, help="Multiple-choice questions (default: %(default)s).")
    p.add_argument("--choices", type=int, default=4, help="Endings per question (default: %(default)s).")
    p.add_argument("--context-tokens", type=int, default=64, help="Context length (default: %(default)s).")
    p.add_argument("--ending-tokens", type=int, default=16, help="Ending length (default: %(default)s).")
    p.add_argument("--hf-batch", type=int, default=32, help="transformers' batch size (default: %(default)s).")
    p.add_argument("--max-num-seqs", type=int, default=64, help="The engine's max_num_seqs (default: %(default)s).")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="The engine's token budget per step (default: %(default)s).",
    )
    p.add_argument("--repeats", type=int, default=2, help="Runs of each side, taking turns (default: %(default)s).")
    p.add_argument("--json", type=Path, help="Also write the results as JSON to this file.")
    args = p.parse_args()
    model_dir = args.model or build_bench_checkpoint()
    core = EngineCore(
        EngineConfig(
            model=model_dir,
            device=args.device,
            dtype=args.dtype,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            kv_cache_gb=2.0,
        )
    )
    prompts = workload(
        core.model_config.vocab_size, args.questions, args.choices, args.context_tokens, args.ending_tokens
    )
    tokens = sum(len(prompt) for prompt in prompts)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    device = torch.device(args.device)
    engine_scores(core, prompts[: args.choices])  # warm up
    hf_scores(hf, prompts[: args.hf_batch], args.hf_batch, device)
    engine_times, hf_times = [], []
    for repeat in range(args.repeats):  # taking turns, so that a drifting machine slows both alike
        seconds, ours = engine_scores(core, prompts)
        engine_times.append(seconds)
        seconds, theirs = hf_scores(hf, prompts, args.hf_batch, device)
        hf_times.append(seconds)
        print(
            f"repeat {repeat + 1}: engine {engine_times[-1]:.1f} s, transformers {hf_times[-1]:.1f} s", file=sys.stderr
        )
    engine_s, hf_s = min(engine_times), min(hf_times)

    results = {
        "device": str(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "prompts": len(prompts),
        "tokens": tokens,
        "engine_prompts_per_s": len(prompts) / engine_s,
        "engine_tokens_per_s": tokens / engine_s,
        "transformers_prompts_per_s": len(prompts) / hf_s,
        "transformers_tokens_per_s": tokens / hf_s,
        "ratio": hf_s / engine_s,
        "repeats": args.repeats,
        **agreement(ours, theirs, args.choices, args.ending_tokens),
    }
    print(
        f"{len(prompts)} prompts ({args.questions} questions x {args.choices} endings, {tokens} tokens), "
        f"every token scored, {results['device']} {args.dtype}, {results['threads']} threads"
    )
    print(
        f"  engine (prompt_logprobs, max_tokens 0)  {results['engine_prompts_per_s']:8.1f} prompts/s "
        f"{results['engine_tokens_per_s']:9.0f} tok/s"
    )
    print(
        f"  transformers (batches of {args.hf_batch:3d})        {results['transformers_prompts_per_s']:8.1f} "
        f"prompts/s {results['transformers_tokens_per_s']:9.0f} tok/s"
    )
    print(f"  engine / transformers                  {results['ratio']:8.2f}x")
    print(
        f"  agreement: largest log-likelihood difference {results['max_loglikelihood_difference']:.2e}, "
        f"same best ending for {100 * results['same_best_ending']:.1f}% of questions"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
