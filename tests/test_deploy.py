"""The deployment files agree with the code.

docker-compose.yml, deploy/Dockerfile and deploy/k8s/*.yaml are only parsed here (no Docker, no
cluster): every CONVEYOR_ variable they set is a field of `Settings`, every command they give the
image is a command of the `conveyor` CLI, the KEDA ScaledObject watches exactly the workers' topics
and consumer group, the kustomization lists every manifest, and the workers get more time to stop
than they take to drain.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import tomllib
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from conveyor.auth import InvalidBootstrapKeys, parse_bootstrap_keys
from conveyor.cli import app
from conveyor.health import health_router
from conveyor.settings import Settings
from conveyor.topics import job_topics, worker_group
from services.worker.middleware.drain import worst_case_shutdown_s

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
K8S_DIR = ROOT / "deploy" / "k8s"
KUSTOMIZATION = K8S_DIR / "kustomization.yaml"
ENV_PREFIX = "CONVEYOR_"
# What a deployment must run: the three services and the two one-shots.
REQUIRED_COMMANDS = {("gateway",), ("worker",), ("progress",), ("migrate",), ("topics",)}
# The HTTP services and the setting that holds the port each listens on.
HTTP_PORT_SETTING = {("gateway",): "gateway_port", ("progress",): "progress_port"}
# Kubernetes' default when a pod spec sets no terminationGracePeriodSeconds.
K8S_DEFAULT_GRACE_S = 30
ONE_SHOT_RESTART_POLICIES = {"no", "on-failure"}
# KEDA's HPA must wait at least this long on fewer replicas before it removes one: a drained worker
# costs its running jobs' grace and a rebalance, so a dip in the lag must not cost one.
MIN_SCALE_IN_WINDOW_S = 60
# Compose interpolation: `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`, `${NAME?error}`.
COMPOSE_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")
# The compose variables that hold secrets: they must be given, never defaulted.
COMPOSE_SECRETS = {"CONVEYOR_API_KEYS", "POSTGRES_PASSWORD"}
# Where compose publishes a port when the operator says nothing: this machine only.
COMPOSE_BIND_VARIABLE = "CONVEYOR_BIND"
LOOPBACK = "127.0.0.1"

Doc = dict[str, Any]


# --- loading ------------------------------------------------------------------------------------


def load_documents(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as stream:
        documents = [doc for doc in yaml.safe_load_all(stream) if doc is not None]
    assert documents, f"{path} holds no YAML document"
    for doc in documents:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping: {doc!r}"
    return documents


@cache
def compose() -> Doc:
    (document,) = load_documents(COMPOSE_FILE)
    return document


@cache
def k8s_files() -> dict[str, list[Doc]]:
    files = {path.name: load_documents(path) for path in sorted(K8S_DIR.glob("*.y*ml"))}
    assert KUSTOMIZATION.name in files, f"no {KUSTOMIZATION}"
    return files


def k8s_objects(kind: str) -> list[Doc]:
    return [doc for docs in k8s_files().values() for doc in docs if doc.get("kind") == kind]


def k8s_object(kind: str, name: str) -> Doc:
    found = [doc for doc in k8s_objects(kind) if doc.get("metadata", {}).get("name") == name]
    assert len(found) == 1, f"expected one {kind} named {name!r} in {K8S_DIR}, found {len(found)}"
    return found[0]


@cache
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def dockerfile_exec_form(keyword: str) -> list[str]:
    values = [rest for instruction, rest in dockerfile_instructions() if instruction == keyword]
    assert values, f"{DOCKERFILE} has no {keyword} in its final stage"
    value = json.loads(values[-1])
    assert isinstance(value, list), f"{keyword} should use the exec (JSON) form"
    return value


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, rest in dockerfile_instructions():
        if instruction == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


@cache
def health_paths() -> frozenset[str]:
    router = health_router(lambda _request: pytest.fail("the dependency is never called here"))
    return frozenset(getattr(route, "path", "") for route in router.routes)


# --- the CLI and the settings -------------------------------------------------------------------


def cli_command_path(argv: list[str]) -> tuple[str, ...]:
    """The (sub)command of the `conveyor` CLI that `argv` runs; fails unless it is a real command.

    Groups are recognised by their `commands` mapping (typer's groups are click groups, or
    their vendored equivalent in recent typer versions).
    """
    command: Any = typer.main.get_command(app)
    assert isinstance(getattr(command, "commands", None), dict), "the conveyor CLI has no subcommands"
    path: list[str] = []
    for word in argv:
        subcommands = getattr(command, "commands", None)
        if not isinstance(subcommands, dict) or word.startswith("-"):
            break
        command = subcommands.get(word)
        assert command is not None, f"`conveyor {' '.join([*path, word])}` is not a conveyor command"
        path.append(word)
    assert path, f"`conveyor {' '.join(argv)}` names no command"
    assert not isinstance(getattr(command, "commands", None), dict), f"`conveyor {' '.join(argv)}` is a group"
    return tuple(path)


def assert_settings_names(names: Iterable[str], where: str) -> None:
    names = sorted(set(names))
    assert names, f"no {ENV_PREFIX}* variable found in {where}"
    not_prefixed = [name for name in names if not name.startswith(ENV_PREFIX)]
    assert not not_prefixed, f"{where}: not {ENV_PREFIX}* variables: {not_prefixed}"
    unknown = [name for name in names if name.removeprefix(ENV_PREFIX).lower() not in Settings.model_fields]
    assert not unknown, f"{where}: not fields of conveyor.settings.Settings: {unknown}"


def drain_grace_s(env: dict[str, str]) -> float:
    if "CONVEYOR_DRAIN_GRACE_S" in env:
        return float(env["CONVEYOR_DRAIN_GRACE_S"])
    default = Settings.model_fields["drain_grace_s"].default
    assert isinstance(default, float)
    return default


def listen_port(command: tuple[str, ...], env: dict[str, str]) -> int:
    field = HTTP_PORT_SETTING[command]
    default = Settings.model_fields[field].default
    assert isinstance(default, int)
    return int(env.get(ENV_PREFIX + field.upper(), default))


def parse_duration_s(value: str | int | float) -> float:
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


# --- docker compose ------------------------------------------------------------------------------


def compose_services() -> dict[str, Doc]:
    services = compose().get("services")
    assert isinstance(services, dict) and services, f"{COMPOSE_FILE} defines no services"
    return services


def builds_conveyor_image(service: Doc) -> bool:
    build = service.get("build")
    if isinstance(build, str):
        context, dockerfile = build, "Dockerfile"
    elif isinstance(build, dict):
        context, dockerfile = build.get("context", "."), build.get("dockerfile", "Dockerfile")
    else:
        return False
    return (ROOT / context / dockerfile).resolve() == DOCKERFILE.resolve()


def compose_conveyor_services() -> dict[str, Doc]:
    """The services that run the image built from deploy/Dockerfile."""
    services = compose_services()
    images = {service.get("image") for service in services.values() if builds_conveyor_image(service)}
    found = {
        name: service
        for name, service in services.items()
        if builds_conveyor_image(service) or (service.get("image") in images - {None})
    }
    assert found, f"no service of {COMPOSE_FILE} builds {DOCKERFILE}"
    return found


def compose_env(service: Doc) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(name): "" if value is None else str(value) for name, value in env.items()}


def compose_depends_on(service: Doc) -> dict[str, str]:
    """{dependency: condition}; the list form means `service_started`."""
    depends_on = service.get("depends_on") or {}
    if isinstance(depends_on, list):
        return dict.fromkeys(depends_on, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in depends_on.items()}


def compose_container_port(mapping: str | int | Doc) -> int:
    """The container side of a `ports` entry, short ("127.0.0.1:8000:8000/tcp") or long syntax."""
    if isinstance(mapping, dict):
        return int(mapping["target"])
    return int(str(mapping).rsplit(":", 1)[-1].split("/")[0])


def compose_argv(service: Doc) -> list[str]:
    entrypoint = service.get("entrypoint")
    command = service.get("command")
    if isinstance(entrypoint, str):
        entrypoint = shlex.split(entrypoint)
    if isinstance(command, str):
        command = shlex.split(command)
    if entrypoint is not None:
        assert entrypoint[:1] == ["conveyor"], f"entrypoint {entrypoint} does not run the conveyor CLI"
        return [*entrypoint[1:], *(command or [])]
    return command if command is not None else dockerfile_exec_form("CMD")


def compose_commands() -> dict[str, tuple[str, ...]]:
    return {name: cli_command_path(compose_argv(s)) for name, s in compose_conveyor_services().items()}


# --- kubernetes ----------------------------------------------------------------------------------


def pod_specs() -> Iterator[tuple[Doc, Doc]]:
    """(workload, pod spec) of every object that runs pods."""
    for docs in k8s_files().values():
        for doc in docs:
            spec = doc.get("spec") or {}
            if doc.get("kind") == "CronJob":
                spec = spec.get("jobTemplate", {}).get("spec", {})
            template = spec.get("template")
            if doc.get("kind") != "Kustomization" and isinstance(template, dict) and "spec" in template:
                yield doc, template["spec"]


def containers(pod_spec: Doc) -> list[Doc]:
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


def image_repository(image: str) -> str:
    image = image.split("@", 1)[0]
    head, _, last = image.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def conveyor_image_names() -> set[str]:
    (kustomization,) = k8s_files()[KUSTOMIZATION.name]
    names = {entry["name"] for entry in kustomization.get("images", [])}
    assert names, f"{KUSTOMIZATION} maps no image"
    return names


def conveyor_containers() -> Iterator[tuple[Doc, Doc, Doc]]:
    """(workload, pod spec, container) of every container that runs the conveyor image."""
    names = conveyor_image_names()
    for workload, pod_spec in pod_specs():
        for container in containers(pod_spec):
            if image_repository(container.get("image", "")) in names:
                yield workload, pod_spec, container


def k8s_argv(container: Doc) -> list[str]:
    command, args = container.get("command"), container.get("args")
    if command is not None:
        assert command[:1] == ["conveyor"], f"{container['name']}: command {command} is not the conveyor CLI"
        return [*command[1:], *(args or [])]
    return args if args is not None else dockerfile_exec_form("CMD")


def secret_values(secret: Doc) -> dict[str, str]:
    values = {name: base64.b64decode(value).decode() for name, value in (secret.get("data") or {}).items()}
    values.update(secret.get("stringData") or {})
    return values


def k8s_env(container: Doc) -> dict[str, str]:
    """The environment a container gets from its envFrom sources and env values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            data = k8s_object("ConfigMap", source["configMapRef"]["name"]).get("data") or {}
        else:
            data = secret_values(k8s_object("Secret", source["secretRef"]["name"]))
        env.update({source.get("prefix", "") + name: str(value) for name, value in data.items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
    return env


def deployments_running(command: tuple[str, ...]) -> list[tuple[Doc, Doc, Doc]]:
    found = [
        (workload, pod_spec, container)
        for workload, pod_spec, container in conveyor_containers()
        if workload["kind"] == "Deployment" and cli_command_path(k8s_argv(container)) == command
    ]
    assert found, f"no Deployment runs `conveyor {' '.join(command)}`"
    return found


def service_addresses(servers: str) -> list[tuple[str, int]]:
    """`svc:9092,svc.ns.svc:9092` -> [(service name, port)]: the first DNS label names the Service."""
    addresses = []
    for server in servers.split(","):
        host, _, port = server.strip().rpartition(":")
        assert host and port.isdigit(), f"not host:port: {server!r}"
        addresses.append((host.split(".")[0], int(port)))
    return addresses


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def resolve_port(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert named, f"container {container['name']} has no port named {port!r}"
    return int(named[0])


# --- tests: the image ----------------------------------------------------------------------------


def test_dockerfile_runs_the_cli_as_a_non_root_user() -> None:
    # tini as PID 1 forwards SIGTERM to the CLI and reaps its children (tests/test_compose.py runs it).
    assert dockerfile_exec_form("ENTRYPOINT") == ["tini", "--", "conveyor"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts.get("conveyor") == "conveyor.cli:app", "the image's entrypoint is not the conveyor CLI"
    cli_command_path(dockerfile_exec_form("CMD"))
    users = [rest for instruction, rest in dockerfile_instructions() if instruction == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    exposed = {
        int(port.split("/")[0])
        for i, rest in dockerfile_instructions()
        if i == "EXPOSE"
        for port in rest.split()
    }
    ports = {Settings.model_fields[field].default for field in HTTP_PORT_SETTING.values()}
    assert ports <= exposed, f"EXPOSE {sorted(exposed)} misses the services' ports {sorted(ports)}"


def test_dockerfile_env_names_are_settings() -> None:
    env = dockerfile_env()
    assert_settings_names([name for name in env if name.startswith(ENV_PREFIX)], str(DOCKERFILE))
    assert env.get("CONVEYOR_HOST") == "0.0.0.0", "services in a container must listen on every interface"


# --- tests: docker compose -----------------------------------------------------------------------


def test_compose_env_names_are_settings() -> None:
    for name, service in compose_conveyor_services().items():
        env = compose_env(service)
        assert_settings_names([n for n in env if n.startswith(ENV_PREFIX)], f"{COMPOSE_FILE} service {name}")


def test_compose_commands_are_cli_commands() -> None:
    commands = compose_commands()
    missing = REQUIRED_COMMANDS - set(commands.values())
    assert not missing, f"{COMPOSE_FILE} runs no `conveyor {sorted(missing)}`"


def test_compose_services_wait_for_the_one_shots() -> None:
    services = compose_services()
    commands = compose_commands()
    one_shots = {name for name, command in commands.items() if command in {("migrate",), ("topics",)}}
    for name, service in services.items():
        for dependency, condition in compose_depends_on(service).items():
            assert dependency in services, f"{name} depends on an undefined service {dependency!r}"
            if dependency in one_shots:
                assert condition == "service_completed_successfully", (name, dependency, condition)
    for name in one_shots:
        restart = str(services[name].get("restart", "no"))
        assert restart in ONE_SHOT_RESTART_POLICIES, f"one-shot {name} with restart {restart!r} loops"
    for name in commands:
        if name not in one_shots:
            assert one_shots <= set(compose_depends_on(services[name])), f"{name} must wait for {one_shots}"


def test_compose_http_services_publish_and_check_their_port() -> None:
    for name, command in compose_commands().items():
        if command not in HTTP_PORT_SETTING:
            continue
        service = compose_services()[name]
        port = listen_port(command, compose_env(service))
        published = {compose_container_port(mapping) for mapping in service.get("ports", [])}
        assert port in published, f"{name} listens on {port} but publishes {sorted(published)}"
        test = service.get("healthcheck", {}).get("test", [])
        text = test if isinstance(test, str) else " ".join(test)
        urls = re.findall(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/[\w/]*)", text)
        assert urls, f"{name}'s healthcheck requests no local URL: {test}"
        for url_port, path in urls:
            assert (int(url_port), path) in {(port, p) for p in health_paths()}, (name, url_port, path)


def compose_variables() -> list[re.Match[str]]:
    return list(COMPOSE_VARIABLE.finditer(COMPOSE_FILE.read_text(encoding="utf-8")))


def test_compose_requires_its_secrets() -> None:
    """A secret compose is not given is an error at `docker compose up`, never a known default."""
    uses = [use for use in compose_variables() if use["name"] in COMPOSE_SECRETS]
    assert {use["name"] for use in uses} == COMPOSE_SECRETS, f"{COMPOSE_FILE} does not use {COMPOSE_SECRETS}"
    for use in uses:
        assert use["op"] in {":?", "?"} and use["arg"].strip(), (
            f"{use[0]} must be `${{{use['name']}:?message}}`"
        )


def test_compose_publishes_on_loopback_unless_told() -> None:
    for name, service in compose_services().items():
        for mapping in service.get("ports", []):
            assert isinstance(mapping, str), f"{name}: use the short port syntax with a host address"
            host = mapping.rsplit(":", 2)[0] if mapping.count(":") >= 2 else ""
            default = COMPOSE_VARIABLE.fullmatch(host)
            if default is not None:
                assert default["name"] == COMPOSE_BIND_VARIABLE and default["op"] == ":-", (name, mapping)
                host = default["arg"]
            assert host == LOOPBACK, f"{name} publishes {mapping!r} beyond this machine by default"


def test_compose_worker_has_time_for_its_worst_case_shutdown() -> None:
    workers = [name for name, command in compose_commands().items() if command == ("worker",)]
    assert workers
    for name in workers:
        service = compose_services()[name]
        # Compose's default stop grace period is 10 s.
        stop_grace = parse_duration_s(service.get("stop_grace_period", "10s"))
        assert stop_grace >= worst_case_shutdown_s(drain_grace_s(compose_env(service))), name


# --- tests: kubernetes ---------------------------------------------------------------------------


def test_k8s_config_names_are_settings() -> None:
    config_maps, secrets = k8s_objects("ConfigMap"), k8s_objects("Secret")
    assert config_maps and secrets, f"{K8S_DIR} needs a ConfigMap and a Secret"
    for config_map in config_maps:
        data = config_map.get("data") or {}
        assert_settings_names(data, f"ConfigMap {config_map['metadata']['name']}")
        not_strings = {name: value for name, value in data.items() if not isinstance(value, str)}
        assert not not_strings, f"ConfigMap values must be strings: {not_strings}"
    for secret in secrets:
        assert_settings_names(secret_values(secret), f"Secret {secret['metadata']['name']}")
    for _workload, _pod_spec, container in conveyor_containers():
        names = [item["name"] for item in container.get("env", []) if item["name"].startswith(ENV_PREFIX)]
        if names:
            assert_settings_names(names, f"container {container['name']}")
        k8s_env(container)  # every envFrom source exists


def test_k8s_secret_holds_no_working_key() -> None:
    """The example Secret's bootstrap keys are refused at startup: applying it as it is gives no tenant
    a key anyone can read in this repository."""
    for secret in k8s_objects("Secret"):
        keys = secret_values(secret).get("CONVEYOR_API_KEYS")
        if keys is not None:
            with pytest.raises(InvalidBootstrapKeys):
                parse_bootstrap_keys(keys)


def test_k8s_secret_holds_no_working_metrics_token() -> None:
    """Nor a metrics token: the placeholder is too short, and the services refuse it."""
    tokens = [secret_values(secret).get("CONVEYOR_METRICS_TOKEN") for secret in k8s_objects("Secret")]
    assert [token for token in tokens if token is not None], "no Secret holds CONVEYOR_METRICS_TOKEN"
    for token in tokens:
        if token is not None:
            with pytest.raises(ValueError):
                Settings(metrics_token=token)


def test_k8s_commands_are_cli_commands() -> None:
    commands = {cli_command_path(k8s_argv(container)) for _w, _p, container in conveyor_containers()}
    missing = REQUIRED_COMMANDS - commands
    assert not missing, f"{K8S_DIR} runs no `conveyor {sorted(missing)}`"


def test_keda_scales_workers_on_the_job_topics_of_their_group() -> None:
    (scaled_object,) = k8s_objects("ScaledObject")
    spec = scaled_object["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    workers = {w["metadata"]["name"]: c for w, _p, c in deployments_running(("worker",))}
    assert target["name"] in workers, f"the ScaledObject scales {target['name']!r}, not a worker Deployment"
    # The prefix and bootstrap servers the scaled workers get (from the ConfigMap, through envFrom).
    env = k8s_env(workers[target["name"]])
    prefix = env.get("CONVEYOR_TOPIC_PREFIX", Settings.model_fields["topic_prefix"].default)
    triggers = spec["triggers"]
    assert {trigger["type"] for trigger in triggers} == {"kafka"}
    assert [t["metadata"].get("topic") for t in triggers] == job_topics(prefix)
    assert {t["metadata"]["consumerGroup"] for t in triggers} == {worker_group(prefix)}
    # KEDA may need a fully qualified name; it must still be the same Service and port.
    wanted = service_addresses(env["CONVEYOR_KAFKA_BOOTSTRAP"])
    for trigger in triggers:
        servers = trigger["metadata"]["bootstrapServers"]
        assert service_addresses(servers) == wanted, (servers, env["CONVEYOR_KAFKA_BOOTSTRAP"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]


def setting(env: dict[str, str], field: str) -> str:
    """A setting as a container gets it: from its environment, else the default."""
    return env.get(ENV_PREFIX + field.upper(), str(Settings.model_fields[field].default))


def test_keda_lag_threshold_is_the_worker_concurrency() -> None:
    """The lag counts waiting and running jobs; a threshold of the worker's slots gives every
    outstanding job a slot (a larger one under-scales long jobs)."""
    (scaled_object,) = k8s_objects("ScaledObject")
    workers = {w["metadata"]["name"]: c for w, _p, c in deployments_running(("worker",))}
    concurrency = int(
        setting(k8s_env(workers[scaled_object["spec"]["scaleTargetRef"]["name"]]), "worker_concurrency")
    )
    thresholds = {int(t["metadata"]["lagThreshold"]) for t in scaled_object["spec"]["triggers"]}
    assert thresholds == {concurrency}, f"lagThreshold {thresholds} is not the concurrency {concurrency}"


def test_keda_scales_in_one_pod_at_a_time_after_a_window() -> None:
    (scaled_object,) = k8s_objects("ScaledObject")
    scale_down = scaled_object["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= MIN_SCALE_IN_WINDOW_S
    policies = scale_down["policies"]
    assert policies and all(p["type"] == "Pods" and p["value"] == 1 for p in policies), policies
    assert scale_down.get("selectPolicy", "Max") != "Disabled"


def test_k8s_workers_liveness_probe_is_their_healthz() -> None:
    for workload, _pod_spec, container in deployments_running(("worker",)):
        name = workload["metadata"]["name"]
        probe = container.get("livenessProbe", {}).get("httpGet")
        assert probe and probe["path"] == "/healthz" and probe["path"] in health_paths(), name
        port = int(setting(k8s_env(container), "worker_metrics_port"))
        assert resolve_port(container, probe["port"]) == port, (name, probe, port)
        # A worker serves no traffic: a readiness probe would only take it out of nothing.
        assert "readinessProbe" not in container, name


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = k8s_files()[KUSTOMIZATION.name]
    listed = kustomization.get("resources", [])
    assert len(listed) == len(set(listed)), f"duplicates in {KUSTOMIZATION}"
    assert set(listed) == set(k8s_files()) - {KUSTOMIZATION.name}


def test_k8s_workers_have_time_for_their_worst_case_shutdown() -> None:
    for workload, pod_spec, container in deployments_running(("worker",)):
        grace = pod_spec.get("terminationGracePeriodSeconds", K8S_DEFAULT_GRACE_S)
        worst = worst_case_shutdown_s(drain_grace_s(k8s_env(container)))
        assert grace >= worst, (
            f"{workload['metadata']['name']}: grace {grace} s < worst-case shutdown {worst} s"
        )


def test_k8s_http_services_probe_and_serve_their_port() -> None:
    for command, _field in HTTP_PORT_SETTING.items():
        for workload, _pod_spec, container in deployments_running(command):
            name = workload["metadata"]["name"]
            port = listen_port(command, k8s_env(container))
            probes = {
                kind: container.get(kind, {}).get("httpGet") for kind in ("readinessProbe", "livenessProbe")
            }
            assert probes["readinessProbe"] and probes["readinessProbe"]["path"] == "/readyz", name
            assert probes["livenessProbe"] and probes["livenessProbe"]["path"] == "/healthz", name
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind, {}).get("httpGet")
                if probe:
                    assert probe["path"] in health_paths(), (name, kind)
                    assert resolve_port(container, probe["port"]) == port, (name, kind)
            labels = workload["spec"]["template"]["metadata"]["labels"]
            assert matches(workload["spec"]["selector"]["matchLabels"], labels), name
            services = [s for s in k8s_objects("Service") if matches(s["spec"].get("selector", {}), labels)]
            assert services, f"no Service selects {name}"
            for service in services:
                for service_port in service["spec"]["ports"]:
                    target = service_port.get("targetPort", service_port["port"])
                    assert resolve_port(container, target) == port, service["metadata"]["name"]
            budgets = [
                pdb
                for pdb in k8s_objects("PodDisruptionBudget")
                if matches(pdb["spec"]["selector"]["matchLabels"], labels)
            ]
            assert budgets, f"no PodDisruptionBudget covers {name}"
