"""A vLLM general plugin: give NIXL's progress thread a poll delay.

NIXL 1.5.1's Python API creates every agent with `pthrDelay = 0`, so each engine's progress
thread spins a whole core even when idle. On a many-core GPU host that is a bounded cost; on a
small machine two spinning threads starve the engines themselves (measured: 27 s TTFT stalls and
KV leases expiring before decode read the blocks). Disabling the thread instead makes multi-block
reads hang, so the fix is a delay between polls, set where the agent is created.

vLLM loads general plugins in every process it starts (API frontend, engine core, workers), which
is the only place that reaches the process that owns the NIXL agent. The plugin does nothing
unless `PD_SERVE_NIXL_PROGRESS_DELAY_US` is set (by `kv_transfer.progress_delay_us`).
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


def register() -> None:
    """Entry point of the `vllm.general_plugins` group; safe to call more than once."""
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
