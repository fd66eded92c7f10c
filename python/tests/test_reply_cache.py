"""The reply cache's bounds and its shares between caller uids (as zrpc-service's,
docs/security.md). Unit tests of ``zrpc._service.ReplyCache``; the end-to-end case
(another uid's flood, a real broker) is in test_reliability.py."""

import random

from conftest import colliding_tuple_keys
from zrpc._service import ReplyCache


def put(c, instance, call, uid, size=1):
    c.put((instance, call, uid), "s", "m", 0, "", b"x" * size)


def test_one_user_is_one_cache_in_insertion_order():
    c = ReplyCache(3, 1000)
    for i in range(5):
        put(c, 1, i, 7)
    assert len(c) == 3 and c.bytes == 3
    assert c.get((1, 1, 7), "s", "m") is None
    assert c.get((1, 2, 7), "s", "m") == (0, "", b"x")
    assert c.get((1, 2, 7), "s", "other") is None


def test_a_flooding_user_evicts_its_own_replies_not_another_users():
    c = ReplyCache(100, 100_000)
    for i in range(10):
        put(c, 5, i, 1000, 10)
    for i in range(5000):
        put(c, 6, i, 2000, 10)
    for i in range(1000):
        put(c, 6, 10_000 + i, 2000, 9000)  # by bytes too
    assert len(c) <= 100 and c.bytes <= 100_000
    for i in range(10):
        assert c.get((5, i, 1000), "s", "m") is not None, i


def test_shares_even_out_and_bounds_hold():
    rng = random.Random(7)
    c = ReplyCache(90, 10_000)
    for call in range(20_000):
        uid = rng.choice([1] + [2] * 4 + [3] * 16)
        put(c, 9, call, uid, rng.randrange(120))
        assert len(c) <= 90 and c.bytes <= 10_000
        assert len(c) == sum(len(u[0]) for u in c.users.values())
        assert c.bytes == sum(u[1] for u in c.users.values())
    for uid in (1, 2, 3):
        n, b = len(c.users[uid][0]), c.users[uid][1]
        assert n + 2 >= 30 or b + 240 >= 10_000 // 3, (uid, n, b)


def test_superseded_and_oversized_and_disabled():
    c = ReplyCache(10, 100)
    put(c, 1, 1, 0, 5)
    put(c, 1, 1, 0, 7)
    assert len(c) == 1 and c.bytes == 7
    put(c, 1, 2, 0, 101)
    assert c.get((1, 2, 0), "s", "m") is None and len(c) == 1
    off = ReplyCache(0, 100)
    put(off, 1, 1, 0)
    assert len(off) == 0


def test_call_ids_crafted_to_collide_do_not_collide():
    """A caller picks its instance and call ids: keys crafted so that their tuples all hash
    alike made each insertion compare with all of them (2,000 entries: ~100 us a put). The
    cache keys its entries by bytes, hashed with the process's random seed."""
    from zrpc._service import _dict_key
    keys = colliding_tuple_keys(1000, 2000)
    assert len({hash(k) for k in keys}) == 1, "the crafted tuples collide"
    assert len({hash(_dict_key(k)) for k in keys}) == len(keys)
    c = ReplyCache(10_000, 1 << 30)
    for k in keys:
        c.put(k, "s", "m", 0, "", b"x")
    assert all(c.get(k, "s", "m") == (0, "", b"x") for k in keys)
