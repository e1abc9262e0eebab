"""Assets near the input (issue 22, items 2 and 5): config, tokenizer, templates and fsdp_config.json.

The rule under test: an asset is read only if it is a regular file whose resolved path lies inside the
folder it was found in (for the HF cache, inside its ``models--*`` folder), of a plausible size; parent
folders are searched only when the input is a checkpoint inside a run (``checkpoint-N``,
``global_stepN``, a verl step or role folder), never above the run. An asset that breaks it is skipped
with a ``warning:`` naming it, never read.

Each hostile folder is built as an attacker (or a careless download) leaves it: a model in ``~/dl/model``
whose files link to ``~/.ssh/id_rsa``, sparse giant files, a verl ``huggingface/`` folder linking to the
run. The CLI runs in a subprocess (:func:`tests.hostile.run_cli`); each test checks the exit code, the
one ``warning:`` / ``error:`` line, that no byte of the secret reached any output file or the console,
and that the input is unchanged. The inputs are real: a corpus model's weights, config and tokenizer,
the real HF Trainer FSDP and verl checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from tests.hostile import SECRET, CliRun, files_containing, leftovers, run_cli, snapshot

CASE = "qwen2_z3_w2_bf16_tied"  # ckpt/: config, generation config, tokenizer.json, chat template; truth weights
VERL = "verl_qwen2_w2_tied"  # ckpt/global_step_{1,2}/actor/{fsdp_config.json, huggingface/}
TRAINER = "trainer_fsdp_qwen2_tied"  # run/{config,tokenizer...}, run/checkpoint-{2,4}/pytorch_model_fsdp_0
NO_VALIDATE = "--no-validate-vllm"
#: One line of :data:`SECRET`: found even where a leak re-serializes the bytes (JSON escapes the newlines).
MARK = SECRET.splitlines()[1]
MODEL_ASSETS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A user's home: ``.ssh/id_rsa`` (the secret) and ``.docker/config.json`` (JSON holding it)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_bytes(SECRET)
    return home


@pytest.fixture
def model(case_dir, home: Path) -> Path:
    """``~/dl/model``: an HF model folder as a download leaves it (real weights, config and tokenizer)."""
    src, dst = case_dir(CASE), home / "dl" / "model"
    dst.mkdir(parents=True)
    shutil.copy(src / "truth" / "global_step2.safetensors", dst / "model.safetensors")
    for name in MODEL_ASSETS:
        shutil.copy(src / "ckpt" / name, dst / name)
    return dst


def _copy(fsdp_corpus: dict[str, Path], case: str, sub: str, dst: Path) -> Path:
    shutil.copytree(fsdp_corpus[case] / sub, dst, symlinks=True)
    return dst


def _link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(path):
        path.unlink()
    path.symlink_to(target)


def _convert(inp: Path, tmp_path: Path, *extra: str) -> tuple[CliRun, Path]:
    out = tmp_path / "outputs" / "out"
    out.parent.mkdir(exist_ok=True)
    return run_cli(["convert", "--input", str(inp), "--output", str(out), "--force", *extra]), out


def _warnings(run: CliRun, name: str) -> list[str]:
    return [ln for ln in run.stderr.splitlines() if ln.startswith("warning:") and name in ln]


def _check(run: CliRun, code: int, out: Path, inp: Path, before: dict, *, error: str | None = None) -> None:
    """Exit code, one ``error:`` line (or none), no traceback, no secret anywhere, input unchanged."""
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("error:")]
    assert run.code == code, f"exit {run.code}, wanted {code}:\n{run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    if error is None:
        assert errors == [], errors
    else:
        assert len(errors) == 1 and error in errors[0], run.stderr[-3000:]
        assert not out.exists() and leftovers(out.parent, out.name) == []
    assert MARK not in (run.stdout + run.stderr).encode()
    assert files_containing(out.parent, MARK) == []
    assert snapshot(inp) == before, f"input {inp} changed"


# -- 1. a model folder: its files may not link out of it (issue: two levels up was allowed) ---------------


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                  "chat_template.jinja", "additional_chat_templates/tool_use.jinja",
                                  "generation_config.json"])
def test_asset_linking_out_of_a_model_folder_is_skipped(model: Path, tmp_path: Path, name: str) -> None:
    """``tokenizer.json -> ../../.ssh/id_rsa`` in ``~/dl/model`` published the key with exit 0."""
    _link(model / name, "../" * name.count("/") + "../../.ssh/id_rsa")
    before = snapshot(model)
    run, out = _convert(model, tmp_path, NO_VALIDATE)
    _check(run, 0, out, model, before)
    warned = _warnings(run, str(model / name))
    assert len(warned) == 1 and "outside" in warned[0], run.stderr
    assert not (out / name).exists()


def test_chat_template_linking_out_is_skipped_with_validation_on(model: Path, tmp_path: Path) -> None:
    """A named chat template linked to the key passed validation (a key is a valid Jinja template)."""
    name = "additional_chat_templates/default.jinja"
    _link(model / name, "../../../.ssh/id_rsa")
    before = snapshot(model)
    run, out = _convert(model, tmp_path)
    _check(run, 0, out, model, before)
    assert len(_warnings(run, name)) == 1 and not (out / name).exists()
    assert (out / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()


def test_config_linking_out_of_a_model_folder_is_skipped(model: Path, home: Path, tmp_path: Path) -> None:
    """``config.json -> ../../.docker/config.json``: a JSON file elsewhere, re-serialized into the output."""
    docker = home / ".docker" / "config.json"
    docker.parent.mkdir()
    config = json.loads((model / "config.json").read_text())
    docker.write_text(json.dumps({**config, "auths": {"registry.example": {"auth": MARK.decode()}}}))
    _link(model / "config.json", "../../.docker/config.json")
    before = snapshot(model)
    run, out = _convert(model, tmp_path, NO_VALIDATE, "--base-model-name", "")
    _check(run, 8, out, model, before, error=f"no config.json in the checkpoint, its parent folders, or the base "
                                              f"model; skipped {model / 'config.json'}: it resolves to")


@pytest.mark.parametrize("what", ["tokenizer", "config"])
def test_plain_files_next_to_a_model_folder_are_not_its(model: Path, tmp_path: Path, what: str) -> None:
    """The README says the search stops at --input; a model folder's parent (``~/dl``) was searched."""
    names = ["config.json"] if what == "config" else ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    for name in names:
        os.rename(model / name, model.parent / name)
    before = snapshot(model)
    run, out = _convert(model, tmp_path, NO_VALIDATE, "--base-model-name", "")
    if what == "config":
        _check(run, 8, out, model, before, error="no config.json")
    else:
        _check(run, 0, out, model, before)
        assert not (out / "tokenizer.json").exists() and _warnings(run, "no tokenizer found"), run.stderr


