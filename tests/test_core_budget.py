"""The shared core budget (dvd/core_budget.py): its state, the vision runner under it, and vLLM's worker stepping it.

The session's `tiny` vision server and language server share one budget (conftest.py), so every equivalence test
through them (greedy outputs and prompt tokens against stock vLLM) runs with it in place.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dvd.core_budget import ENGINE_IDLE_AFTER_S, CoreBudget


@pytest.fixture()
def budget_path() -> Iterator[Path]:
    path = CoreBudget.create()
    yield path
    path.unlink()


@pytest.fixture()
def budget(budget_path: Path) -> CoreBudget:
    return CoreBudget(budget_path)


def test_split_only_while_both_compute(budget: CoreBudget) -> None:
    n = len(budget.cpus)
    assert not budget.vision_busy() and not budget.engine_busy()
    assert budget.engine_threads(4) == 4 and budget.vision_cpus() == budget.cpus
    budget.set_vision_busy(True)
    assert budget.engine_threads(4) == 2 and budget.engine_threads(3) == 2 and budget.engine_threads(1) == 1
    budget.engine_stepped()
    assert budget.vision_cpus() == (budget.cpus[n - n // 2:] if n > 1 else budget.cpus)
    budget.set_vision_busy(False)
    assert budget.engine_threads(4) == 4
    time.sleep(ENGINE_IDLE_AFTER_S * 1.5)
    assert not budget.engine_busy() and budget.vision_cpus() == budget.cpus


def test_state_is_shared_through_the_file(budget_path: Path) -> None:
    """Two mappings of one file (two processes in production) see each other's writes."""
    vision, engine = CoreBudget(budget_path), CoreBudget(budget_path)
    vision.set_vision_busy(True)
    engine.engine_stepped()
    assert engine.vision_busy() and vision.engine_busy()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to split")
def test_vision_runner_takes_its_share_and_gives_it_back(tiny_ckpt: Path, budget: CoreBudget) -> None:
    from vision_server.batcher import DeviceRunner
    from vision_server.config import ModelConfig
    from vision_server.model import build_model
    from vision_server.weights import load_vision_weights

    cfg = ModelConfig.from_checkpoint(tiny_ckpt)
    model = build_model(cfg, load_vision_weights(tiny_ckpt, cfg.flash), "cpu", torch.float32)
    threads = torch.get_num_threads()
    runner = DeviceRunner(model, "cpu")
    assert runner.thread_invariant(1)
    runner.budget = budget
    seen: list[tuple[int, set[int], bool]] = []
    features = model.features

    def spy(pixels: torch.Tensor) -> torch.Tensor:
        seen.append((torch.get_num_threads(), os.sched_getaffinity(0), budget.vision_busy()))
        return features(pixels)

    model.features = spy  # type: ignore[method-assign]
    tile = [torch.zeros(3, cfg.image_size, cfg.image_size)]
    alone = runner.run(tile, [False])[0].emb256
    budget.engine_stepped()
    shared = runner.run(tile, [False])[0].emb256
    n = len(budget.cpus)
    assert seen[0] == (threads, set(budget.cpus), True)
    assert seen[1] == (min(threads, n // 2), set(budget.cpus[n - n // 2:]), True)
    assert torch.equal(alone, shared)
    assert torch.get_num_threads() == threads and os.sched_getaffinity(0) == set(budget.cpus)
    assert not budget.vision_busy()


def test_flash_runner_is_thread_invariant(tiny_flash_ckpt: Path) -> None:
    """Embeddings, the ViR router's probabilities and the compressed projector: the same bytes on one thread."""
    from vision_server.batcher import DeviceRunner
    from vision_server.config import ModelConfig
    from vision_server.model import build_model
    from vision_server.weights import load_vision_weights

    cfg = ModelConfig.from_checkpoint(tiny_flash_ckpt)
    runner = DeviceRunner(build_model(cfg, load_vision_weights(tiny_flash_ckpt, True), "cpu", torch.float32), "cpu")
    assert cfg.flash and runner.thread_invariant(1)


async def test_vllm_worker_steps_the_session_budget(session_core_budget: Path, llm_tiny: str) -> None:
    """A request through the session's language server: vLLM's CPU worker (the plugin's hook) noted its steps."""
    from tests.helpers.llm import generate, text

    before = time.monotonic()
    await generate(llm_tiny, [text("Hi")], max_tokens=2)
    stepped, threads = CoreBudget(session_core_budget).engine_step()
    assert stepped > before and threads >= 1


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to split")
async def test_engine_answers_alike_on_its_share_and_on_every_core(tiny_ckpt: Path, vision_tiny: str) -> None:
    """An engine bound to every core answers with the same greedy tokens and log-probabilities whether the budget
    gives it all its threads (vision idle) or its share (vision busy): the split changes speed, not answers."""
    from dvd.core_budget import ENV
    from dvd.procs import cpu_engine_env, language_server
    from tests.conftest import VLLM_START_TIMEOUT
    from tests.helpers.llm import answer as answer_of
    from tests.helpers.llm import chat_request, text

    path = CoreBudget.create()
    budget = CoreBudget(path)
    svc = language_server(tiny_ckpt, vision_tiny, "--max-model-len", "4096", name="llm-budget",
                          env={**cpu_engine_env(kv_gib=1), ENV: str(path)})
    try:
        address = svc.wait_grpc(VLLM_START_TIMEOUT)

        async def answer(prompt: str) -> list[tuple[int, float]]:
            req = chat_request([text(prompt)], max_tokens=24, temperature=0.0, logprobs=True, top_logprobs=0,
                               ignore_eos=True, return_token_ids=True)
            reply, _ = await answer_of(address, req)
            (choice,) = reply["choices"]
            return list(zip(choice["token_ids"], (lp["logprob"] for lp in choice["logprobs"]["content"]), strict=True))

        prompts = ["Describe the sky", "What is on the table?", "Tell me about the river and the mountain " * 20]
        threads = len(os.sched_getaffinity(0))
        budget.set_vision_busy(False)
        every_core = [await answer(p) for p in prompts]
        assert budget.engine_step()[1] == threads
        budget.set_vision_busy(True)
        share = [await answer(p) for p in prompts]
        assert budget.engine_step()[1] == threads - threads // 2
        assert all(len(a) == 24 for a in every_core)
        assert share == every_core
    finally:
        svc.stop()
        path.unlink()
