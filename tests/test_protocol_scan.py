"""Scanner reads (contract section 5), agent/protocols/scan.py."""

from __future__ import annotations

import pytest
from biip.checksums import gs1_standard_check_digit
from hypothesis import given
from hypothesis import strategies as st

from agent.protocols.scan import ScanFramer, ScanParseError, decode_scan, decode_scan_hex

KEYS = {"aim", "symbology", "data", "gtin", "ai", "valid", "errors"}


# --- GS1 element strings -------------------------------------------------------------------


def test_gs1_128_with_fnc1_and_terminator():
    # Source: GS1 DataMatrix Guideline / GS1 General Specifications example element string
    # (01)09501101530003(17)140704(10)AB-123; FNC1 after the variable-length lot is not needed
    # at the end, GS is FNC1 between fields.
    read = decode_scan(b"]C1010950110153000317140704\x1d10AB-123\r\n")
    assert read == {
        "aim": "]C1",
        "symbology": "GS1-128",
        "data": "010950110153000317140704\x1d10AB-123",
        "gtin": "09501101530003",
        "ai": {"01": "09501101530003", "17": "140704", "10": "AB-123"},
        "valid": True,
        "errors": [],
    }


def test_gs1_datamatrix_with_leading_fnc1():
    # Source: morovia.com KB "Input Format: Creating GS1 DataMatrix" example
    # (01)03453120000011(17)120508(10)ABCD1234(410)9501101020917; some scanners send the
    # leading FNC1 as a GS after the AIM identifier.
    read = decode_scan(b"]d2\x1d01034531200000111712050810ABCD1234\x1d4109501101020917\r")
    assert read["symbology"] == "GS1 DataMatrix"
    assert read["ai"] == {"01": "03453120000011", "17": "120508", "10": "ABCD1234", "410": "9501101020917"}
    assert read["gtin"] == "03453120000011"
    assert read["valid"] is True


def test_biip_documentation_example():
    # Source: biip docs (biip/__init__.py): "010703206980498815210526100329" is GTIN
    # 07032069804988, best before 2021-05-26, lot 0329.
    read = decode_scan(b"]C1010703206980498815210526100329")
    assert read["ai"] == {"01": "07032069804988", "15": "210526", "10": "0329"}
    assert read["valid"]


def test_wrong_check_digit_keeps_raw_values():
    read = decode_scan(b"]C1010950110153000417140704\x1d10AB-123")
    assert read["gtin"] is None
    assert read["valid"] is False
    assert read["ai"] == {"01": "09501101530004", "17": "140704", "10": "AB-123"}
    assert any("check digit" in e for e in read["errors"])


def test_day_00_means_the_month_for_ais_11_to_17():
    # GS1 General Specifications 3.4.x: "If only year and month are available, DD must be
    # filled with two zeros" (biip's parser would also accept it, but reads the wall clock).
    assert decode_scan(b"]C1010950110153000317261100")["valid"] is True


@pytest.mark.parametrize(
    ("read", "fragment"),
    [
        (b"]C1010950110153000317140231", "day 31"),  # no 31 February
        (b"]C1010950110153000317230229", "day 29"),  # 2023 is no leap year
        (b"]C1010950110153000317141304", "format"),  # month 13
        (b"]C101095011015300037006140700", "day 00"),  # first freeze date has no day 00
        (b"]C1010950110153000370031407042460", "time"),  # 24:60
    ],
)
def test_impossible_dates_are_invalid(read, fragment):
    result = decode_scan(read)
    assert result["valid"] is False
    assert any(fragment in e for e in result["errors"]), result["errors"]
    assert "01" in result["ai"]


def test_leap_day_is_a_date():
    assert decode_scan(b"]C1010950110153000317240229")["valid"] is True


def test_variable_length_ai_runs_to_gs_or_end():
    read = decode_scan(b"]C110LOT-7\x1d21SER42\x1d0109501101530003")
    assert read["ai"] == {"10": "LOT-7", "21": "SER42", "01": "09501101530003"}
    assert read["valid"]


