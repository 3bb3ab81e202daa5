"""Sink declarations: which `provider` blocks are audit sinks, and their resolved configuration.

Secret fields (`token`, `api_key`, `secret`, and the `url` of HEC and webhooks, whose path or query may
be the credential) compile to `{"$env": NAME}`; they are resolved here from the engine's environment
and held in `Secret` wrappers whose repr never shows the value. A sink is named in logs and `status`
by its provider label and `scheme://host:port` only.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from faramesh.engine.alerts import MissingEnvironment, resolve_env_refs
from faramesh.engine.sinks.errors import SinkConfigError

# Declared type → sink kind. The schema's names first; the short names are accepted as aliases.
SINK_TYPES: Final[Mapping[str, str]] = {
    "splunk-sink": "splunk",
    "datadog-sink": "datadog",
    "s3-sink": "s3",
    "webhook-sink": "webhook",
    "splunk": "splunk",
    "datadog": "datadog",
    "s3": "s3",
    "webhook": "webhook",
}
_SECRET_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "splunk": ("url", "token"),
    "datadog": ("api_key",),
    "webhook": ("url", "secret"),
    "s3": (),
}
_REQUIRED: Final[Mapping[str, tuple[str, ...]]] = {
    "splunk": ("url", "token"),
    "datadog": ("api_key",),
    "webhook": ("url", "secret"),
    "s3": ("bucket",),
}
DEFAULT_TIMEOUT: Final = 10.0
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Secret:
    """A resolved secret. `repr`/`str` never show it (it may end up in a traceback or a log line by
    accident); `reveal()` is the one deliberate way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__


@dataclass(frozen=True)
class SinkSpec:
    name: str  # the provider label
    kind: str  # splunk | datadog | s3 | webhook
    declared_type: str
    settings: Mapping[str, Any]  # the non-secret fields, as compiled
    secrets: Mapping[str, Secret] = field(repr=False)
    sources: Mapping[str, str] = field(default_factory=dict)  # secret field → where it came from, for messages
    timeout: float = DEFAULT_TIMEOUT

    def secret(self, name: str) -> str:
        return self.secrets[name].reveal()

    def source_of(self, name: str) -> str:
        return self.sources.get(name, f"`{name}`")

    def secret_values(self) -> list[str]:
        """What a redactor must remove. For a URL that is its credential-bearing parts (userinfo, path,
        query), not the whole: `scheme://host:port` is how the sink is named in logs and status."""
        out: list[str] = []
        for key, secret in self.secrets.items():
            out += url_secrets(secret.reveal()) if key == "url" else [secret.reveal()]
        return out

    @property
    def spool_name(self) -> str:
        """The spool directory's name: the label when it is a safe file name, else a digest of it."""
        if _SAFE_NAME.fullmatch(self.name) and self.name not in (".", ".."):
            return self.name
        return "sink-" + hashlib.sha256(self.name.encode()).hexdigest()[:16]


def shown_url(url: str) -> str:
    """How a sink URL appears in logs and status: scheme, host and port, never userinfo, path or query."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<invalid URL>"
    if not parts.hostname:
        return "<invalid URL>"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}:{port or default}"


def url_secrets(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found = [parts.username, parts.password, parts.query]
    if parts.path.strip("/"):
        found += [parts.path, parts.path.strip("/")]
    return [p for p in found if p]


def http_url_problem(url: Any) -> str | None:
    if not isinstance(url, str):
        return "is not a string"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if any(c.isspace() for c in url):
        return "contains white space"
    return None


def sink_specs(providers: Mapping[str, Mapping[str, Any]], environ: Mapping[str, str]) -> list[SinkSpec]:
    """The sinks among the declared providers, resolved. Raises SinkConfigError naming every problem
    (never a secret value) when any of them cannot work."""
    specs: list[SinkSpec] = []
    problems: list[str] = []
    for name, cfg in sorted(providers.items()):
        declared = cfg.get("type")
        kind = SINK_TYPES.get(declared) if isinstance(declared, str) else None
        if kind is None:
            continue
        try:
            specs.append(_spec(name, kind, str(declared), cfg, environ))
        except SinkConfigError as exc:
            problems.append(exc.message)
    names: dict[str, str] = {}
    for spec in specs:
        other = names.setdefault(spec.spool_name, spec.name)
        if other != spec.name:
            problems.append(f'provider "{spec.name}" and provider "{other}" would share one spool directory')
    if problems:
        raise SinkConfigError("; ".join(problems))
    return specs


def _spec(name: str, kind: str, declared: str, cfg: Mapping[str, Any], environ: Mapping[str, str]) -> SinkSpec:
    where = f'provider "{name}"'
    for required in _REQUIRED[kind]:
        if cfg.get(required) in (None, ""):
            raise SinkConfigError(f"{where} ({declared}) needs `{required}`")
    secrets: dict[str, Secret] = {}
    sources: dict[str, str] = {}
    for key in _SECRET_FIELDS[kind]:
        raw = cfg.get(key)
        if raw is None:
            continue
        if isinstance(raw, Mapping) and set(raw) == {"$env"}:
            sources[key] = f'`{key}` (env("{raw["$env"]}"))'
        else:
            sources[key] = f"`{key}`"
        try:
            value = resolve_env_refs(raw, environ, f"{where}.{key}")
        except MissingEnvironment as exc:
            raise SinkConfigError(str(exc)) from None
        if not isinstance(value, str) or not value.strip():
            raise SinkConfigError(f"{where}: {sources[key]} is empty")
        secrets[key] = Secret(value)
    if "url" in secrets:
        problem = http_url_problem(secrets["url"].reveal())
        if problem is not None:
            raise SinkConfigError(f"{where}: {sources['url']} {problem}")
    settings = {k: v for k, v in cfg.items() if k not in _SECRET_FIELDS[kind] and k != "type"}
    if kind == "datadog":
        site = settings.get("site", "datadoghq.com")
        if not isinstance(site, str) or not _site_ok(site):
            raise SinkConfigError(
                f'{where}: `site` must be a Datadog site such as "datadoghq.com" or "datadoghq.eu", '
                "or the http(s):// URL of a relay"
            )
    if kind == "s3" and not isinstance(settings.get("bucket"), str):
        raise SinkConfigError(f"{where}: `bucket` must be a string")
    timeout = cfg.get("timeout", DEFAULT_TIMEOUT)
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise SinkConfigError(f"{where}: `timeout` must be a positive duration")
    return SinkSpec(name, kind, declared, settings, secrets, sources, float(timeout))


def _site_ok(site: str) -> bool:
    if "://" in site:
        return http_url_problem(site) is None
    return re.fullmatch(r"[a-z0-9]([a-z0-9.-]{0,250}[a-z0-9])?", site) is not None
