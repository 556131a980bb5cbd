"""Data-parallel generation over two gloo ranks equals generation in one process."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hfdist.generation import continuation_ids, generate, generate_batched, left_pad
from hfdist.testing import tiny_llama

pytestmark = pytest.mark.distributed
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [20], [30, 31], [40, 41, 42, 43], [50, 51]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = tiny_llama(vocab_size=128, seed=0)
        gathered = generate_batched(
            model, PROMPTS, batch_size=2, pad_token_id=0, max_new_tokens=12, data_parallel=True
        )
        # Each rank its own prompts, with EOS: the ranks finish at different steps, yet run the same number of
        # forward passes (sync_ranks), as a sharded model needs.
        ids, mask = left_pad(PROMPTS[rank::world], 0)
        free = generate(model, ids, mask, max_new_tokens=16)
        eos = sorted(set(free[:, ids.shape[1] + 1 + 8 * rank].tolist()))  # rank 0 done at step 1, rank 1 at 9
        calls = []
        hook = model.register_forward_hook(lambda *args: calls.append(1))
        out = generate(model, ids, mask, max_new_tokens=16, eos_token_id=eos, sync_ranks=True, check_every=2)
        hook.remove()
        queue.put((rank, gathered, continuation_ids(out, ids.shape[1], eos), eos, len(calls)))
    finally:
        dist.destroy_process_group()


def test_data_parallel_generation_equals_one_process():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, 2, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict((r[0], r[1:]) for r in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    model = tiny_llama(vocab_size=128, seed=0)
    expected = generate_batched(model, PROMPTS, batch_size=2, pad_token_id=0, max_new_tokens=12)
    assert results[0][0] == expected and results[1][0] == expected
    alone_calls = []
    for rank in range(2):
        ids, mask = left_pad(PROMPTS[rank::2], 0)
        eos = results[rank][2]
        calls = []
        hook = model.register_forward_hook(lambda *args: calls.append(1))
        alone = generate(model, ids, mask, max_new_tokens=16, eos_token_id=eos, check_every=2)
        hook.remove()
        alone_calls.append(len(calls))
        assert results[rank][1] == continuation_ids(alone, ids.shape[1], eos)
    # Alone, the ranks would stop after different numbers of forward passes; together both run the longer.
    assert alone_calls[0] < alone_calls[1]
    assert results[0][3] == results[1][3] == alone_calls[1]