def test_variable_length_ai_over_its_maximum_is_invalid():
    read = decode_scan(b"]C1010950110153000310" + b"A" * 21)
    assert read["ai"]["10"] == "A" * 21
    assert read["valid"] is False


def test_fixed_length_ai_cut_short_by_gs_is_invalid():
    read = decode_scan(b"]C101095011015\x1d10X")
    assert read["ai"] == {"01": "095011015", "10": "X"}
    assert read["gtin"] is None and read["valid"] is False


def test_unknown_ai_is_invalid():
    read = decode_scan(b"]C1010950110153000323ABC")
    assert read["ai"] == {"01": "09501101530003"}
    assert read["valid"] is False


def test_gs1_qr_and_databar_are_element_strings():
    assert decode_scan(b"]Q3010950110153000310ABC")["ai"] == {"01": "09501101530003", "10": "ABC"}
    databar = decode_scan(b"]e00109501101530003")
    assert databar["symbology"] == "GS1 DataBar"
    assert databar["gtin"] == "09501101530003"


# --- EAN / UPC -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("read", "symbology", "gtin"),
    [
        (b"]E05901234123457\r\n", "EAN-13", "05901234123457"),  # GS1 EAN-13 textbook number
        (b"]E00036000291452\n", "UPC-A", "00036000291452"),  # UPC-A 036000291452 (Wikipedia)
        (b"]E0036000291452\r", "UPC-A", "00036000291452"),  # some scanners send UPC-A as 12
        (b"]E496385074", "EAN-8", "00000096385074"),  # biip docs GTIN-8 example
        (b"]E004252614", "UPC-E", "00042100005264"),  # UPC-E, expanded to UPC-A 042100005264
        (b"]E3590123412345712", "EAN-13 with add-on", "05901234123457"),  # 2-digit add-on
    ],
)
def test_ean_upc_give_gtin_14_and_no_ais(read, symbology, gtin):
    result = decode_scan(read)
    assert (result["symbology"], result["gtin"], result["ai"], result["valid"]) == (symbology, gtin, {}, True)


def test_ean_wrong_check_digit():
    result = decode_scan(b"]E05901234123458")
    assert result["gtin"] is None and result["valid"] is False and result["ai"] == {}


# --- Digital Link ---------------------------------------------------------------------------


def test_digital_link_in_qr_is_gs1_data():
    # Source: GS1 DigitalLinkDocs README (gs1/DigitalLinkDocs): GTIN 09506000134352.
    read = decode_scan(b"]Q1https://id.gs1.org/01/09506000134352/10/ABC1?17=261100&linkType=all\r\n")
    assert read["ai"] == {"01": "09506000134352", "10": "ABC1", "17": "261100"}
    assert read["gtin"] == "09506000134352"
    assert read["valid"]


def test_digital_link_short_names_and_sscc():
    # Source: biip gs1_digital_link_uris.py docstring examples (DL 1.1 short names).
    read = decode_scan(b"]Q1https://id.gs1.org/01/614141123452/lot/ABC1/ser/12345?exp=180426")
    assert read["ai"] == {"01": "00614141123452", "10": "ABC1", "21": "12345", "17": "180426"}
    sscc = decode_scan(b"]Q1https://id.gs1.org/00/106141412345678908?02=00614141123452&37=25&10=ABC123")
    assert sscc["ai"] == {"00": "106141412345678908", "02": "00614141123452", "37": "25", "10": "ABC123"}
    assert sscc["gtin"] is None and sscc["valid"]


def test_digital_link_with_bad_gtin_keeps_it():
    read = decode_scan(b"]Q1https://example.com/p/01/09506000134353")
    assert read["ai"] == {"01": "09506000134353"} and read["valid"] is False and read["gtin"] is None


# --- non-GS1 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"]Q1https://shop.example.com/p/123?x=1\r\n", b"PICKUP-4821\r", b"]C0SKU-000123\n", b"483920"],
)
def test_non_gs1_data_is_valid_without_ais(raw):
    read = decode_scan(raw)
    assert read["ai"] == {} and read["valid"] is True and read["gtin"] is None
    assert read["errors"] == []
    assert read["data"] == raw.decode().rstrip("\r\n").removeprefix(read["aim"] or "")


