"""Which interpreter ``validate --load`` uses when ``--vllm-python`` is not given."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_consolidate.cli import validate as cli_validate


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli_validate.VLLM_PYTHON_ENV, raising=False)
    return tmp_path


def test_nothing_found_means_this_interpreter(in_tmp: Path):
    assert cli_validate._default_vllm_python() is None


def test_the_venv_in_the_current_directory(in_tmp: Path):
    python = in_tmp / ".venv-vllm" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    assert cli_validate._default_vllm_python() == str(python)


def test_the_environment_variable_wins_even_when_wrong(in_tmp: Path, monkeypatch: pytest.MonkeyPatch):
    (in_tmp / ".venv-vllm" / "bin").mkdir(parents=True)
    (in_tmp / ".venv-vllm" / "bin" / "python").write_text("")
    monkeypatch.setenv("VLLM_CONSOLIDATE_VLLM_PYTHON", "/nonexistent/python")
    assert cli_validate._default_vllm_python() == "/nonexistent/python"  # the load tier then says it is missing


def test_the_help_documents_the_default():
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    parser = cli_validate.add_parser(sub)
    text = "".join(parser.format_help().split())  # argparse wraps lines, also at hyphens
    assert "$VLLM_CONSOLIDATE_VLLM_PYTHONifset,else./.venv-vllm/bin/pythoninthecurrentdirectory" in text
