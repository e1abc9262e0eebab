"""Static validation of an output folder. PLACEHOLDER: the full checks land with issue 5."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Check:
    """One check's outcome: ``pass``, ``warn`` or ``fail``."""

    name: str
    status: str
    message: str = ""


@dataclass
class ValidationReport:
    """All checks run on one folder."""

    path: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def failure_messages(self) -> list[str]:
        return [f"{c.name}: {c.message}" for c in self.checks if c.status == "fail"]

    def warning_messages(self) -> list[str]:
        return [f"{c.name}: {c.message}" for c in self.checks if c.status == "warn"]

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "ok": self.ok,
                "checks": [c.__dict__ for c in self.checks]}


def validate_folder(path: Path) -> ValidationReport:
    report = ValidationReport(Path(path))
    report.checks.append(Check("config", "pass" if (Path(path) / "config.json").is_file() else "fail",
                               "config.json present"))
    return report
