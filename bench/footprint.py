"""Benchmark: the footprint of ``gateway-canary run`` (issue "Performance", section 4).

One policy, against the tests' real kube-apiserver + etcd (``tests.kube_cluster``, binaries from
scripts/test-deps.sh; the controller runs as its ServiceAccount bound to what ``gateway-canary
rbac`` prints) and a real Prometheus scraping the tests' traffic exporter every second (with
``--no-prometheus``, or without the binary, an unreachable URL: /readyz waits for neither, the
checks then find Prometheus unavailable). Prints:

- import time of the run path: ``gateway-canary run`` with ``PYTHONPROFILEIMPORTTIME=1`` until
  /readyz answers 200 and one check has run, so the imports made lazily on the way count too: the
  total of every module's own time, the top 10 modules by cumulative time and the top 10 top-level
  packages by own time;
- start -> ready: from just before ``Popen`` to the first 200 from /readyz, median of ``--runs``;
- RSS (``/proc/PID/status``) at ready, and after ``--idle`` seconds of one policy checking every
  ``--interval`` seconds: VmRSS with its RssAnon and RssFile parts, and the peak (VmHWM);
- the wheel (``pip wheel --no-deps``) and what the package and its dependencies occupy installed:
  the files each installed distribution's RECORD lists (as pip wrote them, bytecode included),
  walking ``Requires-Dist`` from gateway-canary (no extras); gateway-canary itself (installed
  editable here) counts as its wheel's files plus the bytecode pip would compile for them;
- the image estimate: that, plus the base image's (the Dockerfile's ``PYTHON_IMAGE``) published
  size, uncompressed (``KNOWN_BASE_IMAGES_MB``; ``--base-image-mb`` to give it).

``--fresh-venv`` installs the wheel and its dependencies (from the package index) into a new
virtualenv, as the image's last stage does, reports its site-packages' growth and runs the
controller from there: the figures of what the image runs, without this repository's test extras.

Asserts nothing. ``--quick`` is the smallest size (2 starts, 3 s idle, 1 s interval).
Usage: .venv/bin/python bench/footprint.py [--quick] [--runs N] [--idle S] [--interval S]
       [--fresh-venv] [--no-prometheus] [--json PATH] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import marshal
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import venv
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from packaging.requirements import Requirement  # noqa: E402  (pip's, setuptools' and the test extras' dependency)

from controller.core.loader import parse_policy_text  # noqa: E402
from tests.kube_cluster import Cluster, ControlPlane, binary_paths  # noqa: E402
from tests.servers import GatewayTraffic, ManagedProcess, TrafficExporter, free_port, wait_for  # noqa: E402

MIB = 1024 * 1024
PROMETHEUS = os.environ.get("PROMETHEUS_BIN", "/usr/bin/prometheus")
TEST_BIN = Path(os.environ.get("GATEWAY_CANARY_TEST_BIN", ROOT / ".cache" / "bin"))
#: Uncompressed size (what ``docker images`` shows, linux/amd64) of base images, by tag family: the
#: published figure, not measured here (no Docker engine on the build machines).
KNOWN_BASE_IMAGES_MB = {
    "python:3.11-slim-bookworm": 130.0,
}

POLICY = """\
apiVersion: gateway-canary.io/v1alpha1
kind: CanaryPolicy
metadata:
  name: shop
spec:
  source: {{service: {ns}/istio-ingressgateway, workload: gw-source}}
  target: {{service: {ns}/istio-ingressgateway-asm, workload: gw-target}}
  schedule:
    steps: [5, 10, 25, 50, 100]
    bakeTime: 1h
  analysis:
    interval: {interval}s
    window: 30s
    minRequests: 10
  gates:
    errorRate: {{max: 0.05}}
    latency: {{p99Ms: {{max: 900}}}}
  routes: {{check: false}}
