"""PII scrubbing: find personal data and secrets in chat turns and replace them with typed placeholders.

Types (``PII_TYPES``) and their placeholders: email ``[EMAIL_1]``, phone ``[PHONE_1]``, card ``[CARD_1]``,
iban ``[IBAN_1]``, ip ``[IP_1]``, secret ``[SECRET_1]``, url_credentials ``[CREDENTIALS_1]`` (only the
``user:pass`` part, so ``https://[CREDENTIALS_1]@host/`` keeps scheme and host), national_id ``[NATIONAL_ID_1]``.
With ``PiiSpec.ner = "presidio"`` also person ``[PERSON_1]``, location ``[LOCATION_1]`` and date_of_birth
``[DATE_OF_BIRTH_1]`` (``NER_TYPES``), which no regex can find.

With ``PiiSpec.consistent`` the number identifies the value within one conversation: the same email is
``[EMAIL_1]`` in every turn, a second email is ``[EMAIL_2]``. Without it every occurrence is an unnumbered
``[EMAIL]``, so nothing links two turns.

Detectors are tuned for precision on ordinary numbers (dates, versions, prices, ids): structured values are
validated (Luhn for cards, country length and mod-97 for IBANs, octets for IPs, SSN ranges) and phone numbers must
look like phone numbers (a ``+`` or ``00`` country code, ``(555) 123-4567`` / ``555-123-4567`` shapes, a 0-prefixed
national number with separators, or a contiguous European mobile number). Where matches overlap, the type earlier
in ``_PRIORITY`` wins.
"""

from __future__ import annotations

import bisect
import functools
import importlib.util
import ipaddress
import json
import os
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from chatforge.config import PII_TYPES, PiiSpec, SpecError
from chatforge.data.batches import RecordBatchFn, RecordStep
from chatforge.data.schema import ORIGINAL_MESSAGES, Record

NER_TYPES = ("person", "location", "date_of_birth")

LABELS = {
    "email": "EMAIL",
    "phone": "PHONE",
    "card": "CARD",
    "iban": "IBAN",
    "ip": "IP",
    "secret": "SECRET",
    "url_credentials": "CREDENTIALS",
    "national_id": "NATIONAL_ID",
    "person": "PERSON",
    "location": "LOCATION",
    "date_of_birth": "DATE_OF_BIRTH",
}


def count_types(spec: PiiSpec) -> tuple[str, ...]:
    """The fields of ``pii_counts``: every regex type, and the NER types when a NER backend is on."""
    return PII_TYPES + (NER_TYPES if spec.ner != "off" else ())


def counts_type(spec: PiiSpec) -> pa.DataType:
    return pa.struct([(pii_type, pa.int64()) for pii_type in count_types(spec)])


PII_COUNTS_TYPE = counts_type(PiiSpec())

# Credentials and secrets contain '@', digits and dots that would otherwise read as emails, phones or IPs;
# cards and IBANs come before phones so that a long digit run is reported once, as the more specific type.
# NER comes last: a model's PERSON over an email address is the email.
_PRIORITY = ("url_credentials", "secret", "email", "iban", "card", "national_id", "ip", "phone")

# A detector yields (start, end, key): the span to replace and the normalized value that identifies it.
Span = tuple[int, int, str]
Match = tuple[int, int, str, str]  # (start, end, type, key)


# Patterns begin with a literal or a character class, never a lookbehind, so that `re` skips in C to the few
# positions where a match can start; a match glued to the word or number before it is refused here instead.
def _clear_before(text: str, start: int, forbidden: str = "") -> bool:
    """True when the character before ``start`` is not a word character or one of ``forbidden``."""
    if start == 0:
        return True
    previous = text[start - 1]
    return not (previous.isalnum() or previous == "_" or previous in forbidden)


# ---------------------------------------------------------------- email and URL credentials

# Anchored on "@": the domain is matched first, then the local part is read backwards from it. Labels and the
# top-level domain may be non-ASCII (bücher.de, пример.рф) or punycode. Not followed by ":path" or "/path": in
# git@github.com:org/repo the part before "@" is a login, not a mailbox.
_EMAIL_DOMAIN = re.compile(r"@(?:[^\W_]+(?:-+[^\W_]+)*\.)+(?:[^\W\d_]{2,24}|xn--[A-Za-z0-9-]{2,59})\b(?![:/][\w~])")
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
_SEPARATORS = re.compile(r"[ .-]")

