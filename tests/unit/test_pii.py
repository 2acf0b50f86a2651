"""PII scrubbing: every seeded value is found and replaced, ordinary numbers are left alone, rows are accounted."""

from __future__ import annotations

import json

import pytest

from chatforge.config import PII_TYPES, PiiSpec
from chatforge.data.pii import LABELS, PII_COUNTS_TYPE, find_pii, iban_valid, luhn_valid, scrub_records, scrub_text
from chatforge.data.schema import BASE_SCHEMA, records_to_table, with_columns

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


def test_scrub_records_keeps_rows_skips_dropped_and_fills_zeros():
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
    assert out[1]["messages"][0]["content"] == "b@example.com"
    assert out[3]["raw"] == "{a@example.com"
    for row in out[1:]:
        assert row["pii_counts"] == ZEROS
        assert list(row["pii_counts"]) == list(PII_TYPES)


def test_counts_fit_the_arrow_type():
    assert [f.name for f in PII_COUNTS_TYPE] == list(PII_TYPES)
    rows = [
        {"id": "a", "source": "s", "messages": [{"role": "user", "content": "x 8.8.8.8"}], "meta": "{}", "raw": None}
    ]
    out = scrub_records([{**r, "drop_reason": None} for r in rows], PiiSpec())
    table = records_to_table(out, with_columns(BASE_SCHEMA, {"pii_counts": PII_COUNTS_TYPE}))
    assert table.column("pii_counts").to_pylist() == [{**ZEROS, "ip": 1}]
