"""Deterministic, locally generated InternVL3.5-shaped checkpoints (`dvd-make-checkpoint`).

A fresh machine has no model hub, so tests, the local launcher and the benchmark run on checkpoints written here:
the official file layout and key names (docs/ARCHITECTURE.md), random but non-degenerate bf16 weights, a small
byte-level BPE tokenizer with InternVL's special tokens, and a remote-code config that stock vLLM loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from dvd.config import option, parse

log = logging.getLogger("dvd.checkpoint")

REMOTE_CODE = Path(__file__).parent / "remote_code" / "configuration_internvl_chat.py"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                  "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
# Added but not special, as in the Qwen3 tokenizer InternVL3.5's language model ships: they stay in the decoded
# text (skip_special_tokens drops special ones), which is where vLLM's reasoning and tool parsers look for them.
MARKUP_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
# Qwen's video context token: vLLM serves InternVL video only when a qwen2/qwen3 text model's tokenizer has it.
# Added after training, so every other token keeps the id it had before video existed.
VIDEO_TOKEN = "<|video_pad|>"
# Bumped whenever what a preset writes changes: a cached checkpoint of another format is generated again.
CHECKPOINT_FORMAT = 4
SYSTEM_MESSAGE = "You are InternVL, a multimodal assistant that answers questions about images."
TOOLS_PREAMBLE = ("# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>")
TOOLS_RULES = ("\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
               "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
               "\\\"arguments\\\": <args-json-object>}\\n</tool_call>")
# InternVL3.5's template (internvl2_5, Qwen chatml) written for OpenAI-style content lists: one `<image>` line per
# image part and one `<video>` line per video part, in place, so vLLM's chat renderer and ours produce the same
# prompt. Tools, tool calls and tool responses render as Qwen's templates render them (the hermes format: <tools>,
# <tool_call>, <tool_response>).
CHAT_TEMPLATE = (
    "{% macro render(content) %}{% if content is string %}{{ content }}{% else %}{% for part in content %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'video' or part['type'] == 'video_url' %}{{ '<video>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{% endmacro %}"
    # The system turn: the client's, else InternVL's; with tools, Qwen's tool instructions follow it.
    "{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ render(messages[0]['content']) }}"
    "{% else %}{{ '" + SYSTEM_MESSAGE + "' }}{% endif %}"
    "{% if tools %}{{ '\\n\\n" + TOOLS_PREAMBLE + "' }}"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '" + TOOLS_RULES + "' }}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\\n<tool_response>\\n' }}{{ render(message['content']) }}{{ '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] %}{{ render(message['content']) }}{% endif %}"
    "{% if message['role'] == 'assistant' and message['tool_calls'] %}"
    "{% for call in message['tool_calls'] %}{% set call = call['function'] if call['function'] else call %}"
    "{% if not loop.first or message['content'] %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n{\"name\": \"' }}{{ call['name'] }}{{ '\", \"arguments\": ' }}"
    "{% if call['arguments'] is string %}{{ call['arguments'] }}{% else %}{{ call['arguments'] | tojson }}{% endif %}"
    "{{ '}\\n</tool_call>' }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    vit_hidden: int
    vit_layers: int
    vit_heads: int
    vit_mlp: int
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_mlp: int
    vocab_target: int
    head_dim: int = 64  # vLLM's CPU attention needs 64 or 128
    max_position_embeddings: int = 32768
    max_dynamic_patch: int = 12


PRESETS: dict[str, Preset] = {
    # Seconds to build; what the tests run on.
    "tiny": Preset(vit_hidden=64, vit_layers=2, vit_heads=2, vit_mlp=256, llm_hidden=128, llm_layers=2,
                   llm_heads=2, llm_kv_heads=1, llm_mlp=384, vocab_target=2048),
    # InternVL3.5-1B's proportions (vision is most of a request's prefill compute), small enough for 2 CPU cores.
    "small": Preset(vit_hidden=256, vit_layers=4, vit_heads=4, vit_mlp=1024, llm_hidden=512, llm_layers=4,
                    llm_heads=8, llm_kv_heads=2, llm_mlp=1536, vocab_target=4096),
    # `small`'s ViT before a language model that does most of a request's prefill work, as InternVL3.5-8B's
    # Qwen3-8B does beside InternViT-300M: for measurements where the language side is the bottleneck (ViR under
    # pressure, benchmarks/vir_pressure.py), small enough for 2 CPU cores.
    "heavylm": Preset(vit_hidden=256, vit_layers=4, vit_heads=4, vit_mlp=1024, llm_hidden=768, llm_layers=4,
                      llm_heads=12, llm_kv_heads=4, llm_mlp=2048, vocab_target=4096),
    # InternVL3.5-8B's vision half at its real size (InternViT-300M-448px: hidden 1024, 24 layers, 16 heads, MLP 4096;
    # pixel shuffle 0.5; mlp1 into Qwen3-8B's hidden 4096; -flash adds mlp2 and the ViR router), for GPU and
    # transfer figures at real tensor sizes. The language part is one Qwen3-8B-wide layer: enough to load, not a
    # model to serve.
    "vision8b": Preset(vit_hidden=1024, vit_layers=24, vit_heads=16, vit_mlp=4096, llm_hidden=4096, llm_layers=1,
                       llm_heads=32, llm_kv_heads=8, llm_mlp=12288, vocab_target=4096, head_dim=128,
                       max_position_embeddings=40960),
}

WORDS = ("the a an image picture photo shows cat dog tree house car road sky cloud sun water river mountain red "
         "green blue yellow white black small large left right top bottom center of in on with and is are what "
         "where how many color describe this that there two three person people table chair window door light "
         "dark bright text sign number letter question answer assistant user system please tell me about").split()


def _corpus(seed: int, lines: int = 4000) -> Iterator[str]:
    rng = random.Random(seed)
    for i in range(lines):
        n = rng.randint(4, 16)
        words = [rng.choice(WORDS) for _ in range(n)]
        yield " ".join(words).capitalize() + rng.choice([".", "?", "!", ","]) + f" {i % 97}"


def build_tokenizer(out: Path, vocab_target: int, seed: int) -> int:
    """Train a small byte-level BPE; returns the vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_corpus(seed)), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    tok.add_special_tokens([AddedToken(VIDEO_TOKEN, special=True, normalized=False)])
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": [*SPECIAL_TOKENS[1:], VIDEO_TOKEN],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
               "additional_special_tokens": [*SPECIAL_TOKENS[1:], VIDEO_TOKEN]}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")
    return tok.get_vocab_size()