_PHONE_END = r"(?![\w@]|[.,:-]\d)"
# A country code after "+" or "00": +44 20 7946 0958, +1 (555) 123-4567, 0044 20 7946 0958, +33 6 12 34 56 78
_PHONE_INTERNATIONAL = re.compile(
    r"(?:\+|00(?=[1-9]))\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,4})?(?:[ .-]?\d{2,8}){1,5}" + _PHONE_END
)
# North American: (555) 123-4567, 555-123-4567, 555.123.4567 (a leading "1-" is taken in by `find_phones`);
# not "555 123 4567", which cannot be told from a list of numbers ("sizes 256 512 1024")
_PHONE_NANP = (
    re.compile(r"\([2-9]\d{2}\) ?\d{3}[ .-]\d{4}" + _PHONE_END),
    re.compile(r"[2-9]\d\d([.-])\d{3}\1\d{4}" + _PHONE_END),
)
_PHONE_NATIONAL = (
    # trunk 0 and at least one separator: 020 7946 0958, (030) 12345678, 07700 900123
    re.compile(r"(?:\(0\d{1,4}\)|0\d{1,4})(?:[ -]\d{2,8}){1,3}" + _PHONE_END),
    # French style, five pairs with one separator throughout: 06 12 34 56 78, 01.23.45.67.89 (not a sixth pair)
    re.compile(r"0[1-9]([ .-])\d\d(?:\1\d\d){3}(?!\1?\d)" + _PHONE_END),
    # mobiles written without separators: UK 07700900123, FR/NL 0612345678, DE 015112345678 (not after a word
    # that names an id, `_ID_BEFORE`). Contiguous landlines are left alone: a 0-prefixed 10-digit run is as often
    # an ISBN or an id.
    re.compile(r"0(?:7[1-9]\d{8}|[67]\d{8}|1[5-7]\d{8,9})(?!\d)" + _PHONE_END),
)
_CONTIGUOUS_MOBILE = _PHONE_NATIONAL[2]
_ID_BEFORE = re.compile(
    r"(?i:\b(?:isbn(?:-1[03])?|order|invoice|serial|ref|id|no|nr|account|acct|ticket|tracking|item|sku)\W{0,3}|#)\Z"
)

_CARD = re.compile(
    r"[2-6](?:\d{12,18}"  # contiguous
    r"|\d{3}[ .-]\d{4}[ .-]\d{4}[ .-]\d{1,4}(?:[ .-]\d{3})?"  # groups of four, any separators: 13-19 digits
    r"|\d{3}[ .-]\d{6}[ .-]\d{4,5}"  # Amex 4-6-5, Diners 4-6-4
    r")(?![\w]|[.,-]\d)"
)

# Any case, spaces or dashes between groups; `find_ibans` cuts the match to the country's length.
_IBAN = re.compile(r"(?i:[A-Z]{2}\d\d(?:[ -]?[A-Z0-9]{4}){2,7}(?:[ -]?[A-Z0-9]{1,3})?)\b")
# ISO 13616 registry: the IBAN length of each country that issues them
IBAN_LENGTHS = dict(
    (entry[:2], int(entry[2:]))
    for entry in (
        "AD24 AE23 AL28 AT20 AZ28 BA20 BE16 BG22 BH22 BI27 BR29 BY28 CH21 CR22 CY28 CZ24 DE22 DJ27 DK18 DO28 EE20 "
        "EG29 ES24 FI18 FK18 FO18 FR27 GB22 GE22 GI23 GL18 GR27 GT28 HN28 HR21 HU28 IE22 IL23 IQ23 IS26 IT27 JO30 "
        "KW30 KZ20 LB28 LC32 LI21 LT20 LU20 LV21 LY25 MC27 MD24 ME22 MK19 MN20 MR27 MT31 MU30 NI28 NL18 NO15 OM23 "
        "PK24 PL28 PS29 PT25 QA29 RO24 RS22 RU33 SA24 SC31 SD18 SE24 SI19 SK24 SM27 SO23 ST25 SV28 TL23 TN24 TR26 "
        "UA29 VA22 VG24 XK20 YE30"
    ).split()
)