@pytest.mark.parametrize(
    "digits, gtin",
    [
        ("5901234123457", "05901234123457"),
        ("96385074", "00000096385074"),
        ("036000291452", "00036000291452"),
        ("09501101530003", "09501101530003"),
    ],
)
def test_bare_gtin_without_aim_is_checked(digits, gtin):
    read = decode_scan(digits.encode() + b"\r\n")
    assert (read["aim"], read["gtin"], read["ai"], read["valid"], read["errors"]) == (
        None,
        gtin,
        {},
        True,
        [],
    )


@pytest.mark.parametrize("digits", ["5901234123458", "96385075", "036000291453", "09501101530004"])
def test_bare_gtin_without_aim_and_a_wrong_check_digit_is_invalid(digits):
    # a misread from a scanner that sends no AIM prefix must not reach the cloud as valid
    read = decode_scan(digits.encode() + b"\r\n")
    assert (read["aim"], read["data"], read["gtin"], read["ai"], read["valid"]) == (
        None,
        digits,
        None,
        {},
        False,
    )
    assert read["errors"] == [f"wrong check digit in {digits}"]


def test_aim_and_data_split():
    read = decode_scan(b"]C0SKU-000123\r\n")
    assert (read["aim"], read["symbology"], read["data"]) == ("]C0", "Code 128", "SKU-000123")
    plain = decode_scan(b"PICKUP-4821\r\n")
    assert (plain["aim"], plain["symbology"], plain["data"]) == (None, None, "PICKUP-4821")


def test_no_aim_gs1_recognised_by_fnc1():
    read = decode_scan(b"\x1d010950110153000310ABC\r\n")
    assert read["aim"] is None and read["ai"] == {"01": "09501101530003", "10": "ABC"}


def test_not_utf8_is_latin1_with_a_note():
    read = decode_scan(b"]C0Caf\xe9\r\n")
    assert read["data"] == "Café"
    assert read["data"].encode("latin-1") == b"Caf\xe9"  # lossless
    assert read["errors"] == ["data is not valid UTF-8; decoded as Latin-1"]
    assert read["valid"] is True  # not GS1 data: the note is not a GS1 error


def test_utf8_is_decoded():
    assert decode_scan("]Q1取件码 8812\r\n".encode())["data"] == "取件码 8812"


@pytest.mark.parametrize("terminator", [b"", b"\r", b"\n", b"\r\n"])
def test_terminators_are_stripped(terminator):
    assert decode_scan(b"]E05901234123457" + terminator)["data"] == "5901234123457"


def test_decode_hex():
    assert (
        decode_scan_hex("5d 45 30 35 39 30 31 32 33 34 31 32 33 34 35 37 0d 0a")["gtin"] == "05901234123457"
    )
    with pytest.raises(ScanParseError, match=r"^not hex: an odd number of hex digits \(3\)"):
        decode_scan_hex("5d4")
    with pytest.raises(ScanParseError, match=r"^not hex: 'z' at byte 0$"):
        decode_scan_hex("zz")
    with pytest.raises(ScanParseError, match=r"^not hex: 'g' at byte 9$"):
        decode_scan_hex("0x5d:45 3g")


# --- framer ---------------------------------------------------------------------------------


def test_auto_takes_cr_lf_and_crlf():
    framer = ScanFramer("auto")
    assert framer.feed(b"A\rB\nC\r\nD") == [b"A", b"B", b"C"]
    assert framer.buffered == b"D"


def test_crlf_split_across_chunks_gives_no_empty_read():
    framer = ScanFramer("auto")
    assert framer.feed(b"ABC\r") == [b"ABC"]
    assert framer.feed(b"\nDEF\r") == [b"DEF"]
    assert framer.feed(b"\n") == []
    assert framer.feed(b"GHI\r\n") == [b"GHI"]


def test_single_terminator_modes_keep_the_other_byte_as_data():
    assert ScanFramer("cr").feed(b"A\nB\rC") == [b"A\nB"]
    assert ScanFramer("lf").feed(b"A\rB\nC") == [b"A\rB"]
    crlf = ScanFramer("crlf")
    assert crlf.feed(b"A\rB\nC\r") == []
    assert crlf.feed(b"\nD") == [b"A\rB\nC"]


