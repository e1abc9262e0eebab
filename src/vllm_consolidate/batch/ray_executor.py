"""Running a plan's jobs on a Ray cluster: ``batch --executor ray`` (``pip install 'vllm-consolidate[ray]'``).

Everything but the running is the local batch's: the plan, naming, collision checks, manifests,
the output folder's lock and the cleanup of stale folders (:func:`~vllm_consolidate.batch.run.run_batch`),
and the scheduling loop (:meth:`~vllm_consolidate.batch.executor.Executor.run`), whose hooks submit tasks here.
Local inputs and a local ``--output-dir`` must be on storage every node sees at the same paths. With
object-store (``s3://…``) inputs and output no shared file system is needed: a task gets only URLs and
the storage options (inside its job's options, never recorded), lists and reads its checkpoint into its
own temporary folder, commits its output into the store itself, and returns its outcome to the driver;
the driver alone writes the batch manifest and holds the batch lock object
(:mod:`~vllm_consolidate.batch.objects`).

* **One job, one Ray task.** :func:`_ray_job` runs :func:`~vllm_consolidate.batch.worker.run_job`,
  the local worker's conversion, in a Ray worker process used for that job alone (``max_calls=1``:
  a hostile or leaking job cannot affect the next). The task declares ``memory`` = the job's peak-RAM
  estimate (:mod:`~vllm_consolidate.batch.resources`; capped at the largest node's, so a job too big
  for every node still runs, alone, as locally) and ``num_cpus`` = 1, so Ray's scheduler admits jobs
  per node as the local scheduler does per machine. At most ``--max-workers`` tasks are in flight, and
  the disk estimate of the (shared) output folder is checked as locally.
* **Faults.** A task whose node or process dies is retried once (``max_retries=1``); an attempt first
  removes the staging folder a dead attempt left. A conversion error is not an exception to Ray
  (:func:`~vllm_consolidate.batch.worker.run_job` reports it), so it is never retried
  (``retry_exceptions=False`` besides). Each job's record gets ``attempts`` and ``nodes`` (one node
  address per attempt).
* **Events.** Each task tells a reporter actor on the driver's node when it starts (which attempt, on
  which node) and how far it is; the driver polls it and emits the usual
  :class:`~vllm_consolidate.batch.executor.BatchEvent` s, so progress, the table, ``--report`` and exit codes
  are those of a local batch. A START event's message names the node.

Ray is imported only when a Ray batch runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

from vllm_consolidate.batch.executor import BatchEvent, Executor
from vllm_consolidate.batch.plan import BatchPlan, Job
from vllm_consolidate.batch.resources import Scheduler
from vllm_consolidate.batch.states import EventKind, Status
from vllm_consolidate.batch.worker import JobSpec, clear_attempt, run_job, shared_lock
from vllm_consolidate.errors import UsageError

#: What to install for ``--executor ray``.
RAY_EXTRA = "pip install 'vllm-consolidate[ray]'"
#: ``--ray-address`` values besides a cluster's ``host:port``.
AUTO, LOCAL = "auto", "local"
#: Retries of a task whose node or worker process died (Ray's ``max_retries``).
MAX_RETRIES = 1
#: How often the driver looks for news.
_POLL_SECONDS = 0.5
#: How long an interrupted batch waits for its cancelled tasks to clean up.
_CANCEL_WAIT_SECONDS = 10.0
_START = "start"


def ray_available() -> bool:
    """Whether Ray can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        return False


def require_ray() -> None:
    """Raises:
    UsageError: Ray is not installed (exit 2), naming the extra that installs it.
    """
    if not ray_available():
        raise UsageError("--executor ray needs Ray, which is not installed",
                         hint=f"Install the extra: {RAY_EXTRA} (or use --executor local).")