"""


@dataclass
class Figures:
    """Everything the benchmark measured (the --json output); NaN or None: not measured."""

    python: str = ""
    prometheus: str = ""
    import_ms: float = math.nan
    import_modules: int = 0
    import_top_cumulative: list[tuple[str, float]] = field(default_factory=list)
    import_top_packages: list[tuple[str, float]] = field(default_factory=list)
    ready_s: list[float] = field(default_factory=list)
    ready_median_s: float = math.nan
    ready_rss_mib: float = math.nan
    idle_seconds: float = math.nan
    idle_checks: int = 0
    idle_rss_mib: float = math.nan
    idle_rss_anon_mib: float = math.nan
    idle_rss_file_mib: float = math.nan
    peak_rss_mib: float = math.nan
    wheel_kib: float = math.nan
    installed_mib: float = math.nan
    installed_top: list[tuple[str, float]] = field(default_factory=list)
    installed_missing: list[str] = field(default_factory=list)
    fresh_venv_mib: float | None = None
    base_image: str = ""
    base_image_mib: float | None = None
    image_estimate_mib: float | None = None


# -- the controller as a subprocess ----------------------------------------------------------------------


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


def _status(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon and RssFile of a process, in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def _checks(port: int) -> int:
    """The checks the controller has made (``gateway_canary_checks_total``, every verdict)."""
    _, text = _get(port, "/metrics")
    lines = (line for line in text.splitlines() if line.startswith("gateway_canary_checks_total{"))
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in lines))


class Controller:
    """One ``gateway-canary run``; ``ready_s``: from just before Popen to the first 200 from /readyz."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path, *, importtime: bool = False) -> None:
        self.port = free_port()
        self.log = log
        env = {**env, "GATEWAY_CANARY_HTTP_PORT": str(self.port)}
        if importtime:
            env["PYTHONPROFILEIMPORTTIME"] = "1"
        started = time.perf_counter()
        self._process = ManagedProcess(command, log, env=env, cwd=log.parent)
        self.pid = self._process.proc.pid
        while _get(self.port, "/readyz")[0] != 200:
            code = self._process.proc.poll()
            if code is not None or time.perf_counter() - started > 60:
                self._process.stop()
                why = f"exited {code}" if code is not None else "not ready after 60 s"
                raise RuntimeError(f"gateway-canary run {why}: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.005)
        self.ready_s = time.perf_counter() - started

    def wait_for_checks(self, count: int) -> None:
        wait_for(lambda: _checks(self.port) >= count, timeout=60, interval=0.1, what=f"{count} check(s)")

    def stop(self) -> None:
        code = self._process.stop(signal.SIGTERM, timeout=20)
        if code != 0:
            raise RuntimeError(f"gateway-canary run exited {code} on SIGTERM (log: {self.log})")


# -- import time ------------------------------------------------------------------------------------------

_IMPORT = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|\s*(\S+)")


def import_profile(log: Path) -> tuple[float, int, list[tuple[str, float]], list[tuple[str, float]]]:
    """(total ms, modules, top 10 modules by cumulative ms, top 10 top-level packages by own ms) of an
    importtime log (other lines, the controller's own log, are skipped)."""
    own: dict[str, int] = {}
    cumulative: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        found = _IMPORT.match(line)
        if found:
            name = found.group(3)
            own[name] = own.get(name, 0) + int(found.group(1))
            cumulative[name] = max(cumulative.get(name, 0), int(found.group(2)))
    packages: dict[str, int] = defaultdict(int)
    for name, microseconds in own.items():
        packages[name.split(".")[0]] += microseconds
    top = sorted(cumulative.items(), key=lambda item: -item[1])[:10]
    top_packages = sorted(packages.items(), key=lambda item: -item[1])[:10]
    return (
        sum(own.values()) / 1000,
        len(own),
        [(name, us / 1000) for name, us in top],
        [(name, us / 1000) for name, us in top_packages],
    )


# -- sizes -------------------------------------------------------------------------------------------------


def build_wheel(directory: Path) -> Path:
    """``pip wheel --no-deps`` of the project (what the Dockerfile's first stage builds of it)."""
    args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--quiet", "--wheel-dir"]
    build = subprocess.run([*args, str(directory), str(ROOT)], capture_output=True, text=True, timeout=600, check=False)
    if build.returncode != 0:
        raise RuntimeError(f"pip wheel failed: {build.stderr[-2000:]}")
    return next(directory.glob("gateway_canary-*.whl"))


def _wheel_installed_bytes(wheel: Path) -> int:
    """The wheel's files as pip installs them: each file, and the bytecode pip compiles for each module."""
    total = 0
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            total += info.file_size
            if info.filename.endswith(".py"):
                code = compile(archive.read(info), info.filename, "exec", dont_inherit=True)
                total += 16 + len(marshal.dumps(code))  # a .pyc: its 16-byte header and the marshalled code
    return total


def _distribution_bytes(dist: metadata.Distribution) -> int:
    total = 0
    for file in dist.files or ():
        path = Path(str(dist.locate_file(file)))
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(name: str, extras: frozenset[str]) -> Iterator[tuple[str, frozenset[str]]]:
    for text in metadata.requires(name) or ():
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in (extras or {""})):
            yield requirement.name, frozenset(requirement.extras)


