"""Tool id canonicalisation and globbing (engine/policy/toolid.py).

The documented decisions: NFKC first, then ASCII segments of [A-Za-z0-9_.:@+-] joined by single `/`,
no empty/`.`/`..` segment, at most 256 characters; matching is case-insensitive; `*` crosses `/`.
Every look-alike must either be refused (TOOL_ID_NOT_CANONICAL) or normalise to exactly the id it
imitates, so that it meets that id's rules.
"""

from __future__ import annotations

import pytest
from faramesh.engine.policy.compiler import compile_files
from faramesh.engine.policy.evaluate import DENY, PERMIT, evaluate
from faramesh.engine.policy.parser import parse_fpl
from faramesh.engine.policy.toolid import (
    MAX_TOOL_ID_LENGTH,
    canonical_tool_id,
    glob_covers,
    glob_prefix,
    glob_problem,
    glob_to_regex,
)
from hypothesis import given
from hypothesis import strategies as st

# ---- ids that are refused outright ------------------------------------------------------------

NOT_CANONICAL = [
    pytest.param(" admin/delete", id="leading-space"),
    pytest.param("admin/delete ", id="trailing-space"),
    pytest.param("admin/delete\t", id="trailing-tab"),
    pytest.param("\tadmin/delete", id="leading-tab"),
    pytest.param("admin/delete\n", id="trailing-newline"),
    pytest.param("admin/delete\x00", id="trailing-NUL"),
    pytest.param("admin\x00/delete", id="inner-NUL"),
    pytest.param("admin//delete", id="double-slash"),
    pytest.param("/admin/delete", id="leading-slash"),
    pytest.param("admin/delete/", id="trailing-slash"),
    pytest.param("./admin/delete", id="dot-segment-first"),
    pytest.param("admin/./delete", id="dot-segment-inner"),
    pytest.param("admin/delete/.", id="dot-segment-last"),
    pytest.param("../admin/delete", id="dotdot-first"),
    pytest.param("admin/../admin/delete", id="dotdot-inner"),
    pytest.param("admin/delete/..", id="dotdot-last"),
    pytest.param(".", id="dot-alone"),
    pytest.param("..", id="dotdot-alone"),
    pytest.param("/", id="slash-alone"),
    pytest.param("", id="empty"),
    pytest.param("\u0455hell/exec", id="cyrillic-dze-s"),
    pytest.param("\u0430dmin/delete", id="cyrillic-a"),
    pytest.param("shell/\u0435xec", id="cyrillic-ie-e"),
    pytest.param("shell\u200b/exec", id="zero-width-space"),
    pytest.param("sh\u200dell/exec", id="zero-width-joiner"),
    pytest.param("\ufeffshell/exec", id="bom"),
    pytest.param("ad\u00admin/delete", id="soft-hyphen"),
    pytest.param("\u202eadmin/delete", id="rtl-override"),
    pytest.param("admin/delete\u202c", id="pop-directional"),
    pytest.param("\u2066admin/delete", id="ltr-isolate"),
    pytest.param("admin\u00a0/delete", id="nbsp"),
    pytest.param("admin\u3000/delete", id="ideographic-space"),  # NFKC → U+0020, still refused
    pytest.param("admin /delete", id="inner-space"),
    pytest.param("admin/\u2024", id="one-dot-leader-becomes-dot-segment"),
    pytest.param("admin/\u2025/x", id="two-dot-leader-becomes-dotdot-segment"),
    pytest.param("\uff0e\uff0e/admin", id="fullwidth-dotdot"),
    pytest.param("admin\uff0f\uff0fdelete", id="fullwidth-double-slash"),
    pytest.param("admin/*", id="glob-star-in-id"),
    pytest.param("admin\\delete", id="backslash"),
    pytest.param("admin?delete", id="question-mark"),
    pytest.param("\u2126/x", id="ohm-sign-greek"),  # NFKC → Greek omega, non-ASCII
    pytest.param("\u0131/x", id="dotless-i"),
    pytest.param("a" * (MAX_TOOL_ID_LENGTH + 1), id="257-chars"),
    pytest.param("a/" * 128 + "b", id="257-chars-segments"),
]


@pytest.mark.parametrize("raw", NOT_CANONICAL)
def test_not_canonical_ids_are_refused(raw: str) -> None:
    assert canonical_tool_id(raw) is None


