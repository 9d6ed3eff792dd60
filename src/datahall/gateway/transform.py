"""Prompt transformation: sandboxed templates, system prompts, a guard, PII redaction, model
aliases, and OpenAI Chat Completions ↔ Anthropic Messages translation.

[reconstruction] Brief ``ai-gateway.md`` §2.5 lists the transformations an AI gateway applies
on the way to a backend; no anchor publishes an algorithm, so the pieces and their order are
ours. Every function here is pure (dict in, new dict out; the input is never changed), so the
server composes them for a client speaking either API to a backend speaking either:

- **templates** (:func:`render_template`): Jinja2 in an immutable sandbox, with variables from
  the request (``model``, ``tenant``, ``metadata`` and the client's ``variables``);
- **system prompt** (:func:`inject_system_prompt`): prepend, append, replace or decorate;
- **guard** (:class:`Guard`): regex allow/deny rules; a denied prompt is a 400 in OpenAI's
  error shape (:class:`PolicyError`);
- **redaction** (:class:`Redactor`): emails, phone numbers, Luhn-valid card numbers, IPv4/IPv6,
  IBANs (mod-97 valid), US SSNs and extra patterns become tokens such as ``[EMAIL]``;
- **model aliases** (:func:`resolve_model`): ``gpt-4o`` → a backend pool and that backend's own
  model name;
- **schema translation**: requests and responses both ways, and streams event by event
  (:class:`OpenAIToAnthropicStream`, :class:`AnthropicToOpenAIStream`).

:class:`Transformer` runs the request-side steps in the gateway's order on an OpenAI-shaped
body (an Anthropic client's request is translated first):

>>> t = Transformer(system_prompt="You help {{ tenant }}.", redactor=Redactor())
>>> out = t.apply({"model": "m", "messages": [{"role": "user", "content": "I am a@b.io"}]},
...               tenant="acme")
>>> out.body["messages"]
[{'role': 'system', 'content': 'You help acme.'}, {'role': 'user', 'content': 'I am [EMAIL]'}]
>>> out.redactions
{'email': 1}
"""

from __future__ import annotations

import bisect
import codecs
import ipaddress
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

if TYPE_CHECKING:  # config imports this module to validate templates and patterns
    from datahall.gateway.config import TransformsConfig

__all__ = [
    "PII_KINDS",
    "AnthropicToOpenAIStream",
    "Guard",
    "ModelTarget",
    "OpenAIToAnthropicStream",
    "PolicyError",
    "Redactor",
    "SseDecoder",
    "SystemPromptMode",
    "TemplateError",
    "TransformResult",
    "Transformer",
    "TranslationError",
    "anthropic_error_to_openai",
    "anthropic_sse",
    "anthropic_to_openai_request",
    "anthropic_to_openai_response",
    "anthropic_usage",
    "compile_template",
    "inject_system_prompt",
    "luhn_valid",
    "openai_error_to_anthropic",
    "openai_sse",
    "openai_to_anthropic_request",
    "openai_to_anthropic_response",
    "openai_usage",
    "resolve_model",
    "rewrite_model",
    "render_template",
    "system_prompt",
    "template_variables",
]

SystemPromptMode = Literal["prepend", "append", "replace", "decorate"]


# --- errors ---------------------------------------------------------------------------------

_OPENAI_TYPES = {400: "invalid_request_error", 413: "invalid_request_error", 429: "requests"}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class PolicyError(Exception):
    """A request the gateway refuses, with the HTTP status and the error body to send.

    The body follows OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``), or
    Anthropic's for a client that speaks the Messages API:

    >>> e = PolicyError(400, "blocked by the prompt guard", code="content_policy_violation")
    >>> e.openai_body()["error"]["code"], e.anthropic_body()["error"]["type"]
    ('content_policy_violation', 'invalid_request_error')
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        if type is None:
            fallback = "server_error" if status >= 500 else "invalid_request_error"
            type = _OPENAI_TYPES.get(status, fallback)
        self.type = type
        self.headers: dict[str, str] = dict(headers or {})

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_body(self) -> dict[str, Any]:
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}


class TemplateError(ValueError):
    """A template that does not compile or render; the message names the template and the cause
    (a syntax error and its line, an undefined variable, or a blocked sandbox access)."""


class TranslationError(ValueError):
    """A body that cannot be said in the other API (e.g. ``n > 1`` for Anthropic); the message
    names the field. The server answers it with a 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# --- sandboxed templates --------------------------------------------------------------------

MAX_TEMPLATE_OUTPUT = 1_000_000
"""Characters one rendering may produce; a template that loops past it fails."""
_MAX_SEQUENCE = 100_000  # longest string or list that `*` may build in a template
_MAX_EXPONENT = 128
# str methods that build a string as long as a number the template chooses (``ljust(10**9)``)
_UNSAFE_STR_METHODS = frozenset(
    {"center", "ljust", "rjust", "zfill", "expandtabs", "format", "format_map"}
)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox (no ``_``-attributes, no internal attributes, no mutating
    methods) plus limits on the operators and methods that build huge values from a short
    template, because templates may come from tenants or clients."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int | float) and abs(right) > _MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is larger than {_MAX_EXPONENT}")
        if operator == "%" and isinstance(left, str):
            raise SecurityError("'%' formatting of strings is disabled; use '~' or filters")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                sized = isinstance(seq, str | list | tuple) and isinstance(n, int)
                if sized and len(seq) * n > _MAX_SEQUENCE:
                    raise SecurityError(
                        f"'*' would build a value of {len(seq) * n} items (at most {_MAX_SEQUENCE})"
                    )
        return super().call_binop(context, operator, left, right)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and attr in _UNSAFE_STR_METHODS:
            return False
        return super().is_safe_attribute(obj, attr, value)


def _environment() -> _Sandbox:
    env = _Sandbox(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    # filters and globals that take a size from the template: same reason as _UNSAFE_STR_METHODS
    for name in ("center", "indent", "format", "wordwrap"):
        env.filters.pop(name, None)
    env.globals.pop("lipsum", None)
    return env


_ENV = _environment()


def compile_template(source: str, *, name: str = "template") -> jinja2.Template:
    """Compile `source` in the sandbox; a syntax error raises :class:`TemplateError` with its line.

    >>> compile_template("Hello {{ name }").render(name="x")
    Traceback (most recent call last):
    ...
    datahall.gateway.transform.TemplateError: template 'template' line 1: unexpected '}'
    """
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"template {name!r} line {e.lineno}: {e.message}") from None


