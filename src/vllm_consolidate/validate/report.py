"""What validation produces: one :class:`Check` per check, gathered in a :class:`ValidationReport`.

A leaf module (it imports nothing of the package), so every check module and
:mod:`vllm_consolidate.validate.source` can use it without an import loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PASS, WARN, FAIL = "pass", "warn", "fail"

#: How a check that cannot run says so: a warning whose message starts with this.
SKIPPED = "skipped: "


@dataclass
class Check:
    """One check's outcome.

    Attributes:
        name: Stable identifier of the check (e.g. ``missing_tensors``).
        status: ``pass``, ``warn`` or ``fail``.
        message: One line for people.
        details: Machine-readable facts (full name lists, tokens, a traceback if the check crashed).
    """

    name: str
    status: str
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def skipped(name: str, reason: str) -> Check:
    """A check that could not run (no transformers, unreadable config): a warning, not a pass.

    Args:
        name: The check's name.
        reason: Why it did not run, for people.

    Returns:
        A ``warn`` check whose message is ``skipped: <reason>``.
    """
    return Check(name, WARN, f"{SKIPPED}{reason}")


@dataclass
class ValidationReport:
    """All checks run on one folder.

    Attributes:
        path: The folder.
        checks: The checks, in the order they ran.
    """

    path: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed (warnings do not count)."""
        return all(c.status != FAIL for c in self.checks)

    def get(self, name: str) -> Check | None:
        """The check called ``name``, if it ran."""
        return next((c for c in self.checks if c.name == name), None)

    def failure_messages(self) -> list[str]:
        """``name: message`` of every failed check."""
        return [f"{c.name}: {c.message}" for c in self.checks if c.status == FAIL]

    def warning_messages(self) -> list[str]:
        """``name: message`` of every warning."""
        return [f"{c.name}: {c.message}" for c in self.checks if c.status == WARN]

    def counts(self) -> dict[str, int]:
        """How many checks passed, warned and failed."""
        return {s: sum(c.status == s for c in self.checks) for s in (PASS, WARN, FAIL)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: path, ok, counts and every check."""
        return {
            "path": str(self.path),
            "ok": self.ok,
            "counts": self.counts(),
            "checks": [
                {"name": c.name, "status": c.status, "message": c.message, "details": c.details}
                for c in self.checks
            ],
        }


__all__ = ["FAIL", "PASS", "SKIPPED", "WARN", "Check", "ValidationReport", "skipped"]