def build_config(p: Preset, vocab_size: int, flash: bool, token_ids: dict[str, int]) -> dict:
    vision = {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
        "hidden_size": p.vit_hidden, "num_hidden_layers": p.vit_layers, "num_attention_heads": p.vit_heads,
        "intermediate_size": p.vit_mlp, "image_size": 448, "patch_size": 14, "num_channels": 3, "qkv_bias": True,
        "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu",
        "initializer_factor": 0.1, "use_flash_attn": False, "dropout": 0.0, "drop_path_rate": 0.0,
        "attention_dropout": 0.0, "torch_dtype": "bfloat16",
    }
    llm = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "hidden_size": p.llm_hidden, "num_hidden_layers": p.llm_layers, "num_attention_heads": p.llm_heads,
        "num_key_value_heads": p.llm_kv_heads, "head_dim": p.head_dim, "intermediate_size": p.llm_mlp,
        "vocab_size": vocab_size, "max_position_embeddings": p.max_position_embeddings, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
        "bos_token_id": token_ids["<|endoftext|>"], "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids["<|endoftext|>"], "torch_dtype": "bfloat16", "use_cache": True,
    }
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"},
        "vision_config": vision, "llm_config": llm,
        "select_layer": -1, "downsample_ratio": 0.5, "ps_version": "v2", "force_image_size": 448,
        "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1,
        "max_dynamic_patch": p.max_dynamic_patch, "template": "internvl2_5", "torch_dtype": "bfloat16",
        "eos_token_id": token_ids["<|im_end|>"],
    }
    if flash:
        config.update(flash_mode=True, flash_relative_threshold=0.5, flash_absolute_threshold=0.3)
    return config