def render_template(
    template: str | jinja2.Template,
    variables: Mapping[str, Any],
    *,
    name: str = "template",
    max_chars: int = MAX_TEMPLATE_OUTPUT,
) -> str:
    """Render a sandboxed template; every failure is a :class:`TemplateError` saying why.

    Undefined variables are errors (not empty strings), and attribute escapes fail:

    >>> render_template("Hi {{ user }} from {{ tenant }}", {"user": "Ann", "tenant": "acme"})
    'Hi Ann from acme'
    >>> render_template("{{ ''.__class__.__mro__ }}", {})
    Traceback (most recent call last):
    ...
    datahall.gateway.transform.TemplateError: template 'template': blocked by the sandbox: access to attribute '__class__' of 'str' object is unsafe.
    """
    compiled = compile_template(template, name=name) if isinstance(template, str) else template
    parts: list[str] = []
    size = 0
    try:
        # generate() yields as it renders, so a runaway loop stops at the cap, not at OOM
        for piece in compiled.generate(**variables):
            size += len(piece)
            if size > max_chars:
                raise TemplateError(f"template {name!r}: output longer than {max_chars} characters")
            parts.append(piece)
    except TemplateError:
        raise
    except SecurityError as e:
        raise TemplateError(f"template {name!r}: blocked by the sandbox: {e}") from None
    except jinja2.UndefinedError as e:
        raise TemplateError(f"template {name!r}: {e.message}") from None
    except (jinja2.TemplateError, ArithmeticError, TypeError, ValueError, LookupError) as e:
        raise TemplateError(f"template {name!r}: {type(e).__name__}: {e}") from None
    return "".join(parts)


def template_variables(
    body: Mapping[str, Any],
    *,
    tenant: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    variables: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The variables a template sees: the client's `variables` at the top level and under
    ``variables``, then the gateway's own (``model``, ``tenant``, ``metadata``), which win, so a
    client cannot pose as another tenant.

    >>> template_variables({"model": "m"}, tenant="acme", variables={"tenant": "evil", "x": 1})
    {'tenant': 'acme', 'x': 1, 'model': 'm', 'metadata': {}, 'variables': {'tenant': 'evil', 'x': 1}}
    """
    out: dict[str, Any] = dict(variables or {})
    out.update(
        tenant=tenant,
        model=body.get("model"),
        metadata=dict(metadata or {}),
        variables=dict(variables or {}),
    )
    return out


# --- walking the texts of a request -----------------------------------------------------------

TextFn = Callable[[str, str], str]
"""``fn(text, where) -> new text``; `where` is a path such as ``messages[1].content``."""


def _map_content(content: Any, role: str, roles: Container, fn: TextFn, where: str) -> Any:
    if isinstance(content, str):
        return fn(content, where) if role in roles else content
    if not isinstance(content, list):
        return content
    out = []
    for j, part in enumerate(content):
        if isinstance(part, Mapping) and part.get("type") == "text" and role in roles:
            text = part.get("text")
            if isinstance(text, str):
                part = {**part, "text": fn(text, f"{where}[{j}].text")}
        elif isinstance(part, Mapping) and part.get("type") == "tool_result" and "content" in part:
            # an Anthropic tool result sits in a user message but is the tool's output
            inner = _map_content(part["content"], "tool", roles, fn, f"{where}[{j}].content")
            part = {**part, "content": inner}
        out.append(part)
    return out


def _map_texts(body: Mapping[str, Any], roles: Container[str], fn: TextFn) -> dict[str, Any]:
    """A copy of `body` whose texts spoken by `roles` went through `fn`: message contents (both
    APIs), Anthropic's ``system``, and the ``prompt`` / ``input`` of completions and embeddings
    (spoken by ``user``)."""
    out = dict(body)
    messages = body.get("messages")
    if isinstance(messages, list):
        new = []
        for i, m in enumerate(messages):
            if isinstance(m, Mapping) and "content" in m:
                role = str(m.get("role", "user"))
                if role == "developer":
                    role = "system"
                where = f"messages[{i}].content"
                m = {**m, "content": _map_content(m["content"], role, roles, fn, where)}
            new.append(m)
        out["messages"] = new
    if "system" in body:
        out["system"] = _map_content(body["system"], "system", roles, fn, "system")
    for key in ("prompt", "input"):
        value = body.get(key)
        if "user" in roles and isinstance(value, str):
            out[key] = fn(value, key)
        elif "user" in roles and isinstance(value, list):
            out[key] = [
                fn(v, f"{key}[{i}]") if isinstance(v, str) else v for i, v in enumerate(value)
            ]
    return out


def _texts(body: Mapping[str, Any], roles: Container[str]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []

    def collect(text: str, where: str) -> str:
        found.append((text, where))
        return text

    _map_texts(body, roles, collect)
    return found


# --- system prompt ----------------------------------------------------------------------------


def _plain_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text"
        )
    raise TranslationError(
        f"content must be a string or a list of parts, got {type(content).__name__}"
    )


def system_prompt(body: Mapping[str, Any]) -> str | None:
    """The system prompt of an OpenAI body (its system/developer messages, joined by a blank
    line) or of an Anthropic body (``system``); None when there is none.

    >>> system_prompt({"messages": [{"role": "system", "content": "Be brief."}]})
    'Be brief.'
    >>> system_prompt({"system": [{"type": "text", "text": "Be brief."}], "messages": []})
    'Be brief.'
    """
    if "system" in body:
        return _plain_text(body["system"])
    texts = [
        _plain_text(m.get("content"))
        for m in body.get("messages") or []
        if isinstance(m, Mapping) and m.get("role") in ("system", "developer")
    ]
    return "\n\n".join(texts) if texts else None


def inject_system_prompt(
    body: Mapping[str, Any],
    template: str | jinja2.Template,
    mode: SystemPromptMode = "prepend",
    variables: Mapping[str, Any] | None = None,
    *,
    api: Literal["openai", "anthropic"] = "openai",
    separator: str = "\n\n",
) -> dict[str, Any]:
    """Put the operator's system prompt into a request (brief §2.5).

    The `template` is rendered with `variables` plus ``system``, the request's own system prompt
    (``""`` if none). Modes: ``prepend`` / ``append`` join it before / after the existing one,
    ``replace`` drops the existing one, and ``decorate`` rewrites an existing one (``"{{ system
    }} Answer in French."``) and leaves a request without one alone. In an OpenAI body the
    result is one system message placed first; in an Anthropic body it is ``system``.

    >>> body = {"messages": [{"role": "system", "content": "Be brief."},
    ...                      {"role": "user", "content": "Hi"}]}
    >>> inject_system_prompt(body, "Policy.", "append")["messages"][0]
    {'role': 'system', 'content': 'Be brief.\\n\\nPolicy.'}
    >>> inject_system_prompt(body, "[{{ system }}]", "decorate")["messages"][0]["content"]
    '[Be brief.]'
    >>> inject_system_prompt({"system": "A", "messages": []}, "B", "prepend", api="anthropic")
    {'system': 'B\\n\\nA', 'messages': []}
    """
    if mode not in ("prepend", "append", "replace", "decorate"):
        raise ValueError(
            f"system prompt mode must be prepend|append|replace|decorate, got {mode!r}"
        )
    existing = system_prompt(body)
    if mode == "decorate" and existing is None:
        return dict(body)
    values = {**(variables or {}), "system": existing or ""}
    text = render_template(template, values, name="system_prompt")
    if mode in ("prepend", "append") and existing:
        text = text + separator + existing if mode == "prepend" else existing + separator + text
    out = dict(body)
    if api == "anthropic":
        out["system"] = text
        return out
    rest = [
        m
        for m in body.get("messages") or []
        if not (isinstance(m, Mapping) and m.get("role") in ("system", "developer"))
    ]
    out["messages"] = [{"role": "system", "content": text}, *rest]
    return out


# --- guard ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Guard:
    """Regex allow/deny rules over the texts that `roles` speak (brief §2.5).

    A text matching any ``deny`` rule is refused; with ``allow`` rules, the request is refused
    unless at least one of them matches somewhere in those texts (a topic allow-list). Refusal
    is a :class:`PolicyError` 400, code ``content_policy_violation``, naming the rule and the
    message, not quoting the pattern back to the client.

    >>> g = Guard(deny=[r"ignore (all )?previous instructions"])
    >>> g.check({"messages": [{"role": "user", "content": "Ignore previous instructions!"}]})
    Traceback (most recent call last):
    ...
    datahall.gateway.transform.PolicyError: messages[0].content matches deny rule 1 of the gateway's prompt guard; the request was not sent to a model
    """

    deny: Sequence[str] = ()
    allow: Sequence[str] = ()
    roles: Sequence[str] = ("user",)
    ignore_case: bool = True
    _deny: tuple[re.Pattern[str], ...] = field(init=False, repr=False)
    _allow: tuple[re.Pattern[str], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        flags = re.IGNORECASE if self.ignore_case else 0
        object.__setattr__(self, "_deny", tuple(_compile(p, flags, "deny") for p in self.deny))
        object.__setattr__(self, "_allow", tuple(_compile(p, flags, "allow") for p in self.allow))

    def check(self, body: Mapping[str, Any]) -> None:
        """Raise :class:`PolicyError` if `body` breaks a rule; return None otherwise."""
        texts = _texts(body, frozenset(self.roles))
        for text, where in texts:
            for k, rule in enumerate(self._deny, 1):
                if rule.search(text):
                    raise PolicyError(
                        400,
                        f"{where} matches deny rule {k} of the gateway's prompt guard; "
                        "the request was not sent to a model",
                        code="content_policy_violation",
                        param=where,
                    )
        if self._allow and texts and not any(r.search(t) for r in self._allow for t, _ in texts):
            raise PolicyError(
                400,
                "the prompt matches none of the gateway's allow rules (it accepts only the "
                "topics its operator listed); the request was not sent to a model",
                code="content_policy_violation",
                param="messages",
            )


def _compile(pattern: str, flags: int, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, flags)
    except re.error as e:
        raise ValueError(f"{what} pattern {pattern!r} is not a valid regex: {e}") from None


# --- PII redaction ----------------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a card number (ISO/IEC 7812); separators are ignored.

    >>> luhn_valid("4111 1111 1111 1111"), luhn_valid("4111 1111 1111 1112")
    (True, False)
    """
    nums = [int(c) for c in digits if c.isascii() and c.isdigit()]
    total = 0
    for i, n in enumerate(reversed(nums)):
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return bool(nums) and total % 10 == 0


