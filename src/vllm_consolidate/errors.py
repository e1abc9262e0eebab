"""The one exception hierarchy of vllm-consolidate.

Every error the library raises on purpose is a :class:`ConsolidateError`. Each carries the file it is
about and a hint saying what the user can do. The CLI maps the classes to exit codes in one place
(``cli.EXIT_CODES``) and prints ``error: <message> [<path>]`` and ``hint: <hint>``; the traceback is
shown only with ``--debug``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


class ConsolidateError(Exception):
    """Base class for every error vllm-consolidate reports to a user.

    Args:
        message: What is wrong, in one sentence.
        path: The file or folder the error is about, if any.
        hint: What the user can do about it.
    """

    default_hint: str | None = None

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return f"{self.message} [{self.path}]" if self.path else self.message


class InputNotFoundError(ConsolidateError):
    """No checkpoint or model could be found at the given input."""

    default_hint = "Pass a training run, a checkpoint-N or global_stepN folder, or an HF model folder."


class CorruptCheckpointError(ConsolidateError):
    """A checkpoint file is truncated, unreadable or internally inconsistent."""

    default_hint = "Re-save the checkpoint, or pick an earlier one with --checkpoint-dir."


class LimitExceededError(CorruptCheckpointError):
    """A size or count the input declares, or the work reading it would take, passes one of our caps.

    Exit code 4 like any input we cannot read (the README's table: "a size or count beyond its cap"),
    not 5: a cap is no sign of intent, only a bound a real checkpoint stays far below.
    """

    default_hint = "No real checkpoint comes near this limit: the file is damaged, or built to exhaust the reader."


class UnsafeInputError(ConsolidateError):
    """The input asks for something a checkpoint never needs: code to run, or a file outside itself.

    Refused before anything it asks for happens (exit code 5).
    """

    default_hint = "Only convert checkpoints you trust; this one points outside itself or asks to run code."


class UnsafePickleError(UnsafeInputError):
    """A pickle names a global outside the allowlist, or tries to rewrite the reader's own objects;
    it was refused and nothing from it ran."""

    default_hint = "Only load checkpoints you trust; this file asks to run code that a checkpoint never needs."


class UnsupportedCheckpointError(ConsolidateError):
    """The checkpoint is of a kind this tool does not handle (stage, layout, format)."""


class ConfigNotFoundError(ConsolidateError):
    """No config.json in the checkpoint, its parents, or the base model."""

    default_hint = "Pass --base-model-name with the local folder or Hub id of the model you fine-tuned."


class OutputExistsError(ConsolidateError):
    """The output folder exists and --force was not given."""

    default_hint = "Pass --force to replace it (it is replaced only after the new output is complete)."


class InsufficientDiskError(ConsolidateError):
    """The output file system does not have room for the output."""

    default_hint = "Free disk space, write elsewhere, or use --dtype bfloat16 to halve the output."


class OutputNotWritableError(ConsolidateError):
    """The output location cannot be written: a read-only or immutable file system or folder, or no permission."""

    default_hint = "Write somewhere you can write to, or fix the folder's permissions."


class ConfigInvalidError(ConfigNotFoundError):
    """A config.json was found but is not usable (not UTF-8, not JSON, not an object, too large)."""

    default_hint = "Fix the config.json (it must be a JSON object), or pass --base-model-name with a good one."


class UsageError(ConsolidateError):
    """The options given do not make sense together."""


class ValidationFailedError(ConsolidateError):
    """The written folder failed validation; see the report it carries."""

    def __init__(self, message: str, *, path=None, hint=None, report=None):
        super().__init__(message, path=path, hint=hint)
        self.report = report


class VllmUnavailableError(ConsolidateError):
    """vLLM is not importable here and no --vllm-python interpreter was given."""

    default_hint = "Install vLLM, or pass --vllm-python /path/to/venv/bin/python of a venv that has it."


class VllmLoadError(ConsolidateError):
    """vLLM failed to load or run the model folder."""


class VllmProbeTimeoutError(VllmLoadError):
    """The vLLM probe did not finish within its timeout."""

    default_hint = "Raise the timeout, or check that the machine is not out of memory."


class StorageError(ConsolidateError):
    """An object store refused or failed a request (credentials, endpoint, permissions, retries exhausted)."""

    default_hint = ("Check the credentials and endpoint (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_REGION, or the "
                    "GCS/Azure equivalents, or --storage-options), then run again.")


class BatchError(ConsolidateError):
    """A batch could not be planned or one of its jobs failed."""


class WorkerDied(BatchError):
    """A worker process ended without reporting its job's outcome (killed, out of memory, a crash)."""

    default_hint = ("Look for the out-of-memory killer (dmesg), lower --max-workers, then run the "
                    "batch again: finished outputs are kept.")


@contextmanager
def naming_file(path: str | os.PathLike) -> Iterator[None]:
    """Inside, an error of ours raised without a file (by a stand-in or a pure helper) is made to name ``path``."""
    try:
        yield
    except ConsolidateError as exc:
        exc.path = exc.path or str(path)
        raise


def error_record(exc: BaseException) -> dict[str, str | None]:
    """The one machine-readable form of an error, for ``--json`` output, batch reports and job records.

    Any exception works: one of ours carries its own message, path and hint; another (a bug, a
    worker's crash) gives its text and no path or hint. Callers add what only they know (the CLI its
    ``exit_code``), so the keys below mean the same thing everywhere.

    Returns:
        ``{"status": "error", "error": message, "path": ..., "hint": ..., "type": class name}``.
    """
    ours = isinstance(exc, ConsolidateError)
    return {
        "status": "error",
        "error": exc.message if ours else (str(exc) or type(exc).__name__),
        "path": exc.path if ours else None,
        "hint": exc.hint if ours else None,
        "type": type(exc).__name__,
    }
