"""Tests written to kill surviving mutants of agent/protocols/stxetx.py (bench/mutation.sh).

Each test names the promise it guards; the mutants it was written for are listed in the README's
Tests section.
"""

from __future__ import annotations

from agent.protocols.stxetx import ETX, STX, Frame, FrameDecoder, Nak, encode_frame, lrc


def test_an_lrc_that_differs_only_in_the_high_bit_is_a_nak() -> None:
    """The check is on all 8 bits: a 7-bit comparison would take a corrupted frame as good."""
    payload = b'{"a":1}'
    good = encode_frame(payload)
    assert FrameDecoder().feed(good) == [Frame(payload)]
    assert FrameDecoder().feed(good[:-1] + bytes([good[-1] ^ 0x80])) == [Nak("bad LRC")]


def test_lrc_is_the_xor_of_every_payload_byte_and_etx() -> None:
    """The folding shortcut agrees with the definition for every length around the fold boundaries."""
    for n in range(0, 40):
        payload = bytes((37 * i + 11) % 0x5F + 0x20 for i in range(n))
        expected = ETX
        for b in payload:
            expected ^= b
        assert lrc(payload) == expected, n
    assert encode_frame(b"x")[0] == STX


def test_after_reset_junk_before_the_next_frame_is_one_nak_then_the_frame_decodes() -> None:
    """`reset()` goes back to the idle state itself, not just "not in a frame": bytes that do not
    frame right after it are NAKed once, and the next frame still decodes."""
    decoder = FrameDecoder()
    assert decoder.feed(b"\x02{\"cut") == []
    decoder.reset()
    assert not decoder.in_frame
    assert decoder.feed(b"off\"}\x03" + encode_frame(b'{"a":1}')) == [Nak("bytes outside a frame"), Frame(b'{"a":1}')]