def _iban_valid(text: str) -> bool:
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _ip_valid(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _ipv6_valid(text: str) -> bool:
    # "::" alone parses, but a bare double colon in prose (or code) is not an address
    return any(c.isalnum() for c in text) and _ip_valid(text)


def _phone_valid(text: str) -> bool:
    return 10 <= sum(c.isdigit() for c in text) <= 15  # E.164 allows at most 15 digits


_D = "[0-9]"  # \d would also match other scripts' digits, which no PII format uses
_PII: dict[str, tuple[str, Callable[[str], bool] | None]] = {
    # kind: (pattern, validator); earlier kinds win where matches overlap
    "email": (
        r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
        r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])",
        None,
    ),
    "iban": (
        rf"(?<![\w])[A-Z]{{2}}{_D}{{2}}(?: ?[A-Z0-9]{{4}}){{2,7}}(?: ?[A-Z0-9]{{1,3}})?(?![\w])",
        _iban_valid,
    ),
    "credit_card": ("", None),  # not a regex: see _find_cards
    "ssn": (
        rf"(?<![\w-])(?!000|666|9{_D}{_D}){_D}{{3}}-(?!00){_D}{{2}}-(?!0000){_D}{{4}}(?![\w-])",
        None,
    ),
    "ipv6": (
        r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}"
        r"(?:[0-9A-Fa-f]{1,4}|[0-9]{1,3}(?:\.[0-9]{1,3}){3})?(?![\w:]|\.[0-9])",
        _ipv6_valid,
    ),
    "ipv4": (rf"(?<![\w.]){_D}{{1,3}}(?:\.{_D}{{1,3}}){{3}}(?![\w]|\.{_D})", _ip_valid),
    "phone": (
        rf"(?<![\w+.-])(?:\+{_D}{{10,15}}|(?:\+{_D}{{1,3}}[ .-]?)?(?:\({_D}{{1,4}}\)[ .-]?)?"
        rf"{_D}{{2,4}}(?:[ .-]?{_D}{{2,4}}){{1,4}})(?![\w:]|[.-]{_D})",
        _phone_valid,
    ),
}
PII_KINDS: tuple[str, ...] = tuple(_PII)
"""The built-in kinds, in priority order: email, iban, credit_card, ssn, ipv6, ipv4, phone."""
_MAX_PASSES = 16

Span = tuple[int, int, str | None]
"""(start, end, kind); kind None *claims* the span: left as written, and no later rule may
match inside it."""

# digit groups joined by single spaces or hyphens, not part of a word, a decimal, an address or
# a "+" phone number
_DIGIT_RUN = re.compile(rf"(?<![\w+.]){_D}+(?:[ -]{_D}+)*(?![\w]|[.,]{_D})")
_DIGIT_GROUP = re.compile(f"{_D}+")


def _card_shaped(lengths: Sequence[int]) -> bool:
    # 13-19 digits as one group or as up to 5 groups of 4+ (4-4-4-4, Amex 4-6-5, 4-4-4-4-3);
    # a 3-3-4 phone number does not start a card
    return 13 <= sum(lengths) <= 19 and len(lengths) <= 5 and all(n >= 4 for n in lengths[:-1])


def _find_cards(text: str) -> Iterable[Span]:
    """Card numbers among the digit runs of `text`. Within a run, left to right, the longest
    card-shaped window of groups that passes Luhn is a card: windows rather than whole runs,
    so that a card written after another number ("qty 2 4111 1111 1111 1111") is still found.
    A run that is card-shaped as a whole and holds no card is claimed: a number written like
    a card but failing Luhn is no card, and must not be half-redacted as a phone number."""
    for run in _DIGIT_RUN.finditer(text):
        groups = [g.span() for g in _DIGIT_GROUP.finditer(text, run.start(), run.end())]
        i, found = 0, False
        while i < len(groups):
            for j in range(min(len(groups), i + 5), i, -1):
                start, end = groups[i][0], groups[j - 1][1]
                if _card_shaped([e - s for s, e in groups[i:j]]) and luhn_valid(text[start:end]):
                    yield start, end, "credit_card"
                    found, i = True, j
                    break
            else:
                i += 1
        if not found and _card_shaped([e - s for s, e in groups]):
            yield run.start(), run.end(), None


def _regex_finder(
    kind: str, rx: re.Pattern[str], valid: Callable[[str], bool] | None
) -> Callable[[str], Iterable[Span]]:
    def find(text: str) -> Iterable[Span]:
        for m in rx.finditer(text):
            if valid is None or valid(m.group()):
                yield m.start(), m.end(), kind

    return find


