"""The command channel's pure rules: the canonical signed form, the check order, hostile payloads.

Real Ed25519 keys (cryptography), no broker: each refusal code in its place in the order.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.commands import rules
from agent.commands.signature import Keys
from tests.support.commander import sign

NOW = datetime(2026, 12, 8, 1, 0, tzinfo=UTC)
FUTURE = "2026-12-08T02:00:00Z"
PAST = "2026-12-08T00:59:59.999Z"
KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
KEYS = Keys({"ops": base64.b64encode(KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()})
DEFAULT = rules.Policy(None, frozenset({"update_config", "update_agent", "erase_subject"}))


def run(name: str, msg: dict | bytes, policy: rules.Policy = DEFAULT) -> rules.Refusal | rules.Args:
    payload = msg if isinstance(msg, bytes) else json.dumps(msg, ensure_ascii=False).encode()
    return rules.check(name, rules.read(payload), policy, KEYS.verify, NOW)


def code(result: rules.Refusal | rules.Args) -> str:
    return result.code if isinstance(result, rules.Refusal) else "ok"


def test_canonical_form_is_the_contracts_bytes_with_non_ascii_args():
    msg = {"id": "c-1", "expires": FUTURE, "args": {"member_id": "会员-Ω-7", "token": "tök"}}
    assert (
        rules.canonical("erase_subject", msg)
        == (
            '{"args":{"member_id":"会员-Ω-7","token":"tök"},"expires":"2026-12-08T02:00:00Z",'
            '"id":"c-1","name":"erase_subject"}'
        ).encode()
    )
    # a missing args is {} and a missing expires null
    assert rules.canonical("status", {"id": "x"}) == b'{"args":{},"expires":null,"id":"x","name":"status"}'


def test_signed_non_ascii_command_verifies_and_any_change_does_not():
    msg = sign(KEY, "ops", "erase_subject", {"id": "c-2", "expires": FUTURE, "args": {"member_id": "会员Ω"}})
    assert isinstance(run("erase_subject", msg), rules.EraseSubjectArgs)
    tampered = {**msg, "args": {"member_id": "会员Ω "}}
    assert code(run("erase_subject", tampered)) == "forbidden"
    # the signature covers the name: the same body on another command's topic does not verify
    pol = rules.Policy(None, frozenset({"erase_subject", "set_log_level"}))
    assert code(run("set_log_level", {**msg, "args": {"level": "debug"}}, pol)) == "forbidden"


@pytest.mark.parametrize(
    "sig",
    [
        None,  # missing
        "AAAA",  # not an object
        {"key": "ops"},  # no value
        {"key": "ops", "value": "!!!not base64!!!"},  # bad base64
        {"key": "ops", "value": base64.b64encode(b"short").decode()},  # not 64 bytes
        {"key": "ops", "value": "QUJD" * 22, "extra": 1},  # unknown key in sig
        {"key": 7, "value": "QUJD"},  # wrong type
    ],
)
def test_missing_or_malformed_sig_is_forbidden(sig):
    msg = {"id": "c-3", "expires": FUTURE, "args": {"token": "t"}}
    if sig is not None:
        msg["sig"] = sig
    assert code(run("erase_subject", msg)) == "forbidden"


def test_wrong_key_and_unknown_key_id_are_forbidden():
    body = {"id": "c-4", "expires": FUTURE, "args": {"token": "t"}}
    assert code(run("erase_subject", sign(OTHER, "ops", "erase_subject", body))) == "forbidden"
    assert code(run("erase_subject", sign(KEY, "nobody", "erase_subject", body))) == "forbidden"


def test_signed_command_without_expires_is_expired_even_with_a_good_signature():
    msg = sign(KEY, "ops", "erase_subject", {"id": "c-5", "args": {"token": "t"}})
    assert code(run("erase_subject", msg)) == "expired"
    past = sign(KEY, "ops", "erase_subject", {"id": "c-6", "expires": PAST, "args": {"token": "t"}})
    assert code(run("erase_subject", past)) == "expired"


def test_check_order_each_code_before_the_next():
    # unknown_command before everything: even an unreadable payload on an unknown name
    assert code(run("set_label", b"\xff not json")) == "unknown_command"
    assert code(run("update_config", {"id": "x"})) == "unknown_command"  # not built by this agent
    # forbidden (not in allow) before expired and invalid_args
    only_status = rules.Policy(frozenset({"status"}), frozenset())
    assert code(run("drain", {"id": "x", "expires": PAST, "args": {"bad": 1}}, only_status)) == "forbidden"
    # forbidden (no signature) before expired and invalid_args
    assert code(run("erase_subject", {"id": "x", "expires": PAST, "args": {}})) == "forbidden"
    # expired before invalid_args
    assert code(run("set_log_level", {"id": "x", "expires": PAST, "args": {"level": "loud"}})) == "expired"
    assert (
        code(run("set_log_level", {"id": "x", "expires": FUTURE, "args": {"level": "loud"}}))
        == "invalid_args"
    )
    assert code(run("set_log_level", {"id": "x", "expires": FUTURE, "args": {"level": "debug"}})) == "ok"
    # erase_subject without a required signature, when the policy does not require one
    assert (
        code(run("erase_subject", {"id": "x", "args": {}}, rules.Policy(None, frozenset()))) == "invalid_args"
    )


@pytest.mark.parametrize(
    ("name", "msg"),
    [
        ("set_log_level", {"id": "x", "args": {"level": 3}}),  # wrong type
        ("set_log_level", {"id": "x", "args": {"level": "info", "extra": True}}),  # unknown key in args
        ("status", {"id": "x", "args": {"verbose": True}}),
        ("status", {"id": "x", "args": []}),  # args not an object
        ("status", {"id": "x", "argz": {}}),  # unknown top-level key
        ("status", {"id": "x", "expires": "tomorrow"}),  # expires not RFC 3339
        ("status", {"id": "x", "expires": 1765155600}),
        ("diagnostics", {"id": "x", "args": {"log_lines": 5001}}),
        ("diagnostics", {"id": "x", "args": {"log_lines": "10"}}),
        ("diagnostics", {"id": "x", "args": {"log_lines": True}}),
    ],
)
def test_wrong_args_are_invalid_args(name, msg):
    assert code(run(name, msg)) == "invalid_args"


def test_hostile_payloads_are_read_without_raising():
    # 10 MB with a readable id in its head: answered invalid_args, never parsed whole
    big = b'{"id": "big-1", "args": {"pad": "' + b"x" * (10 << 20) + b'"}}'
    inc = rules.read(big)
    assert inc.id == "big-1" and inc.msg is None and "over" in (inc.problem or "")
    assert code(rules.check("status", inc, DEFAULT, KEYS.verify, NOW)) == "invalid_args"
    # deep nesting: refused before the parser recurses
    deep = b'{"id": "deep-1", "args": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    inc = rules.read(deep)
    assert inc.id == "deep-1" and inc.msg is None
    # not JSON and no id: nothing to answer
    assert rules.read(b"\x00\x01garbage").id is None
    assert rules.read(b"[1, 2]").id is None
    assert rules.read(b'{"id": 12}').id is None
    assert rules.read(b'{"id": "' + b"x" * 200 + b'"}').id is None
    # truncated JSON with a readable id
    assert rules.read(b'{"id": "cut-1", "args": {"level": "de').id == "cut-1"


def test_diagnostics_default_and_bounds():
    assert run("diagnostics", {"id": "x"}) == rules.DiagnosticsArgs(log_lines=500)
    assert run("diagnostics", {"id": "x", "args": {"log_lines": 5000}}) == rules.DiagnosticsArgs(
        log_lines=5000
    )
