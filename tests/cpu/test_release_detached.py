"""The release of prefill's blocks outlives the request that made it, through real Ray Serve.

Serve cancels the calls a cancelled request made (its children, found through the request's
context). The release matters exactly when a client left, that is when Serve cancels the
request, so `EngineCalls` makes it outside the request's context. Run inside it, the call was
cancelled in flight and the blocks waited for their lease (the CI failure of
`test_client_gone_after_the_first_token_leaves_nothing_behind`, about once in 40 requests).

The decode here is a stand-in that records the call: with real engines the client would have
to leave in the few milliseconds the release is in flight, which no test can time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray import serve

from serve_app.config import AppConfig
from serve_app.engine_calls import EngineCalls
from serve_app.policy.health import LoopStalls
from serve_app.policy.pairs import Pair
from serve_app.protocol import KVTransferParams, PrefillResult


@serve.deployment
class RecordingDecode:
    def __init__(self) -> None:
        self.released: list[str] = []

    async def release_remote_kv(self, request_id: str, params: KVTransferParams) -> None:
        await asyncio.sleep(1.0)  # still in flight when the request that made it is cancelled
        self.released.append(request_id)

    async def calls(self) -> list[str]:
        return self.released


@serve.deployment
class ClientGone:
    """Releases, then waits as a request whose client is about to leave."""

    def __init__(self, decode: Any) -> None:
        self.engine_calls = EngineCalls(AppConfig())
        self.pair = Pair("node", {"decode": decode}, LoopStalls())

    async def __call__(self, request_id: str) -> None:
        result = PrefillResult(
            request_id=request_id, kv_transfer_params=KVTransferParams(), num_prompt_tokens=1
        )
        self.engine_calls._release_soon(self.pair, request_id, result)
        await asyncio.sleep(60)


def test_a_release_is_not_cancelled_with_the_request_that_made_it(ray_cluster: None) -> None:
    decode = serve.run(RecordingDecode.bind(), name="release-decode", route_prefix=None)
    handle = serve.run(ClientGone.bind(decode), name="release-client", route_prefix=None)
    try:
        response = handle.remote("cmpl-gone")
        time.sleep(0.5)  # the release is in flight
        response.cancel()
        deadline = time.monotonic() + 10
        while decode.calls.remote().result() != ["cmpl-gone"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert decode.calls.remote().result() == ["cmpl-gone"]
    finally:
        serve.delete("release-client")
        serve.delete("release-decode")