def _reachable(address: str, timeout: float = 10.0) -> bool:
    """Whether ``HOST:PORT`` accepts a TCP connection (True for other forms, e.g. ``ray://``: Ray decides)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return True
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def _import_ray() -> Any:
    require_ray()
    import ray

    return ray


# -- in the Ray worker process ---------------------------------------------------------------------------


class _Reporter:
    """The actor (on the driver's node) that tasks tell when they start and how far they are."""

    def __init__(self) -> None:
        self.messages: list[tuple] = []
        self.attempts: dict[int, int] = {}

    def start(self, job_id: int, ip: str, node_id: str, when: float) -> int:
        """Count an attempt of a job and return its number (1 for the first)."""
        attempt = self.attempts[job_id] = self.attempts.get(job_id, 0) + 1
        self.messages.append((_START, job_id, attempt, ip, node_id, when))
        return attempt

    def put(self, message: tuple) -> None:
        self.messages.append(message)

    def drain(self) -> list[tuple]:
        out, self.messages = self.messages, []
        return out


class _Relay:
    """What :func:`~vllm_consolidate.batch.worker.run_job` sends to: progress to the reporter; the outcome is kept."""

    def __init__(self, reporter: Any):
        self.reporter = reporter
        self.outcome: tuple | None = None

    def send(self, message: tuple) -> None:
        if message[0] == EventKind.PROGRESS:
            self.reporter.put.remote(message)
        else:
            self.outcome = message


def _ray_job(spec: JobSpec, reporter: Any, lock_path: str | None) -> tuple:
    """A Ray task: one job, converted and published exactly as a local worker does it.

    Returns:
        ``(outcome, attempt, node address, time finished)``, the outcome being the local worker's DONE or
        FAILED message. Times are the node's clock (the driver learns of a start or an end up to
        :data:`_POLL_SECONDS` late).
    """
    import ray

    ip = ray.util.get_node_ip_address()
    attempt = ray.get(reporter.start.remote(spec.id, ip, ray.get_runtime_context().get_node_id(), time.time()))
    clear_attempt(spec)  # what an attempt that died with its node or process left
    relay = _Relay(reporter)
    with shared_lock(lock_path):
        run_job(relay, spec)
    return relay.outcome, attempt, ip, time.time()


# -- in the driver -------------------------------------------------------------------------------------


class RayExecutor(Executor):
    """Run a batch's jobs as Ray tasks (see the module docstring).

    Args:
        address: ``auto`` (the cluster this machine belongs to: ``RAY_ADDRESS`` or a local
            ``ray start``), ``local`` (start a single-node cluster in this process for the batch), or a
            cluster's ``host:port``. Ignored when Ray is already initialized in this process.
        num_cpus: CPUs each task declares.
    """

    name = "ray"

    def __init__(self, address: str = AUTO, *, num_cpus: float = 1.0):
        super().__init__()
        self.address = address
        self.num_cpus = num_cpus
        self.ray: Any = None

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Connect to (or start) the cluster; disconnect after, unless Ray was initialized before."""
        ray = _import_ray()
        owned = not ray.is_initialized()
        if owned:
            self._connect(ray)
        self.ray = ray
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            self.info = {"address": self.address, "nodes": len(nodes),
                         "cpus": sum(n["Resources"].get("CPU", 0) for n in nodes)}
            yield
        finally:
            self.ray = None
            if owned:
                ray.shutdown()

    def _connect(self, ray: Any) -> None:
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING,
                                  "namespace": "vllm-consolidate"}
        hint = ("Start one with `ray start --head` (and `ray start --address HEAD:PORT` on the other nodes), "
                "pass its address, or use --ray-address local.")
        if self.address == LOCAL:
            kwargs["include_dashboard"] = False
        elif self.address != AUTO and not _reachable(self.address):  # Ray itself would retry for minutes
            raise UsageError(f"no Ray cluster answers at --ray-address {self.address}", hint=hint)
        try:
            ray.init(address=self.address, **kwargs)
        except Exception as exc:  # noqa: BLE001 - ConnectionError, an authentication or version mismatch...
            raise UsageError(f"cannot connect to a Ray cluster at --ray-address {self.address}: "
                             f"{type(exc).__name__}: {exc}", hint=hint) from exc

    # -- the scheduling loop's hooks (the loop is Executor.run) ---------------------------------------

    def _open(self, plan: BatchPlan) -> Scheduler:
        """Start the reporter actor and declare the task; return a scheduler for --max-workers and the disk."""
        if self.ray is None:
            raise RuntimeError("RayExecutor.run() outside its session()")
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.reporter = ray.remote(num_cpus=0)(_Reporter).options(scheduling_strategy=here).remote()
        self.task = ray.remote(max_calls=1, max_retries=MAX_RETRIES, retry_exceptions=False)(_ray_job)
        mems = [n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")]
        self.max_memory = int(max(mems, default=0))
        self.refs: dict[Any, Job] = {}  # the submitted tasks, in submission order
        # RAM is Ray's to admit (each task declares its estimate); here only --max-workers and the disk.
        return Scheduler(self.opts.max_workers, 1 << 62, 0, plan.disk_free, available_now=lambda: 1 << 62)

    def _launch(self, job: Job, spec: JobSpec) -> None:
        """Submit the job's task; its START event comes when the task tells the reporter it runs."""
        memory = min(job.est_peak_ram, self.max_memory) if self.max_memory else job.est_peak_ram
        ref = self.task.options(num_cpus=self.num_cpus, memory=max(1, memory),
                                name=f"vllm-consolidate:{job.output.name}").remote(spec, self.reporter, self.lock_path)
        self.refs[ref] = job
        self.job_info[job.id] = {"attempts": 0, "nodes": []}

    def _poll(self) -> None:
        """Wait up to :data:`_POLL_SECONDS` for finished tasks; emit the reporter's news, then the outcomes."""
        refs = list(self.refs)
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=_POLL_SECONDS)
        for message in self.ray.get(self.reporter.drain.remote()):
            self._news(message)
        for ref in ready:
            self._finished(self.refs.pop(ref), ref)

    def _news(self, message: tuple) -> None:
        job = self.running.get(message[1])
        if job is None:
            return  # already finished (the outcome came back before the last progress message)
        if message[0] == EventKind.PROGRESS:
            self.emit(BatchEvent(EventKind.PROGRESS, job, done=message[2], total=message[3]))
            return
        _, _, attempt, ip, _node_id, when = message
        self._attempt_started(job, attempt, ip, when)

    def _attempt_started(self, job: Job, attempt: int, ip: str, when: float) -> None:
        """Record attempt ``attempt`` of ``job`` on node ``ip`` (once) and emit its START (a retry's names it)."""
        info = self.job_info[job.id]
        if attempt <= info["attempts"]:
            return
        info["attempts"] = attempt
        info["nodes"].append(ip)
        if job.status != Status.RUNNING:
            job.status, job.started = Status.RUNNING, when
            self.emit(BatchEvent(EventKind.START, job, f"on {ip}"))
        else:
            self.emit(BatchEvent(EventKind.START, job, f"on {ip} (attempt {attempt}: retried after the "
                                                       f"node or process of attempt {attempt - 1} died)"))

    def _finished(self, job: Job, ref: Any) -> None:
        """A task ended: the job is done or failed, or (cancelled before it started) goes back to pending."""
        try:
            outcome, attempt, ip, finished = self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a system failure Ray gave up on, or a cancellation
            outcome, attempt, ip, finished = None, 0, None, time.time()
            error = exc
            if isinstance(exc, self.ray.exceptions.TaskCancelledError):  # the batch stopped before it ran
                del self.running[job.id]
                self.sched.release(job, False)
                self.pending = sorted([*self.pending, job], key=lambda j: j.id)
                return
        if ip is not None:  # its start message may not have been read yet
            self._attempt_started(job, attempt, ip, time.time())
        elif job.status != Status.RUNNING:  # Ray gave up on it before any attempt told the reporter
            job.status, job.started = Status.RUNNING, time.time()
            self.emit(BatchEvent(EventKind.START, job))
        if self._settle(job, outcome, finished):
            return
        info = self.job_info[job.id]
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        self._died(job, f"the Ray task ended without reporting its job's outcome ({type(error).__name__}"
                        f"{': ' + first if first else ''}) after {max(info['attempts'], 1)} attempt(s)")

    def _discard(self, job: Job) -> None:
        # Also convert()'s ``..<staging>.partial-*``: a task killed with its node could not remove it.
        clear_attempt(self.specs[job.id])

    def _stopping(self) -> None:
        for ref, job in self.refs.items():  # submitted but not started: they must not start now
            if job.status != Status.RUNNING:
                self.ray.cancel(ref)

    def _halt(self) -> None:
        """Cancel every task (each removes its staging folder) and give them a moment to clean up."""
        for ref in self.refs:
            with contextlib.suppress(Exception):
                self.ray.cancel(ref)
        with contextlib.suppress(BaseException):
            self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=_CANCEL_WAIT_SECONDS)

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            self.ray.kill(self.reporter)


__all__ = ["AUTO", "LOCAL", "MAX_RETRIES", "RAY_EXTRA", "RayExecutor", "ray_available",
           "require_ray"]
