"""The long-running service: policies -> one scheduled check per policy, reloads, clean shutdown.

APScheduler runs each policy's tick at its interval (one at a time per policy, missed runs
coalesced) and re-reads the policies directory on a timer. SIGTERM stops new ticks, lets the
one in flight finish or abandon its raise (a rollback is always written), releases the leader
Lease, then flushes alerts.

With leader election (``controller.runtime.leader``) all of that runs only while this replica
leads: a term starts with fresh runners that read every policy's state from its state object
(never from an earlier term's memory) and ends by removing the ticks and waiting for the one in
flight (whose writes the fence refuses). A standby serves /metrics, /healthz and /readyz (it is
ready: a rolling update waits for it) and reports ``gateway_canary_is_leader 0``.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from types import FrameType

import structlog
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from controller.core.alerts import build_alert
from controller.core.enums import AlertKind, Severity
from controller.core.lease import FenceToken
from controller.core.loader import PolicyError
from controller.core.policy import CanaryPolicy
from controller.core.queries import newest_sample_query
from controller.core.results import RenderedQuery
from controller.errors import ClusterError, MetricsUnavailable
from controller.notify.dispatcher import AlertDispatcher, DeliveryPolicy
from controller.notify.factory import global_receivers, policy_receivers
from controller.ports import (
    Clock,
    CloudInspector,
    GatewayPair,
    MetricsSource,
    Notifier,
    RouteInspector,
    SoleWriter,
    StateStore,
)
from controller.runtime.cloud_watch import CloudWatch
from controller.runtime.collector import Collector
from controller.runtime.http import StatusServer
from controller.runtime.leader import LeaderElector
from controller.runtime.policy_source import PolicyCatalog
from controller.runtime.reconciler import PolicyRunner
from controller.runtime.telemetry import Telemetry
from controller.settings import Settings

__all__ = ["ControllerService"]

_log = structlog.get_logger("controller.service")
#: an unanswered command runs its policy's tick early again after this long
_RETRIGGER_SECONDS = 5.0


class ControllerService:
    """Wires the catalog, the runners, the scheduler and the status server together."""

    def __init__(
        self,
        settings: Settings,
        *,
        pair: GatewayPair,
        store: StateStore,
        metrics_for: Callable[[CanaryPolicy], MetricsSource],
        clock: Clock,
        time_scale: float = 1.0,
        telemetry: Telemetry | None = None,
        extra_receivers: list[Notifier] | None = None,
        serve_http: bool = True,
        cloud: CloudInspector | None = None,
        routes: RouteInspector | None = None,
        elector: LeaderElector | None = None,
    ) -> None:
        self.settings = settings
        #: None: no election, this process is the only writer and always leads
        self.elector = elector
        self._leading = False
        self.telemetry = telemetry or Telemetry()
        self.stopping = threading.Event()
        self.runners: dict[str, PolicyRunner] = {}
        self._pair = pair
        self._store = store
        self._metrics_for = metrics_for
        self._cloud = cloud
        self._routes = routes
        self._clock = clock
        self._scale = time_scale
        self._extra_receivers = extra_receivers or []
        self._catalog = PolicyCatalog(settings.policies_dir)
        # a failure's re-check must not judge an answer sent a moment after the failed check's
        share = settings.query_share_seconds
        if settings.failure_recheck_seconds > 0:
            share = min(share, settings.failure_recheck_seconds / 2)
        self._collector = Collector(workers=_QUERY_THREADS, share_seconds=share)
        self._dispatcher = AlertDispatcher(
            DeliveryPolicy(
                backoff_seconds=settings.notify_backoff_seconds,
                backoff_max_seconds=settings.notify_backoff_max_seconds,
                timeout_seconds=settings.notify_timeout_seconds,
                critical_timeout_seconds=settings.notify_critical_timeout_seconds,
                deadline_seconds=settings.notify_deadline_seconds,
                critical_deadline_seconds=settings.notify_critical_deadline_seconds,
            ),
            on_outcome=self.telemetry.notified,
        )
        self.telemetry.oldest_undelivered.set_function(self._dispatcher.oldest_pending_seconds)
        self._due: dict[str, datetime] = {}  # job id -> when the run just submitted was due
        self._scheduler = BackgroundScheduler(
            timezone=UTC, executors={"default": _DueRecordingExecutor(self._due, _TICK_THREADS)}
        )
        self._scheduler.add_listener(self._skipped, EVENT_JOB_MAX_INSTANCES)
        self._reload_lock = threading.Lock()
        self._loaded = threading.Event()
        self._reported_errors: set[PolicyError] = set()
        self._phased: dict[str, tuple[float, float]] = {}  # policy -> (when read, grid start) after the scrapes
        self._polled: dict[str, float] = {}  # policy -> when a look for commands last read its object
        self._triggered: dict[str, tuple[str, float]] = {}  # policy -> (command id, when its tick was run early)
        self._commands_trouble: str | None = None
        self.http: StatusServer | None = None
        if serve_http:
            self.http = StatusServer(
                settings.http_host,
                settings.http_port,
                self.telemetry.registry,
                healthy=self.healthy,
                ready=lambda: self._loaded.is_set() and self._scheduler.running and not self.stopping.is_set(),
            )

    # -- lifecycle -----------------------------------------------------------------------------------

    def healthy(self) -> bool:
        """Scheduling, not stopping, electing (with election), and no policy whose ticks keep failing
        past the setting. An unreachable API server is not unhealthy: a restart would not bring it back."""
        if not self._scheduler.running or self.stopping.is_set():
            return False
        if self.elector is not None and not self.elector.alive():
            return False
        limit = self.settings.unhealthy_after_seconds
        now = time.monotonic()
        return all(r.failing_since is None or now - r.failing_since < limit for r in list(self.runners.values()))

    def start(self) -> None:
        """Load policies, start ticking and serving."""
        if self.http is not None:
            self.http.start()
            _log.info("status server listening", port=self.http.port)
        self._scheduler.start()
        if self.elector is None:
            self._lead(None)
        else:
            self.telemetry.is_leader.set(0)
            self._watch_while_standing_by()
            self.elector.start(on_started=self._lead, on_stopped=self._follow, on_reachable=self._reachability)
        self._loaded.set()

    def _watch_while_standing_by(self) -> None:
        """A standby reads the policies directory too (reporting nothing): when it takes over, a file
        that turned invalid still has its last good version, which keeps protecting (R3)."""
        self._every(self.settings.reload_interval_seconds, self._watch, "__watch__", at_once=True)

    def _every(self, seconds: float, job: Callable[[], None], name: str, *, at_once: bool = False) -> None:
        """A service job (one at a time, missed runs coalesced), replacing one of the same name."""
        self._scheduler.add_job(
            job,
            IntervalTrigger(seconds=seconds / self._scale),
            id=name,
            replace_existing=True,
            max_instances=1,
            coalesce=True,
            **({"next_run_time": datetime.now(UTC)} if at_once else {}),
        )

    def _watch(self) -> None:
        if self.stopping.is_set():
            return
        with self._reload_lock:
            if self._leading or self.stopping.is_set():
                return
            try:
                self._catalog.refresh()
            except Exception:  # reading is all a standby does: never a reason to stop standing by
                _log.exception("reading the policies directory failed while standing by")

    @property
    def leading(self) -> bool:
        """Whether this replica runs the policies now (always, without election)."""
        return self._leading

    def _lead(self, term: FenceToken | None) -> None:
        """A term starts (or, without election, the process): load the policies and tick them."""
        with self._reload_lock:
            if self.stopping.is_set():
                return
            self._leading = True
            self.telemetry.is_leader.set(1)
            if term is not None:
                self.telemetry.leader_transitions.labels("started").inc()
                _log.info("leading: running the policies", term=term.term)
            self._unschedule("__watch__")
            self._catalog.invalidate()  # (what was read standing by is reported now; last good versions stay)
            self._reload_guarded()
            self._every(self.settings.reload_interval_seconds, self.reload, "__reload__")
            if self.settings.command_poll_seconds > 0:
                self._every(self.settings.command_poll_seconds, self.look_for_commands, "__commands__")

    def _follow(self, why: str) -> None:
        """The term ended: no more ticks; returns once the tick in flight (if any) is over."""
        with self._reload_lock:
            self._leading = False
            self.telemetry.is_leader.set(0)
            self.telemetry.leader_transitions.labels("ended").inc()
            if not self.stopping.is_set():  # (stop() shuts the scheduler down: no job calls meanwhile)
                for job in ("__reload__", "__commands__", *self.runners):
                    self._unschedule(job)
                self._watch_while_standing_by()
            runners, self.runners = self.runners, {}
            self._reported_errors = set()
            self._triggered.clear()
            self._catalog.invalidate()
        for runner in runners.values():
            runner.retire()  # waits for its tick in flight, which writes nothing more
        self.telemetry.stand_by()
        left = self._leave_alerts(runners.values())
        _log.warning("standing by: the policies run on the leader", why=why, policies=len(runners), alerts_left=left)

    def _leave_alerts(self, runners: Iterable[PolicyRunner]) -> int:
        """Stop delivering the alerts the state objects' outboxes hold: the next leader sends them (the
        same ids), and two senders would page twice where receivers do not de-duplicate."""
        return self._dispatcher.abandon(set().union(*(runner.persisted for runner in runners)))

    def _reachability(self, reachable: bool) -> None:
        if self.telemetry.reachable(reachable):
            if reachable:
                _log.info("the Kubernetes API server answers again")
            else:
                _log.error(
                    "the Kubernetes API server is unreachable: no Lease, weight or state can be written until it "
                    "answers (gateway_canary_cluster_reachable 0)"
                )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop scheduling, wait for in-flight ticks, flush alerts."""
        if self.stopping.is_set():
            return
        with self._reload_lock:  # a term starting now sees it and starts nothing
            self.stopping.set()
        _log.info("stopping: waiting for in-flight checks")
        self._scheduler.shutdown(wait=True)
        if self.elector is not None:  # after the last tick: the peer takes over at once, and sends what
            self._leave_alerts(self.runners.values())  # the outboxes hold; the rest gets its last try here
            self.elector.stop(release=True)
        self._dispatcher.close(timeout=min(timeout, 10.0))
        self._collector.close()
        if self.http is not None:
            self.http.stop()
        _log.info("stopped")

    def run_forever(self) -> None:
        """Start, then block until SIGTERM/SIGINT, then stop cleanly."""
        stop_requested = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            _log.info("signal received", signal=signal.Signals(signum).name)
            stop_requested.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        stop_requested.wait()
        self.stop()

    # -- policies -----------------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the directory and add, replace or remove runners to match it. Never raises:
        a reload that fails keeps every running policy as it is and is logged with its traceback."""
        if self.stopping.is_set():  # (before the lock: stop() may be waiting for this job)
            return
        with self._reload_lock:
            if self.stopping.is_set() or not self._leading:
                return
            self._reload_guarded()

    def _reload_guarded(self) -> None:
        try:
            self._reload()
        except Exception:  # a bug here must not stop the reload job, nor any policy's protection
            _log.exception("reloading the policies failed; the running policies keep running")
            self.telemetry.errors.labels("-", "reload").inc()
            self._catalog.invalidate()  # and the next reload tries again

    def _reload(self) -> None:
        snapshot = self._catalog.refresh()
        if snapshot is None:
            return
        for warning in snapshot.warnings:
            _log.warning("policy file warning", warning=str(warning))
        self.telemetry.policy_file_errors.set(len(snapshot.errors))
        for name in sorted(set(self.runners) - set(snapshot.policies)):
            runner = self.runners.pop(name)
            self._unschedule(name)
            runner.alert_removed()
            self.telemetry.forget(name)
        changed = [
            name
            for name, sourced in snapshot.policies.items()
            if name not in self.runners or self.runners[name].policy != sourced.policy
        ]
        starts = _staggered(
            {
                name: snapshot.policies[name].policy.spec.analysis.interval.total_seconds() / self._scale
                for name in changed
            }
        )
        for name, sourced in snapshot.policies.items():
            if name in starts:
                current = self._install(sourced.policy, replacing=name in self.runners, after=starts[name])
            else:
                current = self.runners[name]
            current.file = sourced.file
            # R3: a file that turned invalid keeps its last good policy observing and rolling
            # back, but refuses raises until it is fixed (reported once, as PolicyInvalid below).
            problems = [str(error) for error in snapshot.errors if error.file == sourced.file]
            current.file_problem = f"its policy file is invalid: {'; '.join(problems)}" if problems else None
        self.telemetry.policies.set(len(self.runners))
        self._report_errors(snapshot.errors)

    def _install(self, policy: CanaryPolicy, *, replacing: bool, after: float = 0.0) -> PolicyRunner:
        # Receivers that cannot be built are refusals (no raise), never a reason to stop watching:
        # the ones that can be built, and the global ones, still hear about everything.
        own, problems = policy_receivers(policy, self.settings)
        receivers: list[Notifier] = own + global_receivers(self.settings) + self._extra_receivers
        metrics: MetricsSource
        try:
            metrics = self._metrics_for(policy)
        except ValueError as exc:
            problems.append(str(exc))
            metrics = _NoMetrics(str(exc))
        config_error = "; ".join(problems) or None
        runner = PolicyRunner(
            policy,
            pair=self._pair,
            store=self._store,
            metrics=metrics,
            receivers=receivers,
            dispatcher=self._dispatcher,
            collector=self._collector,
            clock=self._clock,
            telemetry=self.telemetry,
            stopping=self.stopping,
            config_error=config_error,
            forbidden_grace_seconds=self.settings.forbidden_grace_seconds,
            cloud=None
            if self._cloud is None
            else CloudWatch(self._cloud, self._routes, verify_writes=not self.settings.dry_run),
            status_refresh_seconds=self.settings.status_refresh_seconds,
            runbook_url=self.settings.runbook_url,
            fence=self.elector or SoleWriter(),
        )
        self.runners[policy.name] = runner
        seconds = policy.spec.analysis.interval.total_seconds() / self._scale
        self._scheduler.add_job(
            self._tick,
            IntervalTrigger(seconds=seconds),
            args=[policy.name],
            id=policy.name,
            replace_existing=True,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            next_run_time=datetime.now(UTC) + timedelta(seconds=after),
        )
        _log.info(
            "policy replaced" if replacing else "policy loaded",
            policy=policy.name,
            interval_s=policy.spec.analysis.interval.total_seconds(),
            receivers=[r.name for r in receivers],
        )
        return runner

    def _unschedule(self, name: str) -> None:
        if self._scheduler.get_job(name) is not None:
            self._scheduler.remove_job(name)

    def _skipped(self, event: JobEvent) -> None:
        """A policy's tick dropped because its last one still runs (the service's own jobs are not ticks)."""
        if event.job_id in self.runners:
            self.telemetry.ticks_skipped.inc()

    def _tick(self, name: str) -> None:
        due = self._due.pop(name, None)
        runner = self.runners.get(name)
        if runner is None or self.stopping.is_set():
            return
        started = time.perf_counter()
        if due is not None:
            self.telemetry.check_lateness.observe(max((datetime.now(UTC) - due).total_seconds(), 0.0))
        try:
            outcome = runner.tick()
        except Exception:  # a bug must not kill the scheduler thread; it is logged with its traceback
            runner.log.exception("tick crashed")
            self.telemetry.errors.labels(name, "crash").inc()
            return
        finally:
            self.telemetry.tick_seconds.observe(time.perf_counter() - started)
        recheck = self.settings.failure_recheck_seconds
        if outcome.recheck_soon and recheck > 0 and not self.stopping.is_set():
            job = self._scheduler.get_job(name)
            soon = datetime.now(UTC) + timedelta(seconds=recheck / self._scale)
            if job is not None and (job.next_run_time is None or soon < job.next_run_time):
                job.modify(next_run_time=soon)
        self._after_scrape(name, runner)  # (a re-check too: on the grid, never sooner than asked)

    def _after_scrape(self, name: str, runner: PolicyRunner) -> None:
        """With CHECK_AFTER_SCRAPE_SECONDS, put the policy's next check on the grid that starts that
        long after Prometheus's newest sample of the ASM gateway (read again every minute): at most an
        interval later than it was due, never sooner. Any trouble: left as it was."""
        margin = self.settings.check_after_scrape_seconds
        if margin <= 0 or self.stopping.is_set():
            return
        now = time.monotonic()
        if now - self._phased.get(name, (-math.inf, 0.0))[0] >= _REPHASE_SECONDS:
            try:
                newest = runner.metrics.query(newest_sample_query(runner.policy))
            except MetricsUnavailable:
                newest = None
            if newest is not None and math.isfinite(newest):
                self._phased[name] = (now, newest + margin)
        job = self._scheduler.get_job(name)
        if name not in self._phased or job is None or job.next_run_time is None:
            return
        interval = runner.policy.spec.analysis.interval.total_seconds() / self._scale
        due = job.next_run_time.timestamp()
        aligned = after_scrape(self._phased[name][1], interval, due)
        if aligned - due > 0.001:
            job.modify(next_run_time=datetime.fromtimestamp(aligned, UTC))

    def look_for_commands(self) -> None:
        """Run at once the tick of a policy an operator just gave a command (it answers it).

        Never raises: a store that cannot be read only delays commands to their policy's next tick.
        """
        if self.stopping.is_set() or not self._leading:
            return
        runners = dict(self.runners)
        now = time.monotonic()
        asked = self._unread_for_commands(runners, now)
        try:
            waiting = self._store.commands([runners[name].policy for name in asked])
        except ClusterError as exc:
            if self._commands_trouble != str(exc):
                self._commands_trouble = str(exc)
                _log.warning("cannot look for operators' commands; they wait for the next tick", error=str(exc))
            return
        except Exception:
            _log.exception("looking for operators' commands failed; they wait for the next tick")
            return
        self._commands_trouble = None
        self._polled.update(dict.fromkeys(asked, now))
        for name, ident in waiting.items():
            runner = runners.get(name)
            if runner is None or ident == runner.last_command_id:
                continue
            # once per command; again after a while if still unanswered (a tick under way when the
            # command came skips the early run, and a failing tick answers nothing)
            before = self._triggered.get(name)
            if before is not None and before[0] == ident and now - before[1] < _RETRIGGER_SECONDS:
                continue
            self._triggered[name] = (ident, now)
            job = self._scheduler.get_job(name)
            if job is not None and not self.stopping.is_set():
                _log.info("operator command waiting; running the tick now", policy=name, command_id=ident)
                job.modify(next_run_time=datetime.now(UTC))

    def _unread_for_commands(self, runners: dict[str, PolicyRunner], now: float) -> list[str]:
        """The policies whose state object nobody read (a tick, or an earlier look) for a poll period,
        oldest first, at most ``_POLL_BUDGET`` reads a second: one read per policy and poll would be
        hundreds a second with hundreds of policies, while a tick reads its object every interval
        anyway. With up to ``_POLL_BUDGET x COMMAND_POLL_SECONDS`` policies every look reads every
        object; with more, a command is seen within ``policies / _POLL_BUDGET`` seconds (or at its
        policy's next tick, if sooner)."""
        poll = self.settings.command_poll_seconds
        period = max(poll, len(runners) / _POLL_BUDGET)

        def last_read(name: str) -> float:
            return max(runners[name].read_at or -math.inf, self._polled.get(name, -math.inf))

        # read again when it would be older than the period at the next look (a few: every look)
        stale = sorted((name for name in runners if now - last_read(name) >= period - poll), key=last_read)
        for name in set(self._polled) - set(runners):
            del self._polled[name]
        return stale[: max(1, math.ceil(_POLL_BUDGET * poll))]

    def _report_errors(self, errors: tuple[PolicyError, ...]) -> None:
        """Log every current error; report each distinct one once: one PolicyInvalid alert (global
        receivers and those of the policy the file holds) and one Event on that policy's target."""
        for error in errors:
            _log.error("policy file invalid", error=str(error))
        fresh = [error for error in errors if error not in self._reported_errors]
        self._reported_errors = set(errors)
        for error in fresh:
            affected = [runner for runner in self.runners.values() if runner.file == error.file]
            receivers = {r.name: r for r in global_receivers(self.settings) + self._extra_receivers}
            for runner in affected:
                receivers.update({r.name: r for r in runner.receivers})
                runner.event(AlertKind.POLICY_INVALID.value, f"{error}; the last good version keeps running")
            alert = build_alert(
                kind=AlertKind.POLICY_INVALID,
                severity=Severity.WARNING,
                policy=error.file,
                reason=str(error),
                at=self._clock.now(),
                source_service="-",
                target_service="-",
                dedup_suffix=str(error),
                runbook_base_url=self.settings.runbook_url,
            )
            self._dispatcher.submit(alert, list(receivers.values()))


#: threads that send a check's queries (a check's custom gates, or its wait for a shared answer)
_QUERY_THREADS = 16
#: state objects read a second at most when looking for operators' commands
_POLL_BUDGET = 50.0
#: threads that run ticks (and service jobs). A tick mostly waits on the API server and Prometheus
#: (200-350 ms at 500 policies for 12-20 ms of CPU): APScheduler's default of 10 capped a process
#: at ~40 ticks a second, well before its CPU did; bursts (a shared answer every check of a round
#: waits for) need room on top (docs/benchmarks.md)
_TICK_THREADS = 48


class _DueRecordingExecutor(ThreadPoolExecutor):  # type: ignore[misc]  # (apscheduler is untyped)
    """The scheduler's thread pool, noting when each run was due before a thread can start it: a
    tick measures its lateness from there, queueing for a thread included (a listener of the
    submission event runs after the submission: too late). With runs coalesced APScheduler hands
    over the latest due time only; runs dropped because the last one still runs are counted apart
    (``gateway_canary_ticks_skipped``)."""

    def __init__(self, due: dict[str, datetime], threads: int) -> None:
        super().__init__(threads)
        self._due = due

    def _do_submit_job(self, job: Job, run_times: list[datetime]) -> None:
        if run_times:
            self._due[job.id] = min(run_times)
        super()._do_submit_job(job, run_times)


#: how often a policy's checks are phased again after the scrapes (CHECK_AFTER_SCRAPE_SECONDS)
_REPHASE_SECONDS = 60.0


def after_scrape(phase: float, interval: float, due: float) -> float:
    """The first check time on the grid ``phase + k x interval`` not before ``due`` (epoch seconds).

    Only ever later: a check moved earlier could come less than a scrape after the last one and
    judge the same samples twice."""
    return phase + math.ceil((due - phase) / interval - 1e-9) * interval


#: policies loaded together start their ticks at least this far apart (up to their interval / count)
_STAGGER_SECONDS = 0.02


def _staggered(intervals: dict[str, float]) -> dict[str, float]:
    """Seconds from now to each policy's first tick, when several are loaded at once (a start, a
    takeover, a ConfigMap of many files): spread over the interval rather than all at one instant,
    where their ticks would queue behind each other at every interval for good (a tick keeps its
    phase). One policy alone starts at once; none waits longer than its interval.
    """
    count = len(intervals)
    return {
        name: index * min(intervals[name] / count, _STAGGER_SECONDS) for index, name in enumerate(sorted(intervals))
    }


class _NoMetrics:
    """Stands in for a metrics source that could not be built: every query is unavailable, with why."""

    def __init__(self, why: str) -> None:
        self._why = why

    def query(self, query: RenderedQuery) -> float | None:
        raise MetricsUnavailable(self._why)

    def query_vector(self, query: RenderedQuery) -> list[tuple[dict[str, str], float]]:
        raise MetricsUnavailable(self._why)