def test_hf_cache_snapshot_links_into_its_blobs_but_not_out(home: Path, model: Path, tmp_path: Path) -> None:
    """A snapshot's files are links into ``models--*/blobs``: followed; one leading out of ``models--*``: skipped."""
    repo = home / ".cache" / "huggingface" / "hub" / "models--acme--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(model.iterdir())):
        os.rename(f, repo / "blobs" / f"blob{i}")
        (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    _link(snap / "special_tokens_map.json", "../../../../../../.ssh/id_rsa")
    before = snapshot(repo)
    run, out = _convert(snap, tmp_path, NO_VALIDATE)
    _check(run, 0, out, repo, before)
    assert len(_warnings(run, "special_tokens_map.json")) == 1, run.stderr
    for name in MODEL_ASSETS[1:]:
        assert (out / name).read_bytes() == (snap / name).read_bytes(), name


# -- 2. checkpoints inside a run still find the run's assets ------------------------------------------------


@pytest.mark.parametrize("given", ["run", "run/checkpoint-4", "run/checkpoint-4/pytorch_model_fsdp_0"])
def test_trainer_checkpoint_finds_the_assets_of_its_run(fsdp_corpus: dict[str, Path], tmp_path: Path,
                                                        given: str) -> None:
    """HF Trainer + FSDP leaves config and tokenizer in the run folder; ``--input run/checkpoint-4`` missed them."""
    run_dir = _copy(fsdp_corpus, TRAINER, "run", tmp_path / "in" / "run")
    inp = tmp_path / "in" / given
    before = snapshot(inp)
    run, out = _convert(inp, tmp_path, NO_VALIDATE)
    _check(run, 0, out, inp, before)
    assert [ln for ln in run.stderr.splitlines() if ln.startswith("warning:")] == []
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        assert (out / name).is_file(), name
    assert (out / "tokenizer.json").read_bytes() == (run_dir / "tokenizer.json").read_bytes()


def test_run_level_file_linking_above_the_run_is_skipped(fsdp_corpus: dict[str, Path], home: Path,
                                                         tmp_path: Path) -> None:
    run_dir = _copy(fsdp_corpus, TRAINER, "run", home / "runs" / "run")
    _link(run_dir / "special_tokens_map.json", "../../.ssh/id_rsa")
    inp = run_dir / "checkpoint-4"
    before = snapshot(run_dir)
    run, out = _convert(inp, tmp_path, NO_VALIDATE)
    _check(run, 0, out, run_dir, before)
    assert len(_warnings(run, "special_tokens_map.json")) == 1 and (out / "tokenizer.json").is_file()


# -- 3. verl: huggingface/ and fsdp_config.json stay in the role folder ------------------------------------


@pytest.fixture
def verl(fsdp_corpus: dict[str, Path], tmp_path: Path) -> Path:
    """A verl run (tracker -> global_step_2) holding a file the actor's links may point at."""
    run = _copy(fsdp_corpus, VERL, "ckpt", tmp_path / "in" / "verl")
    (run / "run_notes.txt").write_bytes(SECRET)  # a run-level file that is no asset
    return run


def _actor(verl: Path) -> Path:
    return verl / "global_step_2" / "actor"


def test_verl_huggingface_file_linking_to_the_run_is_skipped(verl: Path, tmp_path: Path) -> None:
    hf = _actor(verl) / "huggingface"
    _link(hf / "tokenizer.json", "../../../run_notes.txt")
    before = snapshot(verl)
    run, out = _convert(verl, tmp_path, NO_VALIDATE)
    _check(run, 0, out, verl, before)
    warned = _warnings(run, str(hf / "tokenizer.json"))
    assert len(warned) == 1 and "outside" in warned[0], run.stderr
    assert (out / "config.json").is_file() and not (out / "tokenizer.json").exists()


def test_verl_huggingface_folder_linking_to_the_run_is_skipped(verl: Path, tmp_path: Path) -> None:
    hf = _actor(verl) / "huggingface"
    shutil.move(hf, verl / "shared_hf")
    (verl / "shared_hf" / "tokenizer.json").write_bytes(SECRET)
    hf.symlink_to("../../shared_hf")
    before = snapshot(verl)
    run, out = _convert(verl, tmp_path, NO_VALIDATE, "--base-model-name", "")
    _check(run, 8, out, verl, before, error=f"no config.json in the checkpoint, its parent folders, or the base "
                                             f"model; skipped {hf}: it resolves to {verl / 'shared_hf'}, outside")


@pytest.mark.parametrize("where", ["run", "outside"])
def test_verl_fsdp_config_linking_out_of_the_role_folder_is_refused(verl: Path, home: Path, tmp_path: Path,
                                                                    where: str) -> None:
    config = _actor(verl) / "fsdp_config.json"
    target = verl / "fsdp_config.json" if where == "run" else home / "fsdp_config.json"
    target.write_text(json.dumps({"FSDP_version": 1, "world_size": 2, "note": MARK.decode()}))
    _link(config, os.path.relpath(target, config.parent))
    before = snapshot(verl)
    run, out = _convert(verl, tmp_path, NO_VALIDATE)
    _check(run, 5, out, verl, before, error="fsdp_config.json resolves to")
    assert "outside" in run.stderr


def test_verl_world_size_as_a_string_is_shown_quoted(verl: Path, tmp_path: Path) -> None:
    """``"world_size": "2"`` was reported as "world_size 2 ... world size 2"."""
    config = _actor(verl) / "fsdp_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "world_size": "2"}))
    before = snapshot(verl)
    run, out = _convert(verl, tmp_path, NO_VALIDATE)
    _check(run, 4, out, verl, before, error="says world_size '2' (a str, not an integer), but the rank files are "
                                            "for world size 2")


# -- 4. sizes: tokenizer files and templates are capped like config.json --------------------------------


# 256 MiB for tokenizer.json (twice its cap): the input snapshot reads every file, twice.
@pytest.mark.parametrize(("name", "size"), [("tokenizer.json", 2**28), ("chat_template.jinja", 64 * 2**20),
                                            ("additional_chat_templates/tool_use.jinja", 64 * 2**20),
                                            ("generation_config.json", 64 * 2**20)])
def test_sparse_giant_asset_is_skipped(model: Path, tmp_path: Path, name: str, size: int) -> None:
    """A 2 GB sparse ``tokenizer.json`` was copied (2 GB written, every byte read)."""
    path = model / name
    path.parent.mkdir(exist_ok=True)
    with open(path, "ab") as fh:
        fh.truncate(size)
    before = snapshot(model)
    run, out = _convert(model, tmp_path, NO_VALIDATE)
    _check(run, 0, out, model, before)
    warned = _warnings(run, str(path))
    assert len(warned) == 1 and f"{size:,} bytes, more than the" in warned[0], run.stderr
    assert not (out / name).exists()
    assert sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) < 10 * 2**20
    assert run.seconds < 30