# US SSN: one separator throughout (123-45-6789, 123 45 6789); nine bare digits only after an SSN keyword.
_SSN = re.compile(r"\d\d\d([- ])\d\d\1\d{4}(?![\w]|[.-]\d)")
_SSN_KEYWORD_MARKERS = ("ssn", "ss#", "social security")
_NINE_DIGITS = re.compile(r"\d{9}")
_SSN_AFTER_KEYWORD = re.compile(
    r"(?i:\b(?:ssn|ss#|social security)(?:\s*(?:number|no\.?|#))?)[^\d\n]{0,20}(\d{9})(?![\w]|[.-]\d)"
)
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
    """ISO 13616: the country's length; the first four characters moved to the end, letters to 10..35, mod 97 is 1."""
    iban = iban.replace(" ", "").replace("-", "").upper()
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit() or not iban.isalnum():
        return False
    return int("".join(str(int(c, 36)) for c in iban[4:] + iban[:4])) % 97 == 1


def ssn_valid(ssn: str) -> bool:
    """Area 000, 666 and 900-999, group 00 and serial 0000 are never issued (separators are ignored)."""
    digits = _NON_DIGITS.sub("", ssn)
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return len(digits) == 9 and area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _starts_a_number(text: str, start: int) -> bool:
    """Not glued to what comes before, and not a later group of a longer run ("DE89 3704 0044 0532 ...")."""
    return _clear_before(text, start, "+#/.-") and not (
        start >= 2 and text[start - 1] in " .-" and text[start - 2].isdigit()
    )


def find_phones(text: str) -> Iterator[Span]:
    if not _HAS_DIGIT.search(text):
        return
    for m in _PHONE_INTERNATIONAL.finditer(text):
        digits = _NON_DIGITS.sub("", m.group())
        if m.group().startswith("00"):  # "00" + country code: with separators, so a zero-padded id is not a phone
            digits = digits[2:]
            if not _SEPARATORS.search(m.group()) or not _starts_a_number(text, m.start()):
                continue
        if 8 <= len(digits) <= 15 and _clear_before(text, m.start(), "+#/.-"):  # E.164: at most 15
            yield m.start(), m.end(), "+" + digits
    for pattern in _PHONE_NANP:
        for m in pattern.finditer(text):
            start = m.start()
            if start >= 2 and text[start - 2] == "1" and text[start - 1] in " .-":  # 1-800-555-0199
                start -= 2
            if _clear_before(text, start, "+#/.-"):
                yield start, m.end(), _NON_DIGITS.sub("", m.group())
    for pattern in _PHONE_NATIONAL:
        for m in pattern.finditer(text):
            digits = _NON_DIGITS.sub("", m.group())
            if not (10 <= len(digits) <= 12 and _starts_a_number(text, m.start())):
                continue
            if pattern is _CONTIGUOUS_MOBILE and _ID_BEFORE.search(text, max(0, m.start() - 16), m.start()):
                continue
            yield m.start(), m.end(), digits


def find_cards(text: str) -> Iterator[Span]:
    if _HAS_DIGIT.search(text):
        for m in _CARD.finditer(text):
            digits = _NON_DIGITS.sub("", m.group())
            if 13 <= len(digits) <= 19 and luhn_valid(digits) and _clear_before(text, m.start(), ".,+-"):
                yield m.start(), m.end(), digits


def find_ibans(text: str) -> Iterator[Span]:
    if not _HAS_DIGIT.search(text):
        return
    for m in _IBAN.finditer(text):
        found = m.group()
        length = IBAN_LENGTHS.get(found[:2].upper())
        if length is None or not _clear_before(text, m.start()):
            continue
        # The pattern may have run on into a following short word ("BE68 5390 0754 7034 thx"): cut it at the
        # country's length, which must end a group.
        characters = end = 0
        while end < len(found) and characters < length:
            characters += found[end] not in " -"
            end += 1
        if characters == length and (end == len(found) or found[end] in " -") and iban_valid(found[:end]):
            yield m.start(), m.start() + end, found[:end].replace(" ", "").replace("-", "").upper()


