"""FPL text → `PolicyFile`. Pure: takes source text and a display name, never touches the disk.

The grammar lives in grammar.lark and is parsed with LALR (Earley takes seconds on large policies).
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from typing import Any

import lark
from faramesh.engine.policy.ast import (
    AgentDecl,
    Assignment,
    BareWord,
    Block,
    BudgetDecl,
    Cond,
    EnvRef,
    ImportDecl,
    PolicyFile,
    RateLimitDecl,
    RedactDecl,
    RuleDecl,
    TrustKeyDecl,
    Value,
)
from faramesh.engine.policy.errors import PolicySyntaxError, SourcePos
from lark import Token, Transformer, v_args

# What a user should read instead of lark's terminal names.
_TOKEN_NAMES = {
    "STRING": 'a quoted string ("…")',
    "NUMBER": "a number",
    "MONEY": "an amount ($25)",
    "NAME": "a name",
    "TOOL_GLOB": "a tool id or glob (stripe/*)",
    "EFFECT": "permit, defer, deny or deny!",
    "COND_KW": "if or when",
    "CMP_OP": "a comparison (== != < <= > >=)",
    "REGEX_OP": "=~",
    "KEY_LITERAL": "a key (ed25519:<base64>)",
    "LBRACE": "{",
    "RBRACE": "}",
    "LSQB": "[",
    "RSQB": "]",
    "LPAR": "(",
    "RPAR": ")",
    "COLON": ":",
    "EQUAL": "=",
    "DOT": ".",
    "COMMA": ",",
    "_SEP": "; or ,",
    "$END": "end of file",
}

_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}
_ESCAPE_RE = re.compile(r"\\(.)")


def unquote(token: str) -> str:
    """Strip quotes; decode \\" \\\\ \\n \\t and keep any other escape verbatim (regexes need \\d)."""
    body = token[1:-1]
    if "\\" not in body:
        return body
    return _ESCAPE_RE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(0)), body)


def parse_number(text: str) -> int | float:
    if "." in text:
        as_float = float(text)
        return int(as_float) if as_float.is_integer() else as_float
    return int(text)


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = resources.files("faramesh.engine.policy").joinpath("grammar.lark").read_text()
    return lark.Lark(
        grammar,
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=False,
        start=["start", "expr"],
    )


def _pos(file: str, meta: Any) -> SourcePos:
    return SourcePos(file, getattr(meta, "line", 0) or 0, getattr(meta, "column", 0) or 0)


