"""PII scrubbing: recall per type and format, false positives on clean text, and scrub_records throughput.

    .venv/bin/python benchmarks/pii.py                          # chatforge.data.pii as it is in the work tree
    .venv/bin/python benchmarks/pii.py --module /tmp/old/pii.py  # another version of that file (e.g. before a change)

Recall: for each type, values are generated in several formats ("families", e.g. phone ``fr_pairs``
``06 12 34 56 78``, card ``dotted``) and set into sentences; a value is found when the scrubbed sentence no longer
holds it and holds a placeholder of its type. Families named ``gap_*`` are formats the detectors leave alone on
purpose (``555 123 4567``, a bare 9-digit SSN, "the password is swordfish"): they count in their type's recall, so
the figure says what is missed. False positives: generated sentences full of dates, times, versions, prices, order
numbers, ids, hashes, number lists and prose about passwords; a sentence that comes back changed is one false
positive (``by_type`` counts the replacements). Throughput: ``scrub_records`` over generated conversations
(tests/helpers/corpus.py's, PII in 1 of 10, every row with a ``meta``), one process, the best and the median of
``--repeats`` passes: ``throughput`` with 1 row in 10 dropped and holding only a ``raw`` text, ``throughput_kept_only``
with every row kept (the work any version of the step does). Everything is generated from ``--seed``, so two
versions of the module see the same inputs. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import random
import statistics
import string
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from chatforge.config import PII_TYPES, PiiSpec  # noqa: E402
from helpers.corpus import conversation  # noqa: E402

Rng = random.Random


# ---------------------------------------------------------------- values, per type and format


def _digits(rng: Rng, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _luhn_complete(prefix: str, length: int, rng: Rng) -> str:
    body = prefix + _digits(rng, length - len(prefix) - 1)
    total = 0
    for i, d in enumerate(reversed(body)):
        n = int(d) * (2 if i % 2 == 0 else 1)
        total += n - 9 if n > 9 else n
    return body + str((10 - total % 10) % 10)


def _card(rng: Rng) -> str:
    return _luhn_complete(rng.choice(["4", "51", "52", "55", "6011"]), 16, rng)


def _grouped(number: str, sizes: list[int], separators: list[str]) -> str:
    parts, position = [], 0
    for size in sizes:
        parts.append(number[position : position + size])
        position += size
    out = parts[0]
    for i, part in enumerate(parts[1:]):
        out += separators[i % len(separators)] + part
    return out


IBAN_BBAN = {"DE": "8n10n", "GB": "4a14n", "FR": "10n11c2n", "NL": "4a10n", "ES": "20n", "IT": "1a10n12c"}


def _iban(rng: Rng) -> str:
    country = rng.choice(sorted(IBAN_BBAN))
    bban, spec = "", IBAN_BBAN[country]
    for count, kind in _iban_parts(spec):
        pool = {"n": string.digits, "a": string.ascii_uppercase, "c": string.ascii_uppercase + string.digits}[kind]
        bban += "".join(rng.choice(pool) for _ in range(count))
    number = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    return f"{country}{98 - number % 97:02d}{bban}"


def _iban_parts(spec: str) -> list[tuple[int, str]]:
    parts, count = [], ""
    for ch in spec:
        if ch.isdigit():
            count += ch
        else:
            parts.append((int(count), ch))
            count = ""
    return parts


def _spaced(iban: str, separator: str = " ") -> str:
    return separator.join(iban[i : i + 4] for i in range(0, len(iban), 4))


def _ssn(rng: Rng) -> str:
    area = rng.choice([n for n in range(1, 900) if n != 666])
    return f"{area:03d}{rng.randint(1, 99):02d}{rng.randint(1, 9999):04d}"


def _token(rng: Rng, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _name(rng: Rng) -> str:
    return rng.choice(["anna", "ben", "carla", "dmitri", "eve", "farid", "grace", "hugo", "ines", "jon"])


def _password(rng: Rng) -> str:
    return (
        rng.choice(["Tr0ub4dor", "hunter", "Summer", "s3cret", "P4ssw0rd", "qwerty"])
        + _digits(rng, 2)
        + "x!9"[rng.randrange(3)]
    )


# type -> family -> (value, the sentence holding it)
Family = Callable[[Rng], tuple[str, str]]


def _in_sentence(value_fn: Callable[[Rng], str]) -> Family:
    templates = [
        "You can reach me at {v} if anything changes.",
        "{v}",
        "ok so it's {v}, thanks!",
        "Details below:\n{v}\nLet me know.",
        "(see {v})",
    ]

    def family(rng: Rng) -> tuple[str, str]:
        value = value_fn(rng)
        return value, rng.choice(templates).format(v=value)

    return family


def _with_context(template: str, value_fn: Callable[[Rng], str]) -> Family:
    def family(rng: Rng) -> tuple[str, str]:
        value = value_fn(rng)
        return value, template.format(v=value)

    return family


PUBLIC_FIRST_OCTETS = [n for n in range(11, 224) if n != 127]  # 127.x is loopback, which is not scrubbed


def _nanp(rng: Rng) -> tuple[str, str, str]:
    return f"{rng.randint(201, 989)}", f"{rng.randint(200, 999)}", _digits(rng, 4)


FAMILIES: dict[str, dict[str, Family]] = {
    "email": {
        "ascii": _in_sentence(lambda r: f"{_name(r)}.{_token(r, 4, string.ascii_lowercase)}@example.com"),
        "plus_subdomain": _in_sentence(lambda r: f"{_name(r)}+news@mail.{_token(r, 5, string.ascii_lowercase)}.co.uk"),
        "upper": _in_sentence(lambda r: f"{_name(r).title()}@My-Shop.store"),
        "idn_domain": _in_sentence(
            lambda r: f"{_name(r)}@{r.choice(['bücher.de', 'пример.рф', '例え.jp', 'café.fr'])}"
        ),
        "punycode": _in_sentence(lambda r: f"{_name(r)}@xn--bcher-kva.de"),
        "gap_glued_to_cjk": _with_context("请联系{v}谢谢", lambda r: f"{_name(r)}@example.com"),
    },
    "phone": {
        "nanp_dash": _in_sentence(lambda r: "-".join(_nanp(r))),
        "nanp_paren": _in_sentence(lambda r: "({}) {}-{}".format(*_nanp(r))),
        "intl_plus": _in_sentence(lambda r: f"+44 20 {_digits(r, 4)} {_digits(r, 4)}"),
        "intl_00": _in_sentence(lambda r: f"00{r.choice(['44 20', '49 30', '33 1'])} {_digits(r, 4)} {_digits(r, 4)}"),
        "uk_national": _in_sentence(lambda r: f"020 {_digits(r, 4)} {_digits(r, 4)}"),
        "fr_pairs": _in_sentence(lambda r: "0" + r.choice("167") + "".join(f" {_digits(r, 2)}" for _ in range(4))),
        "fr_dots": _in_sentence(lambda r: "0" + r.choice("167") + "".join(f".{_digits(r, 2)}" for _ in range(4))),
        "mobile_contiguous": _in_sentence(lambda r: r.choice(["077", "078", "079"]) + _digits(r, 8)),
        "gap_nanp_spaced": _in_sentence(lambda r: " ".join(_nanp(r))),
        "gap_landline_contiguous": _in_sentence(lambda r: "020" + _digits(r, 8)),
    },
    "card": {
        "contiguous": _in_sentence(_card),
        "spaced": _in_sentence(lambda r: _grouped(_card(r), [4, 4, 4, 4], [" "])),
        "dashed": _in_sentence(lambda r: _grouped(_card(r), [4, 4, 4, 4], ["-"])),
        "dotted": _in_sentence(lambda r: _grouped(_card(r), [4, 4, 4, 4], ["."])),
        "mixed_separators": _in_sentence(lambda r: _grouped(_card(r), [4, 4, 4, 4], [" ", "-", " "])),
        "amex_4_6_5": _in_sentence(lambda r: _grouped(_luhn_complete("37", 15, r), [4, 6, 5], [" "])),
    },
    "iban": {
        "compact": _in_sentence(_iban),
        "spaced": _in_sentence(lambda r: _spaced(_iban(r))),
        "lowercase": _in_sentence(lambda r: _spaced(_iban(r)).lower()),
        "dashed": _in_sentence(lambda r: _spaced(_iban(r), "-")),
    },
    "ip": {
        "ipv4": _in_sentence(
            lambda r: f"{r.choice(PUBLIC_FIRST_OCTETS)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}"
        ),
        "ipv4_zero_padded": _in_sentence(
            lambda r: (
                f"{r.choice(PUBLIC_FIRST_OCTETS):03d}.{r.randint(0, 255):03d}.{r.randint(0, 99):03d}.{r.randint(1, 99):03d}"
            )
        ),
        "ipv6": _in_sentence(lambda r: "2001:db8:" + ":".join(f"{r.randint(1, 65535):x}" for _ in range(4)) + "::1"),
    },
    "secret": {
        "aws": _in_sentence(lambda r: "AKIA" + _token(r, 16, string.ascii_uppercase + string.digits)),
        "github": _in_sentence(lambda r: "gh" + "p_" + _token(r, 36)),
        "openai": _in_sentence(lambda r: "sk-" + "proj-" + _token(r, 32)),
        "huggingface": _in_sentence(lambda r: "hf" + "_" + _token(r, 34, string.ascii_letters)),
        "gitlab": _in_sentence(lambda r: "gl" + "pat-" + _token(r, 20)),
        "bearer_header": _with_context(
            "curl -H 'Authorization: Bearer {v}' https://api.example.com/v1", lambda r: _token(r, 40)
        ),
        "password_phrase": _with_context("my password is {v} but it stopped working", _password),
        "assignment": _with_context("set api_key={v} in the config", lambda r: _token(r, 24)),
        "gap_password_plain_word": _with_context(
            "the password is {v} if you need it", lambda r: r.choice(["swordfish", "marmalade", "bluebird"])
        ),
    },
    "url_credentials": {
        "https": _with_context(
            "Open https://{v}@example.com/dashboard to see it.", lambda r: f"{_name(r)}:{_password(r)}"
        ),
        "postgres": _with_context(
            "DATABASE_URL=postgres://{v}@db.internal:5432/prod", lambda r: f"app:{_token(r, 10)}"
        ),
    },
    "national_id": {
        "ssn_dashed": _in_sentence(lambda r: "{}-{}-{}".format(*(lambda s: (s[:3], s[3:5], s[5:]))(_ssn(r)))),
        "ssn_spaced": _in_sentence(lambda r: "{} {} {}".format(*(lambda s: (s[:3], s[3:5], s[5:]))(_ssn(r)))),
        "ssn_contiguous": _with_context("My SSN is {v}, please update the form.", _ssn),
        "uk_nino": _in_sentence(
            lambda r: f"{r.choice(['AB', 'JG', 'NY'])} {_digits(r, 2)} {_digits(r, 2)} {_digits(r, 2)} C"
        ),
        "gap_ssn_bare": _in_sentence(_ssn),
    },
}
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


# ---------------------------------------------------------------- clean text


def clean_sentences(rng: Rng, n: int) -> list[str]:
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]

    def day() -> str:
        return f"{rng.randint(1, 28):02d}"

    def month() -> str:
        return f"{rng.randint(1, 12):02d}"

    makers = [
        lambda: f"The release went out on {rng.randint(1990, 2030)}-{month()}-{day()} after a long week.",
        lambda: f"Invoice dated {day()}/{month()}/{rng.randint(1990, 2030)}, due in 30 days.",
        lambda: f"Rendez-vous le {day()}.{month()}.{rng.randint(1990, 2030)} à {rng.randint(8, 19)}h30.",
        lambda: f"We met on {rng.choice(months)} {rng.randint(1, 28)}, {rng.randint(1990, 2030)} at the conference.",
        lambda: (
            f"The meeting starts at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} and ends at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}."
        ),
        lambda: f"I upgraded to version {rng.randint(0, 12)}.{rng.randint(0, 40)}.{rng.randint(0, 99)} yesterday.",
        lambda: f"Chrome {rng.randint(90, 130)}.0.{rng.randint(1000, 6999)}.{rng.randint(10, 199)} renders it fine.",
        lambda: f"Windows build 10.0.{rng.randint(10000, 22999)} is still supported.",
        lambda: f"The laptop costs ${rng.randint(1, 9)},{rng.randint(100, 999)}.{rng.randint(10, 99)} before tax.",
        lambda: f"Lunch was €{rng.randint(5, 60)} and coffee {rng.randint(1, 5)}.{rng.randint(10, 99)}.",
        lambda: f"Your order #{rng.randint(100000, 9999999)} has shipped.",
        lambda: f"Order number {rng.randint(100000000, 999999999)} is on its way.",
        lambda: f"Invoice {rng.randint(1000000000, 9999999999)} was paid in full.",
        lambda: f"Ticket {rng.randint(0, 999):06d} was closed.",
        lambda: (
            f"In {rng.randint(1900, 2024)} there were {rng.randint(1, 9)},{rng.randint(100, 999)},{rng.randint(100, 999)},000 people."
        ),
        lambda: (
            f"The ISBN is 978-{rng.randint(0, 9)}-{rng.randint(100, 999)}-{rng.randint(10000, 99999)}-{rng.randint(0, 9)}."
        ),
        lambda: (
            f"The summit is at {rng.randint(-89, 89)}.{rng.randint(1000, 9999)}, {rng.randint(-179, 179)}.{rng.randint(1000, 9999)}."
        ),
        lambda: (
            f"Batch sizes {rng.choice([64, 128, 256])} {rng.choice([512, 768])} {rng.choice([1024, 2048])} and counts {rng.randint(100, 999)} {rng.randint(100, 999)} {rng.randint(1000, 9999)}."
        ),
        lambda: f"Commit {_token(rng, 40, '0123456789abcdef')} fixed it.",
        lambda: "Request id " + "-".join(_token(rng, n, "0123456789abcdef") for n in (8, 4, 4, 4, 12)) + " failed.",
        lambda: (
            f"The score was {rng.randint(0, 9)}-{rng.randint(0, 9)} and attendance {rng.randint(10, 99)},{rng.randint(100, 999)}."
        ),
        lambda: f"Take {rng.randint(1, 3)}.5 tablets every {rng.randint(4, 12)} hours for {rng.randint(5, 14)} days.",
        lambda: f"Serve on 127.0.0.1:{rng.randint(1024, 65535)} or bind 0.0.0.0.",
        lambda: f"Room {rng.randint(100, 2999)} is on floor {rng.randint(1, 30)}, building {rng.randint(1, 9)}.",
        lambda: (
            f"Part {rng.randint(10, 99)}-{rng.randint(100, 999)}-{rng.randint(100, 999)} ships with {rng.randint(1, 9)}-{rng.randint(1, 9)}-{rng.randint(1000, 9999)}."
        ),
        lambda: f"Run it with --workers {rng.randint(1, 16)} --batch-size {rng.choice([32, 64, 256])} --lr 3e-4.",
        lambda: rng.choice(
            [
                "The password must be at least 12 characters long.",
                "Your password is incorrect, try again.",
                "The password is case-sensitive.",
                "The password is required for every login.",
                "Use Bearer authentication for the API.",
                "Send the bearer token in the header.",
                "Set Authorization: Bearer <token> on each call.",
                "Authorization: Bearer $API_TOKEN is read from the environment.",
                "token = tokenizer.encode(text)",
                "password = getpass.getpass()",
                "pip install hf_transfer and call hf_hub_download.",
                "The Social Security Administration answers at the number on the letter.",
            ]
        ),
        lambda: (
            f"Mail it to Springfield, IL {rng.randint(10000, 99999)} or Boston, MA {rng.randint(10000, 99999)}-{rng.randint(1000, 9999)}."
        ),
        lambda: (
            f"Flight BA {rng.randint(100, 999)} departs from gate {rng.randint(1, 60)} at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}."
        ),
        lambda: (
            f"Draw: {' '.join(f'{rng.randint(1, 49):02d}' for _ in range(rng.choice([4, 5, 6])))} and the bonus ball."
        ),
        lambda: f"Serial {rng.randint(0, 99999999):010d} is out of warranty.",
        lambda: f"ISBN 0{rng.randint(100000000, 999999999)} is the paperback.",
        lambda: (
            f"See section {rng.randint(1, 9)}.{rng.randint(1, 9)}.{rng.randint(1, 9)} and table {rng.randint(1, 9)}.{rng.randint(1, 20)}."
        ),
    ]
    return [rng.choice(makers)() for _ in range(n)]


# ---------------------------------------------------------------- measurements


def load_pii_module(path: str | None):
    if path is None:
        from chatforge.data import pii

        return pii
    spec = importlib.util.spec_from_file_location("pii_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def recall(pii, rng: Rng, per_family: int) -> dict:
    found: dict[str, Counter] = defaultdict(Counter)
    for pii_type, families in FAMILIES.items():
        for family, make in families.items():
            for _ in range(per_family):
                value, sentence = make(rng)
                out, _ = pii.scrub_text(sentence, PII_TYPES, {})
                hit = value not in out and f"[{LABELS[pii_type]}_" in out
                found[pii_type][family] += hit
    return {
        pii_type: {
            "recall": round(sum(families.values()) / (per_family * len(families)), 4),
            "per_format": {family: round(n / per_family, 4) for family, n in families.items()},
        }
        for pii_type, families in found.items()
    }


def false_positives(pii, rng: Rng, n: int) -> dict:
    changed, by_type, examples = 0, Counter(), []
    for sentence in clean_sentences(rng, n):
        out, counts = pii.scrub_text(sentence, PII_TYPES, {})
        if out != sentence:
            changed += 1
            by_type.update({k: v for k, v in counts.items() if v})
            if len(examples) < 8:
                examples.append([sentence, out])
    return {
        "sentences": n,
        "changed": changed,
        "rate": round(changed / n, 5),
        "by_type": dict(by_type),
        "examples": examples,
    }


def generated_records(rng: Rng, n: int) -> list[dict]:
    """Conversations as curation's pii step sees them: PII in 1 of 10, 1 in 10 dropped with a raw text."""
    families = [(t, f) for t, fs in FAMILIES.items() for f in fs.values()]
    records = []
    for i in range(n):
        messages = conversation(rng)
        if i % 10 == 0:
            _, sentence = rng.choice(families)[1](rng)
            messages[0]["content"] += " " + sentence
        record = {"id": f"c{i}", "drop_reason": None, "messages": messages, "raw": None}
        record["meta"] = json.dumps({"origin": f"part-{i // 1000}.jsonl#{i}"})
        if i % 10 == 5:
            record["drop_reason"] = "malformed:invalid_json"
            record["raw"] = json.dumps({"conversations": [{"from": "human", "value": m["content"]} for m in messages]})[
                :-3
            ]
            record["messages"] = None
        records.append(record)
    return records


