"""PII scrubbing: every seeded value is found and replaced, ordinary numbers are left alone, rows are accounted."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass

import pytest

from chatforge.config import PII_TYPES, PiiSpec
from chatforge.data import pii
from chatforge.data.batches import records_to_table
from chatforge.data.pii import (
    LABELS,
    NER_TYPES,
    PII_COUNTS_TYPE,
    PiiBackendError,
    PiiStep,
    check_ner_backend,
    counts_type,
    find_pii,
    iban_valid,
    luhn_valid,
    scrub_records,
    scrub_text,
    ssn_valid,
)
from chatforge.data.schema import BASE_SCHEMA, with_columns

ZEROS = dict.fromkeys(PII_TYPES, 0)

# Token-shaped fixtures are assembled at run time so secret scanners on the repository do not flag this file.
GITHUB_TOKEN = "gh" + "p_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
GITHUB_PAT = "github" + "_pat_" + "11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"
OPENAI_KEY = "sk-" + "proj-" + "Abc123Def456Ghi789Jkl012Mno345"
SLACK_TOKEN = "xo" + "xb-" + "123456789012-abcdefghijKLMN"
GOOGLE_KEY = "AI" + "za" + "SyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q"
STRIPE_KEY = "sk" + "_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    + ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ"
    + ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM_KEY = "-----BEGIN " + "RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1b2c3d4e5f6+/abc=\n-----END RSA PRIVATE KEY-----"
HF_TOKEN = "hf" + "_" + "AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh"
GITLAB_TOKEN = "gl" + "pat-" + "xYz12AbC34dEf56GhI78"
OPAQUE_TOKEN = "9f8e7d6c" + "5b4a3928_17e6d5c4b3a2"

# (type, the value that must disappear, a sentence holding it)
SEEDED = [
    ("email", "alice@example.com", "Please write to alice@example.com before Friday."),
    ("email", "bob.smith+news@mail.co.uk", "My address is bob.smith+news@mail.co.uk, thanks."),
    ("email", "j_doe99@sub.domain.org", "Contact: j_doe99@sub.domain.org"),
    ("email", "x.y-z@company-name.io", "cc x.y-z@company-name.io on the thread"),
    ("email", "Support@My-Shop.store", "Reach Support@My-Shop.store for refunds."),
    ("phone", "(555) 123-4567", "Call me at (555) 123-4567 tonight."),
    ("phone", "555-123-4567", "My cell is 555-123-4567."),
    ("phone", "555.123.4567", "Fax: 555.123.4567"),
    ("phone", "020 7946 0958", "The London office is on 020 7946 0958."),
    ("phone", "+44 20 7946 0958", "From abroad dial +44 20 7946 0958 instead."),
    ("phone", "+49 30 12345678", "Berlin: +49 30 12345678, ask for Hans."),
    ("phone", "+1 415 555 2671", "Text +1 415 555 2671 when you land."),
    ("phone", "07700 900123", "My mobile is 07700 900123."),
    ("phone", "1-800-555-0199", "Toll free: 1-800-555-0199 (24/7)."),
    ("phone", "+1 (555) 123-4567", "Reach the US desk at +1 (555) 123-4567."),
    ("card", "4111 1111 1111 1111", "Charge it to 4111 1111 1111 1111 please."),
    ("card", "5500-0000-0000-0004", "The Mastercard number is 5500-0000-0000-0004."),
    ("card", "378282246310005", "Amex 378282246310005 expires 04/27."),
    ("card", "3782 822463 10005", "Or as printed: 3782 822463 10005."),
    ("card", "6011111111111117", "Discover card 6011111111111117 was declined."),
    ("card", "4222222222222", "An old 13-digit Visa: 4222222222222."),
    ("iban", "DE89 3704 0044 0532 0130 00", "Send the rent to DE89 3704 0044 0532 0130 00 by the 1st."),
    ("iban", "GB82WEST12345698765432", "IBAN: GB82WEST12345698765432"),
    ("iban", "GB82 WEST 1234 5698 7654 32", "My UK account is GB82 WEST 1234 5698 7654 32."),
    ("iban", "FR14 2004 1010 0505 0001 3M02 606", "Virement sur FR14 2004 1010 0505 0001 3M02 606 merci."),
    ("iban", "NL91ABNA0417164300", "Pay NL91ABNA0417164300 and keep the receipt."),
    ("iban", "CH9300762011623852957", "Swiss account CH9300762011623852957 it is."),
    ("ip", "192.168.1.10", "The printer sits at 192.168.1.10 on the LAN."),
    ("ip", "8.8.8.8", "I pinged 8.8.8.8 and it answered."),
    ("ip", "203.0.113.45", "Logins came from 203.0.113.45, is that you?"),
    ("ip", "2001:db8::ff00:42:8329", "Our IPv6 is 2001:db8::ff00:42:8329 now."),
    ("ip", "fe80::1ff:fe23:4567:890a", "Link-local fe80::1ff:fe23:4567:890a showed up."),
    ("ip", "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "Full form 2001:0db8:85a3:0000:0000:8a2e:0370:7334."),
    ("secret", "AKIAIOSFODNN7EXAMPLE", "aws_access_key_id = AKIAIOSFODNN7EXAMPLE"),
    ("secret", GITHUB_TOKEN, f"Use {GITHUB_TOKEN} to clone the repo."),
    ("secret", GITHUB_PAT, f"export GH_PAT {GITHUB_PAT}"),
    ("secret", OPENAI_KEY, f"client = OpenAI(api_key='{OPENAI_KEY}')"),
    ("secret", SLACK_TOKEN, f"The bot token {SLACK_TOKEN} stopped working."),
    ("secret", GOOGLE_KEY, f"maps key {GOOGLE_KEY} in the html"),
    ("secret", STRIPE_KEY, f"stripe.api_key = {STRIPE_KEY}"),
    ("secret", JWT, f"Authorization: Bearer {JWT}"),
    ("secret", PEM_KEY, f"Here is my key:\n{PEM_KEY}\nwhy does ssh refuse it?"),
    ("secret", "a1b2c3d4e5", "set api_key=a1b2c3d4e5 in the config"),
    ("secret", "Tr0ub4dor&3", "my password: Tr0ub4dor&3 does not work"),
    ("secret", "hunter22", 'config = {"token": "hunter22"}'),
    ("url_credentials", "admin:s3cret", "Open https://admin:s3cret@example.com/dashboard to see it."),
    ("url_credentials", "app:p4ss", "DATABASE_URL is postgres://app:p4ss@db.internal:5432/prod"),
    ("url_credentials", "user:pw123", "Mirror at ftp://user:pw123@files.example.org/pub"),
    ("url_credentials", "default:hunter2", "redis://default:hunter2@cache:6379/0 times out"),
    ("url_credentials", "bob:Secr3t", "mongodb+srv://bob:Secr3t@cluster0.mongodb.net/test?retryWrites=true"),
    ("national_id", "123-45-6789", "My SSN is 123-45-6789, keep it safe."),
    ("national_id", "078-05-1120", "The card showed 078-05-1120."),
    ("national_id", "536-22-1234", "SSN 536-22-1234 on the W-2."),
    ("national_id", "AB 12 34 56 C", "My NI number is AB 12 34 56 C."),
    ("national_id", "JG103759A", "NINO: JG103759A"),
    ("national_id", "NY 12 34 56 D", "National Insurance NY 12 34 56 D for payroll."),
    # formats beyond the first set: European and international phones, IDN emails, other separators and cases
    ("email", "info@bücher.de", "Schreib an info@bücher.de, bitte."),
    ("email", "anna@пример.рф", "Пиши на anna@пример.рф завтра."),
    ("phone", "06 12 34 56 78", "Mon portable : 06 12 34 56 78, merci."),
    ("phone", "06.12.34.56.78", "Appelle le 06.12.34.56.78 ce soir."),
    ("phone", "0044 20 7946 0958", "From Germany dial 0044 20 7946 0958."),
    ("phone", "07700900123", "Text me on 07700900123 when you land."),
    ("phone", "+33 6 12 34 56 78", "En France : +33 6 12 34 56 78."),
    ("card", "4111.1111.1111.1111", "Card 4111.1111.1111.1111 on file."),
    ("card", "4111 1111-1111 1111", "I typed 4111 1111-1111 1111 by mistake."),
    ("iban", "de89 3704 0044 0532 0130 00", "iban: de89 3704 0044 0532 0130 00"),
    ("iban", "DE89-3704-0044-0532-0130-00", "Pay DE89-3704-0044-0532-0130-00 today."),
    ("iban", "BE68 5390 0754 7034", "Belgian account BE68 5390 0754 7034 thx"),
    ("ip", "192.168.001.010", "The log shows 192.168.001.010 again."),
    ("secret", HF_TOKEN, f"HF_TOKEN is {HF_TOKEN} for the gated model."),
    ("secret", GITLAB_TOKEN, f"git clone with {GITLAB_TOKEN} as the password"),
    ("secret", OPAQUE_TOKEN, f'curl -H "Authorization: Bearer {OPAQUE_TOKEN}" https://api.example.com'),
    ("secret", "hunter22", "my password is hunter22, don't tell anyone"),
    ("secret", "swordfish", "The password for the wifi was 'swordfish'."),
    ("national_id", "123 45 6789", "SSN 123 45 6789 on the form."),
    ("national_id", "123456789", "My social security number is 123456789."),
]


def test_seeded_set_covers_every_type_five_times():
    for pii_type in PII_TYPES:
        assert sum(1 for t, _, _ in SEEDED if t == pii_type) >= 5, pii_type


@pytest.mark.parametrize("pii_type,value,sentence", SEEDED, ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(SEEDED)])
def test_seeded_value_is_replaced_exactly(pii_type, value, sentence):
    out, counts = scrub_text(sentence, PII_TYPES, {})
    assert out == sentence.replace(value, f"[{LABELS[pii_type]}_1]")
    assert counts == {**ZEROS, pii_type: 1}


def test_recall_on_all_seeded_values_in_one_conversation():
    record = {
        "id": "t:1",
        "drop_reason": None,
        "messages": [
            {"role": "user" if i % 2 == 0 else "assistant", "content": s} for i, (_, _, s) in enumerate(SEEDED)
        ],
    }
    [out] = scrub_records([record], PiiSpec())
    text = "\n".join(m["content"] for m in out["messages"])
    for _, value, _ in SEEDED:
        assert value not in text
    expected = dict.fromkeys(PII_TYPES, 0)
    for pii_type, _, _ in SEEDED:
        expected[pii_type] += 1
    assert out["pii_counts"] == expected


def test_url_credentials_keep_scheme_and_host():
    out, counts = scrub_text("see https://bob:pw@git.example.com/repo.git", PII_TYPES, {})
    assert out == "see https://[CREDENTIALS_1]@git.example.com/repo.git"
    assert counts["email"] == 0
    # a user name alone is not a credential
    for remote in ("ssh://git@github.com/org/repo", "git clone git@github.com:org/repo.git"):
        assert scrub_text(remote, PII_TYPES, {}) == (remote, ZEROS)


CLEAN = [
    "The release went out on 2024-01-15 after a long week.",
    "Invoice dated 15/01/2024, due 14/02/2024.",
    "We met on Jan 5, 2023 at the conference.",
    "The meeting starts at 10:30 and ends at 12:45:30.",
    "I upgraded to Python 3.11.7 yesterday.",
    "Ray v2.60.0 fixed the scheduler bug.",
    "Bump the package to 1.2.3 and tag it.",
    "Windows build 10.0.19041 is still supported.",
    "Chrome 120.0.6099.109 renders it fine.",
    "The laptop costs $1,299.99 before tax.",
    "Lunch was €20 and coffee 3.50.",
    "Prices went up 12.5% this year, or 7% after discounts.",
    "Add 250 g of flour and 2 eggs, bake for 35 minutes at 180 degrees.",
    "In 1999 there were 6,000,000,000 people; by 2023 over 8 billion.",
    "Your order #123456 has shipped.",
    "Order number 987654321 is on its way.",
    "Mail it to Springfield, IL 62704 or Boston, MA 02134-1234.",
    "This 16-digit number fails the checksum: 4111111111111112.",
    "And so does 1234 5678 9012 3456 written in groups.",
    "Set the aspect ratio to 16:9 or 4:3.",
    "Everyone knows 2+2=4 and 10-3=7.",
    "Solve 3x + 5 = 20, so x = 5.",
    "The ISBN is 978-0-306-40615-7, or 0-306-40615-2 for the old edition.",
    "Room 1204 is on the 12th floor, building 3.",
    "The summit is at 27.9881, 86.9250 and the base at -33.8688, 151.2093.",
    "Coordinates 40.7128° N, 74.0060° W mark New York.",
    "The score was 3-1 and attendance 45,231.",
    "Run it with --workers 8 --batch-size 256 --lr 3e-4.",
    "Take 1.5 tablets every 8 hours for 10 days.",
    "The file is 2.3 GB and took 00:04:12 to copy.",
    "Flight BA 117 departs from gate 22 at 09:15.",
    "Page 42, section 3.2.1, footnote 7.",
    "Temperature range -40 to 85 degrees, 3.3V supply.",
    "Use slicing like x[::2] or y[1::3] in Python.",
    "C++ code calls std::vector and std::map::find.",
    "The model has 7,000,000,000 parameters and 32 layers.",
    "Call the function with timeout=30 and retries=3.",
    "Set max_tokens=4096 and token_limit: 2048 in the config.",
    "The password must be at least 12 characters long.",
    "Enter your token: it is on the back of the card.",
    "password: required, username: optional",
    "SSN-like but invalid: 000-12-3456, 666-12-3456 and 900-12-3456.",
    "Not an IP: 999.1.1.1 or 256.300.1.1, and 1.2.3 is a version.",
    "Not an IBAN: DE89 3704 0044 0532 0130 01 has a bad check digit.",
    "Email me at the usual address @ the office.",
    "Use the @decorator syntax, e.g. @pytest.fixture.",
    "Visit https://example.com:8080/path?q=1 for docs.",
    "The phone number field is 10 digits, like 12 34 5.",
    "Between 1990 and 2020 the number rose from 5,000 to 12,500.",
    "The hex color is #ff00aa and the MAC is 00:1A:2B:3C:4D:5E.",
    "Serial 12-345-678 and part number 4-5-6789.",
    "Batch sizes 256 512 1024 2048 and counts 300 400 5000.",
    "Serve on 127.0.0.1:8000 or bind 0.0.0.0, and ::1 for IPv6 loopback.",
    "token = tokenizer.encode(text)",
    "password = getpass.getpass()",
    "auth_token = request.headers.get('X-Token')",
    "secret=settings.SECRET_KEY and token=self.token",
    "api_key=os.environ['OPENAI_API_KEY'] or api_key=${API_KEY} or password=<your-password>",
    "Run pwd: /home/me/project, then git clone git@github.com:org/repo.git",
    "Rendez-vous le 15.01.2024 à 10h30, ou le 2024.01.16.",
    "ISBN 0306406152 and ISBN 0718050102 are paperbacks; order 0612345678 was split.",
    "Ticket 000123456 is closed and invoice 1234567890 is paid.",
    "Versions 01.02.03.04 and 1.02.3.4 are not addresses.",
    "Lottery numbers 04 10 32 24 and 01 02 03 04 05 06 came up.",
    "Use Bearer authentication: send the bearer token in the header.",
    "Authorization: Bearer <token>, Authorization: Bearer $API_TOKEN or Bearer YOUR_API_KEY.",
    "Your password is incorrect, and the password is case-sensitive.",
    "The password is required; the password was reset yesterday.",
    "pip install hf_transfer, then call hf_hub_download() with glpat-short.",
    "Commit de12ab34cd56ef7890ab12cd34ef56ab78cd90ef fixed it.",
    "Request de305d54-75b4-431b-adb2-eb6b9e546014 failed.",
    "Checksums fail for 4111 1111 1111 1112 and 4111.1111.1111.1112.",
    "Lowercase but invalid: de89 3704 0044 0532 0130 01.",
    "The Social Security Administration's number is on the letter.",
    "Prices 1.299,99 € and 2.499,00 € in the catalogue.",
]


@pytest.mark.parametrize("sentence", CLEAN)
def test_clean_text_is_untouched(sentence):
    assert scrub_text(sentence, PII_TYPES, {}) == (sentence, ZEROS)


def test_clean_set_is_big_enough():
    assert len(CLEAN) >= 40


def test_same_value_same_placeholder_across_turns():
    record = {
        "id": "t:2",
        "drop_reason": None,
        "messages": [
            {"role": "user", "content": "I am alice@example.com, my friend is bob@example.com."},
            {"role": "assistant", "content": "Noted: Alice@Example.com and bob@example.com."},
            {"role": "user", "content": "Also call 555-123-4567 or (555) 123-4567."},
        ],
    }
    [out] = scrub_records([record], PiiSpec(consistent=True))
    contents = [m["content"] for m in out["messages"]]
    assert contents[0] == "I am [EMAIL_1], my friend is [EMAIL_2]."
    assert contents[1] == "Noted: [EMAIL_1] and [EMAIL_2]."
    assert contents[2] == "Also call [PHONE_1] or [PHONE_1]."
    assert out["pii_counts"]["email"] == 4 and out["pii_counts"]["phone"] == 2


def test_numbering_restarts_per_conversation():
    rows = [
        {"id": f"t:{i}", "drop_reason": None, "messages": [{"role": "user", "content": f"mail {who}@example.com"}]}
        for i, who in enumerate(["ann", "ben"])
    ]
    out = scrub_records(rows, PiiSpec())
    assert [r["messages"][0]["content"] for r in out] == ["mail [EMAIL_1]", "mail [EMAIL_1]"]


def test_inconsistent_mode_uses_unnumbered_placeholders():
    record = {
        "id": "t:3",
        "drop_reason": None,
        "messages": [{"role": "user", "content": "a@example.com, b@example.com, a@example.com"}],
    }
    [out] = scrub_records([record], PiiSpec(consistent=False))
    assert out["messages"][0]["content"] == "[EMAIL], [EMAIL], [EMAIL]"
    assert scrub_text("ip 10.0.0.1", PII_TYPES, None)[0] == "ip [IP]"


def test_only_the_configured_types_are_scrubbed():
    text = "mail a@example.com or call 555-123-4567"
    out, counts = scrub_text(text, ["phone"], {})
    assert out == "mail a@example.com or call [PHONE_1]"
    assert counts == {**ZEROS, "phone": 1}


def test_overlaps_resolve_to_one_type():
    # credentials before emails; a card is not also a phone; a known key in an assignment is one secret
    assert find_pii("https://me:pw@mail.example.com")[0][2] == "url_credentials"
    assert [m[2] for m in find_pii("card 4111-1111-1111-1111")] == ["card"]
    out, counts = scrub_text(f"api_key={OPENAI_KEY}", PII_TYPES, {})
    assert out == "api_key=[SECRET_1]" and counts == {**ZEROS, "secret": 1}


def test_scrubbing_is_idempotent():
    text = " ".join(s for _, _, s in SEEDED)
    once, _ = scrub_text(text, PII_TYPES, {})
    assert scrub_text(once, PII_TYPES, {}) == (once, ZEROS)


def test_validators():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid("GB83WEST12345698765432")
    assert not iban_valid("GB82")
    assert ssn_valid("123-45-6789") and ssn_valid("123 45 6789") and ssn_valid("123456789")
    assert not ssn_valid("666-45-6789") and not ssn_valid("12345678")


def test_repaired_records_original_messages_are_scrubbed_with_the_same_placeholders():
    original = [
        {"role": "assistant", "content": "(cont.) mail me at carol@example.com"},
        {"role": "user", "content": "ok, carol@example.com it is; call 555-123-4567"},
        {"role": "assistant", "content": "Got it."},
    ]
    record = {
        "id": "r",
        "drop_reason": None,
        "messages": original[1:],
        "meta": json.dumps({"origin": "f#0", "original_messages": original}),
    }
    [out] = scrub_records([record], PiiSpec())
    meta = json.loads(out["meta"])
    assert meta["origin"] == "f#0"
    text = json.dumps(meta["original_messages"])
    assert "carol@example.com" not in text and "555-123-4567" not in text
    assert meta["original_messages"][0]["content"] == "(cont.) mail me at [EMAIL_1]"
    assert out["messages"][0]["content"].startswith("ok, [EMAIL_1] it is")
    assert out["pii_counts"]["email"] == 1  # the conversation's own replacements, not the copy's


def test_scrub_records_scrubs_kept_and_dropped_rows_and_fills_zeros():
    rows = [
        {"id": "a", "drop_reason": None, "messages": [{"role": "user", "content": "hi, I'm a@example.com"}]},
        {"id": "b", "drop_reason": "empty_turn", "messages": [{"role": "user", "content": "b@example.com"}]},
        {"id": "c", "drop_reason": None, "messages": [{"role": "user", "content": "no pii here"}]},
        {"id": "d", "drop_reason": "malformed:json", "messages": None, "raw": "{a@example.com"},
        {"id": "e", "drop_reason": None, "messages": [{"role": "user", "content": None}]},
    ]
    out = scrub_records([dict(r) for r in rows], PiiSpec())
    assert [r["id"] for r in out] == ["a", "b", "c", "d", "e"]
    assert out[0]["messages"][0]["content"] == "hi, I'm [EMAIL_1]"
    assert out[0]["pii_counts"] == {**ZEROS, "email": 1}
    # dropped rows go to dropped/ as well: their turns and raw text are scrubbed and counted like kept ones
    assert out[1]["messages"][0]["content"] == "[EMAIL_1]"
    assert out[1]["pii_counts"] == {**ZEROS, "email": 1}
    assert out[3]["raw"] == "{[EMAIL_1]"
    assert out[3]["pii_counts"] == {**ZEROS, "email": 1}
    assert out[2]["messages"] == rows[2]["messages"] and out[4]["messages"] == rows[4]["messages"]
    for row in out:
        assert list(row["pii_counts"]) == list(PII_TYPES)
    for row in (out[2], out[4]):
        assert row["pii_counts"] == ZEROS


def test_raw_json_text_is_scrubbed_through_its_escapes():
    # a record that could not be read keeps its JSON source; "\n" before a value must not hide it
    raw = '{"conversations": [{"from": "human", "value": "mail me:\\nbob@example.com\\n555-123-4567"}, {"from'
    [out] = scrub_records([{"id": "r", "drop_reason": "malformed:truncated", "messages": None, "raw": raw}], PiiSpec())
    assert out["raw"] == raw.replace("bob@example.com", "[EMAIL_1]").replace("555-123-4567", "[PHONE_1]")
    assert out["pii_counts"] == {**ZEROS, "email": 1, "phone": 1}


def test_meta_strings_are_scrubbed_except_origin():
    meta = {
        "origin": "/data/alice@example.com/chats.jsonl#3",
        "error": "turn 2 needs keys 'from' and 'value', has ['text'] (text: call 555-123-4567)",
        "prompt": "Talk to bob@example.com about the trip",
        "ratings": [5, 4],
        "extra": {"contacts": ["bob@example.com", "+44 20 7946 0958"], "n": 3},
    }
    record = {
        "id": "m",
        "drop_reason": "malformed:bad_turn",
        "messages": None,
        "raw": '{"id": 1, "messages": [{"text": "call 555-123-4567"}]}',
        "meta": json.dumps(meta),
    }
    [out] = scrub_records([record], PiiSpec())
    scrubbed = json.loads(out["meta"])
    assert scrubbed["origin"] == meta["origin"]  # file and line, kept so the row can be found
    assert scrubbed["error"].endswith("(text: call [PHONE_1])")  # the number raw holds, so the same placeholder
    assert scrubbed["prompt"] == "Talk to [EMAIL_1] about the trip"
    assert scrubbed["ratings"] == [5, 4]
    assert scrubbed["extra"] == {"contacts": ["[EMAIL_1]", "[PHONE_2]"], "n": 3}
    assert out["raw"] == '{"id": 1, "messages": [{"text": "call [PHONE_1]"}]}'
    # raw 1 phone; meta's own fields: 1 phone, 2 emails, 1 phone
    assert out["pii_counts"] == {**ZEROS, "phone": 3, "email": 2}


def test_meta_without_pii_is_left_byte_for_byte():
    for meta in ('{"origin": "f.jsonl#1"}', '{"origin":"f#2","title":"A quiet day","tags":["x"]}', "not json"):
        [out] = scrub_records(
            [{"id": "x", "drop_reason": None, "messages": [{"role": "user", "content": "hi"}], "meta": meta}],
            PiiSpec(),
        )
        assert out["meta"] is meta


def test_meta_that_is_not_json_is_scrubbed_as_text():
    [out] = scrub_records(
        [{"id": "x", "drop_reason": "malformed:x", "messages": None, "meta": "a@example.com"}], PiiSpec()
    )
    assert out["meta"] == "[EMAIL_1]"


def test_iban_cut_to_its_country_length():
    # the groups ran on into the next word; the match is cut back to Belgium's 16 characters
    assert find_pii("BE68 5390 0754 7034 thx")[0][:2] == (0, 19)
    assert iban_valid("be68-5390-0754-7034") and not iban_valid("BE68 5390 0754 7034 00")


def test_counts_fit_the_arrow_type():
    assert [f.name for f in PII_COUNTS_TYPE] == list(PII_TYPES)
    rows = [
        {"id": "a", "source": "s", "messages": [{"role": "user", "content": "x 8.8.8.8"}], "meta": "{}", "raw": None}
    ]
    out = scrub_records([{**r, "drop_reason": None} for r in rows], PiiSpec())
    table = records_to_table(out, with_columns(BASE_SCHEMA, {"pii_counts": PII_COUNTS_TYPE}))
    assert table.column("pii_counts").to_pylist() == [{**ZEROS, "ip": 1}]


# ---------------------------------------------------------------- the optional NER backend


@dataclass
class FakeResult:
    """The three attributes of Presidio's RecognizerResult that the backend reads."""

    entity_type: str
    start: int
    end: int
    score: float


