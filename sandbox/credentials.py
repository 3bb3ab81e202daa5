"""The agent's environment (S9): an allow-list, with deny-globs as a second line even for allowed names.

Nothing of the host environment passes unless named; a name that is allowed but looks like a credential
(`*_TOKEN`, `*SECRET*`, `AWS_*`, …) is still dropped. HOME points at the sandbox's private tmpfs, so no
credential file of the host (~/.aws, ~/.ssh, ~/.netrc, ~/.docker) is reachable through it, and NO_PROXY
is empty so nothing bypasses the egress proxy.
"""

from __future__ import annotations

from faramesh.sandbox.errors import EnvDenied

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

# Names (or NAME_* prefixes given as globs) that pass by default.
DEFAULT_ALLOW = ("PATH", "LANG", "LANGUAGE", "LC_*", "TERM", "TZ", "FARAMESH_*")
# Matched case-insensitively against every name, allowed or not. `runtime { strip_env }` extends this.
DEFAULT_DENY_GLOBS = (
    "*_TOKEN", "*_TOKEN_*", "*TOKEN", "*SECRET*", "*_KEY", "*_KEY_*", "*KEY_ID", "*PASSWORD*", "*PASSWD*",
    "*PASSPHRASE*", "*CREDENTIAL*", "*_PAT", "*PRIVATE*", "*_AUTH", "*AUTH_*", "*COOKIE*", "*SESSION*",
    "*_DSN", "DATABASE_URL", "AWS_*", "AZURE_*", "GOOGLE_*", "GCLOUD_*", "GCP_*", "VAULT_*", "BAO_*",
    "KUBECONFIG", "SSH_AUTH_SOCK", "SSH_AGENT_PID", "GPG_AGENT_INFO", "DOCKER_*", "NPM_CONFIG_*",
    "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "NETRC", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "LD_*",
    "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME",
)
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def glob_match(name: str, pattern: str) -> bool:
    """Case-insensitive shell-style match with `*` and `?` only (no fnmatch/re on the launch path)."""
    n, p = name.upper(), pattern.upper()
    ni = pi = 0
    star, mark = -1, 0
    while ni < len(n):
        if pi < len(p) and (p[pi] == "?" or p[pi] == n[ni]):
            ni, pi = ni + 1, pi + 1
        elif pi < len(p) and p[pi] == "*":
            star, mark, pi = pi, ni, pi + 1
        elif star != -1:
            mark += 1
            ni, pi = mark, star + 1
        else:
            return False
    while pi < len(p) and p[pi] == "*":
        pi += 1
    return pi == len(p)


def _matches(name: str, globs: Iterable[str]) -> bool:
    return any(glob_match(name, g) for g in globs)


def agent_environment(
    host_env: Mapping[str, str],
    allow: Iterable[str] = (),
    deny_globs: Iterable[str] = (),
    extra: Mapping[str, str] | None = None,
    home: str = "/home/agent",
) -> dict[str, str]:
    """The environment C3 is exec'd with.

    `allow` adds names (globs allowed) to DEFAULT_ALLOW, `deny_globs` adds to DEFAULT_DENY_GLOBS. `extra`
    is what the launcher itself sets (socket path, proxy variables, ids); it is not filtered by the allow
    list but a name in it matching a deny glob raises EnvDenied: the caller must not hand the agent a
    secret through its environment. Proxy variables are denied from the host and set by the launcher.
    """
    allowed = (*DEFAULT_ALLOW, *allow)
    denied = (*DEFAULT_DENY_GLOBS, *deny_globs)
    env: dict[str, str] = {}
    for name, value in host_env.items():
        if "=" in name or "\0" in name or "\0" in value:
            continue
        if _matches(name, allowed) and not _matches(name, denied):
            env[name] = value
    env.setdefault("PATH", DEFAULT_PATH)
    env["HOME"] = home
    env["NO_PROXY"] = ""
    env["no_proxy"] = ""
    for name, value in (extra or {}).items():
        if _matches(name, denied) and not _launcher_proxy(name):
            raise EnvDenied(f"refusing to pass {name!r} to the agent: it matches a deny glob")
        env[name] = value
    return env


def _launcher_proxy(name: str) -> bool:
    """The launcher's own proxy settings (pointing at 127.0.0.1:$FARAMESH_PROXY_PORT) are not secrets."""
    return name.upper() in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
