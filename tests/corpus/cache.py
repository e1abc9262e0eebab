"""The corpus caches: where each registry keeps its built cases, and how a case is launched and built.

Shared by every corpus registry (:mod:`tests.corpus.build`, :mod:`tests.corpus.fsdp_build`,
:mod:`tests.corpus.lora_build`): one :class:`Cache` per registry, named by a folder under
:func:`cache_base` that carries the versions its checkpoints depend on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def dist_version(dist_name: str) -> str:
    """Installed version of a distribution, read without importing it (cheap)."""
    from importlib.metadata import version

    return version(dist_name)


def deepspeed_version() -> str:
    """Installed DeepSpeed version, read without importing deepspeed (cheap)."""
    return dist_version("deepspeed")


def cache_base() -> Path:
    """Parent of every corpus cache: ``$VLLMC_CORPUS_DIR`` or ``<repo>/.cache/corpus``."""
    env = os.environ.get("VLLMC_CORPUS_DIR")
    return Path(env) if env else REPO_ROOT / ".cache" / "corpus"


def hash_spec(spec: Any, schema_version: int, kind_revision: dict[str, int], **extra: Any) -> str:
    """Stable hash of a spec dataclass (+ schema version, non-zero kind revision, ``extra``) for cache invalidation."""
    payload: dict[str, Any] = {"v": schema_version, **dataclasses.asdict(spec)}
    if kind_revision.get(spec.kind):
        payload["kind_revision"] = kind_revision[spec.kind]
    payload.update(extra)
    blob = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def build_lock(root: Path) -> Iterator[None]:
    """Inter-process lock so concurrent sessions don't build the same case twice."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _subprocess_env(world_size: int) -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world_size)),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONUNBUFFERED="1",
    )
    return env


#: Launcher executable (next to ``sys.executable``) -> its "processes per node" flag.
LAUNCHERS: dict[str, str] = {"deepspeed": "--num_gpus", "torchrun": "--nproc_per_node"}


def venv_torchrun(venv: Path, setup: str) -> str:
    """The ``torchrun`` of a builder's own venv (Megatron's, NeMo's) as a :meth:`Cache.launch` launcher: an absolute
    path, which replaces the folder of ``sys.executable``. ``setup`` says how to make the venv.

    Raises:
        RuntimeError: The venv has no ``torchrun``.
    """
    torchrun = venv / "bin" / "torchrun"
    if not torchrun.is_file():
        raise RuntimeError(f"no {torchrun}: run {setup} first")
    LAUNCHERS.setdefault(str(torchrun), "--nproc_per_node")
    return str(torchrun)


#: A summary-table column: header, then the ``case.json`` key or a function of ``case.json``.
Column = tuple[str, "str | Callable[[dict[str, Any]], str]"]
#: Columns every registry's table shows.
TIED_COLUMN: Column = ("tied", lambda c: "y" if c["tied"] else "-")
CKPTS_COLUMN: Column = ("ckpts", lambda c: str(len(c["checkpoints"])))
PARAMS_COLUMN: Column = ("params", lambda c: f"{c['num_params'] / 1e6:.2f}M")
SECS_COLUMN: Column = ("secs", lambda c: f"{c['build_seconds']:.1f}")