class FakeAnalyzer:
    """Finds each of ``entities`` (text -> Presidio entity type) wherever it occurs, as a NER model would."""

    def __init__(self, entities: dict[str, str]):
        self.entities = entities
        self.calls = []

    def analyze(self, text, language, entities, score_threshold):
        self.calls.append((language, tuple(entities), score_threshold))
        return [
            FakeResult(kind, m.start(), m.end(), 0.85)
            for value, kind in self.entities.items()
            for m in re.finditer(re.escape(value), text)
        ]


NER_SPEC = PiiSpec(ner="presidio", ner_model="en_test_model", ner_score_threshold=0.4)


@pytest.fixture
def fake_presidio(monkeypatch):
    analyzer = FakeAnalyzer(
        {
            "Alice Smith": "PERSON",
            "alice smith": "PERSON",
            "12 Baker Street, London": "LOCATION",
            "12/03/1985": "DATE_TIME",
            "2024-01-15": "DATE_TIME",
            "alice@example.com": "PERSON",  # a model's mistake that the regexes must win over
        }
    )
    monkeypatch.setattr(pii, "_presidio_analyzer", lambda model: analyzer)
    monkeypatch.setattr(pii, "check_ner_backend", lambda spec: None)
    return analyzer


def test_ner_backend_replaces_names_places_and_dates_of_birth(fake_presidio):
    record = {
        "id": "n",
        "drop_reason": None,
        "messages": [
            {"role": "user", "content": "I'm Alice Smith, born on 12/03/1985, at 12 Baker Street, London."},
            {
                "role": "assistant",
                "content": "Thanks alice smith; your order of 2024-01-15 ships to alice@example.com.",
            },
        ],
    }
    [out] = scrub_records([record], NER_SPEC)
    assert [m["content"] for m in out["messages"]] == [
        "I'm [PERSON_1], born on [DATE_OF_BIRTH_1], at [LOCATION_1].",
        # the same name in another case is the same person; a date with no word of birth before it is just a date
        "Thanks [PERSON_1]; your order of 2024-01-15 ships to [EMAIL_1].",
    ]
    assert out["pii_counts"] == {
        **ZEROS,
        "email": 1,
        "person": 2,
        "location": 1,
        "date_of_birth": 1,
    }
    assert fake_presidio.calls[0] == ("en", ("PERSON", "LOCATION", "DATE_TIME"), 0.4)
    table = records_to_table([out], with_columns(BASE_SCHEMA, {"pii_counts": counts_type(NER_SPEC)}))
    assert table.column("pii_counts").to_pylist() == [out["pii_counts"]]


