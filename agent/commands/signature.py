"""Ed25519 verification of signed commands against `[commands.public_keys]` (raw 32-byte keys, base64).

`cryptography` (OpenSSL and its Rust bindings) costs the process about 6 MB of RSS, and a store's
agent may never see a signed command: it is loaded with the first signature to check, not at start.
The keys themselves were checked at start by the config (base64 of 32 bytes).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any


class Keys:
    """The configured public keys; `verify` is the `rules.Verifier`."""

    def __init__(self, public_keys: Mapping[str, str]) -> None:
        self._raw = {kid: base64.b64decode(text) for kid, text in public_keys.items()}
        self._keys: dict[str, Any] = {}

    def verify(self, key_id: str, signature: bytes, signed: bytes) -> bool:
        raw = self._raw.get(key_id)
        if raw is None:
            return False
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        key = self._keys.get(key_id)
        if key is None:
            key = self._keys[key_id] = Ed25519PublicKey.from_public_bytes(raw)
        try:
            key.verify(signature, signed)
        except InvalidSignature:
            return False
        return True
