"""Hostile peft adapters (issue 22): adapter_config.json confinement, the base a path names, patterns, numbers.

Every case damages a copy of the real ``peft_plain_qwen2`` adapter folder (``tests/corpus/LORA_README.md``) as an
attacker or a careless user would: ``adapter_config.json`` rewritten as JSON text, replaced by a link or a FIFO with
``os``. Each runs the CLI in a subprocess (:func:`tests.hostile.run_cli`: memory cap, timeout) and checks every
promise with :func:`tests.hostile.assert_refused`: exit code, one ``error:`` line, nothing published, the input
unchanged, no secret byte next to the output, the time.

The base model is always named with ``--base-model-name`` (the corpus adapter names it by absolute path, which is
never followed), except in the cases about that path.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from tests.hostile import assert_refused, run_cli, snapshot

CASE = "peft_plain_qwen2"
NO_VALIDATE = "--no-validate-vllm"
#: A catastrophic-backtracking key: Python's re takes 3**len(name) steps on a module name (hours), RE2 linear time.
HANG = "([a-z0-9_.]|[a-z0-9_.]|[a-z0-9_.])*#"
#: A docker credential, in a JSON file outside the adapter folder: no output may hold it.
TOKEN = b"S3CR3T-docker-auth-dXNlcjpwYXNzd29yZA"
#: Bound for a refusal that needs no tensor (a loaded 2-core machine: the CLI imports torch in a few seconds).
AT_ONCE_S = 20.0
#: Bound for a whole conversion of the tiny model (unloaded: ~7 s).
CONVERT_S = 120.0


@pytest.fixture
def case(lora_corpus: dict[str, Path]) -> Path:
    return lora_corpus[CASE]


@pytest.fixture
def adapter(case: Path, tmp_path: Path) -> Path:
    """A copy of the plain peft folder, free to damage."""
    return Path(shutil.copytree(case / "adapter", tmp_path / "in" / "adapter", symlinks=True))


def _out(tmp_path: Path) -> Path:
    (tmp_path / "o").mkdir(exist_ok=True)
    return tmp_path / "o" / "out"


def _edit(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **changes}, indent=2))


def _refused(adapter: Path, tmp_path: Path, code: int, message: str, *args: str, max_seconds: float = AT_ONCE_S,
             cwd: Path | None = None, secret: bytes | None = None) -> str:
    """``convert`` of the damaged adapter refused with ``code`` and ``message``; returns the stderr."""
    before, out = snapshot(adapter), _out(tmp_path)
    run = run_cli(["convert", "--input", str(adapter), "--output", str(out), NO_VALIDATE, *args], cwd=cwd,
                  timeout=max(60.0, 3 * max_seconds))
    assert_refused(run, code, output=out, inputs=[adapter], before={str(adapter): before}, message=message,
                   secret=secret, max_seconds=max_seconds)
    return run.stderr


def _base(case: Path) -> list[str]:
    return ["--base-model-name", str(case / "base")]


# -- control ------------------------------------------------------------------------------------------------------


def test_undamaged_copy_converts(adapter: Path, case: Path, tmp_path: Path) -> None:
    """The copy converts with --base-model-name: each refusal below is caused by its damage."""
    run = run_cli(["convert", "--input", str(adapter), "--output", str(_out(tmp_path)), NO_VALIDATE, *_base(case)],
                  timeout=3 * CONVERT_S)
    assert run.code == 0, run.stderr[-3000:]


# -- 1. adapter_config.json must be a regular file inside its folder -------------------------------------------------


@pytest.mark.parametrize("lora", ["merge", "adapter"])
def test_adapter_config_linked_out_of_the_folder(adapter: Path, case: Path, tmp_path: Path, lora: str) -> None:
    """adapter_config.json -> a JSON file outside (a docker config holding a token): exit 5; before, ``--lora
    adapter`` re-serialized the outside file into the output."""
    outside = tmp_path / "outside" / "config.json"
    outside.parent.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    outside.write_text(json.dumps({**config, "auths": {"registry.example": {"auth": TOKEN.decode()}}}))
    (adapter / "adapter_config.json").unlink()
    (adapter / "adapter_config.json").symlink_to(outside)
    _refused(adapter, tmp_path, 5, f"adapter_config.json resolves to {outside}, outside its folder {adapter}",
             "--lora", lora, *_base(case), secret=TOKEN)


def test_adapter_config_linked_inside_the_folder_is_read(adapter: Path, case: Path, tmp_path: Path) -> None:
    """A link that stays inside the folder is fine (the rule is the resolved path, not "no links")."""
    (adapter / "meta").mkdir()
    (adapter / "adapter_config.json").rename(adapter / "meta" / "adapter_config.json")
    (adapter / "adapter_config.json").symlink_to(Path("meta") / "adapter_config.json")
    run = run_cli(["inspect", str(adapter), *_base(case)], timeout=60)
    assert run.code == 0 and "problems:      none" in run.stdout, run.stdout + run.stderr


def test_adapter_config_fifo(adapter: Path, case: Path, tmp_path: Path) -> None:
    """A FIFO: refused at once as "not a regular file" (before: reported as no adapter found)."""
    (adapter / "adapter_config.json").unlink()
    os.mkfifo(adapter / "adapter_config.json")
    _refused(adapter, tmp_path, 4, "adapter_config.json is not a regular file", *_base(case))


# -- 2. base_model_name_or_path never chooses a local model -----------------------------------------------------------


def test_absolute_base_path_is_not_followed(adapter: Path, tmp_path: Path) -> None:
    """The adapter names a real local model by absolute path (before: read and published, exit 0): exit 8, and
    the error names --base-model-name."""
    stderr = _refused(adapter, tmp_path, 8, "name it with --base-model-name")
    assert "by the local path" in stderr


def test_relative_base_path_is_not_followed(adapter: Path, case: Path, tmp_path: Path) -> None:
    """``./base`` from the working folder, where a model lies: exit 8 as well."""
    shutil.copytree(case / "base", tmp_path / "base")
    _edit(adapter, base_model_name_or_path="./base")
    _refused(adapter, tmp_path, 8, "by the local path './base'", cwd=tmp_path)


def test_hub_id_shaped_local_folder_is_not_read(adapter: Path, case: Path, tmp_path: Path) -> None:
    """``base`` reads as a Hub id: only the HF cache is asked, never the folder of that name in the working folder."""
    shutil.copytree(case / "base", tmp_path / "base")
    _edit(adapter, base_model_name_or_path="base")
    _refused(adapter, tmp_path, 3, "'base' is not in the local HF cache", cwd=tmp_path)


# -- 3. rank_pattern / alpha_pattern are matched in bounded time --------------------------------------------------


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_backtracking_pattern_does_not_hang(adapter: Path, case: Path, tmp_path: Path, field: str) -> None:
    """The key matches no module; before, convert, inspect and validate --against ran for ever on it."""
    _edit(adapter, **{field: {HANG: 4}})
    out = _out(tmp_path)
    run = run_cli(["inspect", str(adapter), *_base(case)], timeout=3 * AT_ONCE_S)
    assert run.code == 0 and "problems:      none" in run.stdout, run.stdout + run.stderr
    run = run_cli(["convert", "--input", str(adapter), "--output", str(out), NO_VALIDATE, *_base(case)],
                  timeout=3 * CONVERT_S)
    assert run.code == 0 and run.seconds < CONVERT_S, run.stderr[-3000:]
    run = run_cli(["validate", str(out), "--against", str(adapter), *_base(case)], timeout=3 * CONVERT_S)
    assert run.code == 0 and run.seconds < CONVERT_S, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.parametrize(("key", "message"), [
    ("(q_proj", "adapter_config.json: rank_pattern key '(q_proj' is not a valid regular expression"),
    ("(?=q)q_proj", "adapter_config.json: rank_pattern key '(?=q)q_proj' uses a regular expression feature that "
                    "cannot be matched in bounded time"),
    ("x" * 5000, "adapter_config.json: rank_pattern key 'xxxx"),
])
def test_invalid_pattern_is_refused(adapter: Path, case: Path, tmp_path: Path, key: str, message: str) -> None:
    """Before: exit 70 (re.error). Now exit 4, one line naming the file and the key."""
    _edit(adapter, rank_pattern={key: 4})
    _refused(adapter, tmp_path, 4, message, *_base(case))


def test_batch_survives_poisoned_runs(adapter: Path, case: Path, tmp_path: Path) -> None:
    """A batch over a clean adapter, one with the backtracking key and one with an invalid key: planning returns,
    the first two convert, the invalid one is reported (before: the batch hung while planning)."""
    runs = tmp_path / "runs"
    for name, patterns in (("clean", {}), ("hang", {HANG: 4}), ("invalid", {"(q_proj": 4})):
        shutil.copytree(adapter, runs / name)
        _edit(runs / name, rank_pattern=patterns)
    out = tmp_path / "converted"
    run = run_cli(["batch", "--input-dir", str(runs), "--output-dir", str(out), "--continue-on-error",
                   "--max-workers", "1", NO_VALIDATE, *_base(case)], timeout=6 * CONVERT_S)
    assert run.code != 70 and "Traceback" not in run.stderr, run.stderr[-3000:]
    done = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert [n.split("_")[0] for n in done] == ["clean", "hang"], run.stdout[-3000:] + run.stderr[-3000:]
    assert all((out / n / "model.safetensors").is_file() for n in done)
    assert "rank_pattern key '(q_proj'" in run.stdout + run.stderr


# -- 4. numbers and lists that would be read wrongly ------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "message"), [
    ({"r": 4.5}, "r is 4.5, not a positive integer"),
    ({"r": True}, "r is True, not a positive integer"),
    ({"lora_alpha": 1e300}, "the LoRA scale lora_alpha / r = 1e+300 / 8 is 1.25e+299"),
    ({"lora_alpha": 10**400}, "lora_alpha is an integer of 1329 bits, not a positive finite number"),
    ({"alpha_pattern": {"q_proj": 1e300}}, "the LoRA scale lora_alpha / r = 1e+300 / 8"),
    ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern gives 'q_proj' 2.5, not a positive integer"),
    ({"modules_to_save": ["embed_tokens"]}, "lists 'embed_tokens' in modules_to_save, but the adapter holds no trained "
                                            "copy of model.embed_tokens"),
    ({"peft_type": ["LORA"]}, "peft_type is a list of 1 item, not the name of a peft method such as 'LORA'"),
    ({"bias": "2"}, "bias is '2', not one of 'none', 'all', 'lora_only'"),
], ids=["r-float", "r-bool", "alpha-huge", "alpha-int-huge", "alpha-pattern-huge", "rank-pattern-float",
        "modules-to-save-without-copy", "peft-type-list", "bias-quoted"])
def test_bad_setting_is_refused(adapter: Path, case: Path, tmp_path: Path, changes: dict, message: str) -> None:
    """Before: r 4.5 read as 4, alpha 1e300 published Inf, a modules_to_save entry without its copy kept the base's
    tensor (each exit 0); a list peft_type read "this is a a list of 1 items adapter". Now exit 4, one line."""
    _edit(adapter, **changes)
    _refused(adapter, tmp_path, 4, message, *_base(case))


# -- the matcher itself (in process) ----------------------------------------------------------------------------------

MODULES = [f"model.layers.{i}.{part}" for i in (0, 1, 10, 11) for part in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head"]
PATTERNS = ["q_proj", "model.layers.1.self_attn.q_proj", r"layers\.1\d?\..*", "(k|v)_proj", "mlp\\.(up|down)_proj",
            "layers.0.self_attn.v_proj", "proj", ".*_proj", "lm_head|q_proj", "model\\.layers\\.[0-9]+\\.mlp\\.up_proj"]


def _config(tmp_path: Path, rank_pattern: dict[str, int]) -> Any:
    from vllm_consolidate.read import peft

    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": rank_pattern}))
    return peft.read_lora_config(path)


@pytest.mark.parametrize("order", [1, -1], ids=["in-order", "reversed"])
def test_patterns_match_as_peft_does(tmp_path: Path, order: int) -> None:
    """RE2 picks, for every module, the key peft's own get_pattern_key picks (the first in the file that matches)."""
    from peft.utils.other import get_pattern_key

    keys = PATTERNS[::order]
    config = _config(tmp_path, {k: i + 1 for i, k in enumerate(keys)})
    for module in MODULES:
        want = get_pattern_key(keys, module)
        assert config.rank_and_alpha(module)[0] == (keys.index(want) + 1 if want in keys else 8), module


def test_pattern_matches_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys x modules past MAX_PATTERN_MATCHES: refused with one message, not run for minutes."""
    from vllm_consolidate.errors import CorruptCheckpointError
    from vllm_consolidate.read import peft

    monkeypatch.setattr(peft, "MAX_PATTERN_MATCHES", 3 * len(MODULES))
    config = _config(tmp_path, {f"no_such_module_{i}": 4 for i in range(5)})
    with pytest.raises(CorruptCheckpointError, match=f"need more than {3 * len(MODULES)} pattern matches"):
        for module in MODULES:
            config.rank_and_alpha(module)