def throughput(pii, rng: Rng, n: int, repeats: int, kept_only: bool = False) -> dict:
    records = generated_records(rng, n)
    if kept_only:  # the same rows, none dropped: the work both versions of the step do
        records = [
            {**r, "drop_reason": None, "messages": r["messages"] or conversation(rng), "raw": None} for r in records
        ]
    spec = PiiSpec()
    seconds = []
    for _ in range(repeats):
        batch = copy.deepcopy(records)
        started = time.perf_counter()
        pii.scrub_records(batch, spec)
        seconds.append(time.perf_counter() - started)
    turns = sum(len(r["messages"] or []) for r in records)
    return {
        "conversations": n,
        "turns": turns,
        "seconds_best": round(min(seconds), 4),
        "seconds_median": round(statistics.median(seconds), 4),
        "conversations_per_s_best": round(n / min(seconds)),
        "conversations_per_s_median": round(n / statistics.median(seconds)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", help="path of a pii.py to measure instead of chatforge.data.pii")
    parser.add_argument("--per-format", type=int, default=200, help="generated values per type and format")
    parser.add_argument("--clean", type=int, default=5000, help="generated clean sentences")
    parser.add_argument("--conversations", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pii = load_pii_module(args.module)
    result = {
        "module": args.module or "chatforge.data.pii",
        "recall": recall(pii, random.Random(args.seed), args.per_format),
        "false_positives": false_positives(pii, random.Random(args.seed + 1), args.clean),
        "throughput": throughput(pii, random.Random(args.seed + 2), args.conversations, args.repeats),
        "throughput_kept_only": throughput(
            pii, random.Random(args.seed + 2), args.conversations, args.repeats, kept_only=True
        ),
    }
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