class _ToAst(Transformer[Token, Any]):
    def __init__(self, file: str) -> None:
        super().__init__()
        self.file = file

    def _tpos(self, token: Token) -> SourcePos:
        return SourcePos(self.file, token.line or 0, token.column or 0)

    # ---- values
    def string(self, items: list[Token]) -> str:
        return unquote(str(items[0]))

    def number(self, items: list[Token]) -> int | float:
        return parse_number(str(items[0]))

    def money(self, items: list[Token]) -> int | float:
        return parse_number(str(items[0])[1:])

    def true(self, _items: list[Any]) -> bool:
        return True

    def false(self, _items: list[Any]) -> bool:
        return False

    def bare_word(self, items: list[Token]) -> BareWord:
        return BareWord(str(items[0]))

    def value_list(self, items: list[Value]) -> tuple[Value, ...]:
        return tuple(i for i in items if i is not None)

    def env_call(self, items: list[Token]) -> EnvRef:
        return EnvRef(unquote(str(items[0])), self._tpos(items[0]))

    # ---- blocks
    @v_args(meta=True)
    def assignment(self, meta: Any, items: list[Any]) -> Assignment:
        return Assignment(str(items[0]), items[1], _pos(self.file, meta))

    def block(self, items: list[Assignment]) -> tuple[Assignment, ...]:
        return tuple(items)

    @v_args(meta=True)
    def block_stmt(self, meta: Any, items: list[Any]) -> Block:
        return Block(str(items[0]), None, items[1], _pos(self.file, meta))

    @v_args(meta=True)
    def named_block(self, meta: Any, items: list[Any]) -> Block:
        return Block(str(items[0]), unquote(str(items[1])), items[2], _pos(self.file, meta))

    @v_args(meta=True)
    def agent_sub_block(self, meta: Any, items: list[Any]) -> Block:
        return Block(str(items[0]), None, items[1], _pos(self.file, meta))

    @v_args(meta=True)
    def import_stmt(self, meta: Any, items: list[Token]) -> ImportDecl:
        alias = str(items[1]) if len(items) > 1 else None
        return ImportDecl(unquote(str(items[0])), alias, _pos(self.file, meta))

    @v_args(meta=True)
    def trust_key(self, meta: Any, items: list[Token]) -> TrustKeyDecl:
        return TrustKeyDecl(unquote(str(items[0])), str(items[1]), _pos(self.file, meta))

    def trust_block(self, items: list[TrustKeyDecl]) -> tuple[str, tuple[TrustKeyDecl, ...]]:
        return ("trust", tuple(items))

    # ---- rules
    def tool_pattern(self, items: list[Token]) -> str:
        tok = items[0]
        return unquote(str(tok)) if tok.type == "STRING" else str(tok)

    def notify(self, items: list[Token]) -> tuple[str, str]:
        return ("notify", unquote(str(items[0])))

    def reason(self, items: list[Token]) -> tuple[str, str]:
        return ("reason", unquote(str(items[0])))

    def credential(self, items: list[Token]) -> tuple[str, tuple[str, str | None]]:
        via = unquote(str(items[1])) if len(items) > 1 else None
        return ("credential", (unquote(str(items[0])), via))

    @v_args(meta=True)
    def rule(self, meta: Any, items: list[Any]) -> RuleDecl:
        effect_tok = str(items[0])
        pattern = items[1]
        condition: Cond | None = None
        notify: str | None = None
        reason: str | None = None
        credential: str | None = None
        credential_via: str | None = None
        rest = items[2:]
        if rest and isinstance(rest[0], Token) and rest[0].type == "COND_KW":
            condition = _as_cond(rest[1])
            rest = rest[2:]
        for kind, text in rest:
            if kind == "notify":
                notify = text
            elif kind == "credential":
                if credential is not None:
                    raise PolicySyntaxError("a rule names at most one `credential`", pos=_pos(self.file, meta))
                credential, credential_via = text
            else:
                reason = text
        strict = effect_tok == "deny!"
        return RuleDecl(
            "deny" if strict else effect_tok,
            strict,
            pattern,
            condition,
            notify,
            reason,
            _pos(self.file, meta),
            credential,
            credential_via,
        )

    def rules_block(self, items: list[RuleDecl]) -> tuple[str, tuple[RuleDecl, ...]]:
        return ("rules", tuple(items))

    @v_args(meta=True)
    def default_stmt(self, meta: Any, items: list[Token]) -> tuple[str, str, SourcePos]:
        return ("default", str(items[0]), _pos(self.file, meta))

    def framework_stmt(self, items: list[Token]) -> tuple[str, str]:
        return ("framework", unquote(str(items[0])))

    @v_args(meta=True)
    def rate_limit(self, meta: Any, items: list[Any]) -> RateLimitDecl:
        return RateLimitDecl(items[0], parse_number(str(items[1])), str(items[2]), _pos(self.file, meta))

    @v_args(meta=True)
    def budget_field(self, meta: Any, items: list[Any]) -> Assignment:
        return Assignment(str(items[0]), items[-1], _pos(self.file, meta))

    @v_args(meta=True)
    def budget(self, meta: Any, items: list[Any]) -> BudgetDecl:
        return BudgetDecl(str(items[0]), tuple(items[1:]), _pos(self.file, meta))

    @v_args(meta=True)
    def redact(self, meta: Any, items: list[Any]) -> RedactDecl:
        return RedactDecl(items[0], items[1], _pos(self.file, meta))

    @v_args(meta=True)
    def agent_block(self, meta: Any, items: list[Any]) -> AgentDecl:
        agent_id = unquote(str(items[0]))
        default = default_pos = framework = None
        rules: list[RuleDecl] = []
        rates: list[RateLimitDecl] = []
        budgets: list[BudgetDecl] = []
        redactions: list[RedactDecl] = []
        blocks: list[Block] = []
        fields: list[Assignment] = []
        for item in items[1:]:
            if isinstance(item, RuleDecl):
                rules.append(item)
            elif isinstance(item, RateLimitDecl):
                rates.append(item)
            elif isinstance(item, BudgetDecl):
                budgets.append(item)
            elif isinstance(item, RedactDecl):
                redactions.append(item)
            elif isinstance(item, Block):
                blocks.append(item)
            elif isinstance(item, Assignment):
                fields.append(item)
            elif item[0] == "rules":
                rules.extend(item[1])
            elif item[0] == "default":
                if default is not None:
                    raise PolicySyntaxError("`default` is given twice in this agent", pos=item[2])
                default, default_pos = item[1], item[2]
            elif item[0] == "framework":
                framework = item[1]
        return AgentDecl(
            agent_id=agent_id,
            pos=_pos(self.file, meta),
            default=default,
            default_pos=default_pos,
            framework=framework,
            rules=tuple(rules),
            rate_limits=tuple(rates),
            budgets=tuple(budgets),
            redactions=tuple(redactions),
            blocks=tuple(blocks),
            fields=tuple(fields),
        )

    # ---- conditions (JSON-shaped lists, see ast.Cond)
    def path(self, items: list[Token]) -> Cond:
        return ["path", *(str(i) for i in items)]

    def or_expr(self, items: list[Any]) -> Cond:
        return ["or", *(_as_cond(i) for i in items)]

    def and_expr(self, items: list[Any]) -> Cond:
        return ["and", *(_as_cond(i) for i in items)]

    def not_op(self, items: list[Any]) -> Cond:
        return ["not", _as_cond(items[0])]

    def compare(self, items: list[Any]) -> Cond:
        return ["cmp", str(items[1]), _operand(items[0]), _operand(items[2])]

    def in_op(self, items: list[Any]) -> Cond:
        return ["cmp", "in", _operand(items[0]), _operand(items[1])]

    def not_in_op(self, items: list[Any]) -> Cond:
        return ["cmp", "not_in", _operand(items[0]), _operand(items[1])]

    def contains(self, items: list[Any]) -> Cond:
        return ["cmp", "contains", _operand(items[0]), _operand(items[1])]

    def matches(self, items: list[Any]) -> Cond:
        return ["re", _operand(items[0]), unquote(str(items[-1]))]

    def start(self, items: list[Any]) -> PolicyFile:
        imports: list[ImportDecl] = []
        blocks: list[Block] = []
        trust: list[TrustKeyDecl] = []
        agents: list[AgentDecl] = []
        flat: list[RuleDecl] = []
        for item in items:
            if isinstance(item, ImportDecl):
                imports.append(item)
            elif isinstance(item, Block):
                blocks.append(item)
            elif isinstance(item, AgentDecl):
                agents.append(item)
            elif isinstance(item, RuleDecl):
                flat.append(item)
            elif isinstance(item, tuple) and item and item[0] == "trust":
                trust.extend(item[1])
        return PolicyFile(self.file, tuple(imports), tuple(blocks), tuple(trust), tuple(agents), tuple(flat))


