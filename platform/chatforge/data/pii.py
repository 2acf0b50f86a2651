"""PII scrubbing: find personal data and secrets in chat turns and replace them with typed placeholders.

Types (``PII_TYPES``) and their placeholders: email ``[EMAIL_1]``, phone ``[PHONE_1]``, card ``[CARD_1]``,
iban ``[IBAN_1]``, ip ``[IP_1]``, secret ``[SECRET_1]``, url_credentials ``[CREDENTIALS_1]`` (only the
``user:pass`` part, so ``https://[CREDENTIALS_1]@host/`` keeps scheme and host), national_id ``[NATIONAL_ID_1]``.

With ``PiiSpec.consistent`` the number identifies the value within one conversation: the same email is
``[EMAIL_1]`` in every turn, a second email is ``[EMAIL_2]``. Without it every occurrence is an unnumbered
``[EMAIL]``, so nothing links two turns.

Detectors are tuned for precision on ordinary numbers (dates, versions, prices, ids): structured values are
validated (Luhn for cards, mod-97 for IBANs, ``ipaddress`` for IPs, SSN ranges) and phone numbers must look like
phone numbers (a ``+`` country code, ``(555) 123-4567`` / ``555-123-4567`` shapes, or a 0-prefixed national
number with separators). Where matches overlap, the type earlier in ``_PRIORITY`` wins.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
import json
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

import pyarrow as pa

from chatforge.config import PII_TYPES, PiiSpec
from chatforge.data.schema import ORIGINAL_MESSAGES, Record, RecordBatchFn, RecordStep, is_kept

PII_COUNTS_TYPE = pa.struct([(pii_type, pa.int64()) for pii_type in PII_TYPES])

LABELS = {
    "email": "EMAIL",
    "phone": "PHONE",
    "card": "CARD",
    "iban": "IBAN",
    "ip": "IP",
    "secret": "SECRET",
    "url_credentials": "CREDENTIALS",
    "national_id": "NATIONAL_ID",
}

# Credentials and secrets contain '@', digits and dots that would otherwise read as emails, phones or IPs;
# cards and IBANs come before phones so that a long digit run is reported once, as the more specific type.
_PRIORITY = ("url_credentials", "secret", "email", "iban", "card", "national_id", "ip", "phone")

# A detector yields (start, end, key): the span to replace and the normalized value that identifies it.
Span = tuple[int, int, str]


# Patterns begin with a literal or a character class, never a lookbehind, so that `re` skips in C to the few
# positions where a match can start; a match glued to the word or number before it is refused here instead.
def _clear_before(text: str, start: int, forbidden: str = "") -> bool:
    """True when the character before ``start`` is not a word character or one of ``forbidden``."""
    if start == 0:
        return True
    previous = text[start - 1]
    return not (previous.isalnum() or previous == "_" or previous in forbidden)


# ---------------------------------------------------------------- email and URL credentials

# Anchored on "@": the domain is matched first, then the local part is read backwards from it. Not followed
# by ":path" or "/path": in git@github.com:org/repo the part before "@" is a login, not a mailbox.
_EMAIL_DOMAIN = re.compile(r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b(?![:/][\w~])")
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}\Z")

# user:pass between "scheme://" and "@host"; a URL with only a user name (ssh://git@host) is not a credential.
_URL_CREDENTIALS = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://([^\s/:?#@]+(?:@[^\s/:?#@]+)?:[^\s/?#]+)@(?=[\w\[])")


def find_emails(text: str) -> Iterator[Span]:
    if "@" in text:
        for domain in _EMAIL_DOMAIN.finditer(text):
            at = domain.start()
            local = _EMAIL_LOCAL.search(text, max(0, at - 64), at)
            # not after "/": in ssh://git@host the part before "@" is a login
            if local and _clear_before(text, local.start(), ".%+/-"):
                yield local.start(), domain.end(), text[local.start() : domain.end()].lower()


def find_url_credentials(text: str) -> Iterator[Span]:
    if "://" in text and "@" in text:
        for m in _URL_CREDENTIALS.finditer(text):
            yield m.start(1), m.end(1), m.group(1)


# ---------------------------------------------------------------- numbers: phones, cards, IBANs, national ids

_HAS_DIGIT = re.compile(r"\d")
_NON_DIGITS = re.compile(r"\D")

_PHONE_END = r"(?![\w@]|[.,:-]\d)"
_PHONE_INTERNATIONAL = re.compile(  # +CC, an optional (area), digit groups: +44 20 7946 0958, +1 (555) 123-4567
    r"\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,4})?(?:[ .-]?\d{2,8}){1,5}" + _PHONE_END
)
# North American: (555) 123-4567, 555-123-4567, 555.123.4567 (a leading "1-" is taken in by `find_phones`);
# not "555 123 4567", which cannot be told from a list of numbers ("sizes 256 512 1024")
_PHONE_NANP = (
    re.compile(r"\([2-9]\d{2}\) ?\d{3}[ .-]\d{4}" + _PHONE_END),
    re.compile(r"[2-9]\d\d([.-])\d{3}\1\d{4}" + _PHONE_END),
)
# national with trunk 0 and at least one separator: 020 7946 0958, (030) 12345678, 07700 900123
_PHONE_NATIONAL = re.compile(r"(?:\(0\d{1,4}\)|0\d{1,4})(?:[ -]\d{2,8}){1,3}" + _PHONE_END)

_CARD = re.compile(
    r"[2-6](?:\d{12,18}"  # contiguous
    r"|\d{3}([ -])\d{4}\1\d{4}\1\d{1,4}(?:\1\d{3})?"  # groups of four: 13-19 digits
    r"|\d{3}([ -])\d{6}\2\d{4,5}"  # Amex 4-6-5, Diners 4-6-4
    r")(?![\w]|[.,-]\d)"
)

_IBAN = re.compile(r"[A-Z][A-Z]\d\d(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")

_SSN = re.compile(r"\d\d\d-\d\d-\d{4}(?![\w]|[.-]\d)")
# UK National Insurance number: two prefix letters (not D F I Q U V, no O second), six digits, suffix A-D.
_UK_NINO = re.compile(r"[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d\d ?\d\d ?\d\d ?[A-D]\b")
_NINO_UNUSED_PREFIXES = frozenset({"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"})

_LUHN_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number carries (``digits`` is digits only)."""
    odd = digits[-1::-2]
    even = digits[-2::-2]
    return (sum(map(int, odd)) + sum(_LUHN_DOUBLED[int(d)] for d in even)) % 10 == 0


