"""The demo store's products: one catalogue for every simulated till.

The stxetx POS (`drivers.sim.pos`) sends them as GTIN-14 with decimal-string prices; the
printing POS (`drivers.sim.devices`) prints them as GTIN-13 with amounts in fen. Check digits
come from biip (`gs1_standard_check_digit`), the library the scan decoder checks them with, so
the demo never shows a GTIN its own decoder would call invalid.
"""

from __future__ import annotations

from dataclasses import dataclass

from biip.checksums import gs1_standard_check_digit


def gtin13(body12: str) -> str:
    """A GTIN-13 from its first 12 digits, with its check digit."""
    return f"{body12}{gs1_standard_check_digit(body12)}"


@dataclass(frozen=True, slots=True)
class Product:
    gtin: str  # GTIN-13, check digit included
    name: str
    fen: int  # unit price in fen (CNY cents)

    @property
    def gtin14(self) -> str:
        """The GTIN as 14 digits, as POS software sends it."""
        return "0" + self.gtin

    @property
    def price(self) -> str:
        """The unit price as a decimal string in CNY ("12.50"), as the contract writes money."""
        return f"{self.fen // 100}.{self.fen % 100:02d}"


# (first 12 digits of the GTIN-13, name, unit price in fen): a convenience store's shelf.
_SHELF = (
    ("690123456789", "农夫山泉 550ml", 200),
    ("692020288888", "绿茶 500ml", 350),
    ("692225545142", "方便面 桶装", 450),
    ("692010000123", "康师傅红烧牛肉面", 450),
    ("690102807501", "香烟 软装", 2000),
    ("690208388645", "纯牛奶 250ml", 300),
    ("690123456001", "光明纯牛奶 250ml", 350),
    ("692116850925", "苏打饼干", 680),
    ("695000012345", "奥利奥饼干 116g", 990),
    ("690314814463", "洗发水 400ml", 2990),
    ("692530372136", "酸奶 200g", 550),
    ("695476741234", "面包 切片", 990),
    ("691787803652", "咖啡 罐装", 600),
    ("693520001122", "金龙鱼大米 5kg", 4590),
    ("950600013435", "Imported Coffee Beans 250g", 6800),
)

CATALOGUE: tuple[Product, ...] = tuple(Product(gtin13(body), name, fen) for body, name, fen in _SHELF)
