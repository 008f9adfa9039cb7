"""The deployment files in deploy/: Kubernetes manifests, the image, alert rules, systemd
units and the crontab.

Each file is parsed and checked against the code it drives: the command lines go through
the real argument parser, the ConfigMap's TOML through the real settings loader, the
manifests through the Kubernetes schemas of every supported release, the alert rules
through `promtool`, the units through `systemd-analyze verify`, and the crontab lines, the
daemon's manifest and the image's health check are run for real against the fake API.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from docker.utils.build import exclude_paths

from sync import __version__
from sync.cli import build_parser
from sync.config import RESOURCES, Settings, load_settings, parse_duration
from sync.daemon import ABORT_WAIT_SECONDS
from sync.metrics import Metrics
from tests.conftest import API_KEY, free_port
from tests.fakeapi import FakeApi, dataset

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
CRONTAB = DEPLOY / "crontab"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS = DEPLOY / "prometheus"
DOCS = ROOT / "docs" / "deploy.md"
README = ROOT / "README.md"

# The oldest Kubernetes release the manifests support, as docs/deploy.md states it. It is
# the one place the range starts: every newer release whose schema kubernetes-validate
# bundles is checked as well (supported_kubernetes()).
MIN_KUBERNETES = "1.26"

# Where the units and the crontab expect the installed program.
INSTALLED_BINARY = "/opt/ideogram-sync/venv/bin/ideogram-sync"
# After shutdown_grace_seconds the daemon aborts the running sync and waits this long
# for it to roll back (sync/daemon.py, Daemon._finish_current_run).
DAEMON_ABORT_WAIT_SECONDS = ABORT_WAIT_SECONDS
SECRET_ENV = {"IDEOGRAM_API_KEY": "api-key", "IDEOGRAM_SYNC_DATABASE_URL": "database-url"}
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "StateDirectory": "ideogram-sync",
    "WorkingDirectory": "/var/lib/ideogram-sync",
}


# -- helpers ------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """Every document in deploy/kubernetes/*.yaml, by kind (each kind appears once)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        with path.open(encoding="utf-8") as fh:
            for doc in yaml.safe_load_all(fh):
                if doc is None:
                    continue
                assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
                kind = doc["kind"]
                assert kind not in found, f"{path.name}: a second {kind}"
                found[kind] = doc
    return found


def configmap_toml() -> str:
    data = manifests()["ConfigMap"]["data"]
    assert list(data) == ["ideogram-sync.toml"]
    return str(data["ideogram-sync.toml"])


def configmap_settings(tmp_path: Path) -> Settings:
    """The ConfigMap's TOML loaded by the tool itself, from a file as in the pods."""
    path = tmp_path / "ideogram-sync.toml"
    path.write_text(configmap_toml(), encoding="utf-8")
    return load_settings(str(path), env={})


def container(workload: dict[str, Any]) -> dict[str, Any]:
    spec = pod_spec(workload)
    assert len(spec["containers"]) == 1
    return dict(spec["containers"][0])


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "CronJob":
        return dict(workload["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return dict(workload["spec"]["template"]["spec"])


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """Parse with the real parser; argparse exits 2 on anything it does not accept."""
    return build_parser().parse_args(argv)


def env_of(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in spec.get("env", [])}


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]}, keeping repeated keys."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path.name}: continuation lines are not expected"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} is outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not key=value"
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    values = [v for k, v in unit.get(section, []) if k == key]
    assert len(values) == 1, f"[{section}] {key} is set {len(values)} times"
    return values[0]


def timespan_seconds(text: str) -> float:
    """A systemd time span such as 120, 90s, 2min or 1h 30min, in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
    parts = re.findall(r"(\d+)\s*([a-z]*)", text.strip())
    assert parts and re.fullmatch(r"(\s*\d+\s*[a-z]*)+\s*", text), f"bad time span {text!r}"
    return float(sum(int(number) * units[unit] for number, unit in parts))


def wrapper(tmp_path: Path) -> Path:
    """An executable that runs this checkout's CLI, to stand in for the installed one."""
    path = tmp_path / "bin" / "ideogram-sync"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'#!/bin/sh\nPYTHONPATH={shlex.quote(str(ROOT))} exec {shlex.quote(sys.executable)} -m sync "$@"\n',
        encoding="utf-8",
    )
    path.chmod(0o755)
    return path


def crontab() -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The crontab's environment lines and its jobs as (schedule, command)."""
    variables: dict[str, str] = {}
    jobs: list[tuple[str, str]] = []
    for raw in CRONTAB.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        job = re.fullmatch(r"((?:\S+\s+){4}\S+)\s+(.+)", line)
        variable = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)", line)
        if variable:
            variables[variable.group(1)] = variable.group(2)
            continue
        assert job, f"crontab line {line!r} is neither NAME=value nor a job"
        jobs.append((job.group(1), job.group(2)))
    return variables, jobs


def tool_args(command: str) -> list[str]:
    """The arguments a shell command passes to the installed ideogram-sync."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    start = tokens.index(INSTALLED_BINARY) + 1
    args: list[str] = []
    for token in tokens[start:]:
        if set(token) <= set("();<>|&"):
            break
        args.append(token)
    return args


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback only
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def replace_once(text: str, pattern: str, replacement: str) -> str:
    new, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count == 1, f"{pattern!r} matched {count} times"
    return new


@pytest.fixture
def fake_listing(fake_api: FakeApi) -> Iterator[FakeApi]:
    fake_api.datasets = [dataset("a"), dataset("b")]
    yield fake_api


# -- Kubernetes ---------------------------------------------------------------------


def test_manifests_are_the_four_expected_kinds() -> None:
    found = manifests()
    assert {kind: doc["apiVersion"] for kind, doc in found.items()} == {
        "Secret": "v1",
        "ConfigMap": "v1",
        "CronJob": "batch/v1",
        "Deployment": "apps/v1",
    }
    for doc in found.values():
        assert doc["metadata"]["name"].startswith("ideogram-sync")


def test_configmap_is_a_valid_config_for_the_tool(tmp_path: Path) -> None:
    raw = tomllib.loads(configmap_toml())
    settings = configmap_settings(tmp_path)
    assert raw["metrics"]["port"] == settings.metrics.port == 9108
    assert settings.metrics.host == "0.0.0.0"
    assert settings.schedule.max_age_seconds == parse_duration(raw["schedule"]["max_age"])
    assert settings.schedule.max_age_seconds is not None
    grace = parse_duration(raw["schedule"]["shutdown_grace_seconds"])
    assert settings.schedule.shutdown_grace_seconds == grace
    # Secrets stay out of the ConfigMap.
    assert "url" not in raw.get("database", {})
    assert "api_key" not in raw.get("api", {})


def test_secret_example_is_marked_and_covers_every_reference(tmp_path: Path) -> None:
    found = manifests()
    secret = found["Secret"]
    values: dict[str, str] = secret["stringData"]
    assert set(values) == set(SECRET_ENV.values())
    for value in values.values():
        assert "REPLACE_ME" in value
    for kind in ("CronJob", "Deployment"):
        env = env_of(container(found[kind]))
        for variable, key in SECRET_ENV.items():
            ref = env[variable]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], key), kind
    # With the placeholders in the environment the tool accepts the settings.
    path = tmp_path / "ideogram-sync.toml"
    path.write_text(configmap_toml(), encoding="utf-8")
    env = {variable: values[key] for variable, key in SECRET_ENV.items()}
    settings = load_settings(str(path), env=env)
    assert settings.database.url == values["database-url"]
    assert settings.accounts[0].api.key() == values["api-key"]


@pytest.mark.parametrize(("kind", "command"), [("CronJob", "run"), ("Deployment", "daemon")])
def test_workloads_run_the_tool_with_the_config(kind: str, command: str) -> None:
    found = manifests()
    workload = found[kind]
    spec = pod_spec(workload)
    box = container(workload)
    assert box["command"] == ["ideogram-sync"]
    args = parse_cli(box["args"])
    assert args.command == command
    assert args.log_format == "json"
    assert box["image"] == "ghcr.io/example/ideogram-sync:0.1.0"

    # IDEOGRAM_SYNC_CONFIG names the ConfigMap's key where the volume is mounted.
    config_path = Path(env_of(box)["IDEOGRAM_SYNC_CONFIG"]["value"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in box["volumeMounts"]}
    mount = mounts[str(config_path.parent)]
    assert mount["readOnly"] is True
    source = volumes[mount["name"]]["configMap"]
    assert source["name"] == found["ConfigMap"]["metadata"]["name"]
    assert config_path.name in found["ConfigMap"]["data"]

    # Non-root, read-only root file system; every other mount is an emptyDir.
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    assert box["securityContext"]["readOnlyRootFilesystem"] is True
    assert box["securityContext"]["allowPrivilegeEscalation"] is False
    for path, other in mounts.items():
        if path != str(config_path.parent):
            assert "emptyDir" in volumes[other["name"]], path
    assert box["resources"]["requests"] and box["resources"]["limits"]


def test_cronjob_fields() -> None:
    cronjob = manifests()["CronJob"]
    spec = cronjob["spec"]
    assert spec["schedule"] == "*/30 * * * *"
    assert spec["concurrencyPolicy"] == "Forbid"
    job = spec["jobTemplate"]["spec"]
    assert isinstance(job["backoffLimit"], int)
    assert pod_spec(cronjob)["restartPolicy"] == "Never"
    # Exit codes that a retry cannot fix end the Job at once.
    (rule,) = job["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob"
    assert rule["onExitCodes"]["containerName"] == container(cronjob)["name"]
    assert set(rule["onExitCodes"]["values"]) == {2, 3, 5}


def test_deployment_probes_ports_and_grace(tmp_path: Path) -> None:
    settings = configmap_settings(tmp_path)
    port = settings.metrics.port
    deployment = manifests()["Deployment"]
    spec = pod_spec(deployment)
    box = container(deployment)

    ports = {p["name"]: p["containerPort"] for p in box["ports"]}
    assert ports["metrics"] == port
    for probe_name in ("livenessProbe", "readinessProbe"):
        probe = box[probe_name]["httpGet"]
        assert probe["path"] == "/healthz", probe_name
        target = probe["port"]
        assert (ports[target] if isinstance(target, str) else target) == port, probe_name
    # Liveness tolerates a long outage of the API or the database (docs/deploy.md).
    liveness = box["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 15 * 60

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"

    grace = settings.schedule.shutdown_grace_seconds
    assert spec["terminationGracePeriodSeconds"] > grace + DAEMON_ABORT_WAIT_SECONDS
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def supported_kubernetes() -> list[str]:
    """Every Kubernetes release from MIN_KUBERNETES on whose schema kubernetes-validate has."""
    bundled = {
        ".".join(version.split(".")[:2]) for version in kubernetes_validate.utils.all_versions()
    }
    return sorted(
        (v for v in bundled if version_key(v) >= version_key(MIN_KUBERNETES)), key=version_key
    )


def manifest_documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every YAML document in deploy/kubernetes/."""
    found: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(KUBERNETES.glob("*.y*ml")):
        with path.open(encoding="utf-8") as fh:
            found.extend((path.name, doc) for doc in yaml.safe_load_all(fh) if doc is not None)
    return found


def test_supported_kubernetes_releases_start_where_the_docs_say() -> None:
    versions = supported_kubernetes()
    # The oldest supported release must have a schema of its own: kubernetes-validate would
    # otherwise check an older release's schema under its name.
    assert versions[0] == MIN_KUBERNETES, versions
    assert len(versions) >= 3, versions
    stated: dict[str, set[str]] = {}
    for path in (DOCS, README, *KUBERNETES.glob("*.yaml")):
        for version in re.findall(r"Kubernetes (\d+\.\d+) or newer", path.read_text("utf-8")):
            stated.setdefault(version, set()).add(path.relative_to(ROOT).as_posix())
    assert "docs/deploy.md" in stated.get(MIN_KUBERNETES, set()), stated
    assert set(stated) == {MIN_KUBERNETES}, stated


@pytest.mark.parametrize("version", supported_kubernetes())
def test_manifests_validate_against_the_kubernetes_schema(version: str) -> None:
    """Strict: a field the release does not know, or a missing required one, is an error."""
    errors = []
    for name, doc in manifest_documents():
        try:
            checked = kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.absolute_path)
            errors.append(f"{name} ({doc['kind']}): {where}: {exc.message}")
            continue
        # No quiet fallback to an older release's schema.
        assert checked == version, (name, checked)
    assert errors == [], "\n".join(errors)


def test_strict_schema_check_rejects_an_unknown_field() -> None:
    """The check above can fail: a misspelt field is an error, not silently dropped."""
    deployment = manifests()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["healthCheck"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="healthCheck"):
        kubernetes_validate.validate(deployment, supported_kubernetes()[-1], strict=True)


def test_dockerfile_matches_the_manifests() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert "pip install '.[postgres,mysql]'" in text
    assert 'ENTRYPOINT ["ideogram-sync"]' in text
    assert 'CMD ["daemon"]' in text
    user = re.search(r"^USER (\d+)(?::(\d+))?$", text, re.MULTILINE)
    assert user is not None, "USER must be numeric for runAsNonRoot"
    for kind in ("CronJob", "Deployment"):
        context = pod_spec(manifests()[kind])["securityContext"]
        assert context["runAsUser"] == int(user.group(1)), kind
    # Every path the Dockerfile copies exists in the project.
    for copied in re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE):
        for name in copied.split():
            assert (ROOT / name).exists(), name


# -- the image: build context and health check ---------------------------------------

# Directories and files a working tree collects that must stay out of the build context:
# version control, virtual environments, caches, build output, databases, local configs.
CLUTTER_DIRS = {
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    ".ruff_cache",
    ".mypy_cache",
    "build",
    "dist",
    "htmlcov",
}
CLUTTER_FILES = {"ideogram-sync.toml", ".env", ".coverage"}
CLUTTER_SUFFIXES = (".db", ".db-journal", ".db-wal", ".pyc", ".egg-info")
# A sample of such clutter, planted in a copy of the project.
PLANTED = (
    ".git/HEAD",
    ".git/objects/ab/cdef0123",
    ".venv/bin/python",
    ".venv/lib/python3.11/site-packages/secret.py",
    "venv/pyvenv.cfg",
    ".ci/venv/bin/activate",
    "benchmarks/venv/pyvenv.cfg",
    "sync/.venv/pyvenv.cfg",
    "sync/venv/lib/x.py",
    "sync/__pycache__/cli.cpython-311.pyc",
    "migrations/versions/__pycache__/x.cpython-311.pyc",
    "sync/stray.pyc",
    "ideogram_sync.db",
    "ideogram_sync.db-journal",
    "sync/ideogram_sync.db",
    "migrations/test.db",
    "ideogram-sync.toml",
    "sync/ideogram-sync.toml",
    ".env",
    "sync/.env",
    "build/lib/sync/cli.py",
    "dist/ideogram_dataset_sync-0.1.0-py3-none-any.whl",
    "ideogram_dataset_sync.egg-info/PKG-INFO",
    "sync/ideogram_dataset_sync.egg-info/PKG-INFO",
    ".pytest_cache/v/cache/lastfailed",
    "tests/.pytest_cache/v/cache/nodeids",
    ".hypothesis/examples/x",
    ".ruff_cache/0.6.0/x",
    ".coverage",
    "benchmarks/results/run.json",
)


def is_clutter(path: str) -> bool:
    *folders, name = path.split("/")
    return (
        any(f in CLUTTER_DIRS or f.endswith(CLUTTER_SUFFIXES) for f in folders)
        or name in CLUTTER_FILES
        or name.endswith(CLUTTER_SUFFIXES)
    )


def dockerfile_copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY in the Dockerfile, sources relative to the context."""
    copies = []
    for line in re.findall(r"^COPY (.+)$", DOCKERFILE.read_text(encoding="utf-8"), re.M):
        words = line.split()
        assert not any(w.startswith("--") for w in words), f"unexpected COPY option: {line}"
        copies.append((words[:-1], words[-1]))
    return copies


def files_under(root: Path, names: list[str]) -> set[str]:
    found: set[str] = set()
    for name in names:
        path = root / name
        if path.is_dir():
            found |= {p.relative_to(root).as_posix() for p in path.rglob("*") if p.is_file()}
        else:
            found.add(name)
    return found


def copied_files(root: Path) -> set[str]:
    """Every file the Dockerfile COPYs out of the build context at root, clutter aside."""
    names = [name for sources, _ in dockerfile_copies() for name in sources]
    return {path for path in files_under(root, names) if not is_clutter(path)}


def project_copy(tmp_path: Path) -> Path:
    """This project without its local clutter, then with PLANTED clutter added."""
    tree = tmp_path / "tree"

    def skip(_folder: str, names: list[str]) -> set[str]:
        return {name for name in names if is_clutter(name) or name in CLUTTER_DIRS}

    shutil.copytree(ROOT, tree, ignore=skip, symlinks=True)
    for name in PLANTED:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("clutter\n", encoding="utf-8")
    return tree


def dockerignore_patterns() -> list[str]:
    """.dockerignore's patterns: blank lines and # comments skipped, as Docker reads it."""
    lines = (line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def docker_py_context(root: Path) -> set[str]:
    """The files `docker build -f deploy/Dockerfile root` sends, as docker-py computes them."""
    kept = exclude_paths(str(root), dockerignore_patterns(), dockerfile="deploy/Dockerfile")
    return {Path(p).as_posix() for p in kept if (root / p).is_file()}


def test_dockerignore_keeps_what_the_dockerfile_copies_and_nothing_else(tmp_path: Path) -> None:
    tree = project_copy(tmp_path)
    context = docker_py_context(tree)
    wanted = copied_files(tree)
    assert {"pyproject.toml", "README.md", "sync/cli.py", "migrations/env.py"} <= wanted
    assert wanted <= context, sorted(wanted - context)
    # Docker always sends the Dockerfile and .dockerignore themselves.
    assert context - wanted == {"deploy/Dockerfile", ".dockerignore"}
    assert not [path for path in context if is_clutter(path)]
    for name in PLANTED:
        assert name not in context, name


def test_dockerignore_on_this_working_tree() -> None:
    """The real tree, with its .git, .venv and whatever else lies around right now."""
    context = docker_py_context(ROOT)
    assert copied_files(ROOT) <= context
    assert not [path for path in context if is_clutter(path) or path.startswith(".ci/")]


class FakeEngine(socketserver.ThreadingUnixStreamServer):
    """Enough of the Docker Engine API for `docker build` to send its build context.

    The docker CLI's legacy builder reads .dockerignore itself and sends the context as a
    tar: the names in it are the build context, as Docker's own matcher decides.
    """

    daemon_threads = True

    def __init__(self, path: str) -> None:
        self.names: list[str] | None = None
        engine = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:
                self._answer(200, b"", "text/plain")

            def do_GET(self) -> None:
                self._answer(200, b"OK", "text/plain")

            def do_POST(self) -> None:
                if "/build" not in self.path:
                    self._answer(404, b'{"message": "not here"}', "application/json")
                    return
                with tarfile.open(fileobj=io.BytesIO(self._body())) as tar:
                    engine.names = [m.name for m in tar.getmembers() if m.isfile()]
                self._answer(200, b'{"stream": "context received\\n"}\n', "application/json")

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length", "0")))
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Api-Version", "1.45")
                self.send_header("Ostype", "linux")
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        super().__init__(path, Handler)


def test_docker_cli_sends_the_same_context(tmp_path: Path) -> None:
    """The docker CLI's own .dockerignore matching, against a fake engine: the same files."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("the docker CLI is not installed")
    tree = project_copy(tmp_path)
    # A socket path must stay under ~100 bytes; tmp_path may be longer.
    folder = Path(tempfile.mkdtemp(prefix="ids-engine-"))
    engine = FakeEngine(str(folder / "engine.sock"))
    thread = threading.Thread(target=engine.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        done = subprocess.run(
            [docker, "build", "--quiet", "--file", "deploy/Dockerfile", "."],
            cwd=tree,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(tmp_path),
                "DOCKER_CONFIG": str(tmp_path / "docker-config"),
                "DOCKER_HOST": f"unix://{folder / 'engine.sock'}",
                "DOCKER_BUILDKIT": "0",  # the legacy builder sends the context as one tar
            },
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        engine.shutdown()
        engine.server_close()
        thread.join()
        shutil.rmtree(folder)
    assert done.returncode == 0, done.stdout + done.stderr
    assert engine.names is not None, done.stderr
    assert set(engine.names) == docker_py_context(tree)
    assert len(engine.names) == len(set(engine.names))


def healthcheck() -> tuple[dict[str, str], list[str]]:
    """The Dockerfile's HEALTHCHECK: its options and its command (exec form)."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    lines = re.findall(r"^HEALTHCHECK (.+)$", text, re.M)
    assert len(lines) == 1, f"the Dockerfile needs one HEALTHCHECK, not {len(lines)}"
    line = lines[0]
    options = dict(re.findall(r"--([a-z-]+)=(\S+)", line))
    command = re.search(r"\bCMD (\[.*\])\s*$", line)
    assert command, f"HEALTHCHECK needs CMD in exec form: {line}"
    return options, json.loads(command.group(1))


def local_healthcheck() -> list[str]:
    """The HEALTHCHECK command with the image's paths mapped to this checkout."""
    _, command = healthcheck()
    # The slim image has python (and no curl).
    assert command[0] == "python", command
    copied = {destination: sources for sources, destination in dockerfile_copies()}
    (source,) = copied[command[1]]
    return [sys.executable, str(ROOT / source), *command[2:]]


def seconds(text: str) -> float:
    """A Docker duration such as 30s, 5m or 1m30s."""
    parts = re.findall(r"(\d+)(h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return float(sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts))


def test_healthcheck_is_bounded() -> None:
    options, command = healthcheck()
    timeout = seconds(options["timeout"])
    assert timeout < seconds(options["interval"])
    assert int(options["retries"]) >= 2
    # The daemon answers /healthz only once the database is reachable and migrated, and
    # 200 only after a first success: the start period covers a first sync.
    assert seconds(options["start-period"]) >= 120
    script = (ROOT / local_healthcheck()[1]).read_text(encoding="utf-8")
    # It gives up on its own, before Docker kills it at --timeout, and says why.
    own = re.search(r"^TIMEOUT_SECONDS = (\d+(?:\.\d+)?)", script, re.M)
    assert own and float(own.group(1)) < timeout, command


def children(pid: int) -> list[int]:
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat_file.parent.name))
    return found


def namespaces_work() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("nsenter") is None:
        return False
    probe = [unshare, "--pid", "--fork", "--mount-proc", "true"]
    return subprocess.run(probe, capture_output=True, timeout=60, check=False).returncode == 0


@contextlib.contextmanager
def in_container(
    tmp_path: Path, argv: list[str], env: dict[str, str]
) -> Iterator[tuple[int, Path]]:
    """Run argv as PID 1 of a new PID namespace with its own /proc, as a container does.

    Yields that process's PID as seen from here, and the file its output goes to.
    """
    if not namespaces_work():
        pytest.skip("needs unshare and nsenter, and the right to create a PID namespace")
    log = tmp_path / f"container-{time.monotonic_ns()}.log"
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", *argv],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    pid = 0
    try:
        deadline = time.monotonic() + 60
        while not pid and time.monotonic() < deadline and proc.poll() is None:
            pid = next(iter(children(proc.pid)), 0)
            time.sleep(0.05)
        assert pid, log.read_text(encoding="utf-8")
        yield pid, log
    finally:
        # SIGTERM as `docker stop` sends it; an init that ignores it gets SIGKILL.
        with contextlib.suppress(ProcessLookupError):
            if pid:
                os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                if pid:
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()


def run_healthcheck(pid: int, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The Dockerfile's HEALTHCHECK command inside pid's container, as Docker runs it there:
    with the container's environment and working directory."""
    return subprocess.run(
        ["nsenter", f"--target={pid}", "--pid", "--mount", *local_healthcheck()],
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def image_env(
    tmp_path: Path, api: FakeApi, port: int | None, database_url: str = ""
) -> dict[str, str]:
    """The environment of a container: the ConfigMap's config, with port on loopback (or none)."""
    text = configmap_toml()
    if port is None:
        text = replace_once(text, r"^port = \d+\n", "")
    else:
        text = replace_once(text, r"^port = \d+$", f"port = {port}")
    text = replace_once(text, r'^host = ".*"$', 'host = "127.0.0.1"')
    text = replace_once(text, r"^jitter_seconds = .*$", "jitter_seconds = 0")
    config = tmp_path / "ideogram-sync.toml"
    config.write_text(text, encoding="utf-8")
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "IDEOGRAM_SYNC_CONFIG": str(config),
        "IDEOGRAM_API_KEY": API_KEY,
        "IDEOGRAM_API_BASE_URL": api.url,
        "IDEOGRAM_SYNC_DATABASE_URL": database_url or f"sqlite:///{tmp_path / 'image.db'}",
    }


def wait_for(condition: Any, what: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if condition():
                return
        time.sleep(0.1)
    pytest.fail(f"gave up waiting for {what}:\n{log.read_text(encoding='utf-8')}")


def healthz(port: int) -> tuple[int, str]:
    return get(f"http://127.0.0.1:{port}/healthz")


@pytest.mark.parametrize("init", [False, True], ids=["pid1", "under-an-init"])
def test_healthcheck_passes_for_a_healthy_daemon(
    fake_listing: FakeApi, tmp_path: Path, init: bool
) -> None:
    port = free_port()
    argv = [str(wrapper(tmp_path)), "--log-format", "json", "daemon"]
    if init:
        # As with `docker run --init`: PID 1 is an init, the tool its child.
        argv = [
            "sh",
            "-c",
            'trap \'kill -TERM "$child"\' TERM; "$@" & child=$!; wait "$child"',
            "init",
            *argv,
        ]
    env = image_env(tmp_path, fake_listing, port)
    with in_container(tmp_path, argv, env) as (pid, log):
        wait_for(lambda: healthz(port)[0] == 200, "/healthz to answer 200", log)
        checked = run_healthcheck(pid, env, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "healthy: /healthz answered 200" in checked.stdout


def test_healthcheck_fails_when_healthz_answers_503(fake_listing: FakeApi, tmp_path: Path) -> None:
    fake_listing.rejected_keys.add(API_KEY)  # no success, so stale under max_age
    port = free_port()
    argv = [str(wrapper(tmp_path)), "--log-format", "json", "daemon"]
    env = image_env(tmp_path, fake_listing, port)
    with in_container(tmp_path, argv, env) as (pid, log):
        wait_for(lambda: "no successful sync yet" in healthz(port)[1], "a 503", log)
        checked = run_healthcheck(pid, env, tmp_path)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "unhealthy: /healthz answered 503" in checked.stdout
    assert "no successful sync yet" in checked.stdout


def test_healthcheck_fails_when_nothing_answers_and_does_not_hang(
    fake_listing: FakeApi, tmp_path: Path
) -> None:
    # The daemon opens its port only once the database answers, and this one never does.
    port = free_port()
    unreachable = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    env = image_env(tmp_path, fake_listing, port, database_url=unreachable)
    argv = [str(wrapper(tmp_path)), "--log-format", "json", "daemon"]
    with in_container(tmp_path, argv, env) as (pid, log):
        wait_for(lambda: "database not ready" in log.read_text(encoding="utf-8"), "a retry", log)
        refused = run_healthcheck(pid, env, tmp_path)
        # Something that accepts connections and never answers: the check gives up.
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", port))
            silent.listen(8)
            hung = run_healthcheck(pid, env, tmp_path)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"unhealthy: no answer from http://127.0.0.1:{port}/healthz" in refused.stdout
    assert hung.returncode == 1, hung.stdout + hung.stderr
    assert "timed out" in hung.stdout


def test_healthcheck_passes_for_a_one_shot_run(fake_listing: FakeApi, tmp_path: Path) -> None:
    """`docker run IMAGE run` serves no HTTP, even with [metrics] port in its config."""
    fake_listing.gate = threading.Event()  # the run waits for the API's answer
    port = free_port()
    argv = [str(wrapper(tmp_path)), "--log-format", "json", "run"]
    env = image_env(tmp_path, fake_listing, port)
    with in_container(tmp_path, argv, env) as (pid, log):
        wait_for(lambda: bool(fake_listing.requests), "the run to call the API", log)
        checked = run_healthcheck(pid, env, tmp_path)
        fake_listing.gate.set()
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "runs `run`, not the daemon" in checked.stdout


def test_healthcheck_passes_for_a_daemon_without_metrics(
    fake_listing: FakeApi, tmp_path: Path
) -> None:
    argv = [str(wrapper(tmp_path)), "--log-format", "json", "daemon"]
    env = image_env(tmp_path, fake_listing, None)
    with in_container(tmp_path, argv, env) as (pid, log):
        wait_for(lambda: "daemon_started" in log.read_text(encoding="utf-8"), "the daemon", log)
        checked = run_healthcheck(pid, env, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "[metrics] port is not set" in checked.stdout


# -- systemd ------------------------------------------------------------------------


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (it comes with systemd)")
    # verify insists that ExecStart's program exists: point it at an executable that does.
    program = wrapper(tmp_path)
    units = tmp_path / "units"
    units.mkdir()
    for source in sorted(SYSTEMD.iterdir()):
        text = source.read_text(encoding="utf-8")
        assert INSTALLED_BINARY in text or source.suffix == ".timer", source.name
        (units / source.name).write_text(text.replace(INSTALLED_BINARY, str(program)))
    names = sorted(p.name for p in units.iterdir())
    assert names == [
        "ideogram-sync-daemon.service",
        "ideogram-sync.service",
        "ideogram-sync.timer",
    ]
    result = subprocess.run(
        [analyze, "verify", "--man=no", *(str(units / name) for name in names)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=units,
        check=False,
    )
    # verify exits 0 even for unknown keys and bad values; it only warns on stderr.
    ours = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "ideogram-sync" in line or str(tmp_path) in line
    ]
    assert result.returncode == 0, result.stderr
    assert ours == [], result.stderr


def test_oneshot_service_and_timer() -> None:
    service = read_unit(SYSTEMD / "ideogram-sync.service")
    timer = read_unit(SYSTEMD / "ideogram-sync.timer")
    assert unit_value(service, "Service", "Type") == "oneshot"
    argv = shlex.split(unit_value(service, "Service", "ExecStart"))
    assert argv[0] == INSTALLED_BINARY
    assert parse_cli(argv[1:]).command == "run"
    # 5 (another run held the lock) is not a failure of the unit.
    assert "5" in unit_value(service, "Service", "SuccessExitStatus").split()
    for key, value in HARDENING.items():
        assert unit_value(service, "Service", key) == value, key
    assert unit_value(service, "Service", "EnvironmentFile") == "/etc/ideogram-sync/env"

    assert unit_value(timer, "Timer", "Persistent") == "true"
    assert timespan_seconds(unit_value(timer, "Timer", "RandomizedDelaySec")) > 0
    assert unit_value(timer, "Timer", "Unit") == "ideogram-sync.service"
    calendar = unit_value(timer, "Timer", "OnCalendar")
    assert calendar == "*-*-* *:00,30:00"
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        shown = subprocess.run(
            [analyze, "calendar", "--iterations=3", calendar],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        minutes = re.findall(r"\d{4}-\d\d-\d\d \d\d:(\d\d):00", shown)
        assert minutes and set(minutes) <= {"00", "30"}, shown


def test_daemon_service() -> None:
    unit = read_unit(SYSTEMD / "ideogram-sync-daemon.service")
    assert unit_value(unit, "Service", "Type") in ("exec", "simple")
    argv = shlex.split(unit_value(unit, "Service", "ExecStart"))
    assert argv[0] == INSTALLED_BINARY
    args = parse_cli(argv[1:])
    assert (args.command, args.log_format) == ("daemon", "json")
    assert unit_value(unit, "Service", "Restart") == "on-failure"
    assert unit_value(unit, "Service", "KillSignal") == "SIGTERM"
    assert "2" in unit_value(unit, "Service", "RestartPreventExitStatus").split()
    for key, value in HARDENING.items():
        assert unit_value(unit, "Service", key) == value, key
    # TimeoutStopSec covers the grace of the example config plus the abort wait.
    example = load_settings(str(ROOT / "config.example.toml"), env={})
    stop = timespan_seconds(unit_value(unit, "Service", "TimeoutStopSec"))
    assert stop > example.schedule.shutdown_grace_seconds + DAEMON_ABORT_WAIT_SECONDS
    assert unit_value(unit, "Install", "WantedBy") == "multi-user.target"


# -- cron ---------------------------------------------------------------------------


def test_crontab_lines_parse() -> None:
    variables, jobs = crontab()
    assert variables["IDEOGRAM_SYNC_CONFIG"] == "/etc/ideogram-sync/ideogram-sync.toml"
    (run_schedule, run_command), (check_schedule, check_command) = jobs
    assert run_schedule == "*/30 * * * *"
    assert len(check_schedule.split()) == 5
    for command in (run_command, check_command):
        assert ". /etc/ideogram-sync/env" in command
        assert "%" not in command  # cron turns % into a newline
        assert "flock" not in command  # the tool has its own lock
    run = parse_cli(tool_args(run_command))
    assert (run.command, run.log_level) == ("run", "WARNING")
    check = parse_cli(tool_args(check_command))
    assert (check.command, check.log_level, check.max_age) == ("status", "WARNING", "2h")
    assert parse_duration(check.max_age) == 2 * 3600


def test_crontab_jobs_are_silent_when_all_is_well_and_speak_up_when_not(
    fake_listing: FakeApi, tmp_path: Path
) -> None:
    """Run both crontab commands through /bin/sh as cron would; output is what cron mails."""
    variables, jobs = crontab()
    program = wrapper(tmp_path)
    config = tmp_path / "ideogram-sync.toml"
    config.write_text(configmap_toml(), encoding="utf-8")
    env_file = tmp_path / "env"
    env_file.write_text(
        f"IDEOGRAM_API_KEY='{API_KEY}'\n"
        f"IDEOGRAM_SYNC_DATABASE_URL='sqlite:///{tmp_path / 'cron.db'}'\n"
        f"IDEOGRAM_API_BASE_URL='{fake_listing.url}'\n",
        encoding="utf-8",
    )
    env_file.chmod(stat.S_IRUSR | stat.S_IWUSR)
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        **variables,
        "IDEOGRAM_SYNC_CONFIG": str(config),
    }

    def cron(command: str) -> tuple[int, str]:
        command = command.replace(INSTALLED_BINARY, str(program))
        command = command.replace("/etc/ideogram-sync/env", str(env_file))
        done = subprocess.run(
            [variables.get("SHELL", "/bin/sh"), "-c", command],
            env=environment,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return done.returncode, done.stdout + done.stderr

    (_, run_command), (_, check_command) = jobs
    assert cron(run_command) == (0, "")
    assert cron(check_command) == (0, "")

    fake_listing.rejected_keys.add(API_KEY)
    code, output = cron(run_command)
    assert code == 3
    assert "rejected" in output
    code, output = cron(check_command)
    assert code == 4
    # The ConfigMap syncs every resource; a rejected key stops the account at its datasets
    # (the other resources were not run: their last runs succeeded, within the max age).
    stale = [line.split("stale: ", 1)[1] for line in output.splitlines() if "stale: " in line]
    assert stale == ["account default: its last run failed"], output


# -- the daemon as deployed ---------------------------------------------------------


def test_deployment_daemon_serves_healthz_and_stops_cleanly(
    fake_listing: FakeApi, tmp_path: Path
) -> None:
    """The Deployment's command and the ConfigMap's config, with a free loopback port."""
    deployment = manifests()["Deployment"]
    box = container(deployment)
    port = free_port()
    text = configmap_toml()
    text = replace_once(text, r"^port = \d+$", f"port = {port}")
    text = replace_once(text, r'^host = ".*"$', 'host = "127.0.0.1"')
    text = replace_once(text, r"^jitter_seconds = .*$", "jitter_seconds = 0")
    config = tmp_path / "ideogram-sync.toml"
    config.write_text(text, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEOGRAM_")}
    env.update(
        IDEOGRAM_SYNC_CONFIG=str(config),
        IDEOGRAM_API_KEY=API_KEY,
        IDEOGRAM_API_BASE_URL=fake_listing.url,
        IDEOGRAM_SYNC_DATABASE_URL=f"sqlite:///{tmp_path / 'daemon.db'}",
    )
    proc = subprocess.Popen(
        [str(wrapper(tmp_path)), *box["args"]],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deployed = load_settings(str(config), env={})
    accounts = [a.name for a in deployed.accounts]
    assert accounts == ["default"]
    # The ConfigMap leaves [sync] resources at its default: every resource.
    resources = deployed.sync.resources
    assert resources == RESOURCES
    successes = [
        re.compile(
            rf'^ideogram_sync_runs_total\{{account="default",resource="{resource}",'
            rf'status="success"\}} [1-9]',
            re.M,
        )
        for resource in resources
    ] + [
        re.compile(
            rf'^ideogram_sync_last_success_timestamp_seconds\{{account="default",'
            rf'resource="{resource}"\}} [1-9]',
            re.M,
        )
        for resource in resources
    ]
    try:
        # /healthz turns 200 when every resource's commit is visible; the counters follow
        # a moment later, once the run has returned, and then the gauges, read from the
        # database.
        deadline = time.monotonic() + 60
        health, metrics = (0, ""), (0, "")
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):  # not listening yet
                health, metrics = get(f"{base}/healthz"), get(f"{base}/metrics")
            if health[0] == 200 and all(success.search(metrics[1]) for success in successes):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        assert health == (200, "ok\n")
        assert metrics[0] == 200, metrics
        for success in successes:
            assert success.search(metrics[1]), metrics
        # IdeogramSyncRunsFailing (deploy/prometheus/alerts.yml) counts the whole value of
        # a series with no sample from before the hour: the series of every configured
        # account and resource exist at 0 from start-up. sync/metrics.py turns off
        # prometheus_client's *_created series.
        assert "_created" not in metrics[1], metrics[1]
        samples = {
            (name, labels): float(value)
            for name, labels, value in re.findall(r"^(\w+)(\{.*\})? (\S+)$", metrics[1], re.M)
        }
        runs = {
            labels: value
            for (name, labels), value in samples.items()
            if name == "ideogram_sync_runs_total"
        }
        expected = {
            f'{{account="{account}",resource="{resource}",status="{status}"}}': status
            for account in accounts
            for resource in resources
            for status in ("success", "failed", "locked", "skipped")
        }
        assert set(runs) == set(expected), metrics[1]
        for labels, status in expected.items():
            # The start-up run has succeeded (checked above); nothing else has happened.
            assert (runs[labels] >= 1) if status == "success" else (runs[labels] == 0), labels
        for account in accounts:
            for resource in resources:
                for change in ("inserted", "updated", "unchanged", "deleted", "rejected"):
                    labels = f'{{account="{account}",change="{change}",resource="{resource}"}}'
                    assert ("ideogram_sync_rows_total", labels) in samples, labels
                labels = f'{{account="{account}",resource="{resource}"}}'
                assert ("ideogram_sync_run_duration_seconds_count", labels) in samples, labels
            labels = f'{{account="{account}"}}'
            assert samples[("ideogram_sync_datasets_active", labels)] == 2
            assert samples[("ideogram_sync_models_active", labels)] == 0
        assert samples[("ideogram_sync_build_info", f'{{version="{__version__}"}}')] == 1
        assert [key for key in samples if key[0] == "ideogram_sync_build_info"] == [
            ("ideogram_sync_build_info", f'{{version="{__version__}"}}')
        ]
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=pod_spec(deployment)["terminationGracePeriodSeconds"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _, stderr = proc.communicate()
    assert code == 0, stderr
    events = [json.loads(line)["event"] for line in stderr.splitlines()]
    for event in ("daemon_started", "run_succeeded", "daemon_stopping", "daemon_stopped"):
        assert event in events, stderr


# -- alert rules --------------------------------------------------------------------


def promtool() -> str:
    """promtool's path; without it the test skips, except on CI, where it must be there."""
    found = shutil.which("promtool")
    if found is not None:
        return found
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail("promtool is missing on CI: .ci/run installs it (Debian's prometheus package)")
    pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")


def test_promtool_is_required_on_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no promtool there
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        promtool()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="promtool is missing on CI"):
        promtool()


def test_alert_rules_pass_promtool() -> None:
    """`promtool check rules` and the rules' unit tests in alerts.test.yml."""
    program = promtool()
    checked = subprocess.run(
        [program, "check", "rules", "alerts.yml"],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 2 rules found" in checked.stdout, checked.stdout
    tested = subprocess.run(
        [program, "test", "rules", "alerts.test.yml"],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout, tested.stdout


def alert_rules() -> dict[str, dict[str, Any]]:
    with (PROMETHEUS / "alerts.yml").open(encoding="utf-8") as fh:
        groups = yaml.safe_load(fh)["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_every_alert_is_tested_firing_and_quiet() -> None:
    with (PROMETHEUS / "alerts.test.yml").open(encoding="utf-8") as fh:
        unit_tests = yaml.safe_load(fh)
    assert unit_tests["rule_files"] == ["alerts.yml"]
    outcomes: dict[str, set[bool]] = {}
    for case in unit_tests["tests"]:
        for check in case.get("alert_rule_test", []):
            outcomes.setdefault(check["alertname"], set()).add(bool(check["exp_alerts"]))
    rules = alert_rules()
    assert set(rules) == {"IdeogramSyncStale", "IdeogramSyncRunsFailing"}
    for name in rules:
        assert outcomes.get(name) == {True, False}, name


def test_stale_alert_uses_the_configmap_max_age(tmp_path: Path) -> None:
    expr = " ".join(alert_rules()["IdeogramSyncStale"]["expr"].split())
    threshold = re.search(r"> (\d+) \* (\d+)$", expr)
    assert threshold, expr
    max_age = configmap_settings(tmp_path).schedule.max_age_seconds
    assert int(threshold.group(1)) * int(threshold.group(2)) == max_age


def test_deploy_doc_shows_the_alert_rules_file_as_it_is() -> None:
    """The doc may show the rules, but only an exact copy of deploy/prometheus/alerts.yml."""
    text = DOCS.read_text(encoding="utf-8")
    rules = (PROMETHEUS / "alerts.yml").read_text(encoding="utf-8")
    shown = [block for block in re.findall(r"```yaml\n(.*?)```", text, re.S) if "alert:" in block]
    assert shown == [rules]


# -- docs ---------------------------------------------------------------------------


def test_deploy_doc_names_every_metric() -> None:
    text = DOCS.read_text(encoding="utf-8")
    registry = Metrics().registry
    for family in registry.collect():
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        name = family.name + suffix
        assert name in text, name
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    for path in (*files, DOCKERIGNORE):
        assert path.relative_to(ROOT).as_posix() in text or path.name in text, path.name
