"""The bound on chunk bytes held at once (``server.max_bytes_in_flight``): the budget itself, and a real server
under a budget smaller than one request, where every request must run alone and still succeed."""

from __future__ import annotations

import asyncio
import random
import threading

import httpx
import pytest
import torch

from kvtier.api import Client
from kvtier.api.budget import ByteBudget

from .helpers import KEYS, LAYOUT, make_config, prompt, serve

C = LAYOUT.chunk_tokens


def test_concurrent_holders_never_exceed_the_limit():
    async def main() -> int:
        budget = ByteBudget(100)
        peak = 0

        async def user(seed: int) -> None:
            nonlocal peak
            rng = random.Random(seed)
            for _ in range(20):
                held = await budget.acquire(rng.randint(0, 60))
                peak = max(peak, budget.held)
                await asyncio.sleep(rng.random() / 1000)
                budget.release(held)

        await asyncio.wait_for(asyncio.gather(*(user(i) for i in range(12))), timeout=30)
        assert budget.held == 0 and budget.waiting == 0
        return peak

    peak = asyncio.run(main())
    assert 60 < peak <= 100


def test_first_come_first_served_and_oversized_requests_run_alone():
    async def main() -> None:
        budget = ByteBudget(10)
        order: list[str] = []

        async def request(name: str, nbytes: int, hold: asyncio.Event) -> None:
            held = await budget.acquire(nbytes)
            order.append(name)
            await hold.wait()
            budget.release(held)

        go = {name: asyncio.Event() for name in "abcd"}
        a = asyncio.create_task(request("a", 6, go["a"]))
        await asyncio.sleep(0)
        b = asyncio.create_task(request("b", 8, go["b"]))  # waits for a
        await asyncio.sleep(0)
        c = asyncio.create_task(request("c", 3, go["c"]))  # would fit beside a, but b came first
        await asyncio.sleep(0)
        assert order == ["a"] and budget.waiting == 2
        go["a"].set()
        await asyncio.sleep(0.01)
        assert order == ["a", "b"] and budget.held == 8  # c (3 more) does not fit beside b
        go["b"].set()
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "c"]
        d = asyncio.create_task(request("d", 1000, go["d"]))  # larger than the budget: all of it, once c is done
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "c"]
        go["c"].set()
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "c", "d"] and budget.held == 10
        go["d"].set()
        await asyncio.gather(a, b, c, d)
        assert budget.held == 0

    asyncio.run(main())


async def full_budget_with_waiter(nbytes: int) -> tuple[ByteBudget, int, asyncio.Task]:
    """A budget of 10 bytes, all held, and a request for ``nbytes`` queued behind."""
    budget = ByteBudget(10)
    held = await budget.acquire(10)
    waiter = asyncio.create_task(budget.acquire(nbytes))
    await asyncio.sleep(0)
    return budget, held, waiter


def test_a_cancelled_waiter_gives_up_its_place():
    async def main() -> None:
        budget, held, waiter = await full_budget_with_waiter(8)
        behind = asyncio.create_task(budget.acquire(5))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        budget.release(held)
        assert await asyncio.wait_for(behind, timeout=5) == 5
        assert budget.held == 5 and budget.waiting == 0

    asyncio.run(main())


def test_nothing_to_hold_never_waits():
    async def main() -> None:
        budget, held, waiter = await full_budget_with_waiter(5)
        assert await asyncio.wait_for(budget.acquire(0), timeout=1) == 0  # not behind the waiter
        budget.release(held)
        assert await waiter == 5

    asyncio.run(main())


def test_a_budget_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        ByteBudget(0)


def test_requests_larger_than_the_budget_run_one_at_a_time_and_all_succeed(tmp_path):
    config = make_config(tmp_path, server={"max_body_bytes": 64 << 10, "max_tokens_per_request": 4096,
                                           "max_chunks_per_batch": 8, "max_bytes_in_flight": LAYOUT.chunk_bytes})
    errors: list[Exception] = []

    def client_work(url: str, seed: int) -> None:
        try:
            with Client(url, LAYOUT, api_key=KEYS["alice"], timeout=30) as client:
                for i in range(4):
                    tokens = prompt(3 * C, seed=100 * seed + i)
                    kv = torch.randn(LAYOUT.chunk_shape[:3] + (3 * C, LAYOUT.head_dim)).to(LAYOUT.torch_dtype)
                    assert client.put(tokens, kv).stored == 3
                    got = client.get(tokens)
                    assert got.tokens == 3 * C and torch.equal(got.kv, kv)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    with serve(config) as url:
        threads = [threading.Thread(target=client_work, args=(url, s)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a request never got its bytes"
        assert not errors, errors[:3]
        metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEYS['admin']}"}).text
    assert "kvtier_bytes_in_flight 0.0" in metrics
    assert "kvtier_requests_waiting_for_bytes 0.0" in metrics
