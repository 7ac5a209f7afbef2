"""The GPU fast path: CUDA-graph decode with the Triton backend and fused kernels, checked
against HF greedy decoding on the same weights.

The `gpu` tests need CUDA and are skipped elsewhere. The CPU tests run the graph runner's
static-buffer replay path without graphs (kernels routed to their torch references), so its
padding and bookkeeping are checked on every machine; and the GPU benchmark script runs once at
a tiny shape.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from shared.attention import resolve_backend_name
from shared.config import EngineConfig
from shared.cuda_graph import (
    CudaGraphRunner,
    PromptGraphRunner,
    capture_batch_sizes,
    garbage_collected_first,
    prompt_token_counts,
)
from shared.engine_core import EngineCore
from shared.sampling import SamplingParams
from shared.scheduler.scheduler import ScheduleBatch
from tests.engine.hf_reference import hf_greedy
from tests.engine.test_parity import make_prompts, run_alone, run_staggered

ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 12
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def kernel_reference() -> Iterator[None]:
    from kernels.config import reference_mode

    with reference_mode(True):
        yield


def test_capture_batch_sizes() -> None:
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(6) == [1, 2, 4, 6]
    assert capture_batch_sizes(160)[:6] == [1, 2, 4, 8, 16, 24]
    assert capture_batch_sizes(160)[-1] == 160
    assert capture_batch_sizes(20) == [1, 2, 4, 8, 16, 20]


def test_prompt_token_counts() -> None:
    assert prompt_token_counts(16) == [16]
    assert prompt_token_counts(100) == [64, 100]
    assert prompt_token_counts(1024) == [64, 128, 256, 512, 768, 1024]
    assert prompt_token_counts(1000) == [64, 128, 256, 512, 768, 1000]


def test_auto_backend_is_torch_on_cpu_and_triton_on_cuda() -> None:
    assert resolve_backend_name("auto", torch.device("cpu")) == "torch"
    assert resolve_backend_name("auto", torch.device("cuda")) == "triton"
    assert resolve_backend_name("torch", torch.device("cuda")) == "torch"


def test_graph_options_are_validated(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match="cuda_graph_max_bs"):
        EngineConfig.from_options(str(tiny_llama), cuda_graph_max_bs=0)
    with pytest.raises(ValueError, match="cuda_graph_prompt_tokens"):
        EngineConfig.from_options(str(tiny_llama), cuda_graph_prompt_tokens=0)
    config = EngineConfig.from_options(str(tiny_llama), disable_cuda_graph=True)
    assert config.attention_backend == "auto"


def _core_with_static_buffers(path: Path, **options: object) -> tuple[EngineCore, CudaGraphRunner]:
    """A CPU engine whose decode steps go through the graph runner's padded static buffers
    (eagerly: no graphs on CPU), at sizes 1, 2, 4 and 8: 3, 5, 6 or 7 running requests pad up."""
    config = EngineConfig.from_options(
        str(path), device="cpu", attention_backend="triton", chunked_prefill_size=16, **options
    )
    core = EngineCore(config)
    runner = core.runner
    assert runner.graph_runner is None  # CPU: no graphs by default
    graphs = CudaGraphRunner(
        runner.model,
        runner.kv_pool,
        runner.req_pool,
        runner.backend,
        runner.device,
        [1, 2, 4, 8],
        runner.max_context_len,
        capture=False,
    )
    runner.graph_runner = graphs
    return core, graphs


@pytest.mark.parametrize("page_size", [1, 16])
def test_static_buffer_decode_matches_hf_on_cpu(
    tiny_model_factory: Callable[..., Path], kernel_reference: None, page_size: int
) -> None:
    """Decode steps through the graph runner's padded static buffers."""
    path = tiny_model_factory("llama")
    core, graphs = _core_with_static_buffers(path, page_size=page_size)
    prompts = make_prompts(core.runner.vocab_size)
    outputs = run_staggered(core, prompts)
    assert graphs.replays > 0
    for i, ids in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy(path, ids, NEW_TOKENS), f"prompt {i}"


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_static_buffer_prompts_match_hf_on_cpu(
    tiny_model_factory: Callable[..., Path], kernel_reference: None, overlap: bool
) -> None:
    """Prompt steps through the prompt graph runner's padded static buffers (eagerly here): 16-
    token chunks padded up to 4, 8 or 16 tokens and 16 request columns. Staggered, the prompts
    of split mixed steps run eagerly beside their decode rows, never through the prompt runner;
    then each prompt alone, over the prefix the first round cached, takes the runner."""
    path = tiny_model_factory("llama")
    core, _ = _core_with_static_buffers(path, page_size=4, enable_overlap_schedule=overlap)
    runner = core.runner
    prompts_runner = PromptGraphRunner(
        runner.model,
        runner.kv_pool,
        runner.req_pool,
        runner.backend,
        runner.device,
        [4, 8, 16],
        runner.max_context_len,
        capture=False,
    )
    runner.prompt_graphs = prompts_runner
    tokens = [0]  # prompt tokens through the static buffers
    in_split = [False]
    run, split = prompts_runner.run, runner._run_split

    def counting(batch: ScheduleBatch, patch: object = None) -> torch.Tensor:
        assert not in_split[0], "a split step's prompts took the prompt runner"
        tokens[0] += batch.num_tokens
        return run(batch, patch)  # type: ignore[arg-type]

    def splitting(*args: object) -> torch.Tensor:
        in_split[0] = True
        try:
            return split(*args)  # type: ignore[arg-type]
        finally:
            in_split[0] = False

    prompts_runner.run = counting  # type: ignore[method-assign]
    runner._run_split = splitting  # type: ignore[method-assign]
    prompts = make_prompts(runner.vocab_size)
    outputs = run_staggered(core, prompts)
    for i, ids in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy(path, ids, NEW_TOKENS), f"staggered, prompt {i}"
    assert runner.split_steps > 0
    over_prefix = 0
    for i, ids in enumerate(prompts):
        tokens[0] = 0
        got, cached = run_alone(core, f"again{i}", ids)
        assert got == outputs[f"r{i}"], f"alone, prompt {i}"
        assert cached == (len(ids) - 1) // 4 * 4  # the first round's whole pages
        new = len(ids) - cached
        # Every uncached prompt token took the runner, but one alone after a prefix: that step
        # looks like decode (`GraphRunner.can_run`).
        assert tokens[0] == (0 if new == 1 and cached else new), f"alone, prompt {i}"
        over_prefix += cached > 0 and new > 1
    assert over_prefix >= 2


