"""The value types messages are built from: each carries its bounds (`msgspec.Meta`), so
the decoder checks them in C and `docs/PROTOCOL.md`'s type names have one definition.

Every bound is one both sides can represent: counts are signed 64-bit ints (what msgpack
and torch carry), token ids uint32, numbers finite.
"""

from __future__ import annotations

import sys
from typing import Annotated

from msgspec import Meta

MAX_ID_LENGTH = 256  # request, client, engine ids and nonces
MAX_TOKEN_ID = 2**32 - 1
MAX_INT = 2**63 - 1
MIN_INT = -(2**63)
MAX_FLOAT = sys.float_info.max

Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH)]
TokenId = Annotated[int, Meta(ge=0, le=MAX_TOKEN_ID)]
UInt = Annotated[int, Meta(ge=0, le=MAX_INT)]
Int64 = Annotated[int, Meta(ge=MIN_INT, le=MAX_INT)]
Number = Annotated[float, Meta(ge=-MAX_FLOAT, le=MAX_FLOAT)]  # finite; NaN fails every bound
Rate = Annotated[float, Meta(ge=0.0, le=1.0)]
PerSecond = Annotated[float, Meta(ge=0.0, le=MAX_FLOAT)]
# -inf is a real answer (a token the sampler masked); NaN and +inf are not.
Logprob = Annotated[float, Meta(le=MAX_FLOAT)]
# A bare file name: a client may write it into a directory of its own.
FileName = Annotated[str, Meta(pattern=r"^(?!\.\.?$)[^/\\\x00]+$")]