# -- 5. validate reads config.json as convert does ----------------------------------------------------------


def _shard_with_index(model: Path) -> dict:
    """``model.safetensors`` as the one shard of an index (as ``save_pretrained`` names them); the index data."""
    shard = model / "model-00001-of-00001.safetensors"
    os.rename(model / "model.safetensors", shard)
    raw = shard.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    return {"metadata": {"total_size": len(raw)},
            "weight_map": {k: shard.name for k in header if k != "__metadata__"}}


@pytest.mark.parametrize(("name", "code"), [("config.json", 8), ("generation_config.json", None),
                                            ("model.safetensors.index.json", 4)])
def test_validate_refuses_nan_as_convert_does(model: Path, tmp_path: Path, name: str, code: int | None) -> None:
    """A config.json holding NaN passed ``validate`` while ``convert`` refused it (exit 8); likewise the index."""
    data = _shard_with_index(model) if name.endswith(".index.json") else json.loads((model / name).read_text())
    (model / name).write_text(json.dumps({**data, "temperature": float("nan")}))  # json.dumps writes NaN
    before = snapshot(model)
    run = run_cli(["validate", str(model)])
    assert run.code == 9, run.stdout + run.stderr
    fails = [ln for ln in run.stdout.splitlines() if ln.lstrip().startswith("FAIL")]
    assert len(fails) == 1 and name in fails[0] and "NaN" in fails[0], run.stdout
    assert snapshot(model) == before
    if code is not None:  # convert copies generation_config.json as it is; its validation is the one above
        converted, out = _convert(model, tmp_path, NO_VALIDATE)
        _check(converted, code, out, model, before, error=f"{name.removeprefix('model.safetensors.')} is not valid "
                                                           "JSON (NaN")