def iban_valid(iban: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to 10..35, the number mod 97 is 1."""
    iban = iban.replace(" ", "").upper()
    if not 15 <= len(iban) <= 34 or not iban[:2].isalpha() or not iban[2:4].isdigit() or not iban.isalnum():
        return False
    return int("".join(str(int(c, 36)) for c in iban[4:] + iban[:4])) % 97 == 1


def ssn_valid(ssn: str) -> bool:
    """Area 000, 666 and 900-999, group 00 and serial 0000 are never issued (``ssn`` is ddd-dd-dddd)."""
    area, group, serial = ssn.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def find_phones(text: str) -> Iterator[Span]:
    if not _HAS_DIGIT.search(text):
        return
    for m in _PHONE_INTERNATIONAL.finditer(text):
        digits = _NON_DIGITS.sub("", m.group())
        if 8 <= len(digits) <= 15 and _clear_before(text, m.start(), "+#/.-"):  # E.164: at most 15
            yield m.start(), m.end(), "+" + digits
    for pattern in _PHONE_NANP:
        for m in pattern.finditer(text):
            start = m.start()
            if start >= 2 and text[start - 2] == "1" and text[start - 1] in " .-":  # 1-800-555-0199
                start -= 2
            if _clear_before(text, start, "+#/.-"):
                yield start, m.end(), _NON_DIGITS.sub("", m.group())
    for m in _PHONE_NATIONAL.finditer(text):
        digits = _NON_DIGITS.sub("", m.group())
        if 10 <= len(digits) <= 11 and _clear_before(text, m.start(), "+#/.-"):
            yield m.start(), m.end(), digits


def find_cards(text: str) -> Iterator[Span]:
    if _HAS_DIGIT.search(text):
        for m in _CARD.finditer(text):
            digits = _NON_DIGITS.sub("", m.group())
            if 13 <= len(digits) <= 19 and luhn_valid(digits) and _clear_before(text, m.start(), ".,+-"):
                yield m.start(), m.end(), digits


def find_ibans(text: str) -> Iterator[Span]:
    if _HAS_DIGIT.search(text):
        for m in _IBAN.finditer(text):
            if _clear_before(text, m.start()) and iban_valid(m.group()):
                yield m.start(), m.end(), m.group().replace(" ", "")


def find_national_ids(text: str) -> Iterator[Span]:
    if not _HAS_DIGIT.search(text):
        return
    if "-" in text:
        for m in _SSN.finditer(text):
            if _clear_before(text, m.start(), ".-") and ssn_valid(m.group()):
                yield m.start(), m.end(), m.group().replace("-", "")
    for m in _UK_NINO.finditer(text):
        if _clear_before(text, m.start()) and m.group()[:2] not in _NINO_UNUSED_PREFIXES:
            yield m.start(), m.end(), m.group().replace(" ", "")


# ---------------------------------------------------------------- IP addresses

_IPV4 = re.compile(r"\d\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")


def _ipv6_plausible(groups: list[str]) -> bool:
    # "::2" or "1::2" are valid addresses but far more often Python slices; a real address has more to it.
    filled = [g for g in groups if g]
    return len(filled) >= 3 or any(len(g) == 4 or "." in g for g in filled)


def _identifies_a_host(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # 127.0.0.1 and 0.0.0.0 are in every tutorial and say nothing about anyone
    return not (address.is_loopback or address.is_unspecified)


def find_ips(text: str) -> Iterator[Span]:
    if "." in text and _HAS_DIGIT.search(text):
        for m in _IPV4.finditer(text):
            if not _clear_before(text, m.start(), "."):
                continue
            try:
                # ipaddress rejects octets over 255 and leading zeros (so "01.02.2024.1" is not an address)
                address = ipaddress.IPv4Address(m.group())
            except ValueError:
                continue
            if _identifies_a_host(address):
                yield m.start(), m.end(), str(address)
    if "::" in text or text.count(":") >= 7:
        for m in _IPV6.finditer(text):
            try:
                address = ipaddress.IPv6Address(m.group())
            except ValueError:
                continue
            if _identifies_a_host(address) and _ipv6_plausible(m.group().split(":")):
                yield m.start(), m.end(), address.compressed


# ---------------------------------------------------------------- secrets and API keys

_PEM_BEGIN = r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
_PEM_PRIVATE_KEY = re.compile(_PEM_BEGIN + r".*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----", re.DOTALL)
_PEM_TRUNCATED = re.compile(_PEM_BEGIN + r"[A-Za-z0-9+/=\s]*")  # a key cut off before its END line is still a key
_SECRET_TOKEN = re.compile(
    r"\b(?:"
    r"(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255}"  # GitHub
    r"|sk-(?:proj-|svcacct-|admin-|ant-)?[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic style
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT
    r")(?![\w-])"
)
# every token above contains one of these (GitHub and Stripe tokens an "_"): most turns contain none, and a
# substring test is far cheaper than running the pattern
_SECRET_TOKEN_MARKERS = ("_", "sk-", "xox", "eyJ", "AKIA", "ASIA", "ABIA", "ACCA", "AIza")
_SECRET_KEYWORD_MARKERS = ("key", "token", "secret", "pass", "pwd")
# key = value / "key": "value"; only the value is replaced, so the text still says what was there.
_SECRET_ASSIGNMENT = re.compile(
    r"(?i:(?<![A-Za-z0-9])(?:api[_-]?key|secret[_-]?key|access[_-]?key|client[_-]?secret|auth[_-]?token"
    r"|access[_-]?token|token|secret|password|passwd|pwd)(?![A-Za-z0-9]))"
    r"[\"']?\s*(?P<sep>=|:)(?P<space>\s*)(?P<quote>[\"']?)(?P<value>[^\s\"'`,;]*[^\s\"'`,;.)\]}])"
)
# values that only name a secret: env lookups, templates, masks, paths, and our own placeholders
_NOT_A_SECRET_VALUE = re.compile(r"(?:\$|<|\{|\[|%|/|~|\*+$|x+$|\.\.\.|os\.|process\.env|getenv|env\[)", re.I)
# unquoted code on the right-hand side: a call or an attribute (token = tokenizer.encode(text), secret=self.secret)
_CODE_VALUE = re.compile(r"[\w.]*\(|[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+$")


def _assigned_secret(m: re.Match) -> bool:
    value, quoted = m["value"], bool(m["quote"])
    if len(value) < 6 or _NOT_A_SECRET_VALUE.match(value) or (not quoted and _CODE_VALUE.match(value)):
        return False
    # a literal (quoted, or key=value with nothing between) is a secret whatever it looks like; after
    # "password: " in prose a plain word is just a word, a real value has a digit, a symbol or mixed case
    literal = quoted or (m["sep"] == "=" and not m["space"])
    return literal or not (value.isalpha() and (value.islower() or value.istitle()))


def _contains_any(text: str, markers: tuple[str, ...]) -> bool:
    return any(marker in text for marker in markers)


def find_secrets(text: str) -> Iterator[Span]:
    if "-----BEGIN" in text:
        # the lazy search for END would rescan the text from every BEGIN if there were no END at all
        pem = _PEM_PRIVATE_KEY if "-----END" in text else _PEM_TRUNCATED
        for m in pem.finditer(text):
            yield m.start(), m.end(), m.group()
        if pem is _PEM_PRIVATE_KEY:
            for m in _PEM_TRUNCATED.finditer(text):
                yield m.start(), m.end(), m.group()
    if _contains_any(text, _SECRET_TOKEN_MARKERS):
        for m in _SECRET_TOKEN.finditer(text):
            yield m.start(), m.end(), m.group()
    if ("=" in text or ":" in text) and _contains_any(text.lower(), _SECRET_KEYWORD_MARKERS):
        for m in _SECRET_ASSIGNMENT.finditer(text):
            if _assigned_secret(m):
                yield m.start("value"), m.end("value"), m["value"]


DETECTORS: dict[str, Callable[[str], Iterator[Span]]] = {
    "email": find_emails,
    "phone": find_phones,
    "card": find_cards,
    "iban": find_ibans,
    "ip": find_ips,
    "secret": find_secrets,
    "url_credentials": find_url_credentials,
    "national_id": find_national_ids,
}


# ---------------------------------------------------------------- scrubbing


def find_pii(text: str, types: Collection[str] = PII_TYPES) -> list[tuple[int, int, str, str]]:
    """Non-overlapping (start, end, type, key) matches in text order; on overlap the higher-priority type wins."""
    taken: list[tuple[int, int, str, str]] = []
    starts: list[int] = []  # kept sorted, so checking a span is two neighbour lookups, not a scan of all
    for pii_type in _PRIORITY:
        if pii_type not in types:
            continue
        for start, end, key in DETECTORS[pii_type](text):
            i = bisect.bisect_right(starts, start)
            if (i == 0 or taken[i - 1][1] <= start) and (i == len(starts) or end <= starts[i]):
                starts.insert(i, start)
                taken.insert(i, (start, end, pii_type, key))
    return taken


def _placeholder(pii_type: str, key: str, placeholders: dict[str, str] | None) -> str:
    label = LABELS[pii_type]
    if placeholders is None:
        return f"[{label}]"
    typed_key = f"{pii_type}:{key}"  # so a digit string that is a phone here and a card there cannot collide
    found = placeholders.get(typed_key)
    if found is None:
        prefix = f"[{label}_"
        number = 1 + sum(1 for p in placeholders.values() if p.startswith(prefix))
        found = placeholders[typed_key] = f"{prefix}{number}]"
    return found


def scrub_text(
    text: str, types: Collection[str] = PII_TYPES, placeholders: dict[str, str] | None = None
) -> tuple[str, dict[str, int]]:
    """Replace every PII value of ``types`` in ``text``; return the new text and replacements per type.

    ``placeholders`` maps ``"<type>:<normalized value>"`` (lower-cased email, digits of a phone or card, ...)
    to its numbered placeholder; pass the same dict for every turn of a conversation so a value keeps its
    number. ``None`` gives unnumbered placeholders (``[EMAIL]``). Counts include every type in ``PII_TYPES``.
    """
    counts = dict.fromkeys(PII_TYPES, 0)
    if not text:
        return text, counts
    matches = find_pii(text, types)
    if not matches:
        return text, counts
    pieces = []
    position = 0
    for start, end, pii_type, key in matches:
        pieces.append(text[position:start])
        pieces.append(_placeholder(pii_type, key, placeholders))
        counts[pii_type] += 1
        position = end
    pieces.append(text[position:])
    return "".join(pieces), counts


def scrub_records(records: list[Record], spec: PiiSpec) -> list[Record]:
    """Scrub every turn of each kept record and set ``pii_counts``; dropped rows pass through with zeros."""
    types = frozenset(spec.types)
    for record in records:
        counts = dict.fromkeys(PII_TYPES, 0)
        if is_kept(record) and record.get("messages"):
            placeholders: dict[str, str] | None = {} if spec.consistent else None
            messages = []
            for message in record["messages"]:
                content, found = scrub_text(message.get("content") or "", types, placeholders)
                if any(found.values()):
                    message = {**message, "content": content}
                    for pii_type, n in found.items():
                        counts[pii_type] += n
                messages.append(message)
            record["messages"] = messages
            if record.get("meta") and ORIGINAL_MESSAGES in record["meta"]:
                record["meta"] = _scrub_original_messages(record["meta"], types, placeholders)
        record["pii_counts"] = counts
    return records


def _scrub_original_messages(meta_json: str, types: frozenset[str], placeholders: dict[str, str] | None) -> str:
    """Scrub the pre-repair copy of a conversation (``meta.original_messages``, see filters) like its turns.

    The same placeholders dict keeps a value's number equal in both copies; these replacements are not counted
    again in ``pii_counts``, which counts the conversation's own.
    """
    meta = json.loads(meta_json)
    original = meta.get(ORIGINAL_MESSAGES)
    if not isinstance(original, list):
        return meta_json
    for message in original:
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            message["content"] = scrub_text(message["content"], types, placeholders)[0]
    return json.dumps(meta, ensure_ascii=False)


@dataclass(frozen=True)
class PiiStep(RecordStep):
    """The ``pii`` curation step: scrubs kept conversations and adds the ``pii_counts`` column."""

    spec: PiiSpec

    def record_fn(self) -> RecordBatchFn:
        fn = functools.partial(scrub_records, spec=self.spec)
        return RecordBatchFn(fn, stage="pii", adds={"pii_counts": PII_COUNTS_TYPE})
