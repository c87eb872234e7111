"""Ed25519 verification of signed commands against `[commands.public_keys]` (raw 32-byte keys, base64)."""

from __future__ import annotations

import base64
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


class Keys:
    """The configured public keys; `verify` is the `rules.Verifier`."""

    def __init__(self, public_keys: Mapping[str, str]) -> None:
        # the config validated each as base64 of 32 bytes
        self._keys = {
            kid: Ed25519PublicKey.from_public_bytes(base64.b64decode(text))
            for kid, text in public_keys.items()
        }

    def verify(self, key_id: str, signature: bytes, signed: bytes) -> bool:
        key = self._keys.get(key_id)
        if key is None:
            return False
        try:
            key.verify(signature, signed)
        except InvalidSignature:
            return False
        return True
