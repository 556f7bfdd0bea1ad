"""Pairs without Ray: which pair a request gets, what the router learns of the cluster, the
placement check and the config's pair rules."""

from __future__ import annotations

import socket

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig
from serve_app.kv_transfer import claim_side_channel, kv_transfer_config
from serve_app.pairs import PairSplit, Placement, check_same_gpu, pair_capacity
from serve_app.policy.health import LoopStalls
from serve_app.policy.pairs import KV_FULL_WEIGHT, PairSet

PHASES = {"prefill": "prefill-handle", "decode": "decode-handle"}


def pair_set(nodes: dict[str, set[str]]) -> PairSet:
    pairs = PairSet(PHASES, LoopStalls())
    pairs.refresh(lambda handle: nodes[handle.split("-")[0]], lambda handle, node: (handle, node))
    return pairs


def test_pairs_are_the_nodes_of_the_replicas_and_follow_them() -> None:
    nodes = {"prefill": {"a", "b"}, "decode": {"a", "b"}}
    pairs = pair_set(nodes)
    assert sorted(p.node_id for p in pairs) == ["a", "b"]
    assert pairs.pairs["a"].server("decode") == ("decode-handle", "a")
    nodes["decode"].discard("b")  # b's decode replica died
    pairs.refresh(lambda h: nodes[h.split("-")[0]], lambda h, n: (h, n))
    b = pairs.pairs["b"]
    assert b.present == {"prefill"} and not b.is_up("decode") and b.is_up("prefill")
    assert "no decode replica on node b" in b.health["decode"].reason
    nodes["prefill"].discard("b")  # nothing left on b
    pairs.refresh(lambda h: nodes[h.split("-")[0]], lambda h, n: (h, n))
    assert list(pairs.pairs) == ["a"]


def test_choice_is_the_less_loaded_whole_pair() -> None:
    pairs = pair_set({"prefill": {"a", "b"}, "decode": {"a", "b"}})
    pairs.pairs["a"].num_in_flight = 3
    assert {pairs.choose().node_id for _ in range(20)} == {"b"}  # two pairs: both are drawn
    pairs.pairs["b"].health["decode"].kv_cache_usage = 0.5  # weighs KV_FULL_WEIGHT / 2 = 16
    assert pairs.pairs["b"].load() == KV_FULL_WEIGHT / 2
    assert {pairs.choose().node_id for _ in range(20)} == {"a"}


def test_choice_avoids_broken_and_full_pairs_then_uses_what_is_left() -> None:
    pairs = pair_set({"prefill": {"a", "b"}, "decode": {"a", "b"}})
    pairs.pairs["a"].health["decode"].failed("ActorDiedError")
    assert {pairs.choose().node_id for _ in range(20)} == {"b"}
    full = {pairs.pairs["b"].node_id}
    # b full, a broken: a's prefill engine still serves (the route policy runs it whole).
    assert {pairs.choose(lambda p: p.node_id in full).node_id for _ in range(20)} <= {"a", "b"}
    pairs.pairs["b"].health["prefill"].failed("gone")
    pairs.pairs["b"].health["decode"].failed("gone")
    assert {pairs.choose().node_id for _ in range(20)} == {"a"}
    pairs.pairs["a"].health["prefill"].failed("gone")
    assert pairs.choose() is None and not pairs.is_serving()
    assert "decode on a: ActorDiedError" in pairs.reasons()


def test_a_split_pair_is_refused_naming_both_placements() -> None:
    here = Placement("n" * 40, ("0",))
    check_same_gpu(here, Placement("n" * 40, ("0",)))
    with pytest.raises(PairSplit, match=r"prefill on node nnnnnnnnnnnn GPU 0, decode on node "
                       r"nnnnnnnnnnnn GPU 1"):
        check_same_gpu(here, Placement("n" * 40, ("1",)))
    with pytest.raises(PairSplit):
        check_same_gpu(here, Placement("m" * 40, ("0",)))


def test_capacity_is_one_pair_per_node_with_a_gpu() -> None:
    nodes = [
        {"Alive": True, "Resources": {"GPU": 1.0}},
        {"Alive": True, "Resources": {"GPU": 8.0}},  # a multi-GPU node still holds one pair
        {"Alive": True, "Resources": {"CPU": 4.0}},
        {"Alive": False, "Resources": {"GPU": 1.0}},
    ]
    assert pair_capacity(nodes, 1.0) == 2


def test_pair_ports_must_not_overlap() -> None:
    cfg = AppConfig(pairs=4)  # 5600.. and 5610..: 10 apart
    assert cfg.for_replica("decode", 3).decode.nixl_side_channel_port == 5613
    assert kv_transfer_config(cfg.for_replica("prefill", 2), "prefill")["engine_id"] == (
        f"pd-serve-prefill-{socket.gethostname()}-5602"  # the same port on two hosts: two ids
    )
    with pytest.raises(ValidationError, match=r"pairs: 12 pairs use NIXL side-channel ports .* "
                       r"at least 12 apart \(they are 10\)"):
        AppConfig(pairs=12)
    with pytest.raises(ValidationError, match="pairs"):
        AppConfig(pairs=0)


def claim_config(pairs: int) -> AppConfig:
    """Ports no other test uses: the claims' lock files are per port, host wide."""
    from tests.cpu.conftest import TEST_PORT_BASE

    base = TEST_PORT_BASE + 200
    return AppConfig(pairs=pairs, prefill={"nixl_side_channel_port": base},
                     decode={"nixl_side_channel_port": base + 10})


def test_replicas_on_one_host_claim_distinct_ports_and_a_freed_one_is_reused() -> None:
    """Serve renumbers ranks when replicas leave, so ports come from claims, not ranks."""
    cfg = claim_config(pairs=3)
    base = cfg.prefill.nixl_side_channel_port
    claims = [claim_side_channel(cfg, "prefill") for _ in range(3)]
    try:
        assert [c.prefill.nixl_side_channel_port for c, _ in claims] == [base, base + 1, base + 2]
        assert claim_side_channel(cfg, "decode")[0].decode.nixl_side_channel_port == base + 10
        with pytest.raises(RuntimeError, match=rf"no free NIXL side-channel port for a prefill "
                           rf"engine on this host: {base} is another replica's.*"
                           rf"prefill.nixl_side_channel_port \+ 0..2, one per pair"):
            claim_side_channel(cfg, "prefill")
        claims[1][1].close()  # the replica of the middle port left
        again = claim_side_channel(cfg, "prefill")
        assert again[0].prefill.nixl_side_channel_port == base + 1
        claims[1] = again
    finally:
        for _, claim in claims:
            claim.close()


def test_a_port_something_else_listens_on_is_passed_over_or_named() -> None:
    cfg = claim_config(pairs=2)
    base = cfg.prefill.nixl_side_channel_port
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", base))
        listener.listen()
        port_cfg, claim = claim_side_channel(cfg, "prefill")
        claim.close()
        assert port_cfg.prefill.nixl_side_channel_port == base + 1
        with pytest.raises(RuntimeError, match=rf"NIXL side-channel port {base} on 127.0.0.1 "
                           r"\(prefill.nixl_side_channel_port\) is already in use"):
            claim_side_channel(claim_config(pairs=1), "prefill")