def find_national_ids(text: str) -> Iterator[Span]:
    if not _HAS_DIGIT.search(text):
        return
    if "-" in text or " " in text:
        for m in _SSN.finditer(text):
            if _clear_before(text, m.start(), ".-") and ssn_valid(m.group()):
                yield m.start(), m.end(), _NON_DIGITS.sub("", m.group())
    if _NINE_DIGITS.search(text) and _contains_any(text.lower(), _SSN_KEYWORD_MARKERS):
        for m in _SSN_AFTER_KEYWORD.finditer(text):
            if _clear_before(text, m.start(1)) and ssn_valid(m.group(1)):
                yield m.start(1), m.end(1), m.group(1)
    for m in _UK_NINO.finditer(text):
        if _clear_before(text, m.start()) and m.group()[:2] not in _NINO_UNUSED_PREFIXES:
            yield m.start(), m.end(), m.group().replace(" ", "")


# ---------------------------------------------------------------- IP addresses

_IPV4 = re.compile(r"\d\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")


def _ipv4(text: str) -> ipaddress.IPv4Address | None:
    try:
        # ipaddress rejects octets over 255 and leading zeros (so "01.02.03.04" is not an address) ...
        return ipaddress.IPv4Address(text)
    except ValueError:
        pass
    # ... but logs zero-pad every octet to three digits (192.168.001.010): that fixed width is an address
    octets = text.split(".")
    if all(len(octet) == 3 for octet in octets) and all(int(octet) <= 255 for octet in octets):
        return ipaddress.IPv4Address(".".join(str(int(octet)) for octet in octets))
    return None


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
            if _clear_before(text, m.start(), ".") and (address := _ipv4(m.group())) and _identifies_a_host(address):
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
    r"|glpat-[A-Za-z0-9_-]{20,}"  # GitLab
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|sk-(?:proj-|svcacct-|admin-|ant-)?[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic style
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT
    r")(?![\w-])"
)
# every token above contains one of these (GitHub, Hugging Face and Stripe tokens an "_"): most turns contain none,
# and a substring test is far cheaper than running the pattern
_SECRET_TOKEN_MARKERS = ("_", "sk-", "xox", "eyJ", "AKIA", "ASIA", "ABIA", "ACCA", "AIza", "glpat-")
_SECRET_KEYWORD_MARKERS = ("key", "token", "secret", "pass", "pwd")
# key = value / "key": "value"; only the value is replaced, so the text still says what was there.
_SECRET_ASSIGNMENT = re.compile(
    r"(?i:(?<![A-Za-z0-9])(?:api[_-]?key|secret[_-]?key|access[_-]?key|client[_-]?secret|auth[_-]?token"
    r"|access[_-]?token|token|secret|password|passwd|pwd)(?![A-Za-z0-9]))"
    r"[\"']?\s*(?P<sep>=|:)(?P<space>\s*)(?P<quote>[\"']?)(?P<value>[^\s\"'`,;]*[^\s\"'`,;.)\]}])"
)
# "my password is hunter22", "the password for the wifi was 'swordfish'"
_SECRET_PHRASE = re.compile(
    r"(?i:\b(?:password|passphrase|passcode|passwd|pwd)(?:\s+for\s+(?:the\s+|my\s+|our\s+)?[\w-]+)?"
    r"\s+(?:is|was)(?:\s+(?:now|still|just))?\s*:?\s+)"
    r"(?P<quote>[\"'`]?)(?P<value>[^\s\"'`,;]*[^\s\"'`,;.!?)\]}])"
)
# Authorization headers and bearer tokens: "Authorization: Bearer <token>", "Authorization: Basic <base64>"
_AUTH_HEADER = re.compile(
    r"(?i:\bauthorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token|digest)\s+)?|\bbearer\s+)"
    r"(?P<value>[A-Za-z0-9_~+/-](?:[A-Za-z0-9_.~+/-]*[A-Za-z0-9_~+/-])?=*)(?![\w~+/=-]|\.[\w~+/-])"
)
# values that only name a secret: env lookups, templates, masks, paths, and our own placeholders
_NOT_A_SECRET_VALUE = re.compile(r"(?:\$|<|\{|\[|%|/|~|\*+$|x+$|\.\.\.|os\.|process\.env|getenv|env\[)", re.I)
# YOUR_API_KEY, OPENAI_API_KEY: the name of a variable or a placeholder, not its value
_CONSTANT_NAME = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\Z")
# unquoted code on the right-hand side: a call or an attribute (token = tokenizer.encode(text), secret=self.secret)
_CODE_VALUE = re.compile(r"[\w.]*\(|[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+$")


