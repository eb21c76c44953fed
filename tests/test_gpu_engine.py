"""The engine on a GPU: KV sizing from free memory, no Triton compile once serving, bf16 against
transformers, the device it binds to, and decode without graphs on the torch backend.

Every test here needs CUDA and is skipped without it; `scripts/gpu_check.sh` runs them (with
SPLITINFER_GPU_MODEL set to a checkpoint of Llama-3.2-1B's shapes, so that sizing and sampling
are measured at a real vocabulary; without it the tiny test checkpoint stands in). The CPU
side of the same logic is in tests/test_engine_setup.py.
"""

from __future__ import annotations

import gc
import importlib
import os
import pkgutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from splitinfer.engine import LLM, EngineConfig, EngineCore, SamplingParams
from splitinfer.engine.engine_core import resolve_device
from splitinfer.engine.forward_batch import ForwardBatch

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


@pytest.fixture
def gpu_model(tiny_checkpoint: Path) -> Path:
    return Path(os.environ["SPLITINFER_GPU_MODEL"]) if os.environ.get("SPLITINFER_GPU_MODEL") else tiny_checkpoint


@pytest.fixture(autouse=True)
def release_gpu_memory() -> Iterator[None]:
    """Engines hold most of the GPU (a profiled KV cache takes 90% of it): free each before the next."""
    yield
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_device(0)


def run_to_completion(core: EngineCore) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while core.has_unfinished():
        for out in core.step():
            assert out.error is None, out.error
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


@pytest.mark.skipif(
    not os.environ.get("SPLITINFER_GPU_MODEL"),
    reason="needs SPLITINFER_GPU_MODEL (a real-sized checkpoint: the tiny one would get millions of "
    "KV blocks); scripts/gpu_check.sh sets it",
)
def test_kv_cache_sized_by_profiling_survives_the_largest_steps(gpu_model: Path) -> None:
    """num_kv_blocks unset: the cache takes what a profiled worst-case step leaves of 90% of the
    GPU. Then a full token budget of prefill and a max_num_seqs step sampling with top-p,
    penalties and logprobs must fit, and torch must never have reserved more than 90%."""
    utilization = 0.9
    torch.cuda.reset_peak_memory_stats()
    core = EngineCore(
        EngineConfig(
            model=str(gpu_model),
            device="cuda",
            gpu_memory_utilization=utilization,
            max_num_seqs=256,
            max_num_batched_tokens=8192,
            max_model_len=4096,
        )
    )
    assert core.runner.graph_runner.graphs, "decode graphs were not captured"
    vocab = core.model_config.vocab_size
    for i in range(4):  # 4 x 2048 prompt tokens: one step of the whole 8192-token budget
        core.add_request(
            f"long{i}",
            [(31 * i + j) % vocab for j in range(2048)],
            SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
        )
    core.step()
    assert core.stats().computed_tokens == 8192
    run_to_completion(core)
    busy = SamplingParams(
        max_tokens=4,
        temperature=0.9,
        top_p=0.9,
        top_k=100,
        repetition_penalty=1.1,
        frequency_penalty=0.2,
        logprobs=20,
        ignore_eos=True,
    )
    for i in range(256):
        core.add_request(f"s{i}", [(7 * i + j) % vocab for j in range(16)], busy)
    tokens = run_to_completion(core)
    assert len(tokens) == 256 and all(len(t) == 4 for t in tokens.values())
    total = torch.cuda.mem_get_info()[1]
    assert torch.cuda.max_memory_reserved() <= utilization * total


def jit_functions() -> list:
    """Every @triton.jit kernel of splitinfer.kernels."""
    import triton

    import splitinfer.kernels as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.endswith("_triton"):
            module = importlib.import_module(f"splitinfer.kernels.{info.name}")
            found += [v for v in vars(module).values() if isinstance(v, triton.runtime.JITFunction)]
    return found


def test_serving_compiles_no_kernel_after_start(tiny_checkpoint: Path) -> None:
    """A compile (or a module load) while serving stalls every request for up to seconds and is
    illegal during graph capture. Start-up must compile every variant a step can launch:
    decodes of every bucket, mixed prefill+decode steps, chunked prefill, prefix-cache hits."""
    import triton

    for fn in jit_functions():  # forget what earlier tests compiled in this process
        fn.device_caches.clear()
    core = EngineCore(
        EngineConfig(
            model=str(tiny_checkpoint),
            device="cuda",
            dtype="bfloat16",
            max_num_seqs=32,
            max_num_batched_tokens=96,
            block_size=16,
            num_kv_blocks=512,
            max_model_len=1024,
        )
    )
    compiled: list[str] = []

    def record(*, repr: str, **_: object) -> None:  # noqa: A002 (Triton's keyword)
        compiled.append(repr)

    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    triton.knobs.runtime.jit_cache_hook = record
    try:
        for i in range(3):  # decodes of 3
            core.add_request(f"a{i}", [(11 * i + j) % 500 for j in range(5 + i)], greedy)
        for _ in range(4):
            core.step()
        long_prompt = [(3 * j) % 500 for j in range(300)]  # 300 > 96: chunked, beside the decodes
        core.add_request("long", long_prompt, greedy)
        for i in range(20):  # decodes of up to 23 rows, every bucket on the way
            core.add_request(f"b{i}", [(5 * i + j) % 500 for j in range(3)], greedy)
        run_to_completion(core)
        hits_before = core.stats().kv.prefix_hit_tokens
        core.add_request("hit", long_prompt, greedy)  # all but the last token from the prefix cache
        core.add_request("hit-extended", long_prompt + [1, 2, 3, 4, 5], greedy)
        run_to_completion(core)
    finally:
        triton.knobs.runtime.jit_cache_hook = None
    assert core.stats().kv.prefix_hit_tokens > hits_before
    assert compiled == [], f"compiled while serving: {compiled}"


