"""credentials: sentinels planted in the host environment never reach the agent's environment."""

from __future__ import annotations

import fnmatch

import pytest
from faramesh.sandbox.credentials import DEFAULT_DENY_GLOBS, agent_environment, glob_match
from faramesh.sandbox.errors import EnvDenied

SENTINEL = "SENTINEL-c0ffee"

HOST_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TERM": "xterm",
    "TZ": "UTC",
    "HOME": "/root",
    "USER": "root",
    "SHELL": "/bin/bash",
    "SSH_AUTH_SOCK": f"/tmp/ssh-{SENTINEL}/agent.1",
    "AWS_ACCESS_KEY_ID": SENTINEL,
    "AWS_SECRET_ACCESS_KEY": SENTINEL,
    "AWS_SESSION_TOKEN": SENTINEL,
    "GITHUB_TOKEN": SENTINEL,
    "OPENAI_API_KEY": SENTINEL,
    "ANTHROPIC_API_KEY": SENTINEL,
    "DATABASE_URL": f"postgres://u:{SENTINEL}@db/x",
    "VAULT_TOKEN": SENTINEL,
    "GOOGLE_APPLICATION_CREDENTIALS": f"/root/{SENTINEL}.json",
    "MY_SERVICE_PASSWORD": SENTINEL,
    "client_secret": SENTINEL,
    "FARAMESH_SOCKET": "/run/faramesh/agent.sock",
    "FARAMESH_API_KEY": SENTINEL,  # allowed prefix, still denied: the deny globs are a second line
    "FARAMESH_SIGNING_TOKEN": SENTINEL,
    "HTTPS_PROXY": f"http://user:{SENTINEL}@proxy:3128",
    "NO_PROXY": "*",
    "LD_PRELOAD": f"/tmp/{SENTINEL}.so",
    "PYTHONPATH": f"/home/x/{SENTINEL}",
    "APP_MODE": "prod",
    "TEAM_SECRET_NAME": SENTINEL,
}


def test_only_allowed_names_pass_and_no_sentinel_survives() -> None:
    env = agent_environment(HOST_ENV, allow=["APP_MODE", "MY_SERVICE_PASSWORD", "TEAM_*"], home="/home/agent")
    assert SENTINEL not in repr(env)
    assert env["PATH"] == HOST_ENV["PATH"]
    assert env["LANG"] == "C.UTF-8" and env["LC_ALL"] == "C.UTF-8" and env["TERM"] == "xterm" and env["TZ"] == "UTC"
    assert env["FARAMESH_SOCKET"] == "/run/faramesh/agent.sock"
    assert env["APP_MODE"] == "prod"  # a policy-allowed name
    assert "MY_SERVICE_PASSWORD" not in env  # allowed by policy, denied by glob
    assert "TEAM_SECRET_NAME" not in env
    assert env["HOME"] == "/home/agent"
    assert env["NO_PROXY"] == "" and env["no_proxy"] == ""
    for gone in ("USER", "SHELL", "SSH_AUTH_SOCK", "LD_PRELOAD", "PYTHONPATH", "HTTPS_PROXY"):
        assert gone not in env


def test_strip_env_extends_the_deny_globs() -> None:
    env = agent_environment({"APP_MODE": "x", "FARAMESH_DEBUG": "1"}, allow=["APP_*"], deny_globs=["app_mode"])
    assert "APP_MODE" not in env  # case-insensitive
    assert env["FARAMESH_DEBUG"] == "1"


def test_extra_is_set_but_never_a_secret() -> None:
    env = agent_environment({}, extra={"FARAMESH_AGENT_ID": "a1", "HTTPS_PROXY": "http://127.0.0.1:8123"})
    assert env["FARAMESH_AGENT_ID"] == "a1" and env["HTTPS_PROXY"] == "http://127.0.0.1:8123"
    assert env["PATH"]  # a default PATH when the host has none
    with pytest.raises(EnvDenied) as e:
        agent_environment({}, extra={"FARAMESH_ENGINE_TOKEN": "t"})
    assert e.value.code == "SANDBOX_ENV_DENIED"


@pytest.mark.parametrize("name", ["", "A", "GITHUB_TOKEN", "AWS_X", "MY_SECRET_VAL", "X_KEY_Y", "lc_all", "TOKEN"])
@pytest.mark.parametrize("pattern", ["*", "*_TOKEN", "AWS_*", "*SECRET*", "LC_*", "*_KEY_*", "a?c", "", "?"])
def test_glob_match_agrees_with_fnmatch(name: str, pattern: str) -> None:
    assert glob_match(name, pattern) == fnmatch.fnmatchcase(name.upper(), pattern.upper())


def test_default_globs_cover_the_usual_suspects() -> None:
    for name in ("AWS_SECRET_ACCESS_KEY", "GH_TOKEN", "NPM_TOKEN", "STRIPE_API_KEY", "DB_PASSWORD", "SSH_AUTH_SOCK"):
        assert any(glob_match(name, g) for g in DEFAULT_DENY_GLOBS), name