class Cache:
    """One registry's cache folder ``<cache_base()>/<folder()>`` and the helpers that work on it.

    ``folder`` is called on every use (it reads installed versions), so ``$VLLMC_CORPUS_DIR``
    and the versions are looked up when needed, never at import.  A case ``spec`` needs only
    ``.name`` and ``.spec_hash()``.
    """

    def __init__(self, folder: Callable[[], str], tag: str) -> None:
        """``tag`` names the registry in progress lines and errors (``"corpus"``, ``"lora-corpus"``, ...)."""
        self.folder = folder
        self.tag = tag

    def root(self) -> Path:
        """Root folder of this cache (may not exist yet)."""
        return cache_base() / self.folder()

    def case_dir(self, name: str) -> Path:
        """Folder of one case (may not exist yet)."""
        return self.root() / name

    def load_case(self, name: str) -> dict[str, Any]:
        """Read a case's ``case.json``."""
        return json.loads((self.case_dir(name) / "case.json").read_text())

    def is_complete(self, spec: Any) -> bool:
        """True if the case folder holds a finished build of the current spec."""
        path = self.case_dir(spec.name) / "case.json"
        if not path.is_file():
            return False
        try:
            return json.loads(path.read_text()).get("spec_hash") == spec.spec_hash()
        except (OSError, json.JSONDecodeError):
            return False

    def launch(
        self,
        launcher: str,
        script: str,
        world_size: int,
        plan: dict[str, Any],
        label: str,
        env: dict[str, str | None] | None = None,
    ) -> None:
        """Run ``<launcher> <N flag> W --master_port P tests/corpus/<script> --plan <root>/_logs/<label>.plan.json``.

        Output goes to ``<root>/_logs/<label>.log``; raise with the log tail on failure.  ``env``
        entries override :func:`_subprocess_env` (``None`` removes a variable).
        """
        work = self.root() / "_logs"
        work.mkdir(parents=True, exist_ok=True)
        plan_path = work / f"{label}.plan.json"
        log_path = work / f"{label}.log"
        plan_path.write_text(json.dumps(plan, indent=2))
        cmd = [str(Path(sys.executable).parent / launcher), LAUNCHERS[launcher], str(world_size)]
        cmd += ["--master_port", str(_free_port()), str(HERE / script), "--plan", str(plan_path)]
        full_env = _subprocess_env(world_size)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        if log_path.exists():  # a retry keeps the failed attempt's log beside the new one
            log_path.replace(log_path.with_suffix(".log.1"))
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-60:])
            raise RuntimeError(f"{self.tag} launch {label!r} failed (rc={proc.returncode}); log {log_path}:\n{tail}")

    def build(
        self,
        wanted: list[Any],
        steps: Callable[[list[Any]], list[tuple[str, Callable[[], None]]]],
        *,
        rebuild: bool = False,
        verbose: bool = False,
    ) -> dict[str, Path]:
        """Build the ``wanted`` specs that are missing or stale; return ``{name: case_dir}`` for all of them.

        Under :func:`build_lock`: stale/partial case folders are deleted first, then
        ``steps(todo)`` gives ``(label, build function)`` pairs that are run in order.
        """
        root = self.root()
        with build_lock(root):
            todo = [s for s in wanted if rebuild or not self.is_complete(s)]
            errors = self._run_steps(todo, steps, verbose)
            # Once more for what failed: real frameworks sometimes die at interpreter exit after a good run
            # (DeepSpeed + Trainer: "terminate called without an active exception", SIGABRT, seen once under
            # load). A deterministic failure fails again, with both errors reported.
            retry = [s for s in todo if not self.is_complete(s)]
            if retry and errors:
                errors += self._run_steps(retry, steps, verbose)
            missing = [s.name for s in wanted if not self.is_complete(s)]
            if missing:
                detail = "\n".join(str(e) for e in errors)
                raise RuntimeError(f"{self.tag} cases not built: {missing} (see {root / '_logs'})\n{detail}")
        return {s.name: self.case_dir(s.name) for s in wanted}

    def _run_steps(self, todo: list[Any], steps: Callable[[list[Any]], list[tuple[str, Callable[[], None]]]],
                   verbose: bool) -> list[Exception]:
        """Delete ``todo``'s folders, then run its build steps; a failing step is recorded, not raised."""
        for spec in todo:
            shutil.rmtree(self.case_dir(spec.name), ignore_errors=True)
        errors: list[Exception] = []
        for label, fn in steps(todo) if todo else []:
            t0 = time.time()
            if verbose:
                print(f"[{self.tag}] building {label} ...", flush=True)
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - reported with the missing cases after the retry
                errors.append(exc)
                if verbose:
                    print(f"[{self.tag}] {label} failed: {exc}", flush=True)
                continue
            if verbose:
                print(f"[{self.tag}] {label}: {time.time() - t0:.1f}s", flush=True)
        return errors

    def table(self, names: list[str], columns: list[Column]) -> str:
        """Plain-text summary of built cases: a ``case`` column, then ``columns`` filled from each ``case.json``."""
        rows = [("case", *(header for header, _ in columns))]
        for name in names:
            c = self.load_case(name)
            rows.append((name, *(str(c[v]) if isinstance(v, str) else v(c) for _, v in columns)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows)

    def cli(
        self,
        argv: list[str] | None,
        *,
        doc: str | None,
        cases: Iterable[str],
        build_all: Callable[..., dict[str, Path]],
        columns: list[Column],
        title: str,
    ) -> None:
        """The ``python -m tests.corpus.<registry> [--rebuild] [NAME ...]`` CLI: build, then print a table."""
        ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("names", nargs="*", help="cases to build (default: all)")
        ap.add_argument("--rebuild", action="store_true", help="delete and rebuild the selected cases")
        args = ap.parse_args(argv)
        known = set(cases)
        unknown = [n for n in args.names if n not in known]
        if unknown:
            ap.error(f"unknown case(s) {unknown}; known: {sorted(known)}")
        t0 = time.time()
        dirs = build_all(args.names or None, rebuild=args.rebuild, verbose=True)
        print(self.table(list(dirs), columns))
        print(f"{title} root: {self.root()}  ({len(dirs)} cases, {time.time() - t0:.1f}s wall)")
