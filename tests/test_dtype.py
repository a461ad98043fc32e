"""One dtype rule: every engine the project starts computes in what vLLM's `--dtype auto` picks for the same
checkpoint and device, so DvD's vision server and `vllm serve` compute the same numbers by default."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from openai.types.chat import ChatCompletionTokenLogprob
from vllm.config.model import _resolve_auto_dtype
from vllm.transformers_utils.config import get_config
from vllm.transformers_utils.model_arch_config_convertor import ModelArchConfigConvertorBase

from benchmarks.machine import native_bf16
from dvd.dtype import auto_dtype, checkpoint_dtype, resolve_dtype
from tests.conftest import start_llm, start_vision
from tests.helpers.llm import answer, assert_logprobs_close, chat_request, image, text
from tests.helpers.media import image_bytes
from tests.helpers.router import data_url, user_message


def vllm_checkpoint_dtype(ckpt: Path) -> torch.dtype:
    return ModelArchConfigConvertorBase.get_torch_dtype(get_config(str(ckpt), trust_remote_code=True), str(ckpt),
                                                        None, "hf")


@pytest.mark.parametrize("config_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_auto_is_vllms_auto_on_this_cpu(config_dtype: torch.dtype) -> None:
    assert auto_dtype(config_dtype, "cpu") == _resolve_auto_dtype("internvl_chat", config_dtype,
                                                                  is_pooling_model=False)


def test_the_checkpoints_dtype_is_read_as_vllm_reads_it(tiny_ckpt: Path, tmp_path: Path) -> None:
    assert checkpoint_dtype(tiny_ckpt) == vllm_checkpoint_dtype(tiny_ckpt) == torch.bfloat16
    # Without a root dtype vLLM falls back to the language model's: so does the rule.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt, ignore=shutil.ignore_patterns("*.safetensors"))
    raw = json.loads((ckpt / "config.json").read_text())
    raw.pop("torch_dtype", None)
    raw.pop("dtype", None)
    raw["llm_config"]["torch_dtype"] = "float16"
    (ckpt / "config.json").write_text(json.dumps(raw))
    assert checkpoint_dtype(ckpt) == vllm_checkpoint_dtype(ckpt) == torch.float16
    assert resolve_dtype("auto", ckpt, "cpu") == torch.float16
    assert resolve_dtype("float32", ckpt, "cpu") == torch.float32


@pytest.fixture(scope="module")
def default_llm(tiny_ckpt: Path) -> Iterator[str]:
    """A language server fed by a vision server at its default dtype (the suite's shared ones run float32)."""
    vision, vision_address = start_vision("vision-default-dtype", tiny_ckpt, env={"DVD_VISION_DTYPE": ""})
    try:
        llm, address = start_llm("llm-default-dtype", tiny_ckpt, vision_address)
        yield address
        llm.stop()
    finally:
        vision.stop()


async def test_greedy_answers_on_a_bf16_checkpoint_agree_with_stock_vllm(default_llm: str, colocated_tiny: str,
                                                                          tiny_ckpt: Path) -> None:
    """Both sides at their defaults on the bf16 checkpoint: the vision server's ViT and vLLM's own compute in bf16.
    Two bf16 ViTs of different kernels (ours in plain torch; vLLM's with its CPU GEMM dispatch and encoder
    attention) round apart in the last bits, so where the CPU computes bf16 natively the greedy answers are compared
    as vLLM's own tests compare two implementations: the same tokens and logprobs up to a near tie
    (tests.helpers.llm). The images are those of a first answer that once diverged (DvD's ViT computed float32,
    vLLM's bf16); test_vision_model holds the embeddings themselves closer to vLLM's than a float32 ViT's."""
    assert resolve_dtype("auto", tiny_ckpt, "cpu") == torch.bfloat16
    if not native_bf16():
        warnings.warn("this CPU has no native bf16 (AVX512-BF16 or AMX): both sides ran emulated bf16", stacklevel=1)
    images = [image_bytes(640, 480, seed=8101), image_bytes(1000, 300, seed=8102)]
    question = "Describe both images."
    args = {"max_tokens": 48, "temperature": 0.0, "logprobs": True, "top_logprobs": 5}
    reply, _ = await answer(default_llm, chat_request([*(image(b) for b in images), text(question)], **args))
    ours = [ChatCompletionTokenLogprob.model_validate(e) for e in reply["choices"][0]["logprobs"]["content"]]
    stock = openai.AsyncOpenAI(base_url=colocated_tiny, api_key="none", max_retries=0, timeout=300)
    ref = await stock.chat.completions.create(model="tiny", messages=[user_message(question, images=[
        data_url(b) for b in images])], **args)
    assert ref.choices[0].logprobs and ref.choices[0].logprobs.content
    assert_logprobs_close(ours, ref.choices[0].logprobs.content, 0.05)
