"""Models by Hugging Face repo id, resolved offline from a local HF cache laid out as huggingface_hub lays it out:
the vision server needs only the shards holding vision tensors, the language side needs them all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from dvd.checkpoint import make_checkpoint, resolve_model
from vision_server.weights import load_vision_weights, wanted

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    """A cached snapshot of `test-org/tiny-sharded` with its language-only shards missing."""
    ckpt = make_checkpoint("tiny", tmp_path / "src", shard_size_mb=0.5)
    cache = tmp_path / "hub"
    repo = cache / "models--test-org--tiny-sharded"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(ckpt, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    weight_map = json.loads((snapshot / "model.safetensors.index.json").read_text())["weight_map"]
    vision = {f for n, f in weight_map.items() if wanted(n, flash=True)}
    language_only = sorted(set(weight_map.values()) - vision)
    assert language_only, "the test needs shards without vision tensors"
    for shard in language_only:
        (snapshot / shard).unlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot, language_only


def test_vision_server_resolves_a_repo_id_from_the_vision_shards_alone(hub_cache: tuple[Path, list[str]]) -> None:
    snapshot, _ = hub_cache
    path = resolve_model("test-org/tiny-sharded", keep=lambda n: wanted(n, flash=True))
    assert path == snapshot
    tensors = load_vision_weights(path, flash=False)
    assert any(n.startswith("vision_model.") for n in tensors) and any(n.startswith("mlp1.") for n in tensors)


def test_a_full_resolve_needs_every_shard(hub_cache: tuple[Path, list[str]]) -> None:
    with pytest.raises(LocalEntryNotFoundError):
        resolve_model("test-org/tiny-sharded")  # the language shards are not in the cache and we are offline


def test_what_is_not_a_model_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="repo id"):
        resolve_model(str(tmp_path / "nowhere"))