def weight_shapes(p: Preset, vocab_size: int, flash: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, by its official key name."""
    d, h = p.vit_hidden, p.llm_hidden
    s: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (1, 1, d),
        "vision_model.embeddings.patch_embedding.weight": (d, 3, 14, 14),
        "vision_model.embeddings.patch_embedding.bias": (d,),
        "vision_model.embeddings.position_embedding": (1, 32 * 32 + 1, d),
    }
    for i in range(p.vit_layers):
        pre = f"vision_model.encoder.layers.{i}."
        s |= {pre + "attn.qkv.weight": (3 * d, d), pre + "attn.qkv.bias": (3 * d,),
              pre + "attn.proj.weight": (d, d), pre + "attn.proj.bias": (d,),
              pre + "norm1.weight": (d,), pre + "norm1.bias": (d,), pre + "norm2.weight": (d,),
              pre + "norm2.bias": (d,), pre + "ls1": (d,), pre + "ls2": (d,),
              pre + "mlp.fc1.weight": (p.vit_mlp, d), pre + "mlp.fc1.bias": (p.vit_mlp,),
              pre + "mlp.fc2.weight": (d, p.vit_mlp), pre + "mlp.fc2.bias": (d,)}
    s |= {"mlp1.0.weight": (4 * d,), "mlp1.0.bias": (4 * d,), "mlp1.1.weight": (h, 4 * d), "mlp1.1.bias": (h,),
          "mlp1.3.weight": (h, h), "mlp1.3.bias": (h,)}
    if flash:
        s |= {"mlp2.0.weight": (16 * d,), "mlp2.0.bias": (16 * d,), "mlp2.1.weight": (2 * h, 16 * d),
              "mlp2.1.bias": (2 * h,), "mlp2.4.weight": (2 * h, 2 * h), "mlp2.4.bias": (2 * h,),
              "mlp2.7.weight": (h, 2 * h), "mlp2.7.bias": (h,)}
        s["pooling_before_gating.query_token"] = (1, d)
        for k in range(1, 5):  # attn3/norm3/attn4/norm4 ship in the weights but the forward never uses them
            pre = f"pooling_before_gating.attn{k}."
            s |= {pre + "in_proj_weight": (3 * d, d), pre + "in_proj_bias": (3 * d,),
                  pre + "out_proj.weight": (d, d), pre + "out_proj.bias": (d,),
                  f"pooling_before_gating.norm{k}.weight": (d,), f"pooling_before_gating.norm{k}.bias": (d,)}
        for k in range(1, 5):
            pre = f"gating.block{k}."
            s |= {pre + "0.weight": (4 * d, d), pre + "0.bias": (4 * d,), pre + "3.weight": (d, 4 * d),
                  pre + "3.bias": (d,), pre + "5.weight": (d,), pre + "5.bias": (d,)}
        s |= {"gating.gate.0.weight": (d,), "gating.gate.0.bias": (d,), "gating.gate.1.weight": (2, d),
              "gating.gate.1.bias": (2,)}
    qd, kvd = p.llm_heads * p.head_dim, p.llm_kv_heads * p.head_dim
    s["language_model.model.embed_tokens.weight"] = (vocab_size, h)
    for i in range(p.llm_layers):
        pre = f"language_model.model.layers.{i}."
        s |= {pre + "self_attn.q_proj.weight": (qd, h), pre + "self_attn.k_proj.weight": (kvd, h),
              pre + "self_attn.v_proj.weight": (kvd, h), pre + "self_attn.o_proj.weight": (h, qd),
              pre + "self_attn.q_norm.weight": (p.head_dim,), pre + "self_attn.k_norm.weight": (p.head_dim,),
              pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,),
              pre + "mlp.gate_proj.weight": (p.llm_mlp, h), pre + "mlp.up_proj.weight": (p.llm_mlp, h),
              pre + "mlp.down_proj.weight": (h, p.llm_mlp)}
    s |= {"language_model.model.norm.weight": (h,), "language_model.lm_head.weight": (vocab_size, h)}
    return s


def init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Unit-scale activations everywhere, so that images and context visibly steer greedy decoding."""
    leaf = name.rsplit(".", 1)[-1]
    is_norm = any(t in name for t in ("norm", "layernorm", "mlp1.0", "mlp2.0", ".5.", "gate.0")) and len(shape) == 1
    if name.endswith(("ls1", "ls2")):
        return torch.full(shape, 0.1)
    if is_norm and leaf == "weight":
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if leaf.endswith("bias") or is_norm:
        return 0.02 * torch.randn(shape, generator=gen)
    if "embed_tokens" in name or "class_embedding" in name or "query_token" in name:
        return torch.randn(shape, generator=gen)
    if "position_embedding" in name:
        return 0.5 * torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def _write_shards(tensors: dict[str, torch.Tensor], out: Path, shard_bytes: int) -> list[str]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def make_checkpoint(preset: str, out: Path, *, flash: bool = False, seed: int = 0,
                    shard_size_mb: float = 1024.0) -> Path:
    p = PRESETS[preset]
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log.info("building tokenizer", extra={"preset": preset, "out": str(out)})
    vocab = build_tokenizer(out, p.vocab_target, seed)
    from tokenizers import Tokenizer

    token_ids = {t: Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = int(math.ceil(vocab / 64) * 64)
    config = build_config(p, vocab_size, flash, token_ids)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(REMOTE_CODE, out / REMOTE_CODE.name)
    gen_cfg = {"eos_token_id": [token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
               "pad_token_id": token_ids["<|endoftext|>"]}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2, sort_keys=True) + "\n")

    shapes = weight_shapes(p, vocab_size, flash)
    tensors: dict[str, torch.Tensor] = {}
    from tqdm import tqdm

    for i, (name, shape) in enumerate(tqdm(shapes.items(), desc=f"weights {preset}{'-flash' if flash else ''}",
                                           unit="tensor", leave=False)):
        # One generator per tensor: a Flash checkpoint shares every non-Flash tensor with its plain twin.
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        tensors[name] = init_tensor(name, shape, gen).to(torch.bfloat16).contiguous()
        del i
    files = _write_shards(tensors, out, int(shard_size_mb * 2**20))
    meta = {"generator": "dvd-make-checkpoint", "format": CHECKPOINT_FORMAT, "preset": preset, "flash": flash,
            "seed": seed, "shape": asdict(p), "files": files}
    (out / "dvd_checkpoint.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    log.info("checkpoint written", extra={"out": str(out), "tensors": len(tensors), "files": len(files)})
    return out


def default_checkpoint_dir() -> Path:
    """Where presets are generated on first use (override with DVD_CHECKPOINT_DIR)."""
    import os

    root = os.environ.get("DVD_CHECKPOINT_DIR")
    return Path(root) if root else Path.home() / ".cache" / "dvd" / "checkpoints"


def resolve_model(model: str, seed: int = 0, keep: Callable[[str], bool] | None = None,
                  revision: str | None = None) -> Path:
    """A preset name (`tiny`, `small`, `vision8b`, each also `-flash`), a checkpoint directory, or a Hugging Face
    repo id (`OpenGVLab/InternVL3_5-8B-Flash[@revision]`, or `revision` given apart as vLLM's `--revision`) fetched
    into the HF cache (HF_HOME, HF_TOKEN).
    `keep(tensor_name)` limits a download to the shards holding tensors it wants (the vision server's)."""
    preset, _, variant = model.partition("-")
    if preset in PRESETS and variant in ("", "flash"):
        out = default_checkpoint_dir() / f"{model}-seed{seed}"
        if not _current(out / "dvd_checkpoint.json"):
            make_checkpoint(preset, out, flash=variant == "flash", seed=seed)
        return out
    path = Path(model).expanduser()
    if (path / "config.json").exists():
        return path
    if REPO_ID.fullmatch(model) and not path.exists():
        return fetch_from_hub(model, keep, revision)
    raise FileNotFoundError(f"{model!r} is neither a preset ({', '.join(PRESETS)}, with -flash), a directory with "
                            "a config.json, nor a Hugging Face repo id (org/name)")


def _current(meta: Path) -> bool:
    """A generated checkpoint of this code's format (older ones lack tokens or template parts tests need)."""
    try:
        return json.loads(meta.read_text()).get("format") == CHECKPOINT_FORMAT
    except (OSError, ValueError):
        return False


REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def fetch_from_hub(model: str, keep: Callable[[str], bool] | None = None, revision: str | None = None) -> Path:
    """The repo's snapshot directory in the HF cache: config, tokenizer and code files, then the weight shards
    (only those holding a tensor `keep` wants). Offline (HF_HUB_OFFLINE=1) it resolves from the cache alone."""
    from huggingface_hub import hf_hub_download, snapshot_download

    repo_id, _, pinned = model.partition("@")
    revision = revision or pinned
    log.info("fetching from the Hugging Face Hub", extra={"repo": repo_id, "revision": revision or "main"})
    root = Path(snapshot_download(repo_id, revision=revision or None,
                                  allow_patterns=["*.json", "*.py", "*.txt", "*.model", "*.tiktoken"]))
    index = root / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        shards = sorted({f for name, f in weight_map.items() if keep is None or keep(name)})
    else:
        shards = ["model.safetensors"]
    for shard in shards:
        hf_hub_download(repo_id, shard, revision=revision or None)
    log.info("checkpoint ready", extra={"path": str(root), "shards": len(shards)})
    return root


@dataclass(frozen=True)
class MakeCheckpoint:
    """dvd-make-checkpoint's options: flags from a dataclass, as every service's (dvd.config)."""

    out: Path = option(help="the directory the checkpoint is written to")  # noqa: RUF009 (a field, not a value)
    preset: str = option("tiny", "the checkpoint's shapes", choices=sorted(PRESETS))
    flash: bool = option(False, "add the ViR router and mlp2 (InternVL3.5-Flash)")
    seed: int = option(0, "the weights' random seed (the same seed gives the same bytes)")
    shard_size_mb: float = option(1024.0, "the largest safetensors shard")


def main(argv: list[str] | None = None) -> None:
    from dvd.logs import setup_logging

    args = parse(MakeCheckpoint, argv, prog="dvd-make-checkpoint", description=__doc__.splitlines()[0])
    setup_logging(fmt="text")
    make_checkpoint(args.preset, args.out, flash=args.flash, seed=args.seed, shard_size_mb=args.shard_size_mb)
    print(args.out)


if __name__ == "__main__":
    main()
