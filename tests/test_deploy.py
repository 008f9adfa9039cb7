"""The deployment files in deploy/: Kubernetes manifests, systemd units and the crontab.

Each file is parsed and checked against the code it drives: the command lines go through
the real argument parser, the ConfigMap's TOML through the real settings loader, the units
through `systemd-analyze verify`, and the crontab lines and the daemon's manifest are run
for real against the fake API and a SQLite database.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sync.cli import build_parser
from sync.config import Settings, load_settings, parse_duration
from sync.metrics import Metrics
from tests.conftest import API_KEY
from tests.fakeapi import FakeApi, dataset

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
CRONTAB = DEPLOY / "crontab"
DOCS = ROOT / "docs" / "deploy.md"

# Where the units and the crontab expect the installed program.
INSTALLED_BINARY = "/opt/ideogram-sync/venv/bin/ideogram-sync"
# After shutdown_grace_seconds the daemon aborts the running sync and waits this long
# for it to roll back (sync/daemon.py, Daemon._finish_current_run).
DAEMON_ABORT_WAIT_SECONDS = 60
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    assert "stale: account default: its last run failed" in output


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
    success = re.compile(
        r'^ideogram_sync_runs_total\{account="default",status="success"\} [1-9]', re.M
    )
    try:
        # /healthz turns 200 when the run's commit is visible; the counter follows a moment
        # later, once the run has returned.
        deadline = time.monotonic() + 60
        health, metrics = (0, ""), (0, "")
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):  # not listening yet
                health, metrics = get(f"{base}/healthz"), get(f"{base}/metrics")
            if health[0] == 200 and success.search(metrics[1]):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        assert health == (200, "ok\n")
        assert metrics[0] == 200 and success.search(metrics[1]), metrics
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


# -- docs ---------------------------------------------------------------------------


def test_deploy_doc_names_every_metric() -> None:
    text = DOCS.read_text(encoding="utf-8")
    registry = Metrics().registry
    for family in registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        assert name in text, name
    for path in (*KUBERNETES.glob("*.yaml"), *SYSTEMD.iterdir(), CRONTAB, DEPLOY / "Dockerfile"):
        assert path.relative_to(ROOT).as_posix() in text or path.name in text, path.name