def _prose_word(value: str) -> bool:
    # after "password: " or "password is " in prose a plain word is just a word ("required", "Wrong"); a real value
    # has a digit, a symbol or mixed case
    return value.replace("-", "").isalpha() and (value.islower() or value.istitle())


def _assigned_secret(m: re.Match) -> bool:
    value, quoted = m["value"], bool(m["quote"])
    if len(value) < 6 or _NOT_A_SECRET_VALUE.match(value) or (not quoted and _CODE_VALUE.match(value)):
        return False
    literal = quoted or (m["sep"] == "=" and not m["space"])  # key=value with nothing between is a literal
    return literal or not _prose_word(value)


def _stated_secret(m: re.Match) -> bool:
    """A phrase's or a header's value: a secret unless it is a plain word, a placeholder or a variable's name."""
    value = m["value"]
    if len(value) < 6 or _NOT_A_SECRET_VALUE.match(value) or _CONSTANT_NAME.match(value):
        return False
    return bool(m.groupdict().get("quote")) or not _prose_word(value)


def _contains_any(text: str, markers: tuple[str, ...]) -> bool:
    for marker in markers:  # noqa: SIM110 - a plain loop is twice as fast as any() over a generator, on every turn
        if marker in text:
            return True
    return False


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
    # cheap substring tests first: most turns have no "=" or ":", and "is"/"was" without a password word
    assignment = "=" in text or ":" in text
    stated = " is " in text or " was " in text
    header = assignment or "earer" in text
    if not (assignment or stated or header):
        return
    lower = text.lower()
    if assignment and _contains_any(lower, _SECRET_KEYWORD_MARKERS):
        for m in _SECRET_ASSIGNMENT.finditer(text):
            if _assigned_secret(m):
                yield m.start("value"), m.end("value"), m["value"]
    if stated and ("pass" in lower or "pwd" in lower):
        for m in _SECRET_PHRASE.finditer(text):
            if _stated_secret(m):
                yield m.start("value"), m.end("value"), m["value"]
    if header and ("bearer" in lower or "authorization" in lower):
        for m in _AUTH_HEADER.finditer(text):
            if _stated_secret(m):
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


# ---------------------------------------------------------------- NER (optional): names, places, dates of birth

NerBackend = Callable[[str], Iterable[Match]]

NER_INSTALL_HINT = (
    "pip install presidio-analyzer, and a spaCy model: `python -m spacy download en_core_web_lg` where the "
    "network allows, else its wheel, or a model directory named by pii.ner_model"
)
_PRESIDIO_ENTITIES = {"PERSON": "person", "LOCATION": "location", "DATE_TIME": "date_of_birth"}
# A date is replaced as a date of birth only when the words just before it, in the same clause, say so.
_BIRTH_CONTEXT = re.compile(r"(?i:\bborn\b|\bbirth|\bd\.?o\.?b\b\.?|\bbday\b)(?P<rest>[^;!?\n]{0,30})\Z")
_CLAUSE_END = re.compile(r"\.\s")  # "DOB: 1985" is one clause, "born in Leeds. Then on 2024" two


class PiiBackendError(SpecError):
    """A NER backend that cannot run here; the message says what to install."""