@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_engine_follows_transformers(make_checkpoint: Callable[..., Path], head_dim: int) -> None:
    """Llama's attention shapes (32 query heads, 8 KV heads, head_dim 64 or 128), bf16, CUDA graphs
    on. The first token's logits match transformers (bf16, sdpa); then along our own greedy
    sequence, teacher-forced through transformers, each of 40 tokens is transformers' argmax or
    within bf16 noise of it (a random model has near-ties that rounding may swap)."""
    from transformers import AutoModelForCausalLM

    path = make_checkpoint(
        "--layers",
        "2",
        "--hidden",
        "1024",
        "--heads",
        "32",
        "--kv-heads",
        "8",
        "--head-dim",
        str(head_dim),
        "--intermediate",
        "2048",
        "--vocab",
        "1024",
        "--dtype",
        "bfloat16",
        "--seed",
        "3",
    )
    prompt = [(13 * j + 5) % 1000 for j in range(50)]
    llm = LLM(path, device="cuda", dtype="bfloat16", num_kv_blocks=128, max_num_seqs=8)
    assert llm.engine.runner.graph_runner.graphs
    out = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    with torch.inference_mode():
        ids = torch.tensor(prompt, device="cuda")
        batch = ForwardBatch.for_prefill([len(prompt)], "cuda")
        ours = llm.engine.model.compute_logits(
            llm.engine.model(ids, torch.arange(len(prompt), device="cuda"), batch), batch.logits_indices
        )[0]
    del llm
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    with torch.inference_mode():
        reference = hf(torch.tensor([prompt + out.token_ids], device="cuda")).logits[0].float()
    first = reference[len(prompt) - 1]
    assert ((ours - first).abs().max() / first.abs().max()).item() < 0.03
    steps = reference[len(prompt) - 1 : len(prompt) - 1 + len(out.token_ids)]
    chosen = steps.gather(1, torch.tensor(out.token_ids, device="cuda")[:, None]).squeeze(1)
    margin = steps.max(dim=1).values - chosen  # 0 where we chose transformers' argmax
    assert len(out.token_ids) == 40
    assert (margin <= 0.05 * steps.abs().max(dim=1).values).all(), margin.tolist()


def test_engine_binds_the_device_it_was_given(tiny_checkpoint: Path) -> None:
    """Triton launches on the current device: an engine on cuda:N must make N current, or its
    kernels run on device 0 with pointers into N. Checked on the last GPU (cuda:0 on a
    one-GPU host), whose greedy tokens must equal those of an engine on cuda:0."""
    last = torch.cuda.device_count() - 1
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3, 4], list(range(40, 90))]

    def generate(device: str) -> list[list[int]]:
        torch.cuda.set_device(0)
        llm = LLM(tiny_checkpoint, device=device, dtype="float32", num_kv_blocks=64)
        assert torch.cuda.current_device() == torch.device(device).index
        assert llm.engine.kv_cache.k.device == torch.device(device)
        return [o.token_ids for o in llm.generate(prompts, params)]

    assert generate(f"cuda:{last}") == generate("cuda:0")
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{last + 1}")


def test_torch_kernel_backend_on_cuda_decodes_without_graphs(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The torch backend syncs in its attention plan (illegal during capture): the engine must
    start with graphs off and decode the same greedy tokens as the Triton kernels (fp32)."""
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3, 4], list(range(40, 90))]

    def generate(backend: str) -> tuple[bool, list[list[int]]]:
        monkeypatch.setenv("SPLITINFER_KERNELS", backend)
        llm = LLM(tiny_checkpoint, device="cuda", dtype="float32", num_kv_blocks=64)
        return bool(llm.engine.runner.graph_runner.graphs), [o.token_ids for o in llm.generate(prompts, params)]

    torch_graphs, torch_tokens = generate("torch")
    triton_graphs, triton_tokens = generate("triton")
    assert not torch_graphs and triton_graphs
    assert torch_tokens == triton_tokens