def test_ner_counts_are_only_added_when_the_backend_is_on():
    assert [f.name for f in counts_type(NER_SPEC)] == [*PII_TYPES, *NER_TYPES]
    assert counts_type(PiiSpec()) == PII_COUNTS_TYPE
    step_fn = PiiStep(PiiSpec()).record_fn()
    assert step_fn.adds["pii_counts"] == PII_COUNTS_TYPE


def test_missing_presidio_fails_in_the_driver_naming_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        pii.importlib.util, "find_spec", lambda name: None if name == "presidio_analyzer" else real_find_spec(name)
    )
    with pytest.raises(PiiBackendError, match="pip install presidio-analyzer"):
        PiiStep(NER_SPEC).record_fn()
    PiiStep(PiiSpec()).record_fn()  # off by default: nothing to install


def test_missing_spacy_model_fails_naming_the_model(monkeypatch, tmp_path):
    present = {"presidio_analyzer"}
    monkeypatch.setattr(pii.importlib.util, "find_spec", lambda name: object() if name in present else None)
    with pytest.raises(PiiBackendError, match=r"pii.ner_model = 'en_test_model'.*spacy download"):
        check_ner_backend(NER_SPEC)
    check_ner_backend(PiiSpec(ner="presidio", ner_model=str(tmp_path)))  # a local model directory will do
    present.add("en_test_model")
    check_ner_backend(NER_SPEC)  # an installed model package


