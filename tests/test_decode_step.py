"""The fixed-shape decode step (the one CUDA captures as a graph) against the eager one and full recomputation:
the same tokens greedy and sampled, every slot fed against the whole cache; on CUDA, the captured graph too."""

from __future__ import annotations

import pytest
import torch

from selfrefine.decode_step import use_static_step
from selfrefine.sampling import SamplingParams, generate
from tests.test_sampling import LENGTHS, decode_letters, model, prompts_of, reference  # noqa: F401 (fixture)


@pytest.mark.parametrize("slots", [3, 64])
@pytest.mark.parametrize("stop_ids,with_strings", [([], False), ([3, 7, 11], False), ([3, 7], True)])
def test_static_step_greedy_matches_recomputation(model, slots, stop_ids, with_strings):
    prompts = prompts_of(LENGTHS)
    stops = ()
    if with_strings:  # rows stop at different steps, so free slots sit below busy ones
        free = [reference(model, prompts[i], 16) for i in (0, 2, 5)]
        stops = tuple(decode_letters(c.token_ids[k:k + 2]) for c, k in zip(free, (3, 6, 9)))
    params = SamplingParams(max_new_tokens=16, n=2, stop_strings=stops)
    res = generate(model, prompts, params, stop_ids=stop_ids, decode=decode_letters, batch_size=slots,
                   progress=False, static=True)
    for p, cs in zip(prompts, res):
        ref = reference(model, p, 16, stop_ids, decode_letters, stops)
        assert cs == [ref, ref]


@pytest.mark.parametrize("slots", [4, 64])
def test_static_step_samples_like_the_eager_step(model, slots):
    prompts = prompts_of(LENGTHS[:7])
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.95, n=3, stop_strings=("ab",))
    kw = dict(stop_ids=[3], decode=decode_letters, seed=5, progress=False, batch_size=slots)
    eager = generate(model, prompts, params, **kw)
    assert generate(model, prompts, params, static=True, **kw) == eager
    assert len({len(c.token_ids) for r in eager for c in r}) > 2  # rows finished at different steps


def test_static_step_feeds_every_slot_against_the_whole_cache(model, monkeypatch):
    """Fixed shapes whatever the busy rows: all slots in every decode forward, keys over every cache position,
    a free slot fed at position 0 seeing only that position."""
    shapes, masks = set(), []
    inner = model.hidden_states

    def spy(ids, positions=None, key_mask=None, cache=None):
        if key_mask is not None:  # a decode step
            shapes.add((tuple(ids.shape), tuple(positions.shape), tuple(key_mask.shape)))
            masks.append((positions[:, 0].clone(), key_mask[:, 0, 0].clone()))
        return inner(ids, positions, key_mask, cache)

    monkeypatch.setattr(model, "hidden_states", spy)
    prompts = prompts_of([4, 9, 2])
    generate(model, prompts, SamplingParams(max_new_tokens=5), stop_ids=[], batch_size=8, progress=False,
             static=True)
    positions = max(map(len, prompts)) + 5 - 1
    assert shapes == {((3, 1), (3, 1), (3, 1, 1, positions))}  # 3 slots: min(8, rows)
    for at, mask in masks:
        assert mask.tolist() == [[k <= a for k in range(positions)] for a in at.tolist()]


def test_use_static_step_by_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [use_static_step(c, cpu) for c in ("auto", "on", "off")] == [False, True, False]
    assert [use_static_step(c, cuda) for c in ("auto", "on", "off")] == [True, True, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decoding_equals_eager_on_cuda(model):
    """On CUDA the static step is captured and replayed: greedy rows equal the eager step's, row for row."""
    m = model.to("cuda")
    try:
        prompts = prompts_of(LENGTHS)
        params = SamplingParams(max_new_tokens=16, n=2)
        kw = dict(stop_ids=[3, 7], batch_size=5, progress=False)
        assert generate(m, prompts, params, static=True, **kw) == generate(m, prompts, params, **kw)
    finally:
        model.to("cpu")
