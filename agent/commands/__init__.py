"""The command channel (contract section 3): the cloud steers the agent over MQTT.

- `rules`: the pure part: a payload's reading, the canonical form that is signed, the check
  order, one pydantic model per command's arguments, the reply's bytes. No I/O.
- `signature`: Ed25519 verification against `[commands.public_keys]`.
- `store`: the `commands` table (one row per id: outcome and reply bytes) and its pruning.
- `erase`: `erase_subject` inside the buffer's writer: rows and chunks rewritten, overwritten.
- `channel`: the wiring: messages from the uplink's thread to one worker thread, execution,
  the record committed (with its `command.*` event) before the reply goes out on the live session.
"""
