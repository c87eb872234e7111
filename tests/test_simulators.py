"""The demo store's simulators (drivers/sim): one catalogue, valid GTINs, data the agent's own parsers accept."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import orjson

from agent.protocols.escpos import extract_fields, extract_receipts
from agent.protocols.scan import decode_scan
from agent.protocols.stxetx import Transaction, parse_transaction
from drivers.sim.catalogue import CATALOGUE
from drivers.sim.devices import DEMO_PATTERNS, PrintingPosSimulator, scanner_reads
from drivers.sim.pos import PosSimulator

BY_GTIN = {p.gtin: p for p in CATALOGUE}


def test_every_product_has_a_gtin_the_scan_decoder_calls_valid() -> None:
    assert len(BY_GTIN) == len(CATALOGUE)  # no product twice
    for product in CATALOGUE:
        for read in (product.gtin.encode(), b"]E0" + product.gtin.encode()):
            decoded = decode_scan(read)
            assert decoded["valid"] is True, (product, decoded["errors"])
            assert decoded["gtin"] == product.gtin14


def test_pos_simulator_sells_valid_transactions_from_the_catalogue() -> None:
    till = PosSimulator(-1, "R1", 0, seed=7)
    now = datetime(2026, 11, 23, 8, 15, tzinfo=UTC)
    for _ in range(200):
        payload = till.transaction(now)
        parsed = parse_transaction(orjson.dumps(payload))
        assert isinstance(parsed, Transaction), parsed
        for item in payload["items"]:  # type: ignore[union-attr]
            product = BY_GTIN[item["gtin"][1:]]
            assert item["gtin"] == product.gtin14
            assert (item["name"], item["unit_price"]) == (product.name, product.price)


def test_printing_pos_prints_the_same_catalogue() -> None:
    pos = PrintingPosSimulator(-1, 0, rng=random.Random(3))
    seen = set()
    for _ in range(50):
        (receipt,) = extract_receipts(pos.next_receipt())
        for item in extract_fields(receipt.lines, DEMO_PATTERNS)["items"]:
            product = BY_GTIN[item["gtin"]]
            assert item["unit_price"] == product.price
            seen.add(product.gtin)
    assert len(seen) > len(CATALOGUE) // 2


def test_scanner_reads_carry_catalogue_gtins() -> None:
    for seed in range(20):
        ean = scanner_reads(random.Random(seed))[0]
        assert decode_scan(ean)["gtin"][1:] in BY_GTIN
