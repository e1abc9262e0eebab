"""The exit-code table: every error class has its documented code, and the README lists every code."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from vllm_consolidate import errors as E
from vllm_consolidate.cli.common import EXIT_CODES, INTERNAL_ERROR, exit_code

README = Path(__file__).resolve().parents[2] / "README.md"

EXPECTED = {
    E.UsageError: 2, E.InputNotFoundError: 3, E.CorruptCheckpointError: 4, E.UnsupportedCheckpointError: 4,
    E.LimitExceededError: 4,
    E.UnsafeInputError: 5, E.UnsafePickleError: 5, E.OutputExistsError: 6, E.InsufficientDiskError: 7,
    E.ConfigNotFoundError: 8, E.ConfigInvalidError: 8, E.ValidationFailedError: 9, E.VllmUnavailableError: 10,
    E.VllmLoadError: 10, E.VllmProbeTimeoutError: 10, E.BatchError: 11, E.WorkerDied: 11, E.OutputNotWritableError: 12,
    E.StorageError: 13,
}


def test_every_error_class_has_its_code():
    classes = [c for _, c in inspect.getmembers(E, inspect.isclass)
               if issubclass(c, E.ConsolidateError) and c is not E.ConsolidateError]
    assert set(classes) == set(EXPECTED), "a new error class needs a row in EXPECTED and in EXIT_CODES"
    for cls, code in EXPECTED.items():
        assert exit_code(cls("x")) == code, cls.__name__


def test_other_exceptions():
    assert exit_code(KeyboardInterrupt()) == 130
    assert exit_code(ValueError("bug")) == INTERNAL_ERROR == 70


def test_more_specific_classes_come_first():
    for i, (cls, _) in enumerate(EXIT_CODES):
        for later, _ in EXIT_CODES[i + 1:]:
            assert not issubclass(later, cls) or later is cls, f"{later.__name__} is shadowed by {cls.__name__}"


def test_readme_documents_every_code():
    text = README.read_text()
    table = text[text.index("**Exit codes**"):text.index("## Safety")]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", table, flags=re.M)}
    assert documented == set(EXPECTED.values()) | {0, 70, 130}
