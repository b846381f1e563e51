"""Tensor parallelism on CPU: two vLLM workers, each with half the heads, vocabulary and FFN."""

from __future__ import annotations

import os

from tests.vllm.conftest import PROMPTS, Native

NEW_TOKENS = 12


def test_tensor_parallel_2_gives_native_greedy_tokens(tiny_12b, llm_factory, monkeypatch):
    """TP=2 (multiprocessing workers, gloo) on the 12B layout: greedy tokens equal our native model's."""
    from vllm import SamplingParams

    # vLLM's automatic binding wants a NUMA node per worker; pin one CPU per rank instead ("0|1").
    cpus = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(map(str, cpus[:2])) if len(cpus) > 1 else "nobind")

    llm = llm_factory(tiny_12b, tensor_parallel_size=2, distributed_executor_backend="mp")
    assert llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
    native = Native(tiny_12b)
    prompts = [native.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    for ids, out in zip(prompts, outputs):
        assert list(out.outputs[0].token_ids) == native.greedy(ids, NEW_TOKENS)
