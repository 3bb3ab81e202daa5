"""Tool ids and tool globs: one canonical form, so a look-alike id can never slip past a deny.

Decisions (documented in the README):
- A tool id is NFKC-normalised, then must be ASCII segments of `[A-Za-z0-9_.:@+-]` joined by single
  `/`; no empty, `.` or `..` segment, no whitespace, control or zero-width character, at most 256
  characters. Anything else is *not canonical* and is denied with its own code, never matched:
  Cyrillic look-alikes (`ѕhell/exec`) are non-ASCII after NFKC and so are refused outright.
- Matching is case-insensitive (ids and patterns are compared lower-cased), so `Admin/Delete`
  cannot slip past `deny admin/*`. The DPR keeps the id as the agent sent it.
- In a glob, `*` matches any run of characters, `/` included: `deny admin/*` covers
  `admin/users/delete`, and `permit *` covers everything.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

MAX_TOOL_ID_LENGTH = 256
_CANONICAL_RE = re.compile(r"[A-Za-z0-9_.:@+\-]+(?:/[A-Za-z0-9_.:@+\-]+)*")
_GLOB_RE = re.compile(r"[A-Za-z0-9_.:@+\-*]+(?:/[A-Za-z0-9_.:@+\-*]+)*")


def canonical_tool_id(raw: object) -> str | None:
    """The lower-cased canonical id, or None when `raw` is not a canonical tool id."""
    if not isinstance(raw, str) or not raw or len(raw) > MAX_TOOL_ID_LENGTH:
        return None
    text = raw if raw.isascii() else unicodedata.normalize("NFKC", raw)
    if not text.isascii() or len(text) > MAX_TOOL_ID_LENGTH or _CANONICAL_RE.fullmatch(text) is None:
        return None
    if "." in text:
        padded = f"/{text}/"
        if "/./" in padded or "/../" in padded:
            return None
    return text.lower()


def glob_problem(pattern: str) -> str | None:
    """Why `pattern` can never match a canonical tool id, or None when it can."""
    if not pattern:
        return "the tool pattern is empty"
    if not pattern.isascii():
        return "the tool pattern has non-ASCII characters, which no canonical tool id contains"
    if _GLOB_RE.fullmatch(pattern) is None:
        return "the tool pattern has characters or empty segments no canonical tool id contains"
    padded = f"/{pattern}/"
    if "/./" in padded or "/../" in padded:
        return "the tool pattern has a `.` or `..` segment, which no canonical tool id contains"
    return None


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    parts = (re.escape(p) for p in pattern.lower().split("*"))
    return re.compile(".*".join(parts), re.DOTALL)


@lru_cache(maxsize=4096)
def _compiled_glob(pattern: str) -> re.Pattern[str]:
    return glob_to_regex(pattern)


def glob_matches(pattern: str, tool: str) -> bool:
    """Does the (lower-cased canonical) `tool` match `pattern`? Patterns come from the policy, so the
    compiled-regex cache is bounded by it (and by maxsize)."""
    if "*" not in pattern:
        return pattern.lower() == tool
    return _compiled_glob(pattern).fullmatch(tool) is not None


def glob_prefix(pattern: str) -> str:
    """The literal text before the first `*` (the whole pattern when it has none)."""
    star = pattern.find("*")
    return pattern.lower() if star < 0 else pattern[:star].lower()


def glob_covers(general: str, specific: str) -> bool:
    """True when every id matching `specific` also matches `general` (conservative: may say False)."""
    g, s = general.lower(), specific.lower()
    if g == s or g == "*":
        return True
    if "*" not in g:
        return False
    if g.endswith("*") and g.count("*") == 1:
        prefix = g[:-1]
        return s.startswith(prefix) and "*" not in s[: len(prefix)]
    return "*" not in s and glob_to_regex(g).fullmatch(s) is not None