@pytest.mark.parametrize("raw", [None, 1, 1.5, True, b"admin/delete", ["admin/delete"], {"admin": "delete"}, object()])
def test_non_string_ids_are_refused(raw: object) -> None:
    assert canonical_tool_id(raw) is None


# ---- ids that are canonical (possibly after NFKC and lower-casing) ----------------------------

CANONICAL = [
    ("admin/delete", "admin/delete"),
    ("Admin/Delete", "admin/delete"),
    ("ADMIN/DELETE", "admin/delete"),
    ("\uff41dmin/delete", "admin/delete"),  # fullwidth a → a (NFKC)
    ("\uff53\uff48\uff45\uff4c\uff4c/\uff45\uff58\uff45\uff43", "shell/exec"),  # all fullwidth
    ("admin\uff0fdelete", "admin/delete"),  # fullwidth solidus → /
    ("\u017fhell/exec", "shell/exec"),  # long s → s
    ("\ufb01le/read", "file/read"),  # fi ligature → fi
    ("\u212aey/x", "key/x"),  # Kelvin sign → K → k
    ("stripe/refund.create", "stripe/refund.create"),
    ("a/.b", "a/.b"),  # a segment that merely starts with a dot is not `.`
    ("a/b..c", "a/b..c"),
    ("mcp:github@1/issues+comments", "mcp:github@1/issues+comments"),
    ("under_score-dash", "under_score-dash"),
    ("a" * MAX_TOOL_ID_LENGTH, "a" * MAX_TOOL_ID_LENGTH),
]


@pytest.mark.parametrize(("raw", "expected"), CANONICAL)
def test_canonical_ids(raw: str, expected: str) -> None:
    assert canonical_tool_id(raw) == expected


def test_canonical_id_never_exceeds_the_length_limit_after_nfkc() -> None:
    # U+FB03 (ﬃ) is one character that NFKC expands to three ASCII letters: a short raw id must not
    # become a canonical id three times over the documented limit.
    raw = "\ufb03" * 200
    assert len(raw) <= MAX_TOOL_ID_LENGTH
    result = canonical_tool_id(raw)
    assert result is None or len(result) <= MAX_TOOL_ID_LENGTH


@given(st.text(max_size=300))
def test_canonical_form_is_a_fixed_point_and_well_formed(raw: str) -> None:
    result = canonical_tool_id(raw)
    if result is None:
        return
    assert result.isascii()
    assert result == result.lower()
    assert 0 < len(result) <= MAX_TOOL_ID_LENGTH
    assert canonical_tool_id(result) == result
    for seg in result.split("/"):
        assert seg not in ("", ".", "..")
        assert all(c.isalnum() or c in "_.:@+-" for c in seg)


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_whitespace_or_invisible_at_either_end_is_always_refused(raw: str) -> None:
    for ws in (" ", "\t", "\n", "\x00", "\u200b", "\u202e"):
        assert canonical_tool_id(ws + raw) is None
        assert canonical_tool_id(raw + ws) is None


# ---- globs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "tool", "hit"),
    [
        ("*", "a", True),
        ("*", "a/b/c", True),
        ("admin/*", "admin/delete", True),
        ("admin/*", "admin/users/delete", True),  # * crosses /
        ("admin/*", "admin", False),
        ("admin/*", "administrator/x", False),
        ("admin*", "administrator/x", True),
        ("*_search", "web_search", True),
        ("*_search", "kb/web_search", True),
        ("*_search", "web_search/x", False),
        ("Admin/*", "admin/delete", True),  # patterns are lower-cased
        ("a.b", "axb", False),  # `.` is literal
        ("a+b", "aab", False),  # `+` is literal
        ("*/c", "a/b/c", True),
        ("a/*/c", "a/b/x/c", True),
        ("a/*/c", "a/c", False),
    ],
)
def test_glob_to_regex(pattern: str, tool: str, hit: bool) -> None:
    assert (glob_to_regex(pattern).fullmatch(tool) is not None) is hit


def test_glob_prefix() -> None:
    assert glob_prefix("Stripe/*") == "stripe/"
    assert glob_prefix("*") == ""
    assert glob_prefix("Refund") == "refund"
    assert glob_prefix("a*b*") == "a"


@pytest.mark.parametrize(
    ("pattern", "bad"),
    [
        ("", True),
        ("admin//x", True),
        ("admin/./x", True),
        ("admin/../x", True),
        ("\u0455hell/*", True),
        ("admin /x", True),
        ("admin/*", False),
        ("*", False),
        ("*_search", False),
    ],
)
def test_glob_problem(pattern: str, bad: bool) -> None:
    assert (glob_problem(pattern) is not None) is bad


