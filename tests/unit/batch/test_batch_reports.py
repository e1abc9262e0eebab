"""The words reports use (enums print and serialise as plain words), error records, and SIGTERM handling."""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from vllm_consolidate.batch.plan import BatchOptions, BatchPlan, Job, job_error
from vllm_consolidate.batch.run import BatchResult
from vllm_consolidate.batch.states import OUTCOMES, Action, Admission, EventKind, Status
from vllm_consolidate.cli import common
from vllm_consolidate.errors import BatchError, InputNotFoundError, error_record
from vllm_consolidate.signals import sigterm_raises_interrupt


@pytest.mark.parametrize("member", [*Action, *Status, *EventKind, *Admission])
def test_members_are_their_words(member):
    word = member.value
    assert member == word and str(member) == word and f"{member}" == word and f"{member:>12}" == f"{word:>12}"
    assert json.dumps(member) == json.dumps(word) and json.dumps({member: 1}) == json.dumps({word: 1})
    assert {word: 1}[member] == 1


def test_job_and_result_reports_are_plain_json():
    plan = BatchPlan(BatchOptions(output_dir=Path("/out")), [
        Job(0, Path("/in"), None, "c", 1, Path("/o0"), action=Action.SKIP, status=Status.SKIPPED),
        Job(1, Path("/in"), None, "c", 2, Path("/o1"), action=Action.ERROR, status=Status.FAILED),
    ], ram_available=1, ram_margin=0, disk_free=None)
    doc = json.loads(json.dumps(BatchResult(plan, 0.0, 1.0).to_dict(), indent=2))
    assert [(j["action"], j["status"]) for j in doc["jobs"]] == [("skip", "skipped"), ("error", "failed")]
    assert doc["counts"] == {"done": 0, "skipped": 1, "failed": 1, "not_run": 0} and doc["ok"] is False
    assert list(doc["counts"]) == [s.value for s in OUTCOMES]
    assert Job(2, Path("/in"), None, "c", 3, Path("/o2")).to_dict()["status"] == "pending"


def test_error_record_for_ours_and_for_a_bug():
    assert error_record(InputNotFoundError("gone", path="/x")) == {
        "status": "error", "error": "gone", "path": "/x", "hint": InputNotFoundError.default_hint,
        "type": "InputNotFoundError"}
    assert error_record(ValueError("bad")) == {"status": "error", "error": "bad", "path": None, "hint": None,
                                               "type": "ValueError"}


def test_job_error_names_the_text_message():
    assert job_error(BatchError("no match", path="/r")) == {"type": "BatchError", "message": "no match", "path": "/r",
                                                           "hint": None}
    try:
        raise KeyError("k")
    except KeyError as exc:
        info = job_error(exc, debug=True)
    assert info["type"] == "KeyError" and "Traceback" in info["traceback"]


def test_cli_json_error_is_the_record_plus_exit_code(capsys: pytest.CaptureFixture):
    def fails(args: argparse.Namespace) -> int:
        raise BatchError("nothing selected")

    assert common.run(fails, argparse.Namespace(json=True, debug=False)) == 11
    out = capsys.readouterr()
    assert json.loads(out.out) == {**error_record(BatchError("nothing selected")), "exit_code": 11}
    assert out.err == "error: nothing selected\n"


def test_sigterm_raises_interrupt_then_restores():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_raises_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at once and ends the sleep
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_helper_does_nothing_off_the_main_thread():
    seen = []

    def body() -> None:
        with sigterm_raises_interrupt():
            seen.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [signal.getsignal(signal.SIGTERM)]