def installed_sizes(wheel: Path) -> tuple[dict[str, int], list[str]]:
    """Bytes per distribution of gateway-canary and of everything it requires (no extras), and the
    requirements not installed in this environment (not counted)."""
    sizes = {"gateway-canary": _wheel_installed_bytes(wheel)}
    missing: set[str] = set()
    queue = list(_requirements("gateway-canary", frozenset()))
    seen: set[tuple[str, frozenset[str]]] = set()
    while queue:
        name, extras = queue.pop()
        if (_canonical(name), extras) in seen:
            continue
        seen.add((_canonical(name), extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.add(_canonical(name))
            continue
        sizes.setdefault(_canonical(dist.metadata["Name"]), _distribution_bytes(dist))
        queue.extend(_requirements(name, extras))
    return sizes, sorted(missing)


def _tree_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file() and not path.is_symlink())


def fresh_venv(wheel: Path, directory: Path) -> tuple[Path, int]:
    """A new virtualenv with the wheel and its dependencies (from the package index), as the image's
    last stage installs them: its ``gateway-canary`` and the bytes its site-packages grew by."""
    env_dir = directory / "venv"
    venv.create(env_dir, with_pip=True)
    site = next(env_dir.glob("lib/python*/site-packages"))
    before = _tree_bytes(site)
    install = subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--no-cache-dir", "--quiet", str(wheel)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if install.returncode != 0:
        raise RuntimeError(f"pip install failed: {install.stderr[-2000:]}")
    return env_dir / "bin" / "gateway-canary", _tree_bytes(site) - before


def base_image() -> tuple[str, float | None]:
    """The Dockerfile's ``PYTHON_IMAGE`` and its known uncompressed size in MB (None: not known)."""
    found = re.search(r"^ARG PYTHON_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    image = found.group(1) if found else ""
    family = re.sub(r"^(python:\d+\.\d+)\.\d+", r"\1", image)  # patch releases differ by a few hundred KB
    return image, KNOWN_BASE_IMAGES_MB.get(family)


def measure_sizes(figures: Figures, workdir: Path, args: argparse.Namespace) -> list[str]:
    """Fill in the sizes; the command that runs the controller (the fresh virtualenv's with --fresh-venv)."""
    wheel = build_wheel(workdir / "wheel")
    figures.wheel_kib = wheel.stat().st_size / 1024
    sizes, figures.installed_missing = installed_sizes(wheel)
    figures.installed_mib = sum(sizes.values()) / MIB
    ranked = sorted(sizes.items(), key=lambda item: -item[1])[:10]
    figures.installed_top = [(name, size / MIB) for name, size in ranked]
    script = Path(sys.executable).parent / "gateway-canary"
    if args.fresh_venv:
        script, grown = fresh_venv(wheel, workdir)
        figures.fresh_venv_mib = grown / MIB
    figures.python = str(script.parent.parent)
    figures.base_image, figures.base_image_mib = base_image()
    if args.base_image_mb is not None:
        figures.base_image_mib = args.base_image_mb
    if figures.base_image_mib is not None:
        installed = figures.fresh_venv_mib if figures.fresh_venv_mib is not None else figures.installed_mib
        figures.image_estimate_mib = figures.base_image_mib + installed
    return [str(script), "run"]


# -- the servers and the controller ------------------------------------------------------------------------


@contextlib.contextmanager
def prometheus(traffic: TrafficExporter, workdir: Path, enabled: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    """(URL, wait until scraped) of a real Prometheus scraping ``traffic``; ("", no wait) when
    disabled or not installed."""
    if not enabled or not Path(PROMETHEUS).exists():
        yield "", lambda: None
        return
    from tests.conftest import prometheus_command

    port = free_port()
    args, scraped = prometheus_command(workdir, port, [traffic.server.port])
    process = ManagedProcess(args, workdir / "prometheus.log")
    try:
        yield f"http://127.0.0.1:{port}", lambda: wait_for(scraped, timeout=60, interval=0.2, what="a first scrape")
    finally:
        process.stop()


def _controller_env(kube: Cluster, workdir: Path, prometheus_url: str, interval: float) -> dict[str, str]:
    policies = workdir / "policies"
    policies.mkdir()
    text = POLICY.format(ns=kube.ns, interval=interval)
    (policies / "shop.yaml").write_text(text)
    loaded = parse_policy_text(text, "shop.yaml")
    if loaded.errors:
        raise RuntimeError(f"the benchmark's policy is invalid: {loaded.errors}")
    kube.grant(*(sourced.policy for sourced in loaded.policies))
    return {
        **{key: value for key, value in os.environ.items() if not key.startswith(("GATEWAY_CANARY_", "PYTHON"))},
        "GATEWAY_CANARY_POLICIES_DIR": str(policies),
        "GATEWAY_CANARY_PROMETHEUS_URL": prometheus_url or f"http://127.0.0.1:{free_port()}",  # (nobody there)
        "GATEWAY_CANARY_KUBECONFIG": str(kube.write_kubeconfig()),
        "GATEWAY_CANARY_NAMESPACE": kube.ns,
        "GATEWAY_CANARY_HTTP_HOST": "127.0.0.1",
        "GATEWAY_CANARY_LOG_FORMAT": "json",
    }


def measure_processes(
    figures: Figures, command: list[str], env: dict[str, str], workdir: Path, args: argparse.Namespace
) -> None:
    """Import time, start -> ready, RSS."""
    profiled = Controller(command, env, workdir / "importtime.log", importtime=True)
    profiled.wait_for_checks(1)
    profiled.stop()
    figures.import_ms, figures.import_modules, figures.import_top_cumulative, figures.import_top_packages = (
        import_profile(profiled.log)
    )
    for run in range(args.runs):
        controller = Controller(command, env, workdir / f"run-{run}.log")
        figures.ready_s.append(controller.ready_s)
        if run < args.runs - 1:
            controller.stop()
    figures.ready_median_s = statistics.median(figures.ready_s)
    figures.ready_rss_mib = _status(controller.pid)["VmRSS"]  # the last start stays up: idle, one policy
    controller.wait_for_checks(1)
    time.sleep(args.idle)
    status = _status(controller.pid)
    figures.idle_seconds = args.idle
    figures.idle_checks = _checks(controller.port)
    figures.idle_rss_mib, figures.idle_rss_anon_mib = status["VmRSS"], status["RssAnon"]
    figures.idle_rss_file_mib, figures.peak_rss_mib = status["RssFile"], status["VmHWM"]
    controller.stop()


def measure(args: argparse.Namespace) -> Figures:
    figures = Figures()
    binaries = binary_paths(TEST_BIN)
    missing = [str(binaries[name]) for name in ("etcd", "kube-apiserver") if not binaries[name].exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run scripts/test-deps.sh")
    workdir = Path(tempfile.mkdtemp(prefix="footprint-"))
    traffic = TrafficExporter(GatewayTraffic("gw-source"), GatewayTraffic("gw-target"), total_rps=200.0)
    traffic.share = lambda: 0.05  # the ASM gateway at its first step: both gateways have traffic
    with contextlib.ExitStack() as stack:
        stack.callback(traffic.close)
        if args.keep:
            print(f"work directory (logs, importtime output): {workdir}", file=sys.stderr)
        else:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        prometheus_url, scraped = stack.enter_context(prometheus(traffic, workdir, not args.no_prometheus))
        figures.prometheus = "real" if prometheus_url else "unreachable"
        command = measure_sizes(figures, workdir, args)  # while Prometheus waits for its first scrape
        plane = stack.enter_context(ControlPlane(workdir / "cp", binaries).running())
        kube = Cluster(plane, plane.create_namespace("footprint"), workdir)
        kube.add_gateways()
        traffic.move_to(kube.ns)
        env = _controller_env(kube, workdir, prometheus_url, args.interval)
        scraped()
        measure_processes(figures, command, env, workdir, args)
    return figures


def report(figures: Figures) -> None:
    print(f"gateway-canary run from {figures.python}; Prometheus: {figures.prometheus}")
    modules = figures.import_modules
    print(f"import time of the run path (to ready + 1 check): {figures.import_ms:.0f} ms, {modules} modules")
    print("  top 10 modules by cumulative time:")
    for name, ms in figures.import_top_cumulative:
        print(f"    {ms:8.1f} ms  {name}")
    print("  top 10 packages by own time:")
    for name, ms in figures.import_top_packages:
        print(f"    {ms:8.1f} ms  {name}")
    runs = ", ".join(f"{seconds:.3f}" for seconds in figures.ready_s)
    print(f"start -> ready (/readyz 200): median {figures.ready_median_s:.3f} s (n={len(figures.ready_s)}: {runs})")
    print(f"RSS at ready: {figures.ready_rss_mib:.1f} MiB")
    print(
        f"idle RSS after {figures.idle_seconds:g} s ({figures.idle_checks} checks): {figures.idle_rss_mib:.1f} MiB "
        f"(anon {figures.idle_rss_anon_mib:.1f}, file {figures.idle_rss_file_mib:.1f}); "
        f"peak (VmHWM) {figures.peak_rss_mib:.1f} MiB"
    )
    print(f"wheel: {figures.wheel_kib:.0f} KiB")
    print(f"installed, wheel + dependencies (RECORD files): {figures.installed_mib:.1f} MiB; the largest:")
    for name, mib in figures.installed_top:
        print(f"    {mib:7.2f} MiB  {name}")
    if figures.installed_missing:
        print(f"  required but not installed here (not counted): {', '.join(figures.installed_missing)}")
    if figures.fresh_venv_mib is not None:
        print(f"installed in a fresh virtualenv (site-packages growth): {figures.fresh_venv_mib:.1f} MiB")
    if figures.image_estimate_mib is None:
        print(f"image estimate: the base {figures.base_image} (size unknown: --base-image-mb) + installed")
    else:
        print(
            f"image estimate: {figures.image_estimate_mib:.0f} MiB "
            f"(base {figures.base_image} ~{figures.base_image_mib:.0f} MB uncompressed + installed)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="the smallest size: 2 starts, 3 s idle, 1 s interval")
    parser.add_argument("--runs", type=int, default=None, help="starts for the start -> ready median (default 7)")
    parser.add_argument("--idle", type=float, default=None, help="seconds idle before RSS is read (default 30)")
    parser.add_argument("--interval", type=int, default=None, help="the policy's check interval, s (default 5)")
    parser.add_argument("--no-prometheus", action="store_true", help="an unreachable Prometheus URL instead")
    parser.add_argument("--fresh-venv", action="store_true", help="install into a new virtualenv and run from it")
    parser.add_argument("--base-image-mb", type=float, default=None, help="the base image's size, uncompressed")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, importtime output)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    args.runs = max(1, args.runs or (2 if args.quick else 7))
    args.idle = args.idle if args.idle is not None else (3.0 if args.quick else 30.0)
    args.interval = args.interval or (1 if args.quick else 5)
    figures = measure(args)
    report(figures)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(figures), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
