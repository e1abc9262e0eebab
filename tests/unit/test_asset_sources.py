"""Where the generation config comes from: the checkpoint, its parents, then a base model of the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_consolidate.read.assets import GENERATION_CONFIG_FILE, find_assets

CONFIG = {"model_type": "qwen2", "vocab_size": 1001}


def _folder(path: Path, *, config: dict | None = None, generation: bool = False, tokenizer: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if generation:
        (path / GENERATION_CONFIG_FILE).write_text(json.dumps({"eos_token_id": 2, "from": path.name}))
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Path]:
    """``run/checkpoint-2`` with config and tokenizer, and no generation config anywhere yet."""
    run = _folder(tmp_path / "run")
    ckpt = _folder(run / "checkpoint-2", config=CONFIG, tokenizer=True)
    return ckpt, run


def test_the_checkpoint_first_then_its_parents(run, tmp_path):
    ckpt, parent = run
    _folder(parent, generation=True)
    base = _folder(tmp_path / "base", config=CONFIG, generation=True)
    assert find_assets([ckpt, parent], str(base)).generation_config == parent / GENERATION_CONFIG_FILE
    _folder(ckpt, generation=True)
    assert find_assets([ckpt, parent], str(base)).generation_config == ckpt / GENERATION_CONFIG_FILE


def test_then_a_base_model_of_the_same_model(run, tmp_path):
    ckpt, parent = run
    base = _folder(tmp_path / "base", config=dict(CONFIG, architectures=["Qwen2ForCausalLM"]), generation=True)
    assets = find_assets([ckpt, parent], str(base))
    assert assets.generation_config == base / GENERATION_CONFIG_FILE and assets.base_model_dir == base
    assert assets.config == ckpt / "config.json" and assets.tokenizer_dir == ckpt  # the rest stays the checkpoint's


@pytest.mark.parametrize("other", [{"model_type": "llama", "vocab_size": 1001},
                                   {"model_type": "qwen2", "vocab_size": 7}, {"vocab_size": 1001}])
def test_not_from_a_base_model_of_another_model(run, tmp_path, other):
    """E.g. the default base model, if cached, must not lend its eos ids to a different fine-tune."""
    ckpt, parent = run
    base = _folder(tmp_path / "base", config=other, generation=True)
    assert find_assets([ckpt, parent], str(base)).generation_config is None


def test_with_the_config_from_the_base_model_its_generation_config_comes_too(tmp_path):
    ckpt = _folder(tmp_path / "ckpt", tokenizer=True)
    base = _folder(tmp_path / "base", config={"model_type": "llama"}, generation=True)
    assets = find_assets([ckpt], str(base))
    assert assets.config == base / "config.json" and assets.generation_config == base / GENERATION_CONFIG_FILE


def test_a_missing_generation_config_alone_never_downloads(run, monkeypatch):
    import huggingface_hub

    calls: list[dict] = []

    def snapshot_download(name, **kwargs):
        calls.append(kwargs)
        raise FileNotFoundError(name)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    ckpt, parent = run
    assets = find_assets([ckpt, parent], "acme/not-cached")
    assert assets.generation_config is None and assets.base_model_error is None
    assert all(c.get("local_files_only") for c in calls)  # the local cache only, never a download
    # The cache has no folder for it: known without asking huggingface_hub at all (read/hub_cache.py).
    monkeypatch.setenv("HF_HUB_CACHE", str(ckpt.parent / "empty-cache"))
    calls.clear()
    assert find_assets([ckpt, parent], "acme/not-cached").generation_config is None
    assert calls == []


# -- sizes (issue 22): tokenizer files and templates are capped one by one and together ------------------


def _sparse(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as fh:
        fh.truncate(size)
    return path


def test_a_tokenizer_larger_than_its_cap_is_skipped(tmp_path):
    from vllm_consolidate.safe_io import MAX_TEMPLATE_BYTES, MAX_TOKENIZER_BYTES

    model = _folder(tmp_path / "model", config=CONFIG)
    _sparse(model / "tokenizer.json", MAX_TOKENIZER_BYTES)  # at the cap: taken
    _sparse(model / "chat_template.jinja", MAX_TEMPLATE_BYTES + 1)
    assets = find_assets([model], None)
    assert assets.tokenizer_files == [model / "tokenizer.json"]
    assert assets.skipped == [f"skipped {model / 'chat_template.jinja'}: it is {MAX_TEMPLATE_BYTES + 1:,} bytes, "
                              f"more than the {MAX_TEMPLATE_BYTES:,} such a file can plausibly be"]


def test_the_tokenizer_files_of_a_folder_are_capped_together(tmp_path):
    from vllm_consolidate.safe_io import MAX_TOKENIZER_BYTES, MAX_TOKENIZER_SET_BYTES

    model = _folder(tmp_path / "model", config=CONFIG)
    names = ["tokenizer.json", "a.tiktoken", "b.tiktoken"]
    for name in names:
        _sparse(model / name, MAX_TOKENIZER_BYTES)
    assert 3 * MAX_TOKENIZER_BYTES > MAX_TOKENIZER_SET_BYTES >= 2 * MAX_TOKENIZER_BYTES
    assets = find_assets([model], None)
    assert len(assets.tokenizer_files) == 2 and len(assets.skipped) == 1
    assert "together" in assets.skipped[0]


def test_a_reader_asset_folder_linking_out_of_the_weights_folder_is_skipped(tmp_path):
    """verl's ``actor/huggingface`` must be the actor's own, not a link to some other model's folder."""
    from vllm_consolidate.read.assets import find_checkpoint_assets

    actor = tmp_path / "run" / "global_step_1" / "actor"
    other = _folder(tmp_path / "run" / "other_model", config=CONFIG, tokenizer=True)
    actor.mkdir(parents=True)
    (actor / "huggingface").symlink_to(other)
    assets = find_checkpoint_assets(actor, actor, [actor / "huggingface"], None)
    assert assets.config is None and assets.tokenizer_dir is None
    assert assets.skipped == [f"skipped {actor / 'huggingface'}: it resolves to {other}, outside {actor}"]