@pytest.mark.parametrize(
    ("arch", "overrides", "overlap"),
    [
        ("llama", {}, False),
        ("llama", {}, True),
        ("mistral", {"sliding_window": 8}, True),  # the window in both halves' attention
        ("qwen3", {}, True),
    ],
    ids=["llama-sync", "llama-overlap", "mistral-window8-overlap", "qwen3-overlap"],
)
def test_split_mixed_steps_match_hf_on_cpu(
    tiny_model_factory: Callable[..., Path],
    kernel_reference: None,
    arch: str,
    overrides: dict[str, int],
    overlap: bool,
) -> None:
    """Split mixed steps: a mixed step's leading decode rows through the graph runner's
    static buffers (eagerly here; on a GPU their graph on a second stream), its prompt chunks
    through the eager forward, logits joined in batch order; with overlap scheduling the decode
    rows' pending tokens reach the graph's inputs."""
    path = tiny_model_factory(arch, **overrides)
    core, graphs = _core_with_static_buffers(path, page_size=4, enable_overlap_schedule=overlap)
    runner = core.runner
    patched: list[bool] = []
    run = graphs.run

    def recording(batch: object, patch: object = None) -> torch.Tensor:
        patched.append(patch is not None)
        return run(batch, patch)  # type: ignore[arg-type]

    graphs.run = recording  # type: ignore[method-assign]
    prompts = make_prompts(runner.vocab_size)
    outputs = run_staggered(core, prompts)
    assert runner.split_steps > 0
    assert any(patched) == overlap  # pending tokens only with overlap scheduling
    for i, ids in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy(path, ids, NEW_TOKENS), f"prompt {i}"


