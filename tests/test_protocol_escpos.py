"""ESC/POS receipt tap (contract section 4.2), agent/protocols/escpos.py."""

from __future__ import annotations

import codecs

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocols.escpos import (
    _CODE_PAGES,
    EscposError,
    Receipt,
    ReceiptParser,
    decode_escpos,
    extract_fields,
    extract_receipts,
)

ESC, GS, FS, DLE = b"\x1b", b"\x1d", b"\x1c", b"\x10"
CUT = GS + b"V\x00"


def lines_of(data: bytes, encoding: str = "gb18030") -> list[list[str]]:
    return [r.lines for r in extract_receipts(data, encoding)]


# --- builders for a realistic stream ----------------------------------------------------------


def raster(width_bytes: int, height: int) -> bytes:
    """GS v 0 raster image whose dot data is full of bytes that look like commands and text."""
    pattern = b"\n\x1b\x1dV\x00Z\r\x1c&\xb0\xa1"
    data = (pattern * (width_bytes * height // len(pattern) + 1))[: width_bytes * height]
    return GS + b"v0\x00" + width_bytes.to_bytes(2, "little") + height.to_bytes(2, "little") + data


def qr(payload: bytes) -> bytes:
    """GS ( k QR sequence as Epson documents it (model, size, level, store, print)."""
    store = b"1P0" + payload
    return (
        GS + b"(k\x04\x001A2\x00"
        + GS + b"(k\x03\x001C\x06"
        + GS + b"(k\x03\x001E1"
        + GS + b"(k" + len(store).to_bytes(2, "little") + store
        + GS + b"(k\x03\x001Q0"
    )  # fmt: skip


def gb(text: str) -> bytes:
    return text.encode("gb18030")


SHOP_RECEIPT = (
    ESC + b"@"
    + DLE + b"\x04\x01"  # the POS polls printer status between receipts
    + ESC + b"a\x01"
    + raster(48, 24)  # store logo
    + GS + b"!\x11" + gb("某某便利店") + b"\n"
    + GS + b"!\x00" + gb("上海市徐汇区漕溪北路88号") + b"\n"
    + gb("电话: 021-5555 0123") + b"\r\n"
    + ESC + b"a\x00"
    + b"-" * 32 + b"\n"
    + gb("收银员: 张三        机号: R1") + b"\n"
    + gb("单号: R1-000123") + b"\n"
    + b"2026-11-23 16:15:02\n"
    + b"-" * 32 + b"\n"
    + gb("农夫山泉550ml     2   2.00   4.00") + b"\n"
    + gb("康师傅红烧牛肉面   1   4.50   4.50") + b"     \n"  # trailing spaces
    + b"\n"  # a blank line is kept
    + ESC + b"E\x01" + gb("合计:") + b"\t" + b"8.50" + ESC + b"E\x00" + b"\n"
    + FS + b"." + ESC + b"t\x10" + b"EUR 1.05 \x80\n" + FS + b"&"  # cp1252 euro sign outside Chinese mode
    + gb("会员号: 13800138000") + b"\n"
    + gb("优惠券: CPN-2026-AB12") + b"\n"
    + gb("优惠券: CPN-2026-CD34") + b"\n"
    + ESC + b"d\x02"  # feed: no blank lines
    + ESC + b"a\x01"
    + GS + b"h\x50" + GS + b"w\x02" + GS + b"H\x02" + GS + b"f\x00"
    + GS + b"k\x02" + b"6901234567892\x00"  # EAN-13, NUL-terminated form
    + GS + b"kI\x0c{BR1-000123\n\r"  # Code 128, length-prefixed form; data holds LF and CR
    + qr(b"https://e.example.com/r/R1-000123\n")
    + ESC + b"J\x40"
    + ESC + b"p\x00\x19\xfa"  # open the cash drawer
    + GS + b"VB\x00"  # feed and cut
    + ESC + b"@" + FS + b"&" + gb("交班小票") + b"\n" + b"\n\n\n" + GS + b"V\x01"
    + GS + b"V\x00"  # a cut with nothing printed: no receipt
)  # fmt: skip

SHOP_LINES = [
    "某某便利店",
    "上海市徐汇区漕溪北路88号",
    "电话: 021-5555 0123",
    "-" * 32,
    "收银员: 张三        机号: R1",
    "单号: R1-000123",
    "2026-11-23 16:15:02",
    "-" * 32,
    "农夫山泉550ml     2   2.00   4.00",
    "康师傅红烧牛肉面   1   4.50   4.50",
    "",
    "合计:\t8.50",
    "EUR 1.05 €",
    "会员号: 13800138000",
    "优惠券: CPN-2026-AB12",
    "优惠券: CPN-2026-CD34",
]


def test_realistic_gb18030_receipt():
    # Built to Epson's ESC/POS reference: raster logo (GS v 0), both GS k forms, a GS ( k QR,
    # the drawer pulse and GS V 66; image and barcode data hold bytes that look like LF, ESC,
    # GS V and GB18030 text, and must not leak.
    assert lines_of(SHOP_RECEIPT) == [SHOP_LINES, ["交班小票", "", "", ""]]


def test_decode_escpos_shape():
    assert decode_escpos(SHOP_RECEIPT, "gb18030")["receipts"][1] == {"lines": ["交班小票", "", "", ""]}


def test_byte_by_byte_is_the_same_as_whole():
    parser = ReceiptParser("gb18030")
    got: list[Receipt] = []
    for k in range(len(SHOP_RECEIPT)):
        got += parser.feed(SHOP_RECEIPT[k : k + 1])
    got += parser.flush()
    assert [r.lines for r in got] == [SHOP_LINES, ["交班小票", "", "", ""]]


@settings(max_examples=60)
@given(st.lists(st.integers(0, len(SHOP_RECEIPT)), max_size=12))
def test_any_chunking_is_the_same_as_whole(cuts):
    bounds = [0, *sorted(cuts), len(SHOP_RECEIPT)]
    parser = ReceiptParser()
    got = [r for a, b in zip(bounds, bounds[1:], strict=False) for r in parser.feed(SHOP_RECEIPT[a:b])]
    got += parser.flush()
    assert [r.lines for r in got] == [SHOP_LINES, ["交班小票", "", "", ""]]


def test_receipts_come_out_at_their_cut():
    parser = ReceiptParser()
    cut_at = SHOP_RECEIPT.index(GS + b"VB\x00") + 4
    first = parser.feed(SHOP_RECEIPT[:cut_at])
    assert [r.lines for r in first] == [SHOP_LINES]
    assert [r.lines for r in parser.feed(SHOP_RECEIPT[cut_at:])] == [["交班小票", "", "", ""]]
    assert parser.flush() == []


# --- real captures: escpos-php's expected printer output ---------------------------------------
# Source: github.com/mike42/escpos-php test/unit/EscposTest.php (checkOutput strings).


def test_escpos_php_chinese_text():
    # testTextChinese: "示例文本打印机!" in GBK between FS & and FS .
    data = b"\x1b@\x1c&\xca\xbe\xc0\xfd\xce\xc4\xb1\xbe\xb4\xf2\xd3\xa1\xbb\xfa!\x0a\x1c."
    assert lines_of(data) == [["示例文本打印机!"]]


def test_escpos_php_text_and_cut():
    # testTextStringOutput followed by testCutDefault's GS V A 3.
    data = b"\x1b@The quick brown fox jumps over the lazy dog\n" + b"\x1dVA\x03"
    assert lines_of(data, "cp437") == [["The quick brown fox jumps over the lazy dog"]]


ESCPOS_PHP_COMMANDS = {
    "feed3": b"\x1bd\x03",
    "select_print_mode": b"\x1b!\x00",
    "underline": b"\x1b-\x02",
    "emphasis": b"\x1bE\x01",
    "double_strike": b"\x1bG\x01",
    "font_c": b"\x1bM\x02",
    "justify_right": b"\x1ba\x02",
    "feed_reverse": b"\x1be\x03",
    "barcode_height": b"\x1dh\x0a",
    "barcode_width": b"\x1dw\x03",
    "barcode_text_position": b"\x1dH\x03",
    "barcode_upca": b"\x1dkA\x0c012345678901",
    "barcode_upce": b"\x1dkB\x0b01234567890",
    "barcode_jan13": b"\x1dkC\x0d0123456789012",
    "barcode_code39": b"\x1dkE\x07ABC 012",
    "barcode_itf": b"\x1dkF\x041234",
    "barcode_codabar": b"\x1dkG\x0bA012$+-./:A",
    "barcode_code93": b"\x1dkH\x07012abcd",
    "barcode_code128_c": b"\x1dkI\x05{C\x15 +",  # data holds a control byte and a space
    "pulse": b"\x1bp0<x",
    "reverse_colors": b"\x1dB\x01",
    "bit_image_raster": b"\x1dv0\x00\x01\x00\x02\x00\xc0\x00",
    "graphics": b"\x1d(L\x0c\x000p0\x01\x011\x02\x00\x02\x00\xc0\x00\x1d(L\x02\x0002",
    "qr_code": b"\x1d(k\x04\x001A2\x00\x1d(k\x03\x001C\x03\x1d(k\x03\x001E0\x1d(k\x07\x001P01234\x1d(k\x03\x001Q0",
    "text_size": b"\x1d!3",
    "color": b"\x1br\x01",
    "print_width": b"\x1dW\x90\x01",
    "left_margin": b"\x1dL\x00\x00",
    "feed_form": b"\x0c",
}


@pytest.mark.parametrize("name", sorted(ESCPOS_PHP_COMMANDS))
def test_escpos_php_commands_print_no_text(name):
    data = b"\x1b@before\n" + ESCPOS_PHP_COMMANDS[name] + b"after\n" + CUT
    assert lines_of(data, "cp437") == [["before", "after"]]


def test_a_line_holding_only_a_bit_image_is_an_empty_line():
    # testBitImageColumnFormatBoth: ESC 3, ESC * 33 with two columns, LF, ESC 2. The LF ends the
    # image's line on paper: the receipt has that line, empty of text (contract 4.2: each LF ends
    # a line; blank lines are kept as "").
    image = b"\x1b3\x10\x1b*!\x02\x00\x80\x00\x00\x80\x00\x00\x0a\x1b2"
    assert lines_of(b"\x1b@top\n" + image + b"\nbottom\n" + CUT, "cp437") == [["top", "", "", "bottom"]]
    # the image next to text on one line prints that text, once
    assert lines_of(b"\x1b@\x1b*\x00\x01\x00\xffLOGO\n" + CUT, "cp437") == [["LOGO"]]


# --- the command table, one command at a time --------------------------------------------------
# Payload bytes are "Z\n": a command measured too short leaks Z lines, too long eats "after".

FILL = b"Z\n"


def fill(k: int) -> bytes:
    return (FILL * (k // 2 + 1))[:k]


COMMANDS = {
    "ESC SP": ESC + b" Z",
    "ESC $": ESC + b"$ZZ",
    "ESC %": ESC + b"%Z",
    "ESC & 2 chars": ESC + b"&\x03AB" + b"\x02" + fill(6) + b"\x01" + fill(3),
    "ESC ( A beep": ESC + b"(A\x04\x000Z\x03\x02",
    "ESC * 8-dot": ESC + b"*\x00\x05\x00" + fill(5),  # printed with "after"'s LF
    "ESC * 24-dot": ESC + b"*!\x03\x00" + fill(9),
    "ESC 2 / 3": ESC + b"2" + ESC + b"3Z",
    "ESC =": ESC + b"=Z",
    "ESC ?": ESC + b"?Z",
    "ESC D tabs": ESC + b"D\x08\x10\x18\x00",
    "ESC D 32 tabs": ESC + b"D" + bytes(range(1, 33)),
    "ESC L / W / T / S": ESC + b"L" + ESC + b"WZZZZZZZZ" + ESC + b"TZ" + ESC + b"S",
    "ESC FF": ESC + b"\x0c",
    "ESC R": ESC + b"RZ",
    "ESC U / V / {": ESC + b"UZ" + ESC + b"VZ" + ESC + b"{Z",
    "ESC \\": ESC + b"\\ZZ",
    "ESC c 3/4/5": ESC + b"c3Z" + ESC + b"c4Z" + ESC + b"c5Z",
    "ESC u / v": ESC + b"uZ" + ESC + b"v",
    "ESC <": ESC + b"<",
    "GS $ / GS \\": GS + b"$ZZ" + GS + b"\\ZZ",
    "GS ( A test print": GS + b"(A\x02\x00ZZ",
    "GS ( E config": GS + b"(E\x03\x00" + fill(3),
    "GS ( L store": GS + b"(L\x0b\x000p0\x01\x011\x01\x00\x01\x00" + b"\n",
    "GS 8 L": GS + b"8L\x0c\x00\x00\x000p0\x01\x011\x02\x00\x02\x00" + fill(2),
    "GS *": GS + b"*\x01\x01" + fill(8),
    "GS / print downloaded": GS + b"/Z",
    "GS : macro": GS + b":" + GS + b":",
    "GS C 0/1/2": GS + b"C0ZZ" + GS + b"C1ZZZZZZ" + GS + b"C2ZZ",
    "GS C ;": GS + b"C;1;9;1;1;0;",
    "GS D BMP": GS + b"D0C0ZZ01" + b"BM" + (14).to_bytes(4, "little") + fill(8),
    "GS E / GS I / GS T": GS + b"EZ" + GS + b"IZ" + GS + b"TZ",
    "GS P": GS + b"PZZ",
    "GS Q 0": GS + b"Q0\x00\x03\x00\x0a\x00" + fill(6),  # 3 columns of 10 dots: 2 bytes each
    "GS ^ macro run": GS + b"^ZZZ",
    "GS a / b / j / r": GS + b"aZ" + GS + b"bZ" + GS + b"jZ" + GS + b"rZ",
    "GS c": GS + b"c",
    "GS g 0 / 2": GS + b"g0\x00ZZ" + GS + b"g2\x00ZZ",
    "GS z 0": GS + b"z0ZZ",
    "GS k NUL form": GS + b"k\x04*CODE39*\x00",
    "GS k length form": GS + b"kI\x06" + fill(6),
    "GS v 0": GS + b"v0\x00\x02\x00\x03\x00" + fill(6),
    "FS ! / - / W / C": FS + b"!Z" + FS + b"-Z" + FS + b"WZ" + FS + b"CZ",
    "FS 2 user Kanji": FS + b"2\xfe\xa1" + fill(72),
    "FS ?": FS + b"?\xfe\xa1",
    "FS S": FS + b"SZZ",
    "FS p NV image": FS + b"p\x01Z",
    "FS q two NV images": FS + b"q\x02" + b"\x01\x00\x01\x00" + fill(8) + b"\x01\x00\x02\x00" + fill(16),
    "FS ( A": FS + b"(A\x02\x000Z",
    "FS g 1 write": FS + b"g1\x00\x00\x00\x00\x00\x03\x00" + fill(3),
    "FS g 2 read": FS + b"g2\x00\x00\x00\x00\x00ZZ",
    "DLE EOT 1": DLE + b"\x04\x01",
    "DLE EOT 7 a": DLE + b"\x04\x07\x01",
    "DLE ENQ": DLE + b"\x05\x02",
    "DLE DC4 1 pulse": DLE + b"\x14\x01\x00\x05",
    "DLE DC4 2 power off": DLE + b"\x14\x02\x01\x08",
    "DLE DC4 7": DLE + b"\x14\x07\x01",
    "DLE DC4 8 clear": DLE + b"\x14\x08\x01\x03\x14\x01\x06\x02\x08",
    "CAN / CR / NUL": b"\x18\x0d\x00",
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_prints_no_text(name):
    data = ESC + b"@before\n" + COMMANDS[name] + b"after\n" + CUT
    assert lines_of(data, "cp437") == [["before", "after"]]


@pytest.mark.parametrize(
    "cut",
    [GS + b"V\x00", GS + b"V\x01", GS + b"V0", GS + b"V1", GS + b"VAZ", GS + b"VBZ", GS + b"VaZ", GS + b"VgZ"]
    + [ESC + b"i", ESC + b"m"],
)
def test_every_cut_form_ends_a_receipt(cut):
    # GS V m: m 0/1/48/49 take no n; 65/66/97/98/103/104 take n ("Z" here, which must not print).
    assert lines_of(b"one\n" + cut + b"two\n" + CUT, "cp437") == [["one"], ["two"]]


# --- text rules ----------------------------------------------------------------------------------


def test_feeds_end_the_line_but_add_no_lines():
    data = b"a" + ESC + b"d\x05" + b"b" + ESC + b"J\x60" + b"c\n\nd\n" + CUT
    assert lines_of(data, "cp437") == [["a", "b", "c", "", "d"]]


def test_trailing_whitespace_stripped_leading_kept():
    assert lines_of(b"  x  \t \n" + CUT, "cp437") == [["  x"]]


def test_cut_without_text_makes_no_receipt():
    assert lines_of(CUT + b"\n\n" + CUT + ESC + b"d\x03" + CUT, "cp437") == []


def test_text_without_lf_before_cut_is_the_last_line():
    assert lines_of(b"a\nb" + CUT, "cp437") == [["a", "b"]]


def test_flush_returns_the_uncut_tail():
    parser = ReceiptParser("cp437")
    assert parser.feed(b"a\nb") == []
    assert [r.lines for r in parser.flush()] == [["a", "b"]]
    assert parser.flush() == []


def test_initialize_drops_the_unfinished_line_and_resets_code_page():
    data = ESC + b"t\x10" + b"\x80 dropped" + ESC + b"@" + b"\x80\n" + CUT
    assert lines_of(data, "cp437") == [["Ç"]]  # 0x80 back in PC437


def test_code_page_switch_applies_to_following_text():
    data = b"\x9c" + ESC + b"t\x10" + b"\x9c" + ESC + b"t\x11" + b"\x9c\n" + CUT
    assert lines_of(data, "cp437") == [["£œЬ"]]  # PC437, WPC1252, PC866


def test_chinese_mode_off_uses_single_byte_page():
    data = FS + b"." + b"\xb0\xa1" + FS + b"&" + b"\xb0\xa1\n" + CUT
    assert lines_of(data) == [["░í啊"]]  # PC437 box drawing, then GB18030 "啊"


def test_single_byte_encoding_switches_to_gb18030_in_chinese_mode():
    data = b"\xe9" + FS + b"&" + b"\xb0\xa1" + FS + b"." + b"\xe9\n" + CUT
    assert lines_of(data, "cp1252") == [["é啊é"]]


def test_gb18030_four_byte_characters():
    text = "€ 𠀀 ㊣"
    assert lines_of(text.encode("gb18030") + b"\n" + CUT) == [[text]]


def test_utf8_printers():
    assert lines_of("收据 ✓\n".encode() + CUT, "utf-8") == [["收据 ✓"]]


def test_unknown_commands_skip_two_bytes():
    assert lines_of(ESC + b"\x01x" + GS + b"\x02y" + FS + b"\x03z\n" + CUT, "cp437") == [["xyz"]]


def test_every_code_page_has_a_codec():
    for name in _CODE_PAGES.values():
        codecs.lookup(name)


@pytest.mark.parametrize("encoding", ["no-such-codec", "utf-16", "cp500"])
def test_bad_encoding(encoding):
    with pytest.raises(EscposError):
        ReceiptParser(encoding)


def test_huge_image_streams_without_buffering():
    parser = ReceiptParser("cp437")
    width, height = 1000, 1000  # 1 MB of dots
    assert (
        parser.feed(b"top\n" + GS + b"v0\x00" + width.to_bytes(2, "little") + height.to_bytes(2, "little"))
        == []
    )
    chunk = b"\n\x1dV\x00" * 1024
    for _ in range(width * height // len(chunk)):
        assert parser.feed(chunk) == []
        assert len(parser._buf) == 0  # skipped as it streams, never held
    rest = width * height % len(chunk)
    assert [r.lines for r in parser.feed(chunk[:rest] + b"bottom\n" + CUT)] == [["top", "bottom"]]


# --- fields ----------------------------------------------------------------------------------------

PATTERNS = {
    "total": r"^合计:\s*(\d+\.\d{2})$",
    "member_id": r"会员号:\s*(?P<value>\d+)",
    "coupons": r"优惠券:\s*(\S+)",
    "items": r"^(?P<name>\S+)\s+(?P<qty>\d+)\s+(?P<unit_price>\d+\.\d{2})\s+(?P<amount>\d+\.\d{2})$",
}


def test_extract_fields_from_the_receipt():
    fields = extract_fields(SHOP_LINES, PATTERNS)
    assert fields == {
        "total": "8.50",
        "member_id": "13800138000",
        "coupons": ["CPN-2026-AB12", "CPN-2026-CD34"],
        "items": [
            {"name": "农夫山泉550ml", "qty": "2", "unit_price": "2.00", "amount": "4.00"},
            {"name": "康师傅红烧牛肉面", "qty": "1", "unit_price": "4.50", "amount": "4.50"},
        ],
    }


def test_extract_fields_without_matches():
    assert extract_fields(["hello"], PATTERNS) == {
        "total": None,
        "member_id": None,
        "coupons": [],
        "items": [],
    }
    assert extract_fields(["TOTAL 3.00"], {"total": r"TOTAL [\d.]+"}) == {"total": "TOTAL 3.00"}
    assert extract_fields(["x"], {}) == {}


def test_extract_fields_bad_regex():
    with pytest.raises(EscposError, match="total"):
        extract_fields(["x"], {"total": "("})


# --- properties ------------------------------------------------------------------------------------


@given(st.binary(max_size=400), st.sampled_from(["gb18030", "cp437", "utf-8", "big5"]))
def test_random_bytes_never_raise(data, encoding):
    for receipt in extract_receipts(data, encoding):
        assert receipt.lines and any(receipt.lines)
        assert all(isinstance(line, str) and line == line.rstrip() for line in receipt.lines)


COMMANDISH = st.lists(
    st.one_of(
        st.binary(max_size=8),
        st.sampled_from([ESC, GS, FS, DLE, b"\n", b"\x00", CUT, FS + b"&", FS + b".", ESC + b"t"]),
    ),
    max_size=60,
).map(b"".join)


@given(COMMANDISH, st.lists(st.integers(0, 500), max_size=10))
def test_chunking_never_changes_the_result(data, cuts):
    whole = lines_of(data)
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    parser = ReceiptParser()
    got = [r for a, b in zip(bounds, bounds[1:], strict=False) for r in parser.feed(data[a:b])]
    assert [r.lines for r in got + parser.flush()] == whole
