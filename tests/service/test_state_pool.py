import numpy as np
import pytest

from service.engine.errors import SessionLimitReached
from service.engine.state_pool import StatePool


def make_pool(max_slots: int = 10, initial_capacity: int = 2) -> StatePool:
    return StatePool(
        num_states=2,
        num_layers=3,
        hidden_size=4,
        max_slots=max_slots,
        initial_capacity=initial_capacity,
    )


def test_slots_start_zeroed_and_are_distinct() -> None:
    pool = make_pool()
    slots = [pool.acquire() for _ in range(5)]
    assert sorted(slots) == [0, 1, 2, 3, 4]
    assert not pool.gather(np.array(slots)).any()
    assert pool.in_use == 5


def test_grows_by_doubling_and_keeps_states() -> None:
    pool = make_pool(max_slots=10, initial_capacity=2)
    a, b = pool.acquire(), pool.acquire()
    pool.scatter(np.array([a, b]), np.full((2, 3, 2, 4), 7.0, np.float32))
    pool.acquire()
    assert pool.capacity == 4
    for _ in range(6):
        pool.acquire()
    assert pool.capacity == 10  # capped at max_slots
    np.testing.assert_array_equal(pool.gather(np.array([a, b])), 7.0)


def test_gather_and_scatter_address_only_the_given_slots() -> None:
    pool = make_pool()
    slots = [pool.acquire() for _ in range(4)]
    states = np.arange(2 * 3 * 2 * 4, dtype=np.float32).reshape(2, 3, 2, 4)
    pool.scatter(np.array([slots[3], slots[1]]), states)
    gathered = pool.gather(np.array(slots))  # (S, L, B, m)
    np.testing.assert_array_equal(gathered[:, :, 3], states[:, :, 0])
    np.testing.assert_array_equal(gathered[:, :, 1], states[:, :, 1])
    assert not gathered[:, :, [0, 2]].any()


def test_gather_returns_a_copy() -> None:
    pool = make_pool()
    slot = pool.acquire()
    gathered = pool.gather(np.array([slot]))
    gathered[...] = 5.0
    assert not pool.gather(np.array([slot])).any()


def test_released_slot_is_zeroed_and_reused() -> None:
    pool = make_pool()
    first, second = pool.acquire(), pool.acquire()
    pool.scatter(np.array([first]), np.ones((2, 3, 1, 4), np.float32))
    pool.release(first)
    assert pool.in_use == 1
    assert pool.acquire() == first
    assert not pool.gather(np.array([first])).any()
    assert second != first


def test_reset_zeroes_one_slot() -> None:
    pool = make_pool()
    a, b = pool.acquire(), pool.acquire()
    pool.scatter(np.array([a, b]), np.ones((2, 3, 2, 4), np.float32))
    pool.reset(a)
    assert not pool.gather(np.array([a])).any()
    assert pool.gather(np.array([b])).all()


def test_full_pool_raises_session_limit() -> None:
    pool = make_pool(max_slots=3)
    for _ in range(3):
        pool.acquire()
    with pytest.raises(SessionLimitReached, match="limit of 3 open sessions"):
        pool.acquire()