def test_a_split_step_whose_prompt_forward_fails_leaves_the_engine_serving(
    tiny_model_factory: Callable[..., Path], kernel_reference: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prompts' half of a split step raises (as an out-of-memory would) after the decode
    rows ran: the step fails, the engine drops its requests (`fail_all`, as the engine loop
    does) and the next requests decode as HF does."""
    path = tiny_model_factory("llama")
    core, _ = _core_with_static_buffers(path, page_size=4, enable_overlap_schedule=True)
    runner = core.runner
    run = runner._run
    failed: list[int] = []

    def failing(fb: object) -> torch.Tensor:
        if runner.split_steps and not failed:  # the first split step's prompt forward
            failed.append(runner.split_steps)
            raise torch.OutOfMemoryError("out of memory (test)")
        return run(fb)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "_run", failing)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = make_prompts(runner.vocab_size)
    core.add_request(["a"], prompts[0], params)
    with pytest.raises(torch.OutOfMemoryError):
        for step in range(50):
            if step == 2:
                core.add_request(["b"], prompts[1], params)  # arrives while a decodes: a mixed step
            core.step()
    assert failed == [1]
    assert sorted(core.fail_all("engine step failed")) == ["a", "b"]
    core.check_idle()
    outputs = run_staggered(core, prompts[2:])
    assert runner.split_steps > 1
    for i, ids in enumerate(prompts[2:]):
        assert outputs[f"r{i}"] == hf_greedy(path, ids, NEW_TOKENS), f"prompt {i}"


class _Cycle:
    """Garbage only the cyclic collector frees; its finalizer notes that it ran."""

    def __init__(self, name: str, freed: list[str]) -> None:
        self.name, self.freed, self.me = name, freed, self

    def __del__(self) -> None:
        self.freed.append(self.name)


def test_garbage_is_collected_before_a_capture_and_never_during_it() -> None:
    freed: list[str] = []
    _Cycle("before", freed)
    with garbage_collected_first():
        assert "before" in freed and not gc.isenabled()
        _Cycle("during", freed)
        churn: list[list[int]] = [[] for _ in range(100_000)]  # far past the collector's thresholds
        assert "during" not in freed and len(churn) == 100_000
    assert gc.isenabled()
    gc.collect()
    assert "during" in freed
    gc.disable()  # a caller's choice to keep it off is kept
    try:
        with garbage_collected_first():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_gpu_bench_runs_at_a_tiny_shape(tmp_path: Path) -> None:
    """The benchmark script end to end, on the CPU (also on a GPU host, whose memory the engines
    of earlier tests in this process may hold)."""
    out = tmp_path / "bench.json"
    script = str(ROOT / "bench" / "gpu_bench.py")
    cmd = [sys.executable, script, "--preset", "tiny", "--device", "cpu", "--json", str(out)]
    cmd += ["--mixed", "4", "--mixed-chunks", "16,64", "--compare-split-mixed"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tandem"]["decode"]["1"]["tok_s"] > 0
    assert result["hf"]["decode"]["1"]["tok_s"] > 0
    # Prefill against the measured matmul rate (the tiny preset is a dense Llama).
    roof = result["roofline"]
    assert roof["matmul"] == "float32 1024^3" and roof["prefill_tok_s"] > 0
    assert "matmul" in proc.stdout and "the prefill row's roofline" in proc.stdout
    # --mixed: 4 requests decoding, new prompts filling the rest of each step's budget.
    for chunk in (16, 64):
        m = result["tandem"]["mixed"][str(chunk)]
        assert (m["mixed_prompt_tokens"], m["prefill_prompt_tokens"]) == (chunk - 4, chunk)
        assert min(m["decode_ms"], m["mixed_ms"], m["prefill_ms"], m["mixed_flipped_ms"]) > 0
        assert m["mixed_split"] is True  # the default; on a CPU no graphs, so steps run whole
        assert f"budget {chunk}: 4 decoding alone" in proc.stdout


# ---- on the GPU ---------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize(
    ("arch", "overrides", "page_size", "split"),
    [
        # Split mixed steps, the default: a mixed step's decode rows as a graph on a second stream.
        ("llama", {}, 1, True),
        ("llama", {}, 16, True),
        ("qwen3", {}, 16, True),
        ("mistral", {"sliding_window": 8}, 4, True),
        # MLA: absorbed decode in the graphs (the kernel wants a rope key of 16+), fused MoE
        ("deepseek_v2", {"qk_rope_head_dim": 16}, 16, True),
        ("deepseek_v3", {"qk_rope_head_dim": 16}, 1, True),
        # disable_split_mixed_steps: every row of a mixed step in one eager forward
        ("llama", {}, 16, False),
        ("deepseek_v2", {"qk_rope_head_dim": 16}, 16, False),
    ],
    ids=[
        "llama-page1",
        "llama-page16",
        "qwen3-page16",
        "mistral-window8",
        "deepseek_v2",
        "deepseek_v3",
        "llama-whole",
        "deepseek_v2-whole",
    ],
)
def test_cuda_graph_greedy_parity_with_hf(
    tiny_model_factory: Callable[..., Path], arch: str, overrides: dict[str, int], page_size: int, split: bool
) -> None:
    """float32 on the GPU: Triton attention, fused kernels and CUDA-graph decode vs HF on CPU."""
    path = tiny_model_factory(arch, **overrides)
    core = EngineCore(
        EngineConfig.from_options(
            str(path),
            device="cuda",
            dtype="float32",
            page_size=page_size,
            chunked_prefill_size=16,
            cuda_graph_max_bs=6,  # sizes 1, 2, 4, 6: most steps pad
            disable_split_mixed_steps=not split,
            debug_invariants=True,
        )
    )
    assert core.runner.backend.name == "triton"
    graphs = core.runner.graph_runner
    assert graphs is not None and graphs.batch_sizes == [1, 2, 4, 6]
    prompts = make_prompts(core.runner.vocab_size)
    outputs = run_staggered(core, prompts)
    assert graphs.replays > 0
    assert (core.runner.split_steps > 0) == split
    for i, ids in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy(path, ids, NEW_TOKENS), f"prompt {i} (len {len(ids)})"


@gpu
@needs_cuda
def test_an_engine_captures_its_graphs_while_the_last_one_waits_for_the_collector(
    tiny_model_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Engines built one after another in a process, each dropped in a reference cycle (as a
    failed test's engine is): the collector is off for every forward the runner captures (with
    it on, finalizers of the last engines ran mid-capture and invalidated it), and the last
    engine decodes as HF does."""
    path = tiny_model_factory("llama")
    collector_on: list[bool] = []
    run = CudaGraphRunner._run

    def recording(self: CudaGraphRunner, fb: object) -> torch.Tensor:
        collector_on.append(gc.isenabled())
        return run(self, fb)  # type: ignore[arg-type]

    monkeypatch.setattr(CudaGraphRunner, "_run", recording)
    config = EngineConfig.from_options(str(path), device="cuda", dtype="float32", cuda_graph_max_bs=4)
    for _ in range(2):
        dropped = EngineCore(config)
        dropped.runner.cycle = dropped  # type: ignore[attr-defined]
        del dropped
    core = EngineCore(config)
    assert collector_on and not any(collector_on) and gc.isenabled()
    prompts = make_prompts(core.runner.vocab_size)
    outputs = run_staggered(core, prompts)
    for i, ids in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy(path, ids, NEW_TOKENS), f"prompt {i}"


def _step_logits(path: Path, **options: object) -> tuple[EngineCore, list[torch.Tensor]]:
    """One CUDA engine built with `options` (graphs up to batch 8) over five staggered prompts:
    the engine, and a copy of every step's logits in order."""
    core = EngineCore(EngineConfig.from_options(str(path), device="cuda", cuda_graph_max_bs=8, **options))
    logits = _record_logits(core)
    run_staggered(core, make_prompts(512, count=5), max_new_tokens=6)
    return core, logits


def _record_logits(core: EngineCore) -> list[torch.Tensor]:
    """Copies of every step's logits, in order."""
    seen: list[torch.Tensor] = []
    forward = core.runner.forward

    def record(batch: object, prev: object = None) -> torch.Tensor:
        out = forward(batch, prev)  # type: ignore[arg-type]
        seen.append(out.detach().clone())
        return out

    core.runner.forward = record  # type: ignore[method-assign]
    return seen


@gpu
@needs_cuda
@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("llama", {}), ("qwen3", {}), ("mistral", {"sliding_window": 8})],
    ids=["llama", "qwen3", "mistral-window8"],
)
def test_prompt_graphs_greedy_parity_with_hf(
    tiny_model_factory: Callable[..., Path], arch: str, overrides: dict[str, int]
) -> None:
    """float32 on the GPU, prompt steps replaying their captured graphs (every chunk padded up to
    16 tokens; a split step's prompts eagerly beside their decode rows), then again over cached
    prefixes: HF's tokens."""
    path = tiny_model_factory(arch, **overrides)
    core = EngineCore(
        EngineConfig.from_options(
            str(path),
            device="cuda",
            dtype="float32",
            page_size=4,
            chunked_prefill_size=16,
            cuda_graph_max_bs=6,
            cuda_graph_prompt_tokens=16,
            debug_invariants=True,
        )
    )
    prompt_graphs = core.runner.prompt_graphs
    assert prompt_graphs is not None and prompt_graphs.token_counts == [16]
    decode_graphs = core.runner.graph_runner
    assert decode_graphs is not None and decode_graphs.capture_stream is not None
    assert prompt_graphs.capture_stream is not None  # each its own cuBLAS workspace (capture_graphs)
    assert decode_graphs.capture_stream.cuda_stream != prompt_graphs.capture_stream.cuda_stream
    prompts = make_prompts(core.runner.vocab_size)
    for round_ in range(2):  # the second round's prompts start from cached prefixes
        replays = prompt_graphs.replays
        outputs = run_staggered(core, prompts)
        assert prompt_graphs.replays > replays
        for i, ids in enumerate(prompts):
            assert outputs[f"r{i}"] == hf_greedy(path, ids, NEW_TOKENS), f"round {round_}, prompt {i}"