def check_ner_backend(spec: PiiSpec) -> None:
    """Fail now, naming what to install, if ``spec.ner`` needs packages or a model this machine does not have.

    Cheap (nothing is imported): the step calls it in the driver, so a missing model fails before any task runs.
    """
    if spec.ner == "off":
        return
    if importlib.util.find_spec("presidio_analyzer") is None:
        raise PiiBackendError(f"pii.ner = presidio, but presidio-analyzer is not installed: {NER_INSTALL_HINT}")
    model = spec.ner_model
    # Presidio would try to download a model it cannot find; spaCy models are not on PyPI, so say so instead
    if not os.path.isdir(model) and importlib.util.find_spec(model.replace("-", "_")) is None:
        raise PiiBackendError(
            f"pii.ner_model = {model!r} is neither an installed spaCy model package nor a directory: {NER_INSTALL_HINT}"
        )


@functools.cache
def _presidio_analyzer(model: str):
    """Presidio's analyzer over the spaCy model ``model``, built once per process (spaCy takes seconds to load)."""
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    provider = NlpEngineProvider(
        nlp_configuration={"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": model}]}
    )
    return AnalyzerEngine(nlp_engine=provider.create_engine(), supported_languages=["en"])


@dataclass(frozen=True)
class PresidioNer:
    """Presidio's PERSON, LOCATION and DATE_TIME (a date of birth only after "born", "birth", "DOB") as matches.

    The analyzer loads on the first call, in the process that scrubs; English only. What it finds depends on the
    spaCy model: with a blank pipeline only Presidio's date patterns run, and no names or places are found.
    """

    model: str
    score_threshold: float

    def __call__(self, text: str) -> Iterator[Match]:
        results = _presidio_analyzer(self.model).analyze(
            text=text, language="en", entities=list(_PRESIDIO_ENTITIES), score_threshold=self.score_threshold
        )
        for result in sorted(results, key=lambda r: (-r.score, r.start)):
            pii_type = _PRESIDIO_ENTITIES[result.entity_type]
            start, end = result.start, result.end
            if pii_type == "date_of_birth" and not _after_birth_word(text, start):
                continue
            yield start, end, pii_type, " ".join(text[start:end].casefold().split())


def _after_birth_word(text: str, start: int) -> bool:
    before = text[max(0, start - 40) : start]
    match = _BIRTH_CONTEXT.search(before)
    return match is not None and not _CLAUSE_END.search(match["rest"])


def ner_backend(spec: PiiSpec) -> NerBackend | None:
    if spec.ner == "off":
        return None
    return PresidioNer(spec.ner_model, spec.ner_score_threshold)


# ---------------------------------------------------------------- scrubbing


def find_pii(text: str, types: Collection[str] = PII_TYPES, ner: NerBackend | None = None) -> list[Match]:
    """Non-overlapping (start, end, type, key) matches in text order; on overlap the higher-priority type wins,
    and a NER match only fills what no regex took."""
    taken: list[Match] = []
    starts: list[int] = []  # kept sorted, so checking a span is two neighbour lookups, not a scan of all

    def take(start: int, end: int, pii_type: str, key: str) -> None:
        i = bisect.bisect_right(starts, start)
        if (i == 0 or taken[i - 1][1] <= start) and (i == len(starts) or end <= starts[i]):
            starts.insert(i, start)
            taken.insert(i, (start, end, pii_type, key))

    for pii_type in _PRIORITY:
        if pii_type in types:
            for start, end, key in DETECTORS[pii_type](text):
                take(start, end, pii_type, key)
    if ner is not None:
        for match in ner(text):
            take(*match)
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


# JSON string escapes (\n, \", \u00e9): in a raw record they would glue a value to the letter before it
_JSON_ESCAPE = re.compile(r"\\(?:u[0-9A-Fa-f]{4}|.)")


def _blank_json_escapes(text: str) -> str:
    """``text`` with every JSON escape blanked to spaces of the same length, so offsets stay the same."""
    return _JSON_ESCAPE.sub(lambda m: " " * len(m.group()), text) if "\\" in text else text