def _operand(item: Any) -> Cond:
    """Wrap a transformed operand: paths, lists and nested expressions keep their shape."""
    if isinstance(item, list):
        return item
    if isinstance(item, tuple):
        return ["list", *(_operand(i) for i in item)]
    if isinstance(item, EnvRef | BareWord):
        raise PolicySyntaxError("env() and bare words are not allowed inside a condition", pos=None)
    return ["lit", item]


def _as_cond(item: Any) -> Cond:
    """A bare operand used as a whole condition (`if flagged`) means `flagged == true`."""
    if isinstance(item, list) and item and item[0] in ("and", "or", "not", "cmp", "re"):
        return item
    return ["cmp", "==", _operand(item), ["lit", True]]


def _describe_expected(expected: set[str]) -> str:
    names = sorted({_TOKEN_NAMES.get(e, e.strip('"').lower()) for e in expected})
    return ", ".join(names[:8]) + (" …" if len(names) > 8 else "")


KEYWORDS = (
    "import", "runtime", "provider", "identity", "trust", "agent", "default", "rules", "framework",
    "rate_limit", "budget", "redact", "egress", "model_policy", "session", "alert", "permit", "defer",
    "deny", "notify", "reason", "credential", "via", "command", "when", "matches", "contains",
)  # fmt: skip
_WORD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _keyword_hint(text: str | None, line: int) -> str:
    """A misspelt keyword near a syntax error (`defualt deny`, `rulez {`): say what was meant."""
    if not text or line <= 0:
        return ""
    from difflib import get_close_matches

    lines = text.split("\n")
    for number in range(line, max(0, line - 2), -1):
        if number > len(lines):
            continue
        for word in _WORD_RE.findall(lines[number - 1].split("#", 1)[0]):
            if word in KEYWORDS or len(word) < 4:
                continue
            close = get_close_matches(word, KEYWORDS, n=1, cutoff=0.75)
            if close:
                return f"; did you mean `{close[0]}` (line {number} has `{word}`)?"
    return ""