@gpu
@needs_cuda
def test_prompt_graphs_stay_off_for_mla_and_moe_models(tiny_model_factory: Callable[..., Path]) -> None:
    path = tiny_model_factory("deepseek_v2", qk_rope_head_dim=16)
    config = EngineConfig.from_options(str(path), device="cuda", dtype="float32", cuda_graph_prompt_tokens=16)
    runner = EngineCore(config).runner
    assert runner.graph_runner is not None and runner.prompt_graphs is None


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32"])
def test_graph_replay_logits_match_eager(tiny_model_factory: Callable[..., Path], dtype: str) -> None:
    """The same decode steps, graphed and eager (disable_cuda_graph): the same logits."""
    path = tiny_model_factory("llama")
    logits = {
        graphed: _step_logits(path, dtype=dtype, disable_cuda_graph=not graphed)[1]
        for graphed in (True, False)
    }
    assert len(logits[True]) == len(logits[False])
    for graphed, eager in zip(logits[True], logits[False]):
        torch.testing.assert_close(graphed, eager, atol=1e-4, rtol=1e-4)


@gpu
@needs_cuda
def test_gemma2_on_cuda_takes_the_torch_backend_and_matches_hf(
    tiny_model_factory: Callable[..., Path],
) -> None:
    """`auto` on CUDA is triton, which lacks Gemma 2's soft-capping: the runner takes the torch
    backend instead (eager, no graphs) rather than refusing the model, and matches HF."""
    path = tiny_model_factory("gemma2")
    core = EngineCore(
        EngineConfig.from_options(
            str(path), device="cuda", dtype="float32", page_size=16, chunked_prefill_size=16
        )
    )
    assert core.runner.backend.name == "torch"
    assert core.runner.graph_runner is None
    prompts = make_prompts(core.runner.vocab_size)
    outputs = run_staggered(core, prompts)
    for i, ids in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy(path, ids, NEW_TOKENS), f"prompt {i} (len {len(ids)})"


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pdl_changes_no_logit(tiny_model_factory: Callable[..., Path], dtype: str) -> None:
    """PDL moves only when the decode step's kernels start (kernels/pdl.py): every step's
    logits, graphed, are the same bits with it on and off, and it is on where the GPU has it."""
    from kernels import pdl

    path = tiny_model_factory("llama")
    hopper = torch.cuda.get_device_capability()[0] >= 9
    logits: dict[bool, list[torch.Tensor]] = {}
    for on in (True, False):
        core, logits[on] = _step_logits(path, dtype=dtype, disable_pdl=not on)
        assert pdl.launch_options(torch.zeros(1, device="cuda"))["USE_PDL"] == (on and hopper)
        assert core.runner.graph_runner is not None and core.runner.graph_runner.replays > 0
    assert not pdl.enabled()  # the last engine's setting, process-wide
    assert len(logits[True]) == len(logits[False])
    for with_pdl, without in zip(logits[True], logits[False]):
        assert torch.equal(with_pdl, without)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_producers_quantizing_for_fp8_linears_change_no_logit(
    tiny_model_factory: Callable[..., Path], dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kernels.fp8_quant.FUSE_INTO_PRODUCERS` (FP8 weights): every step's logits, decode graphs
    on the tensor-core GEMV and eager prompts on the block GEMM, are the same bits whether the
    norms and SiLU-and-mul quantize the linears' inputs or the linears do."""
    from kernels import fp8_quant

    # Whole 128-row blocks for every fused shard, two activation groups a row (tests/engine/test_fp8.py).
    path = tiny_model_factory(
        "llama", hidden_size=256, num_attention_heads=8, num_key_value_heads=4, intermediate_size=256
    )
    logits: dict[bool, list[torch.Tensor]] = {}
    for on in (False, True):
        monkeypatch.setattr(fp8_quant, "FUSE_INTO_PRODUCERS", on)
        core, logits[on] = _step_logits(path, dtype=dtype, quantization="fp8")
        layer = core.runner.model.model.layers[0]  # type: ignore[attr-defined]
        assert layer.input_layernorm.fp8_group == (128 if on else None)
        assert core.runner.graph_runner is not None and core.runner.graph_runner.replays > 0
    assert len(logits[True]) == len(logits[False])
    for fused, plain in zip(logits[True], logits[False]):
        assert torch.equal(fused, plain)


@gpu
@needs_cuda
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_pdl_greedy_parity_with_hf(tiny_model_factory: Callable[..., Path], arch: str) -> None:
    """float32, PDL on (the default), graphs and staggered arrivals: the same tokens as HF."""
    path = tiny_model_factory(arch)
    core = EngineCore(
        EngineConfig.from_options(
            str(path), device="cuda", dtype="float32", page_size=16, chunked_prefill_size=16,
            cuda_graph_max_bs=6,
        )
    )  # fmt: skip
    prompts = make_prompts(core.runner.vocab_size)
    outputs = run_staggered(core, prompts)
    for i, ids in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy(path, ids, NEW_TOKENS), f"prompt {i} (len {len(ids)})"


@gpu
@needs_cuda
def test_split_mixed_steps_with_prompt_graphs_finish_at_the_8b_layer_shape(tmp_path: Path) -> None:
    """94 requests decoding beside prompt chunks filling a 2048-token budget, prompt graphs on,
    at the Llama-3-8B layer shape (four layers, bf16): the steps must finish. This bench command
    hung in its first mixed steps on an H100 when the prompts replayed their graph beside the
    decode graph, both captured on torch's one default capture stream (r30; `capture_graphs`);
    such prompts now run eagerly (r31), and each graph set has its own stream."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--layers", "4", "--batches", "1"]
    cmd += ["--skip-hf", "--decode-tokens", "8", "--prefill-batch", "1", "--prompt-graph-tokens", "2048"]
    cmd += ["--mixed", "94", "--mixed-chunks", "2048", "--json", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the mixed steps did not finish in 300 s: {e.stdout!r}") from None
    assert proc.returncode == 0, proc.stderr[-3000:]
    tandem = json.loads(out.read_text())["tandem"]
    assert tandem["prompt_graphs"] is True
    mixed = tandem["mixed"]["2048"]
    assert mixed["mixed_split"] is True and mixed["mixed_ms"] > 0
