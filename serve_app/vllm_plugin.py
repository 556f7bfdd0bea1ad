"""A vLLM general plugin: NIXL's progress thread gets a poll delay; decode loads only what
prefill computed.

NIXL 1.5.1's Python API creates every agent with `pthrDelay = 0`, so each engine's progress
thread spins a whole core even when idle. On a many-core GPU host that is a bounded cost; on a
small machine two spinning threads starve the engines themselves (measured: 27 s TTFT stalls and
KV leases expiring before decode read the blocks). Disabling the thread instead makes multi-block
reads hang, so the fix is a delay between polls, set where the agent is created.

vLLM loads general plugins in every process it starts (API frontend, engine core, workers), which
is the only place that reaches the process that owns the NIXL agent. The poll delay is set only
where `PD_SERVE_NIXL_PROGRESS_DELAY_US` is (by `kv_transfer.progress_delay_us`).

The second patch, applied wherever this vLLM has the class it was written for, serves the first
token from prefill (`serve_app/first_token.py`): decode's prompt is then prefill's prompt plus
the first token, one token longer than what prefill computed. vLLM 0.32's pull connector asks to
load the whole prompt's length, which at a block boundary needs one block more than prefill
holds (an assertion in the read). Loading at most `remote_num_tokens` (what prefill reports it
computed) is the same count in the plain handoff and the right one for the continuation; the
scheduler then computes the rest locally.
"""

from __future__ import annotations

import logging
import os
from typing import Any

ENV_VAR = "PD_SERVE_NIXL_PROGRESS_DELAY_US"
logger = logging.getLogger(__name__)


class _BindingsWithPollDelay:
    """Stands in for `nixl._api.nixlBind`: the same bindings, but agents get the poll delay."""

    def __init__(self, bindings: Any, delay_us: int) -> None:
        self._bindings = bindings
        self._delay_us = delay_us

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bindings, name)

    def nixlAgent(self, name: str, agent_config: Any) -> Any:  # noqa: N802 (binding's name)
        agent_config.pthrDelay = self._delay_us
        return self._bindings.nixlAgent(name, agent_config)


def pull_scheduler_class() -> Any:
    """vLLM's NIXL pull scheduler, if this vLLM has the one the load clamp was written for."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl import pull_scheduler
    except ImportError:
        return None
    cls = getattr(pull_scheduler, "NixlPullConnectorScheduler", None)
    if cls is None or not hasattr(cls, "get_num_new_matched_tokens"):
        return None
    return cls


def clamp_remote_load(cls: Any) -> None:
    """Make `cls.get_num_new_matched_tokens` load no more than the remote computed."""
    original = cls.get_num_new_matched_tokens
    if getattr(original, "_pd_serve_clamped", False):
        return

    def get_num_new_matched_tokens(self, request, num_computed_tokens):  # noqa: ANN001
        count, is_async = original(self, request, num_computed_tokens)
        params = request.kv_transfer_params or {}
        remote = params.get("remote_num_tokens")
        if count > 0 and params.get("do_remote_prefill") and remote:
            count = min(count, remote - num_computed_tokens)
            if count <= 0:
                return 0, False
        return count, is_async

    get_num_new_matched_tokens._pd_serve_clamped = True  # type: ignore[attr-defined]
    cls.get_num_new_matched_tokens = get_num_new_matched_tokens


def register() -> None:
    """Entry point of the `vllm.general_plugins` group; safe to call more than once."""
    cls = pull_scheduler_class()
    if cls is not None:
        clamp_remote_load(cls)
    _set_progress_delay()


def _set_progress_delay() -> None:
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return
    try:
        from nixl import _api
    except ImportError:
        return
    if isinstance(_api.nixlBind, _BindingsWithPollDelay):
        return
    _api.nixlBind = _BindingsWithPollDelay(_api.nixlBind, int(raw))
    logger.info("NIXL progress thread poll delay set to %s us", raw)
