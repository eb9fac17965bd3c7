import threading
import time

import numpy as np
import torch

from kvtier.kvstore import DiskTier, HostTier, TieredStore

from .helpers import TINY, kv_for_tokens
from .test_store import FP, check_invariants

C = TINY.chunk_tokens


def test_threads_on_overlapping_prefixes_keep_exact_accounting(tmp_path):
    store = TieredStore([HostTier(6 * FP, prefault=False), DiskTier(tmp_path, 12 * (FP + 2048))], layout=TINY,
                        policy=["lru", "s3fifo"])
    shared = [np.random.default_rng(i).integers(0, 500, 3 * C).tolist() for i in range(3)]
    errors: list[str] = []
    served = [0]
    stop = time.monotonic() + 4.0

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while time.monotonic() < stop and not errors:
            base = shared[rng.integers(3)][: int(rng.integers(1, 4)) * C]
            tokens = base + rng.integers(0, 500, int(rng.integers(0, 3)) * C).tolist()
            op = rng.integers(4)
            if op == 0:
                store.put(tokens, kv_for_tokens(TINY, tokens))
            elif op == 1:
                got = store.get(tokens)
                if not torch.equal(got.kv[:, :, :, : got.tokens], kv_for_tokens(TINY, tokens)[:, :, :, : got.tokens]):
                    errors.append(f"wrong KV for {got.tokens} tokens")
                served[0] += got.tokens
            elif op == 2:
                store.pin(tokens)
                store.lookup(tokens)
                store.unpin(tokens)
            else:
                store.delete(tokens[: C * int(rng.integers(1, 3))])

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert served[0] > 0
    check_invariants(store)
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("*/*.kvt"))
    assert store.tiers[1].used_bytes == on_disk
    assert store.tiers[0].used_bytes == sum(e.nbytes for e in store.tiers[0]._entries.values())
