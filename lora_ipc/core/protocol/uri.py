"""The ``lora-ipc://`` URI grammar (``lora_ipc.lora.uri.AdapterURI`` builds and parses it)::

    lora-ipc://<name>[/v<version>]?endpoint=<endpoint>[&epoch=<epoch>][&follow=1]

- ``<name>``: a published name (1 to ``MAX_NAME_CHARS`` characters), percent-encoded (UTF-8);
- ``<version>``: 1 to 18 decimal digits, no leading zero (:data:`VERSION_PATH`); absent: the newest at load time;
- ``endpoint``: percent-encoded, an ``ipc://`` endpoint; absent: ``$LORA_IPC_ENDPOINT`` in the engine;
- ``epoch``: the store's epoch, 1 to 16 lowercase hex digits (:data:`EPOCH_PATTERN`, the ``Epoch`` field type
  of the ZeroMQ messages too); required with a version;
- ``follow=1``: the OpenAI server's entry for a bare model name.

The scheme is case-insensitive (RFC 3986 §3.1); each query key appears at most once, no other key is allowed.
"""

from __future__ import annotations

from .limits import MAX_NAME_CHARS

SCHEME = "lora-ipc"
QUERY_KEYS = ("endpoint", "epoch", "follow")
FOLLOW = "1"  # the one value of follow=
VERSION_PATH = r"(?:/v([1-9][0-9]{0,17}))?/?"
EPOCH_PATTERN = "[0-9a-f]{1,16}"
MAX_EPOCH_CHARS = 16
MAX_ENDPOINT_CHARS = len("ipc://") + 100  # what endpoint.ipc_path accepts (a sun_path of 108 bytes)
#: the longest URI a legal name and endpoint make: a character percent-encodes to at most 12 (4 UTF-8
#: bytes, "%XX" each); the rest (scheme, /v<18 digits>, the query's keys, an epoch) is under 128
MAX_URI_CHARS = 128 + 12 * (MAX_NAME_CHARS + MAX_ENDPOINT_CHARS)