def _token(kind: str) -> str:
    return f"[{kind.upper()}]"


@dataclass(frozen=True)
class Redactor:
    """Replace PII in the texts that `roles` speak with tokens such as ``[EMAIL]`` (brief §2.5).

    `kinds` chooses among :data:`PII_KINDS`; `extra` adds ``{name: regex}`` rules, tried first
    and replaced with ``[NAME]``. Candidates are validated: card numbers by Luhn, IBANs by their
    mod-97 check, addresses by :mod:`ipaddress`, phone numbers by digit count (10 to 15), so
    look-alikes stay. Redaction repeats until nothing changes, so its output never holds a
    redactable span and redacting twice changes nothing.

    >>> r = Redactor()
    >>> r.redact("Mail ann@example.com or call +1 (555) 123-4567 from 10.0.0.7.")
    'Mail [EMAIL] or call [PHONE] from [IPV4].'
    >>> r.redact("card 4111 1111 1111 1111, not 4111 1111 1111 1112")
    'card [CREDIT_CARD], not 4111 1111 1111 1112'
    """

    kinds: Sequence[str] = PII_KINDS
    extra: Mapping[str, str] = field(default_factory=dict)
    roles: Sequence[str] = ("user",)
    _finders: tuple[Callable[[str], Iterable[Span]], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.kinds) - set(PII_KINDS))
        if unknown:
            raise ValueError(f"unknown PII kinds {unknown}; choose from {', '.join(PII_KINDS)}")
        finders: list[Callable[[str], Iterable[Span]]] = []
        tokens = [_token(k) for k in [*self.extra, *PII_KINDS]]
        for name, pattern in self.extra.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
                raise ValueError(f"redaction rule name {name!r} must be letters, digits and _")
            rx = _compile(pattern, 0, f"redaction rule {name!r}")
            for token in tokens:
                if rx.search(token):
                    raise ValueError(
                        f"redaction rule {name!r} matches the replacement token {token}, so "
                        "redaction would never settle; make the pattern stricter"
                    )
            finders.append(_regex_finder(name, rx, None))
        for kind in PII_KINDS:
            if kind == "credit_card" and kind in self.kinds:
                finders.append(_find_cards)
            elif kind in self.kinds:
                pattern, valid = _PII[kind]
                finders.append(_regex_finder(kind, re.compile(pattern), valid))
        object.__setattr__(self, "_finders", tuple(finders))

    def redact_counts(self, text: str) -> tuple[str, Counter[str]]:
        """`text` redacted, and how many spans of each kind were replaced."""
        counts: Counter[str] = Counter()
        for _ in range(_MAX_PASSES):
            text, n = self._pass(text, counts)
            if not n:
                break
        return text, counts

    def redact(self, text: str) -> str:
        return self.redact_counts(text)[0]

    def _pass(self, text: str, counts: Counter[str]) -> tuple[str, int]:
        taken: list[Span] = []  # sorted and disjoint
        starts: list[int] = []
        work = text
        for find in self._finders:
            mine = []
            for span in find(work):
                start, end, _ = span
                i = bisect.bisect_left(starts, start)
                if (i > 0 and taken[i - 1][1] > start) or (i < len(taken) and taken[i][0] < end):
                    continue  # overlaps a span of an earlier rule (only a loose extra rule can)
                taken.insert(i, span)
                starts.insert(i, start)
                mine.append(span)
            # later rules see each taken span as NULs, a boundary that no pattern crosses, as
            # its token will be: so "555-123-4567 4111 1111 1111 1111" is a phone and a card
            if mine:
                pieces, pos = [], 0
                for start, end, _ in sorted(mine):
                    pieces += [work[pos:start], "\0" * (end - start)]
                    pos = end
                work = "".join(pieces) + work[pos:]
        replaced = [t for t in taken if t[2] is not None]
        if not replaced:
            return text, 0
        out, pos = [], 0
        for start, end, kind in replaced:
            out += [text[pos:start], _token(kind)]  # type: ignore[arg-type]
            counts[kind] += 1  # type: ignore[index]
            pos = end
        out.append(text[pos:])
        return "".join(out), len(replaced)

    def redact_body(self, body: Mapping[str, Any]) -> tuple[dict[str, Any], Counter[str]]:
        """A copy of `body` with the texts of `roles` redacted, and the counts per kind."""
        counts: Counter[str] = Counter()

        def one(text: str, where: str) -> str:
            new, c = self.redact_counts(text)
            counts.update(c)
            return new

        return _map_texts(body, frozenset(self.roles), one), counts


# --- model aliases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelTarget:
    """Where an alias sends a request: a backend pool, and the model name that pool's backends
    know (None keeps the client's name)."""

    pool: str
    model: str | None = None


def resolve_model(model: str, aliases: Mapping[str, ModelTarget | str]) -> ModelTarget | None:
    """The target of `model` in `aliases` (a bare string value is a pool name), or None when
    the name is no alias and is looked up among the backends' own models.

    >>> aliases = {"gpt-4o": ModelTarget("openai", "gpt-4o-2024-08-06"), "llama-3": "local"}
    >>> resolve_model("gpt-4o", aliases), resolve_model("llama-3", aliases)
    (ModelTarget(pool='openai', model='gpt-4o-2024-08-06'), ModelTarget(pool='local', model=None))
    >>> resolve_model("mistral", aliases) is None
    True
    """
    target = aliases.get(model)
    if target is None:
        return None
    return ModelTarget(target) if isinstance(target, str) else target


def rewrite_model(body: Mapping[str, Any], target: ModelTarget | None) -> dict[str, Any]:
    """A copy of `body` whose ``model`` is the target's backend model name.

    >>> rewrite_model({"model": "gpt-4o"}, ModelTarget("pool", "gpt-4o-2024-08-06"))
    {'model': 'gpt-4o-2024-08-06'}
    """
    out = dict(body)
    if target is not None and target.model is not None:
        out["model"] = target.model
    return out


# --- OpenAI ↔ Anthropic: shared pieces ----------------------------------------------------------

_FINISH_FROM_STOP = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_STOP_FROM_FINISH = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
DEFAULT_MAX_TOKENS = 4096
"""``max_tokens`` sent to Anthropic when an OpenAI client named none (Anthropic requires it)."""
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)", re.DOTALL)


def _finish_reason(stop_reason: str | None) -> str | None:
    return None if stop_reason is None else _FINISH_FROM_STOP.get(stop_reason, "stop")


def _stop_reason(finish_reason: str | None) -> str | None:
    return None if finish_reason is None else _STOP_FROM_FINISH.get(finish_reason, "end_turn")


def _json_args(arguments: Any, where: str) -> Any:
    if isinstance(arguments, Mapping):
        return dict(arguments)
    try:
        return json.loads(arguments or "{}")
    except (TypeError, ValueError):
        raise TranslationError(f"{where} is not valid JSON: {arguments!r:.80}", where) from None