@given(
    st.sampled_from(["*", "a*", "a/*", "a/b*", "*b", "a/*/c", "x"]),
    st.sampled_from(["a", "a/b", "a/b/c", "ab", "x", "a/x/c", "b", "cb"]),
)
def test_glob_covers_is_sound(general: str, tool: str) -> None:
    # glob_covers(g, s) for a literal s means "every id matching s also matches g", i.e. g matches s.
    if glob_covers(general, tool):
        assert glob_to_regex(general).fullmatch(tool) is not None


# ---- through the engine: no look-alike slips past a deny ---------------------------------------

POLICY = """\
agent "a" {
  default deny
  deny admin/*
  deny shell/*
  permit *
}
"""


def _policy():  # type: ignore[no-untyped-def]
    return compile_files(parse_fpl(POLICY, "governance.fms"), {"governance.fms": "x"}, env={})


@pytest.mark.parametrize("raw", NOT_CANONICAL)
def test_engine_denies_non_canonical_ids_with_their_own_code(raw: str) -> None:
    d = evaluate(_policy(), {"agent_id": "a", "tool_id": raw, "args": {}, "time": 1767225600})
    assert d.effect == DENY
    assert d.code == "TOOL_ID_NOT_CANONICAL"
    assert d.rule_ref is None


@pytest.mark.parametrize("raw", [None, 7, True, ["shell/exec"], {"id": "shell/exec"}, b"shell/exec"])
def test_engine_denies_non_string_ids(raw: object) -> None:
    d = evaluate(_policy(), {"agent_id": "a", "tool_id": raw, "args": {}})
    assert (d.effect, d.code) == (DENY, "TOOL_ID_NOT_CANONICAL")


def test_engine_denies_a_missing_tool_id() -> None:
    d = evaluate(_policy(), {"agent_id": "a", "args": {}})
    assert (d.effect, d.code) == (DENY, "TOOL_ID_NOT_CANONICAL")


@pytest.mark.parametrize(
    ("raw", "ref"),
    [
        ("Admin/Delete", "governance.fms:3"),
        ("ADMIN/users/DELETE", "governance.fms:3"),
        ("\uff41dmin/delete", "governance.fms:3"),  # fullwidth: NFKC → admin/delete → the deny rule
        ("admin\uff0fdelete", "governance.fms:3"),
        ("\u017fhell/exec", "governance.fms:4"),  # long s: NFKC → shell/exec → the deny rule
        ("SHELL/EXEC", "governance.fms:4"),
        ("\uff33hell/exec", "governance.fms:4"),
    ],
)
def test_case_and_nfkc_variants_meet_the_deny_rule(raw: str, ref: str) -> None:
    d = evaluate(_policy(), {"agent_id": "a", "tool_id": raw, "args": {}})
    assert (d.effect, d.code, d.rule_ref) == (DENY, "POLICY_DENY", ref)
    assert d.tool == canonical_tool_id(raw)


def test_the_ordinary_id_is_still_permitted() -> None:
    d = evaluate(_policy(), {"agent_id": "a", "tool_id": "ticket/read", "args": {}})
    assert (d.effect, d.code, d.rule_ref) == (PERMIT, "POLICY_PERMIT", "governance.fms:5")


@given(st.text(max_size=60))
def test_no_string_reaching_permit_canonicalises_into_a_denied_namespace(raw: str) -> None:
    d = evaluate(_policy(), {"agent_id": "a", "tool_id": raw, "args": {}})
    if d.effect == PERMIT:
        tool = canonical_tool_id(raw)
        assert tool is not None
        assert not tool.startswith(("admin/", "shell/"))
    else:
        assert d.code in ("POLICY_DENY", "TOOL_ID_NOT_CANONICAL")


@given(
    st.sampled_from(["admin/delete", "shell/exec"]).flatmap(
        lambda base: st.tuples(
            st.just(base),
            st.integers(0, len(base)),
            st.sampled_from(["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u202e", "\u00ad", " ", "\t", "\x00"]),
        )
    )
)
def test_invisible_characters_anywhere_are_refused(case: tuple[str, int, str]) -> None:
    base, at, ch = case
    raw = base[:at] + ch + base[at:]
    d = evaluate(_policy(), {"agent_id": "a", "tool_id": raw, "args": {}})
    assert (d.effect, d.code) == (DENY, "TOOL_ID_NOT_CANONICAL")
