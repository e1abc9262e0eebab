"""The README's Python API example runs as written, on a real HF Trainer + DeepSpeed ZeRO-2 run."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import vllm_consolidate

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):text.index("## How it works")]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_readme_example_runs(case_dir, tmp_path: Path, monkeypatch, capsys) -> None:
    run = tmp_path / "ft_runs" / "qwen2.5-7b"
    shutil.copytree(case_dir("trainer_qwen2_z2_bf16") / "run", run)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(_example(), "README.md", "exec"), {})  # noqa: S102 - the example is ours
    printed = capsys.readouterr().out.split()
    assert Path(printed[0]) == (tmp_path / "models" / "qwen2.5-7b").absolute() and printed[-1] == "bfloat16"
    assert (tmp_path / "models" / "qwen2.5-7b" / "model.safetensors").is_file()
    assert os.listdir(tmp_path / "models") == ["qwen2.5-7b"]


def test_public_names() -> None:
    for name in vllm_consolidate.__all__:
        assert getattr(vllm_consolidate, name) is not None, name
    assert callable(vllm_consolidate.convert) and callable(vllm_consolidate.validate_folder)
    assert issubclass(vllm_consolidate.errors.ConsolidateError, Exception)