@pytest.mark.slow
def test_presidio_over_a_blank_spacy_pipeline(tmp_path):
    """The real wiring, offline: spaCy's models are not on PyPI, so a blank pipeline (no NER: no names or places);
    Presidio's own date patterns still run, so a date of birth is found and an ordinary date is not."""
    pytest.importorskip("presidio_analyzer")
    spacy = pytest.importorskip("spacy")
    spacy.blank("en").to_disk(tmp_path / "blank_en")
    spec = PiiSpec(ner="presidio", ner_model=str(tmp_path / "blank_en"))
    PiiStep(spec).record_fn()
    record = {
        "id": "p",
        "drop_reason": None,
        "messages": [{"role": "user", "content": "I was born on 12/03/1985; the release is on 2024-01-15."}],
    }
    [out] = scrub_records([record], spec)
    assert out["messages"][0]["content"] == "I was born on [DATE_OF_BIRTH_1]; the release is on 2024-01-15."
    assert out["pii_counts"]["date_of_birth"] == 1


@pytest.mark.parametrize(
    ("before", "of_birth"),
    [
        ("I was born on ", True),
        ("DOB: ", True),
        ("D.O.B. ", True),
        ("Date of birth: ", True),
        ("my birthday is ", True),
        ("I was born on 12/03/1985; the release is on ", False),
        ("born in Leeds. The release is on ", False),
        ("The release is on ", False),
    ],
)
def test_a_date_is_a_date_of_birth_only_after_a_word_of_birth_in_its_clause(before, of_birth):
    assert pii._after_birth_word(before + "2024-01-15", len(before)) is of_birth
