"""What `pip install tokenbus` brings: the client, the server and relay, the audit
and analytics consumers, without the model runtime, which is `tokenbus[worker]`;
and the client's types (py.typed)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_RUNTIME = ("torch", "transformers", "gguf", "accelerate")


def _modules_after(code: str) -> set[str]:
    """The top-level modules a fresh interpreter holds after running ``code``."""
    probe = code + "\nimport sys; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


@pytest.mark.parametrize(
    "code",
    [
        "import producers; from producers import Tokenbus, AsyncTokenbus",
        "import relay",
        "import tokenbus.edge.app",
        "import consumers.audit",
        "from tokenbus.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass",
    ],
    ids=["client", "relay", "http-app", "audit", "cli-help"],
)
def test_the_pieces_without_a_model_import_no_model_runtime(code: str) -> None:
    assert not _modules_after(code) & set(MODEL_RUNTIME)


def test_the_model_runtime_is_only_in_the_worker_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_name(requirement) for requirement in project["dependencies"]}
    assert not names & set(MODEL_RUNTIME)
    worker = {_name(requirement) for requirement in project["optional-dependencies"]["worker"]}
    assert set(MODEL_RUNTIME) <= worker
    assert ".[worker,guard,dev]" in (ROOT / "scripts" / "install").read_text()  # everything


def test_the_client_ships_its_types() -> None:
    assert (ROOT / "producers" / "py.typed").is_file()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["producers"]


def _name(requirement: str) -> str:
    for end in "<>=!~[; ":
        requirement = requirement.split(end)[0]
    return requirement.strip().lower()