def test_overlong_read_is_discarded_with_an_error():
    framer = ScanFramer("auto", max_length=8)
    assert framer.feed(b"0123456789") == []
    assert framer.buffered == b""  # bounded
    assert framer.feed(b"ABC\rOK\r") == [b"OK"]  # the tail of the long read is dropped too
    assert framer.take_errors() == ["read longer than 8 bytes discarded"]
    assert framer.take_errors() == []
    assert framer.feed(b"x" * 20 + b"\rY\r") == [b"Y"]
    assert len(framer.take_errors()) == 1


def test_bad_framer_settings():
    with pytest.raises(ScanParseError):
        ScanFramer("tab")
    with pytest.raises(ScanParseError):
        ScanFramer("auto", max_length=0)


# --- properties -----------------------------------------------------------------------------


@given(st.binary(max_size=120))
def test_random_reads_never_raise(raw):
    read = decode_scan(raw)
    assert set(read) == KEYS
    assert isinstance(read["valid"], bool)
    if read["gtin"] is not None:
        gtin = read["gtin"]
        assert len(gtin) == 14 and gtin.isdigit()
        assert gs1_standard_check_digit(gtin[:-1]) == int(gtin[-1])


GS1_CHARS = st.text(alphabet="0123456789ABCXYZ-\x1d", max_size=60)


@given(st.sampled_from(["]C1", "]d2", "]Q3", "]e0", "]E0", "]E3", "]E4", "]I1", "]Q1", ""]), GS1_CHARS)
def test_random_gs1_shaped_reads_never_raise(aim, body):
    read = decode_scan((aim + body).encode())
    assert set(read) == KEYS
    if not read["valid"]:
        assert read["errors"]  # an invalid read always says why


@given(st.text(max_size=60))
def test_random_hex_text_raises_only_scan_parse_error(text):
    try:
        decode_scan_hex(text)
    except ScanParseError:
        pass


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@given(
    st.lists(
        st.binary(min_size=1, max_size=30).filter(lambda b: b"\r" not in b and b"\n" not in b), max_size=10
    ),
    st.lists(st.sampled_from([b"\r", b"\n", b"\r\n"]), min_size=10, max_size=10),
    st.lists(st.integers(0, 400), max_size=8),
)
def test_auto_framer_never_loses_or_invents_reads(reads, terminators, cuts):
    stream = b"".join(r + t for r, t in zip(reads, terminators, strict=False))
    framer = ScanFramer("auto")
    got = [read for chunk in chunked(stream, cuts) for read in framer.feed(chunk)]
    assert got == reads
    assert framer.buffered == b""


@given(
    st.sampled_from(["cr", "lf", "crlf"]), st.binary(max_size=200), st.lists(st.integers(0, 400), max_size=8)
)
def test_framer_never_loses_bytes(mode, stream, cuts):
    framer = ScanFramer(mode, max_length=10_000)
    got = [read for chunk in chunked(stream, cuts) for read in framer.feed(chunk)]
    term = {"cr": b"\r", "lf": b"\n", "crlf": b"\r\n"}[mode]
    *complete, rest = stream.split(term)
    assert got == [part for part in complete if part]
    assert framer.buffered == rest


@given(st.binary(max_size=300), st.integers(1, 40), st.lists(st.integers(0, 400), max_size=8))
def test_framer_stays_bounded_on_random_input(stream, max_length, cuts):
    framer = ScanFramer("auto", max_length=max_length)
    for chunk in chunked(stream, cuts):
        for read in framer.feed(chunk):
            assert 0 < len(read) <= max_length
        assert len(framer.buffered) <= max_length


def test_the_typed_dict_names_exactly_the_objects_keys() -> None:
    from agent.protocols.scan import ScanRead

    for raw in (b"]E05901234123457\r\n", b"PICKUP-4821\r", b"\x1d0109501101530003"):
        assert set(decode_scan(raw)) == ScanRead.__required_keys__ == set(ScanRead.__annotations__)