def _dump_args(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def openai_usage(usage: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Anthropic ``usage`` as OpenAI's: input tokens, cache reads and cache writes are all
    prompt tokens; cache reads are also ``prompt_tokens_details.cached_tokens``."""
    if usage is None:
        return None
    read = int(usage.get("cache_read_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + read
    prompt += int(usage.get("cache_creation_input_tokens") or 0)
    completion = int(usage.get("output_tokens") or 0)
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if read:
        out["prompt_tokens_details"] = {"cached_tokens": read}
    return out


def anthropic_usage(usage: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI ``usage`` as Anthropic's (the inverse of :func:`openai_usage`).

    >>> anthropic_usage({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
    ...                  "prompt_tokens_details": {"cached_tokens": 4}})
    {'input_tokens': 6, 'cache_creation_input_tokens': 0, 'cache_read_input_tokens': 4, 'output_tokens': 5}
    """
    if usage is None:
        return None
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {
        "input_tokens": int(usage.get("prompt_tokens") or 0) - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": int(usage.get("completion_tokens") or 0),
    }


# --- OpenAI → Anthropic: requests ---------------------------------------------------------------


def _image_to_anthropic(part: Mapping[str, Any], where: str) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, Mapping) else image
    if not isinstance(url, str):
        raise TranslationError(f"{where}.image_url.url must be a string", where)
    m = _DATA_URL.fullmatch(url)
    if m:
        source = {"type": "base64", "media_type": m["type"], "data": m["data"]}
    else:
        source = {"type": "url", "url": url}
    return {"type": "image", "source": source}


def _parts_to_blocks(content: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise TranslationError(f"{where} must be a string or a list of parts", where)
    blocks = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            blocks.append(_image_to_anthropic(part, f"{where}[{j}]"))
        else:
            raise TranslationError(
                f"{where}[{j}] has type {kind!r}, which the Anthropic Messages API cannot carry "
                "(text and image_url can)",
                f"{where}[{j}]",
            )
    return blocks


def _as_blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _append_turn(messages: list[dict[str, Any]], role: str, content: Any) -> None:
    # Anthropic turns alternate, so consecutive same-role turns (several tool results, or a
    # tool result then the user's text) become one turn with their blocks in order
    if messages and messages[-1]["role"] == role:
        last = messages[-1]
        last["content"] = _as_blocks(last["content"]) + _as_blocks(content)
    else:
        messages.append({"role": role, "content": content})


def _tools_to_anthropic(tools: Any) -> list[dict[str, Any]]:
    out = []
    for k, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or tool.get("type") != "function":
            raise TranslationError(f"tools[{k}] is not a function tool", f"tools[{k}]")
        item: dict[str, Any] = {"name": fn.get("name")}
        if fn.get("description") is not None:
            item["description"] = fn["description"]
        item["input_schema"] = fn.get("parameters") or {"type": "object", "properties": {}}
        out.append(item)
    return out


def _tool_choice_to_anthropic(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None:
        out = None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        out = {"type": "none"}
    elif isinstance(choice, Mapping) and choice.get("type") == "function":
        out = {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    else:
        raise TranslationError(f"tool_choice {choice!r} has no Anthropic equivalent", "tool_choice")
    if parallel is False:
        out = {**(out or {"type": "auto"}), "disable_parallel_tool_use": True}
    return out


def openai_to_anthropic_request(
    body: Mapping[str, Any], *, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> dict[str, Any]:
    """An OpenAI Chat Completions request as an Anthropic Messages request.

    System and developer messages become ``system``; ``tool`` messages become ``tool_result``
    blocks of a user turn; assistant ``tool_calls`` become ``tool_use`` blocks; consecutive
    turns of one role merge (Anthropic turns alternate). ``stop`` → ``stop_sequences``,
    ``max_completion_tokens``/``max_tokens`` → ``max_tokens`` (`default_max_tokens` if
    neither), ``user`` → ``metadata.user_id``, and tools and ``tool_choice`` map to their
    equivalents. Sampling fields Anthropic lacks (penalties, ``seed``, ``logit_bias``,
    ``logprobs``, ``response_format``) are dropped; ``n > 1`` raises :class:`TranslationError`.

    >>> openai_to_anthropic_request({"model": "claude-sonnet", "max_tokens": 64, "stop": "END",
    ...     "messages": [{"role": "system", "content": "Be brief."},
    ...                  {"role": "user", "content": "Hi"}]})
    {'model': 'claude-sonnet', 'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 64, 'system': 'Be brief.', 'stop_sequences': ['END']}
    """
    if body.get("n") not in (None, 1):
        raise TranslationError(
            "n > 1 cannot be sent to an Anthropic backend (one answer per call)", "n"
        )
    systems: list[str] = []
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(body.get("messages") or []):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, Mapping) else None
        if role in ("system", "developer"):
            systems.append(_plain_text(m.get("content")))
        elif role == "user":
            _append_turn(messages, "user", _parts_to_blocks(m.get("content"), f"{where}.content"))
        elif role == "assistant":
            calls = m.get("tool_calls") or []
            content = m.get("content")
            if not calls:
                blocks: Any = _parts_to_blocks(content if content is not None else "", where)
            else:
                blocks = [
                    b
                    for b in _as_blocks(_parts_to_blocks(content or "", where))
                    if b.get("text") != ""
                ]
                for j, call in enumerate(calls):
                    fn = call.get("function") or {}
                    args = _json_args(
                        fn.get("arguments"), f"{where}.tool_calls[{j}].function.arguments"
                    )
                    blocks.append(
                        {
                            "type": "tool_use",
                            "id": call.get("id"),
                            "name": fn.get("name"),
                            "input": args,
                        }
                    )
            _append_turn(messages, "assistant", blocks)
        elif role == "tool":
            result = {
                "type": "tool_result",
                "tool_use_id": m.get("tool_call_id"),
                "content": _plain_text(m.get("content")),
            }
            _append_turn(messages, "user", [result])
        else:
            raise TranslationError(
                f"{where}.role {role!r} cannot be translated (system, developer, user, assistant "
                "and tool can)",
                f"{where}.role",
            )
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    out["max_tokens"] = int(max_tokens) if max_tokens else default_max_tokens
    if systems:
        out["system"] = "\n\n".join(systems)
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    for key in ("temperature", "top_p", "top_k", "stream"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("user"):
        out["metadata"] = {"user_id": body["user"]}
    if body.get("tools"):
        out["tools"] = _tools_to_anthropic(body["tools"])
    choice = _tool_choice_to_anthropic(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None:
        out["tool_choice"] = choice
    return out


# --- Anthropic → OpenAI: requests ---------------------------------------------------------------


def _block_to_part(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": block.get("text", "")}
    if kind == "image":
        source = block.get("source") or {}
        if source.get("type") == "base64":
            url = f"data:{source.get('media_type')};base64,{source.get('data')}"
        elif source.get("type") == "url":
            url = source.get("url")
        else:
            raise TranslationError(
                f"{where}.source type {source.get('type')!r} is not supported", where
            )
        return {"type": "image_url", "image_url": {"url": url}}
    raise TranslationError(
        f"{where} has type {kind!r}, which OpenAI Chat Completions cannot carry", where
    )


def _tool_result_text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, block in enumerate(content):
        if not (isinstance(block, Mapping) and block.get("type") == "text"):
            raise TranslationError(f"{where}[{j}]: OpenAI tool messages carry text only", where)
        texts.append(block.get("text", ""))
    return "".join(texts)


def _tools_to_openai(tools: Any) -> list[dict[str, Any]]:
    out = []
    for k, tool in enumerate(tools or []):
        if not isinstance(tool, Mapping):
            raise TranslationError(f"tools[{k}] must be an object", f"tools[{k}]")
        if tool.get("type") not in (None, "custom"):
            raise TranslationError(
                f"tools[{k}] is an Anthropic server tool ({tool.get('type')}); OpenAI backends "
                "cannot run it",
                f"tools[{k}]",
            )
        fn: dict[str, Any] = {"name": tool.get("name")}
        if tool.get("description") is not None:
            fn["description"] = tool["description"]
        fn["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice_to_openai(choice: Any) -> tuple[Any, bool]:
    if not isinstance(choice, Mapping):
        return None, False
    kind = choice.get("type")
    mapped: Any = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
    if kind == "tool":
        mapped = {"type": "function", "function": {"name": choice.get("name")}}
    return mapped, bool(choice.get("disable_parallel_tool_use"))


def anthropic_to_openai_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages request as an OpenAI Chat Completions request (the inverse of
    :func:`openai_to_anthropic_request`).

    ``system`` becomes the first message; ``tool_result`` blocks become ``tool`` messages before
    the rest of their user turn; ``tool_use`` blocks become ``tool_calls``; thinking blocks are
    dropped. A streamed request asks for usage (``stream_options.include_usage``), which the
    final ``message_delta`` event needs.

    >>> anthropic_to_openai_request({"model": "m", "max_tokens": 64, "system": "Be brief.",
    ...     "messages": [{"role": "user", "content": "Hi"}]})
    {'model': 'm', 'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}], 'max_tokens': 64}
    """
    messages: list[dict[str, Any]] = []
    if body.get("system"):
        messages.append({"role": "system", "content": _plain_text(body["system"])})
    for i, m in enumerate(body.get("messages") or []):
        where = f"messages[{i}].content"
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            raise TranslationError(f"messages[{i}].role must be user or assistant, got {role!r}")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise TranslationError(f"{where} must be a string or a list of blocks", where)
        if role == "user":
            parts, had_results = [], False
            for j, block in enumerate(content):
                if block.get("type") == "tool_result":
                    had_results = True
                    text = _tool_result_text(block.get("content"), f"{where}[{j}].content")
                    messages.append(
                        {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}
                    )
                else:
                    parts.append(_block_to_part(block, f"{where}[{j}]"))
            if parts:
                # text that followed tool results was a plain string before the merge
                single = had_results and len(parts) == 1 and parts[0]["type"] == "text"
                messages.append({"role": "user", "content": parts[0]["text"] if single else parts})
        else:
            texts, calls = [], []
            for block in content:
                if block.get("type") == "text":
                    texts.append(block.get("text", ""))
                elif block.get("type") == "tool_use":
                    calls.append(
                        {
                            "id": block.get("id"),
                            "type": "function",
                            "function": {
                                "name": block.get("name"),
                                "arguments": _dump_args(block.get("input", {})),
                            },
                        }
                    )
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
            if calls:
                msg["tool_calls"] = calls
            elif msg["content"] is None:
                msg["content"] = ""
            messages.append(msg)
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if body.get("max_tokens") is not None:
        out["max_tokens"] = body["max_tokens"]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    for key in ("temperature", "top_p", "top_k", "stream"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stream"):
        out["stream_options"] = {"include_usage": True}
    user = (body.get("metadata") or {}).get("user_id")
    if user:
        out["user"] = user
    if body.get("tools"):
        out["tools"] = _tools_to_openai(body["tools"])
    choice, no_parallel = _tool_choice_to_openai(body.get("tool_choice"))
    if choice is not None:
        out["tool_choice"] = choice
    if no_parallel:
        out["parallel_tool_calls"] = False
    return out


# --- responses ----------------------------------------------------------------------------------


def anthropic_to_openai_response(
    message: Mapping[str, Any], *, created: int | None = None
) -> dict[str, Any]:
    """An Anthropic message (a non-streamed answer) as an OpenAI ``chat.completion``.

    >>> anthropic_to_openai_response({"id": "msg_1", "type": "message", "role": "assistant",
    ...     "model": "m", "content": [{"type": "text", "text": "Hello"}], "stop_reason": "end_turn",
    ...     "usage": {"input_tokens": 3, "output_tokens": 1}}, created=0)["choices"][0]
    {'index': 0, 'message': {'role': 'assistant', 'content': 'Hello'}, 'logprobs': None, 'finish_reason': 'stop'}
    """
    blocks = message.get("content") or []
    text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
    calls = [
        {
            "id": b.get("id"),
            "type": "function",
            "function": {"name": b.get("name"), "arguments": _dump_args(b.get("input", {}))},
        }
        for b in blocks
        if b.get("type") == "tool_use"
    ]
    msg: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        msg["tool_calls"] = calls
    out: dict[str, Any] = {
        "id": message.get("id"),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": message.get("model"),
        "choices": [
            {
                "index": 0,
                "message": msg,
                "logprobs": None,
                "finish_reason": _finish_reason(message.get("stop_reason")),
            }
        ],
    }
    usage = openai_usage(message.get("usage"))
    if usage is not None:
        out["usage"] = usage
    return out


def openai_to_anthropic_response(completion: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` as an Anthropic message (its first choice).

    >>> openai_to_anthropic_response({"id": "c1", "model": "m", "choices": [{"index": 0,
    ...     "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "length"}]})
    {'id': 'c1', 'type': 'message', 'role': 'assistant', 'model': 'm', 'content': [{'type': 'text', 'text': 'Hi'}], 'stop_reason': 'max_tokens', 'stop_sequence': None, 'usage': {'input_tokens': 0, 'cache_creation_input_tokens': 0, 'cache_read_input_tokens': 0, 'output_tokens': 0}}
    """
    choices = completion.get("choices") or [{}]
    choice = choices[0]
    msg = choice.get("message") or {}
    blocks: list[dict[str, Any]] = []
    text = _plain_text(msg.get("content"))
    if text:
        blocks.append({"type": "text", "text": text})
    for j, call in enumerate(msg.get("tool_calls") or []):
        fn = call.get("function") or {}
        where = f"choices[0].message.tool_calls[{j}].function.arguments"
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": fn.get("name"),
                "input": _json_args(fn.get("arguments"), where),
            }
        )
    return {
        "id": completion.get("id"),
        "type": "message",
        "role": "assistant",
        "model": completion.get("model"),
        "content": blocks,
        "stop_reason": _stop_reason(choice.get("finish_reason")),
        "stop_sequence": None,
        "usage": anthropic_usage(completion.get("usage") or {}),
    }


def anthropic_error_to_openai(body: Mapping[str, Any], status: int) -> dict[str, Any]:
    """An Anthropic error body as OpenAI's, keeping the message.

    >>> anthropic_error_to_openai({"type": "error", "error": {"type": "rate_limit_error",
    ...     "message": "slow down"}}, 429)
    {'error': {'message': 'slow down', 'type': 'requests', 'param': None, 'code': 'rate_limit_error'}}
    """
    err = body.get("error") or {}
    kind = err.get("type") if isinstance(err, Mapping) else None
    message = err.get("message") if isinstance(err, Mapping) else None
    return PolicyError(status, str(message or err or body), code=kind).openai_body()


def openai_error_to_anthropic(body: Mapping[str, Any], status: int) -> dict[str, Any]:
    """An OpenAI error body as Anthropic's, typed by the HTTP status."""
    err = body.get("error") or {}
    message = err.get("message") if isinstance(err, Mapping) else err
    return PolicyError(status, str(message or body)).anthropic_body()


# --- streams ------------------------------------------------------------------------------------


def openai_sse(chunk: Mapping[str, Any] | str) -> bytes:
    """One OpenAI SSE event (``data: {...}``); pass ``"[DONE]"`` for the end marker.

    >>> openai_sse("[DONE]")
    b'data: [DONE]\\n\\n'
    """
    data = chunk if isinstance(chunk, str) else json.dumps(chunk, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def anthropic_sse(event: Mapping[str, Any]) -> bytes:
    """One Anthropic SSE event, named by its type.

    >>> anthropic_sse({"type": "message_stop"})
    b'event: message_stop\\ndata: {"type": "message_stop"}\\n\\n'
    """
    data = json.dumps(event, ensure_ascii=False)
    return f"event: {event.get('type')}\ndata: {data}\n\n".encode()


_LINE_END = re.compile(r"\r\n|\r|\n")


class SseDecoder:
    """Incremental Server-Sent Events parser: feed it bytes as they arrive, get the complete
    events as ``(event name or None, data)``; comments and ``id``/``retry`` fields are skipped.

    >>> d = SseDecoder()
    >>> d.feed(b"event: ping\\ndata: {}\\n\\ndata: [DO"), d.feed(b"NE]\\r\\n\\r\\n")
    ([('ping', '{}')], [(None, '[DONE]')])

    An event cut off without its closing blank line is never returned, as the SSE spec says.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, chunk: bytes | str) -> list[tuple[str | None, str]]:
        text = chunk if isinstance(chunk, str) else self._decoder.decode(chunk)
        buffer = self._buffer + text
        # a trailing CR may be the first half of a CRLF split between two chunks: read as a
        # line end now, it would turn the LF that follows into a blank line ending the event
        held = "\r" if buffer.endswith("\r") else ""
        *lines, rest = _LINE_END.split(buffer[: len(buffer) - len(held)])
        self._buffer = rest + held
        events = []
        for line in lines:
            if not line:
                if self._data:
                    events.append((self._event, "\n".join(self._data)))
                self._event, self._data = None, []
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    self._event = value
                elif name == "data":
                    self._data.append(value)
        return events


class OpenAIToAnthropicStream:
    """Turns the chunks of an OpenAI stream into Anthropic stream events, one chunk at a time.

    :meth:`feed` takes each parsed ``chat.completion.chunk`` and returns the events it causes
    (``message_start`` first; a ``content_block_start`` … ``_delta`` … ``_stop`` run per text or
    tool call); :meth:`close`, called at ``[DONE]`` or when the upstream ends, returns
    ``message_delta`` (stop reason and usage) and ``message_stop``, or an ``error`` event if the
    upstream never gave a finish reason (a cut stream must not look complete). Ask the OpenAI
    backend for ``stream_options.include_usage`` so that the usage is known at the end.

    >>> s = OpenAIToAnthropicStream()
    >>> [e["type"] for e in s.feed({"id": "c1", "model": "m",
    ...     "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]})]
    ['message_start', 'content_block_start', 'content_block_delta', 'content_block_stop']
    >>> [e["type"] for e in s.close()]
    ['message_delta', 'message_stop']
    """

    def __init__(self, *, model: str | None = None, message_id: str | None = None) -> None:
        self.model, self.message_id = model, message_id
        self.started = self.closed = False
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self._block: tuple[str, int] | None = None  # ("text", -1) or ("tool", openai index)
        self._index = -1  # Anthropic content block index of the open or last block

    def _start(self, chunk: Mapping[str, Any]) -> list[dict[str, Any]]:
        self.started = True
        self.message_id = self.message_id or chunk.get("id") or f"msg_{uuid.uuid4().hex[:24]}"
        self.model = self.model or chunk.get("model")
        message = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # OpenAI streams report usage only at the end; message_delta carries it
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [{"type": "message_start", "message": message}]

    def _close_block(self) -> list[dict[str, Any]]:
        if self._block is None:
            return []
        self._block = None
        return [{"type": "content_block_stop", "index": self._index}]

    def _open(self, key: tuple[str, int], block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close_block()
        self._index += 1
        self._block = key
        return [
            *events,
            {"type": "content_block_start", "index": self._index, "content_block": block},
        ]

    def feed(self, chunk: Mapping[str, Any]) -> list[dict[str, Any]]:
        if self.closed:
            return []
        if "error" in chunk:
            self.closed = True
            err = openai_error_to_anthropic(chunk, 500)
            return [{"type": "error", "error": err["error"]}]
        events = [] if self.started else self._start(chunk)
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                if self._block != ("text", -1):
                    events += self._open(("text", -1), {"type": "text", "text": ""})
                delta_event = {"type": "text_delta", "text": text}
                events.append(
                    {"type": "content_block_delta", "index": self._index, "delta": delta_event}
                )
            for call in delta.get("tool_calls") or []:
                key = ("tool", int(call.get("index", 0)))
                fn = call.get("function") or {}
                if self._block != key:
                    block = {
                        "type": "tool_use",
                        "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                        "name": fn.get("name") or "",
                        "input": {},
                    }
                    events += self._open(key, block)
                if fn.get("arguments"):
                    delta_event = {"type": "input_json_delta", "partial_json": fn["arguments"]}
                    events.append(
                        {"type": "content_block_delta", "index": self._index, "delta": delta_event}
                    )
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
                events += self._close_block()
        if chunk.get("usage"):
            self.usage = dict(chunk["usage"])
        return events

    def close(self) -> list[dict[str, Any]]:
        if self.closed:
            return []
        self.closed = True
        events = [] if self.started else self._start({})
        events += self._close_block()
        if self.finish_reason is None:
            message = "the upstream stream ended before the model finished its answer"
            return [*events, {"type": "error", "error": {"type": "api_error", "message": message}}]
        delta = {"stop_reason": _stop_reason(self.finish_reason), "stop_sequence": None}
        usage = anthropic_usage(self.usage or {})
        events.append({"type": "message_delta", "delta": delta, "usage": usage})
        events.append({"type": "message_stop"})
        return events


class AnthropicToOpenAIStream:
    """Turns Anthropic stream events into OpenAI ``chat.completion.chunk`` objects, one event at
    a time (the inverse of :class:`OpenAIToAnthropicStream`).

    ``message_start`` gives the role chunk; text and ``input_json_delta`` deltas give content and
    ``tool_calls`` chunks (tool calls numbered in order); ``message_delta`` gives the finish
    reason; ``message_stop`` gives the usage chunk (``choices: []``) when `include_usage`. The
    caller sends ``data: [DONE]`` after :attr:`finished`. :meth:`close` returns an error chunk
    if the upstream stopped before ``message_stop``.

    >>> s = AnthropicToOpenAIStream(created=0)
    >>> s.feed({"type": "message_start", "message": {"id": "msg_1", "model": "m",
    ...                                               "usage": {"input_tokens": 3}}})[0]["choices"]
    [{'index': 0, 'delta': {'role': 'assistant', 'content': ''}, 'logprobs': None, 'finish_reason': None}]
    >>> s.feed({"type": "content_block_delta", "index": 0,
    ...         "delta": {"type": "text_delta", "text": "Hi"}})[0]["choices"][0]["delta"]
    {'content': 'Hi'}
    """

    def __init__(
        self, *, include_usage: bool = True, created: int | None = None, model: str | None = None
    ) -> None:
        self.include_usage = include_usage
        self.created = int(time.time()) if created is None else created
        self.model = model
        self.id: str | None = None
        self.finished = False
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    def feed(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        if self.finished:
            return []
        if kind == "message_start":
            message = event.get("message") or {}
            self.id = message.get("id") or f"chatcmpl-{uuid.uuid4().hex[:24]}"
            self.model = self.model or message.get("model")
            self.usage.update(message.get("usage") or {})
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                k = self._tools[int(event.get("index", 0))] = len(self._tools)
                call = {
                    "index": k,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                return [self._chunk({"tool_calls": [call]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta":
                return [self._chunk({"content": delta.get("text", "")})]
            if delta.get("type") == "input_json_delta":
                k = self._tools.get(int(event.get("index", 0)), 0)
                call = {"index": k, "function": {"arguments": delta.get("partial_json", "")}}
                return [self._chunk({"tool_calls": [call]})]
            return []  # thinking and signature deltas have no OpenAI form
        if kind == "message_delta":
            self.usage.update(
                {k: v for k, v in (event.get("usage") or {}).items() if v is not None}
            )
            self.finish_reason = _finish_reason((event.get("delta") or {}).get("stop_reason"))
            return [self._chunk({}, self.finish_reason or "stop")]
        if kind == "message_stop":
            self.finished = True
            if not self.include_usage:
                return []
            return [{**self._chunk({}), "choices": [], "usage": openai_usage(self.usage)}]
        if kind == "error":
            self.finished = True
            return [anthropic_error_to_openai(event, 500)]
        return []  # ping, and event types added later

    def close(self) -> list[dict[str, Any]]:
        if self.finished:
            return []
        self.finished = True
        message = "the upstream stream ended before the model finished its answer"
        return [
            PolicyError(502, message, type="server_error", code="upstream_truncated").openai_body()
        ]


# --- the request pipeline -----------------------------------------------------------------------


@dataclass(frozen=True)
class TransformResult:
    """What :meth:`Transformer.apply` did: the new body, and the redactions made per kind."""

    body: dict[str, Any]
    redactions: dict[str, int] = field(default_factory=dict)


def _compiled_messages(
    name: str, messages: Iterable[Mapping[str, str]]
) -> tuple[tuple[str, jinja2.Template], ...]:
    return tuple(
        (m["role"], compile_template(m["content"], name=f"{name}.messages[{i}]"))
        for i, m in enumerate(messages)
    )


class Transformer:
    """The request-side transformations of brief §2.5, in the gateway's order, for an
    OpenAI-shaped body:

    1. ``variables`` and ``template`` (request extensions, removed before forwarding) are read;
       a named `templates` entry renders its messages in front of the request's;
    2. with `render_messages`, the texts of the request's own user and system messages are
       rendered as templates (clients write ``{{ customer }}``; the sandbox keeps them in);
    3. the `guard` checks the texts (before redaction, so deny rules see what the user wrote);
    4. the `redactor` replaces PII;
    5. the operator's `system_prompt` is injected by `system_mode` (trusted text: it is neither
       guarded nor redacted).

    Template failures are :class:`PolicyError` 400s naming the template.

    >>> t = Transformer(templates={"ask": [{"role": "user", "content": "Tell {{ who }} hi"}]})
    >>> t.apply({"model": "m", "template": "ask", "variables": {"who": "Bo"}}).body
    {'model': 'm', 'messages': [{'role': 'user', 'content': 'Tell Bo hi'}]}
    """

    def __init__(
        self,
        *,
        templates: Mapping[str, Sequence[Mapping[str, str]]] | None = None,
        system_prompt: str | None = None,
        system_mode: SystemPromptMode = "prepend",
        render_messages: bool = False,
        guard: Guard | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self.templates = {k: _compiled_messages(k, v) for k, v in (templates or {}).items()}
        self.system_prompt = (
            None if system_prompt is None else compile_template(system_prompt, name="system_prompt")
        )
        self.system_mode: SystemPromptMode = system_mode
        self.render_messages = render_messages
        self.guard, self.redactor = guard, redactor

    @classmethod
    def from_config(cls, config: TransformsConfig) -> Transformer:
        """Build from the ``transforms`` section of ``gateway.yaml`` (:mod:`.config`)."""
        sp = config.system_prompt
        guard = config.guard
        red = config.redaction
        return cls(
            templates={
                k: [m.model_dump() for m in v.messages] for k, v in config.templates.items()
            },
            system_prompt=None if sp is None else sp.text,
            system_mode="prepend" if sp is None else sp.mode,
            render_messages=config.render_message_templates,
            guard=None
            if guard is None or not (guard.deny or guard.allow)
            else Guard(guard.deny, guard.allow, guard.roles, guard.ignore_case),
            redactor=Redactor(red.kinds, red.extra, red.roles) if red.enabled else None,
        )

    def apply(
        self,
        body: Mapping[str, Any],
        *,
        tenant: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> TransformResult:
        # a shallow copy: every step builds new containers for what it changes, so the input
        # stays as it was without a deep copy per request (100+ us for a long dialogue)
        out = dict(body)
        user_vars = out.pop("variables", None)
        name = out.pop("template", None)
        if user_vars is not None and not isinstance(user_vars, Mapping):
            raise PolicyError(400, "variables must be a JSON object", param="variables")
        values = template_variables(out, tenant=tenant, metadata=metadata, variables=user_vars)
        try:
            if name is not None:
                if name not in self.templates:
                    known = ", ".join(sorted(self.templates)) or "none are configured"
                    raise PolicyError(
                        400,
                        f"unknown prompt template {name!r} (known: {known})",
                        param="template",
                        code="template_not_found",
                    )
                rendered = [
                    {"role": role, "content": render_template(t, values, name=name)}
                    for role, t in self.templates[name]
                ]
                out["messages"] = rendered + list(out.get("messages") or [])
            if self.render_messages:
                # not the assistant's or tools' texts: earlier answers may quote template
                # syntax (code, docs) that nobody meant to render
                out = _map_texts(
                    out,
                    frozenset({"user", "system"}),
                    lambda text, where: render_template(text, values, name=where),
                )
        except TemplateError as e:
            raise PolicyError(400, str(e), param="messages", code="invalid_template") from None
        if self.guard is not None:
            self.guard.check(out)
        counts: Counter[str] = Counter()
        if self.redactor is not None:
            out, counts = self.redactor.redact_body(out)
        if self.system_prompt is not None:
            try:
                out = inject_system_prompt(out, self.system_prompt, self.system_mode, values)
            except TemplateError as e:
                raise PolicyError(400, str(e), param="system", code="invalid_template") from None
        return TransformResult(out, dict(counts))