def _syntax_error(exc: lark.exceptions.UnexpectedInput, file: str, text: str | None = None) -> PolicySyntaxError:
    pos = SourcePos(file, getattr(exc, "line", 0) or 0, getattr(exc, "column", 0) or 0)
    if isinstance(exc, lark.exceptions.UnexpectedToken):
        tok = exc.token
        if tok.type == "$END" and tok.end_line:
            # lark gives $END the position of the last token; the file ends *after* it.
            pos = SourcePos(file, tok.end_line, tok.end_column or 0)
        shown = "end of file" if tok.type == "$END" else repr(str(tok))
        message = f"unexpected {shown}; expected {_describe_expected(set(exc.expected))}"
    elif isinstance(exc, lark.exceptions.UnexpectedCharacters):
        message = f"unexpected character {exc.char!r}"
        allowed = getattr(exc, "allowed", None)
        if allowed:
            message += f"; expected {_describe_expected(set(allowed))}"
    else:
        message = "unexpected end of file"
    return PolicySyntaxError(message + _keyword_hint(text, pos.line), pos=pos)


def _too_deep(file: str) -> PolicySyntaxError:
    return PolicySyntaxError("an expression or list is nested too deeply", pos=SourcePos(file, 1))


def parse_fpl(text: str, file: str = "governance.fms") -> PolicyFile:
    """Parse FPL source. Raises PolicySyntaxError with a position; never anything else."""
    try:
        tree = _parser().parse(text, start="start")
        result = _ToAst(file).transform(tree)
    except lark.exceptions.UnexpectedInput as exc:
        raise _syntax_error(exc, file, text) from None
    except lark.exceptions.VisitError as exc:
        inner = exc.orig_exc
        if isinstance(inner, PolicySyntaxError):
            raise PolicySyntaxError(
                inner.message, pos=inner.pos or _pos(file, getattr(exc.obj, "meta", None))
            ) from None
        if isinstance(inner, RecursionError):
            raise _too_deep(file) from None
        raise
    except RecursionError:
        raise _too_deep(file) from None
    assert isinstance(result, PolicyFile)
    return result


def parse_condition(text: str, file: str, pos: SourcePos | None = None) -> Cond:
    """Parse a condition written in FPL expression syntax (YAML/JSON `condition` fields)."""
    try:
        tree = _parser().parse(text, start="expr")
        result = _ToAst(file).transform(tree)
    except lark.exceptions.UnexpectedInput as exc:
        err = _syntax_error(exc, file)
        raise PolicySyntaxError(f"in condition {text!r}: {err.message}", pos=pos) from None
    except lark.exceptions.VisitError as exc:
        raise PolicySyntaxError(f"in condition {text!r}: {exc.orig_exc}", pos=pos) from None
    except RecursionError:
        raise PolicySyntaxError(f"in condition {text[:40]!r}…: nested too deeply", pos=pos) from None
    return _as_cond(result)
