"""The engine core in its own process (docs/engine.md, "Processes"): real processes over a tiny
random checkpoint on CPU, driven through :class:`EngineClient` as the API drives it."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from telechat.engine.async_engine import AsyncEngine, EngineDeadError
from telechat.engine.core_client import EngineClient
from telechat.engine.core_process import SHUTDOWN_ERROR, EngineSpec, build_engine
from telechat.engine.sampling import SamplingParams
from telechat.errors import UserError
from telechat.model.config import TelechatConfig
from telechat.model.modeling import TelechatForCausalLM
from tests.processes import running, wait_for

VOCAB = 400
GREEDY = SamplingParams(max_tokens=16, temperature=0)
ENDLESS = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)



def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, VOCAB) for _ in range(rng.randrange(2, 40))] for _ in range(n)]


async def collect(engine, prompt: list[int], params: SamplingParams):
    """(all new token ids, the last output) of one request."""
    tokens, last = [], None
    async for out in engine.generate(prompt, params):
        tokens += out.new_token_ids
        last = out
    return tokens, last


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random TeleChat checkpoint folder (the core loads it by path, as it loads a real one)."""
    torch.manual_seed(0)
    # A large init spreads the logits, so greedy ties (which batching could flip) do not occur.
    cfg = TelechatConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, ffn_hidden_size=128,
                         training_seqlen=48, seq_length=512, initializer_range=0.3,
                         architectures=["TelechatForCausalLM"])
    out = tmp_path_factory.mktemp("tiny") / "tiny"
    TelechatForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def client(checkpoint):
    """A started engine core process, shared by the tests that leave it serving."""
    engine = EngineClient(EngineSpec(str(checkpoint)))
    engine.wait_ready()
    yield engine
    engine.shutdown(0)


def test_ready_tells_what_the_api_needs(client):
    """The ready message carries context length, KV capacity and vocabulary size; the core runs apart."""
    assert client.alive and client.stopped_reason is None
    assert (client.info.vocab_size, client.info.max_model_len) == (VOCAB, 512)
    assert client.info.kv_capacity_tokens >= 512 and client.stats()["kv_capacity_tokens"] == client.info.kv_capacity_tokens
    assert client.pid != os.getpid() and running(client.pid)


def test_outputs_equal_the_in_process_engine(client, checkpoint):
    """Concurrent greedy requests through the process split give the in-process engine's tokens."""
    ps = prompts(6, seed=1)
    local = AsyncEngine(build_engine(EngineSpec(str(checkpoint))))

    async def run(engine):
        return await asyncio.gather(*(collect(engine, p, GREEDY) for p in ps))

    try:
        expected = asyncio.run(run(local))
    finally:
        local.shutdown(0)
    got = asyncio.run(run(client))
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    assert all(len(tokens) == 16 for tokens, _ in got)
    assert [(o.finish_reason, o.num_prompt_tokens, o.num_output_tokens) for _, o in got] == \
        [(o.finish_reason, o.num_prompt_tokens, o.num_output_tokens) for _, o in expected]


def test_leaving_a_stream_early_aborts_it(client):
    """A consumer that stops reading aborts its request in the core: nothing runs afterwards."""
    async def main():
        async for out in client.generate(prompts(1, seed=2)[0], ENDLESS):
            if out.num_output_tokens >= 3:
                break
        for _ in range(400):
            if client.stats()["running"] == client.stats()["waiting"] == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert asyncio.run(main())
    tokens, last = asyncio.run(collect(client, prompts(1, seed=3)[0], GREEDY))
    assert len(tokens) == 16 and last.finish_reason == "length"


def test_refused_request_raises_value_error(client):
    """A request the engine refuses at add raises ValueError in its stream; the core keeps serving."""
    with pytest.raises(ValueError, match=rf"prompt token ids must be in \[0, {VOCAB}\)"):
        asyncio.run(collect(client, [1, VOCAB + 5], GREEDY))
    assert client.alive


def test_abort_all_ends_every_stream_with_the_error(client):
    """abort_all (the server's shutdown grace period is over) ends each stream with 'abort' and the error."""
    async def main():
        tasks = [asyncio.create_task(collect(client, p, ENDLESS)) for p in prompts(3, seed=4)]
        while client.stats()["running"] < 3:
            await asyncio.sleep(0.01)
        client.abort_all("the server is shutting down")
        return await asyncio.gather(*tasks)

    for _, last in asyncio.run(main()):
        assert (last.finish_reason, last.error) == ("abort", "the server is shutting down")