def scrub_text(
    text: str,
    types: Collection[str] = PII_TYPES,
    placeholders: dict[str, str] | None = None,
    *,
    ner: NerBackend | None = None,
    json_escaped: bool = False,
) -> tuple[str, dict[str, int]]:
    """Replace every PII value of ``types`` in ``text``; return the new text and replacements per type.

    ``placeholders`` maps ``"<type>:<normalized value>"`` (lower-cased email, digits of a phone or card, ...)
    to its numbered placeholder; pass the same dict for every turn of a conversation so a value keeps its
    number. ``None`` gives unnumbered placeholders (``[EMAIL]``). Counts include every type in ``PII_TYPES``
    (and ``NER_TYPES`` with a ``ner`` backend). ``json_escaped``: ``text`` is JSON source (a raw record), whose
    escapes count as separators.
    """
    counts = dict.fromkeys(PII_TYPES + (NER_TYPES if ner is not None else ()), 0)
    if not text:
        return text, counts
    view = _blank_json_escapes(text) if json_escaped else text
    matches = find_pii(view, types, ner)
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
    """Scrub every record, kept or dropped (dropped/ is written out too), and set ``pii_counts``.

    A record's turns, its ``raw`` text (a record that could not be read) and the strings of its ``meta`` are
    scrubbed with one placeholders dict, so a value has the same number everywhere in the record. ``meta.origin``
    (file and line) is left as is. ``pii_counts`` counts the replacements in turns, ``raw`` and meta's own fields;
    ``meta.original_messages``, the pre-repair copy of the turns, is scrubbed but not counted again.
    """
    types = frozenset(spec.types)
    ner = ner_backend(spec)
    for record in records:
        _scrub_record(record, types, ner, count_types(spec), {} if spec.consistent else None)
    return records


def _scrub_record(
    record: Record,
    types: frozenset[str],
    ner: NerBackend | None,
    fields: tuple[str, ...],
    placeholders: dict[str, str] | None,
) -> None:
    counts = dict.fromkeys(fields, 0)

    def scrub(text: str, json_escaped: bool = False, counted: bool = True) -> str:
        scrubbed, found = scrub_text(text, types, placeholders, ner=ner, json_escaped=json_escaped)
        if counted and scrubbed is not text:
            for pii_type, n in found.items():
                counts[pii_type] += n
        return scrubbed

    if record.get("messages"):
        messages = []
        for message in record["messages"]:
            content = message.get("content") or ""
            scrubbed = scrub(content)
            messages.append(message if scrubbed is content else {**message, "content": scrubbed})
        record["messages"] = messages
    if record.get("raw"):
        record["raw"] = scrub(record["raw"], json_escaped=True)
    if record.get("meta"):
        record["meta"] = _scrub_meta(record["meta"], scrub)
    record["pii_counts"] = counts


def _scrub_meta(meta_json: str, scrub: Callable[..., str]) -> str:
    """Every string in ``meta`` scrubbed except ``origin``; the text unchanged (same object) when nothing was found.

    Meta that is not JSON is scrubbed as text.
    """
    if meta_json.startswith('{"origin": "') and meta_json.endswith('"}') and meta_json.count('"') == 4:
        return meta_json  # most rows' meta is their origin alone: nothing to parse
    try:
        meta = json.loads(meta_json)
    except ValueError:
        return scrub(meta_json, json_escaped=True)
    changed = False

    def walk(value: Any, counted: bool) -> Any:
        nonlocal changed
        if isinstance(value, str):
            scrubbed = scrub(value, counted=counted)
            changed |= scrubbed is not value
            return scrubbed
        if isinstance(value, list):
            return [walk(item, counted) for item in value]
        if isinstance(value, dict):
            return {key: walk(item, counted) for key, item in value.items()}
        return value

    if isinstance(meta, dict):
        meta = {
            key: value if key == "origin" else walk(value, counted=key != ORIGINAL_MESSAGES)
            for key, value in meta.items()
        }
    else:
        meta = walk(meta, counted=True)
    return json.dumps(meta, ensure_ascii=False) if changed else meta_json


@dataclass(frozen=True)
class PiiStep(RecordStep):
    """The ``pii`` curation step: scrubs every row, kept or dropped, and adds the ``pii_counts`` column."""

    spec: PiiSpec

    def record_fn(self) -> RecordBatchFn:
        check_ner_backend(self.spec)  # in the driver: a missing NER model fails before any task runs
        fn = functools.partial(scrub_records, spec=self.spec)
        return RecordBatchFn(fn, stage="pii", adds={"pii_counts": counts_type(self.spec)})