def test_shutdown_ends_streams_and_the_process(checkpoint):
    """shutdown(grace): a stream still running after the grace period ends with 'abort' and the reason;
    the core process exits, its socket folder is removed, and new requests are refused."""
    engine = EngineClient(EngineSpec(str(checkpoint)))
    engine.wait_ready()
    pid, folder = engine.pid, engine._dir

    async def main():
        stream = asyncio.create_task(collect(engine, prompts(1, seed=5)[0], ENDLESS))
        while engine.stats()["running"] < 1:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(engine.shutdown, 0.2)
        return await stream

    _, last = asyncio.run(main())
    assert (last.finish_reason, last.error) == ("abort", SHUTDOWN_ERROR)
    assert not running(pid) and not folder.exists()
    assert not engine.alive and engine.stopped_reason == "the engine was shut down"
    with pytest.raises(EngineDeadError):
        asyncio.run(collect(engine, [1, 2], GREEDY))
    engine.shutdown(0)  # a second call does nothing


def test_killed_core_ends_streams_with_an_error(checkpoint):
    """SIGKILL to the core mid-stream: the stream ends with finish reason 'error' naming the exit,
    ``alive`` turns false, and new requests raise EngineDeadError with the same reason."""
    engine = EngineClient(EngineSpec(str(checkpoint)))
    engine.wait_ready()

    async def main():
        tokens, killed = 0, False
        async for out in engine.generate(prompts(1, seed=6)[0], ENDLESS):
            tokens += len(out.new_token_ids)
            if tokens >= 2 and not killed:
                os.kill(engine.pid, signal.SIGKILL)
                killed = True
        return out

    try:
        last = asyncio.run(main())
        reason = "the engine process stopped (exit code -9, SIGKILL); restart the server"
        assert (last.finished, last.finish_reason, last.error) == (True, "error", reason)
        assert not engine.alive and engine.stopped_reason == reason
        with pytest.raises(EngineDeadError, match="exit code -9"):
            asyncio.run(collect(engine, [1, 2], GREEDY))
    finally:
        engine.shutdown(0)


def test_bad_checkpoint_fails_start_with_one_line(checkpoint, tmp_path):
    """Weights the core cannot read: wait_ready raises the loader's one-line CheckpointError (a
    UserError), and neither the process nor its socket folder is left behind."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    engine = EngineClient(EngineSpec(str(bad)))
    with pytest.raises(UserError, match="could not read the weights") as e:
        engine.wait_ready()
    assert "\n" not in str(e.value)
    assert not running(engine.pid) and not engine._dir.exists() and not engine.alive


def test_core_exits_when_its_parent_dies(checkpoint):
    """A parent killed with SIGKILL (no chance to stop its core) takes the core with it."""
    script = textwrap.dedent(f"""
        import time
        from telechat.engine.core_client import EngineClient
        from telechat.engine.core_process import EngineSpec

        engine = EngineClient(EngineSpec({str(checkpoint)!r}))
        engine.wait_ready()
        print(engine.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        core = int(parent.stdout.readline())
        assert running(core)
    finally:
        parent.kill()
        parent.wait()
    assert wait_for(lambda: not running(core))


def test_two_clients_share_one_core(client, checkpoint):
    """A second client joins the running core (as each API process of ``--api-server-count`` does): both
    use the same request ids at once and each gets exactly its own outputs (the in-process engine's
    tokens); the joined client detaching aborts only its own requests; the core serves on."""
    other = EngineClient.connect(client.started_address())
    other.wait_ready()
    assert other.info == client.info and other.pid == client.pid
    ps = prompts(4, seed=9)
    local = AsyncEngine(build_engine(EngineSpec(str(checkpoint))))

    async def same_ids(engine, order):
        async def one(i):
            tokens = []
            async for out in engine.generate(ps[i], GREEDY, request_id=f"r{i}"):
                tokens += out.new_token_ids
            return tokens
        return await asyncio.gather(*(one(i) for i in order))

    try:
        expected = asyncio.run(same_ids(local, range(4)))
    finally:
        local.shutdown(0)

    async def both():
        return await asyncio.gather(same_ids(client, range(4)), same_ids(other, reversed(range(4))))

    mine, theirs = asyncio.run(both())
    assert mine == expected and theirs == expected[::-1]

    async def endless_then_detach():
        async def read(engine, rid):
            n, last = 0, None
            async for out in engine.generate(prompts(1, seed=3)[0], ENDLESS, request_id=rid):
                n += len(out.new_token_ids)
                last = out
            return n, last

        kept = asyncio.ensure_future(read(client, "long"))
        cut = asyncio.ensure_future(read(other, "long"))
        while client.stats()["running"] < 2:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(other.shutdown, 0)
        return await cut, await kept

    (cut_n, cut_last), (kept_n, kept_last) = asyncio.run(endless_then_detach())
    assert cut_last.finish_reason == "abort" and cut_n < 400
    assert kept_last.finish_reason == "length" and kept_n == 400
    assert client.alive and not other.alive
