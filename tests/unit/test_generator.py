"""The generator on the tiny random-init Llama: the build and its gate, iteration-level batching, finishes."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from pipeline.errors import EngineFailure
from pipeline.errors import QualityGateError
from pipeline.events import Generation
from pipeline.generation import TEMPLATES, DecodeBatch, GenerationScheduler, GenerativeModel, Sampling, template_from
from pipeline.manifest import load_manifest

PROMPTS = ["My card was charged twice for one coffee.", "Where is my refund?", "The app logs me out every hour.",
           "Thanks, the new branch staff were great!", "Shares of ACME fell 12% after the earnings call."]


@pytest.fixture(scope="module")
def model(tiny_generator):
    m = GenerativeModel(tiny_generator, variant="fp32", provider="cpu")
    yield m
    m.close()


def prompts_of(model, texts, template="reply"):
    return [model.render(*TEMPLATES[template].render(t)) for t in texts]


def solo(model, prompt: str, n: int) -> list[int]:
    """One prompt alone, the plain way: prefill, then one token at a time (no batching, no prefix reuse)."""
    ids = model.encode(prompt)
    last, past = model.prefill(ids)
    out = [int(last.argmax())]
    length = len(ids)
    while len(out) < n and out[-1] not in model.eos:
        logits, past = model.forward(np.asarray([[out[-1]]]), np.ones((1, length + 1), dtype=np.int64), past)
        length += 1
        out.append(int(logits[0, -1].argmax()))
    return out


def test_manifest_records_the_gate_and_the_prompt_format(tiny_generator):
    _, m = load_manifest(tiny_generator)
    assert m.task == "text-generation" and "{system}" in m.generation["prompt_format"]
    assert m.gate["passed"] and m.gate["prompts"] >= 10
    for v in ("fp32", "int8"):
        q = m.variants[v].quality
        assert q["exact_match_16"] >= 0.5 and 0.0 <= q["rouge_l"] <= 1.0
        assert m.variants[v].extra_files, "the external weights file is checksummed too"
    assert m.generation["default_cpu_variant"] in ("fp32", "int8")
    ref = m.gate["reference_tokens"]
    assert len(ref) == m.gate["prompts"] and all(1 <= len(r) <= 16 for r in ref), "PyTorch's tokens, for later checks"


def test_a_variant_is_checked_later_against_the_stored_reference(tiny_generator, model):
    """What `python -m producers.bench.generator_check` does on a GPU machine: no torch, the manifest's tokens."""
    from pipeline.model.generative import gate_figures, gate_prompt_ids

    _, m = load_manifest(tiny_generator)
    hyp = model.greedy(gate_prompt_ids(model), 16)
    assert gate_figures(m.gate["reference_tokens"], hyp) == {k: m.variants["fp32"].quality[k]
                                                            for k in ("n", "exact_match_16", "rouge_l")}


@pytest.mark.train
def test_gate_refuses_a_variant_under_the_floor(tmp_path):
    from pipeline.model.build import Reporter
    from pipeline.model.generative import build_generator

    with pytest.raises(QualityGateError) as exc:
        build_generator(out=tmp_path, preset="tiny-generator", variants=("int4",), min_exact=1.01, bench=False,
                        reporter=Reporter(quiet=True))
    assert "int4" in str(exc.value) and "exact match" in str(exc.value)
    assert not list((tmp_path / "tiny-generator").glob("[0-9]*")), "nothing was published"
    assert list((tmp_path / "tiny-generator").glob("rejected-*")), "the refused build is kept for inspection"


def test_batched_greedy_equals_one_prompt_at_a_time(model):
    prompts = prompts_of(model, PROMPTS)
    batched = model.greedy([model.encode(p) for p in prompts], 12)
    assert batched == [solo(model, p, 12) for p in prompts]


def test_device_slot_batch_decodes_like_one_prompt_at_a_time(model):
    """The GPU decode batch (fixed slots, prefill into the slot, KV bound in place), run in host memory."""
    from pipeline.generation import DeviceDecodeBatch

    prompts = prompts_of(model, PROMPTS)
    batch = DeviceDecodeBatch(model, rows=8, length=256, device="cpu")
    outs = {}
    for i, p in enumerate(prompts[:3]):  # three rows, then two more join two steps later, one leaves early
        outs[i] = [int(batch.join(i, model.encode(p)).argmax())]
    for step in range(10):
        if step == 2:
            for i in (3, 4):
                outs[i] = [int(batch.join(i, model.encode(prompts[i])).argmax())]
        if step == 4:
            batch.leave([batch.rows.index(1)])
        logits = batch.step(np.asarray([outs[r][-1] for r in batch.rows]))
        for r, t in zip(batch.rows, logits.argmax(axis=1).tolist()):
            outs[r].append(int(t))
    for i, p in enumerate(prompts):
        assert outs[i] == solo(model, p, len(outs[i])), f"row {i}"


LONGER = PROMPTS + ["Hi", "I was charged a fee on a transfer I cancelled within the hour, and support closed my ticket "
                              "twice without an answer; what should I do next?", "ok thanks"]


def _decode(batch, model, prompts, n: int, join_at: dict[int, list[int]]) -> dict:
    """Greedy decoding on ``batch``: ``join_at[step]`` prompts join together (one join_many) before that step."""
    outs: dict[int, list[int]] = {}
    for step in range(n + max(join_at)):
        if step in join_at:
            group = join_at[step]
            for i, t in zip(group, batch.join_many([(i, model.encode(prompts[i])) for i in group], greedy=True)):
                outs[i] = [t]
        if step == 3 and 1 in batch.rows:  # one leaves early: a hole among the slots
            batch.leave([batch.rows.index(1)])
        live = [r for r in batch.rows if len(outs[r]) < n]
        if not live:
            continue
        batch.leave([j for j, r in enumerate(batch.rows) if len(outs[r]) >= n])
        nxt = batch.step(np.asarray([outs[r][-1] for r in batch.rows]), greedy=True)
        for r, t in zip(batch.rows, np.asarray(nxt).tolist()):
            outs[r].append(int(t))
    return outs


@pytest.mark.parametrize("kind", ["host, one call per prompt", "host, one padded call", "device slots, padded runs",
                                  "device slots, fixed-shape steps"])
def test_batched_prefill_decodes_exactly_what_one_at_a_time_prefill_does(model, kind):
    """Prompts of 1 to ~40 tokens join in groups (right-padded in one call, or one call each), a row leaves and
    later prompts fill the hole: every row's tokens are those of the prompt decoded alone."""
    from pipeline.generation import DeviceDecodeBatch

    prompts = prompts_of(model, LONGER)
    if kind.startswith("device"):
        batch = DeviceDecodeBatch(model, rows=8, length=256, device="cpu", fixed="fixed" in kind)
    else:
        batch = DecodeBatch(model)
        batch.batched = "padded" in kind
    outs = _decode(batch, model, prompts, 10, {0: [0, 1, 2], 5: [3, 4, 5, 6, 7]})
    assert sorted(outs) == list(range(8))
    for i, p in enumerate(prompts):
        assert outs[i] == solo(model, p, len(outs[i])), f"{kind}: prompt {i}"


def test_the_graph_projects_only_each_rows_last_position(model):
    """The build adds a gather before the LM head: logits are rows × 1 × vocabulary, and a right-padded batch's
    row gets its own last token's logits (not the padding's)."""
    assert model.last_only
    assert [o.shape[1] for o in model.session.get_outputs() if o.name in ("logits", "next_token")] == [1, 1]
    ids = [model.encode(p) for p in prompts_of(model, LONGER)]
    assert len({len(i) for i in ids}) > 3, "rows of different lengths: padding in the batch"
    batched, present = model.prefill_many(ids)
    for i, one in enumerate(ids):
        alone, kv = model.prefill(one)
        np.testing.assert_allclose(batched[i], alone, atol=1e-5)
        k = model.past_names[0]
        np.testing.assert_allclose(present[k][i, :, :len(one)], kv[k][0], atol=1e-5)


def test_free_slot_runs_cover_the_joining_prompts_in_slot_order(model):
    from pipeline.generation import DeviceDecodeBatch

    batch = DeviceDecodeBatch(model, rows=8, length=64, device="cpu")
    assert batch.runs(3) == [(0, 3)]
    batch.slots = ["a", None, None, "b", None, "c", None, None]
    assert batch.runs(1) == [(1, 1)]
    assert batch.runs(3) == [(1, 2), (4, 1)]
    assert batch.runs(5) == [(1, 2), (4, 1), (6, 2)]
    with pytest.raises(ValueError, match="6 prompts to join, 5 free slots"):
        batch.runs(6)


async def test_prompts_join_the_running_batch_and_match_solo_decoding(model):
    sched = GenerationScheduler(model, max_batch=8, max_new_tokens=24)
    sched.add_prefix(model.prefix_of(TEMPLATES["reply"].render("")[0]))
    sched.start()
    try:
        prompts = prompts_of(model, PROMPTS)
        first = sched.submit_many(prompts[:2])
        deadline = time.monotonic() + 30
        while sched.batches < 3 and not first.done():  # wait until the first two are decoding
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        steps_before = sched.batches
        second = sched.submit_many(prompts[2:])
        a, b = await asyncio.wait_for(asyncio.gather(first, second), 60)
        results = a.results + b.results
        assert all(isinstance(r, Generation) for r in results)
        # Joining a running batch (and the shared prefix) does not change any row's greedy output.
        for p, r in zip(prompts, results):
            assert r.text == model.decode_text(solo(model, p, 24)).strip()
            assert r.finish_reason in ("length", "stop") and 1 <= r.tokens <= 24
            assert r.timings.ttft >= r.timings.queue >= 0
        assert sched.batches - steps_before < 24 * 2, "the late prompts did not wait for the first batch to end"
    finally:
        await sched.close()


async def test_deadline_finishes_a_sequence_with_what_it_has(model):
    ticks = iter(range(10**9))
    t0 = time.time()
    clock = lambda: t0 + next(ticks) * 0.001  # noqa: E731 — 1 ms per reading: the deadline falls mid-generation
    sched = GenerationScheduler(model, max_batch=4, max_new_tokens=400, clock=clock)
    sched.start()
    try:
        [r] = await asyncio.wait_for(sched.generate(prompts_of(model, PROMPTS[:1]), [t0 + 0.05]), 30)
        assert isinstance(r, Generation) and r.finish_reason == "deadline"
        assert 1 <= r.tokens < 400
        assert sched.late == 1
    finally:
        await sched.close()


async def test_a_prompt_longer_than_the_context_fails_alone(model):
    sched = GenerationScheduler(model, max_batch=4, max_new_tokens=8)
    sched.start()
    try:
        long = "word " * 2000
        r = await asyncio.wait_for(sched.generate(prompts_of(model, [long, PROMPTS[0]])), 30)
        assert isinstance(r[0], EngineFailure) and r[0].reason.startswith("too long")
        assert isinstance(r[1], Generation), "the other prompt of the same call is answered"
    finally:
        await sched.close()


async def test_identical_prompts_share_one_generation_and_stop_strings_cut(model):
    p = prompts_of(model, PROMPTS[:1])[0]
    ref = model.decode_text(solo(model, p, 16)).strip()
    stop = ref.split()[2] if len(ref.split()) > 2 else ref[-2:]
    sched = GenerationScheduler(model, max_batch=4, max_new_tokens=16, stop=[stop])
    sched.start()
    try:
        r = await asyncio.wait_for(sched.generate([p, p, p]), 30)
        assert r[0] is r[1] is r[2] and sched.coalesced == 2
        assert r[0].finish_reason == "stop" and stop not in r[0].text and ref.startswith(r[0].text)
    finally:
        await sched.close()


async def test_seeded_sampling_is_reproducible_and_differs_from_greedy(model):
    prompts = prompts_of(model, PROMPTS)
    outs = []
    for _ in range(2):
        sched = GenerationScheduler(model, max_batch=8, max_new_tokens=16,
                                    sampling=Sampling(do_sample=True, temperature=1.5, top_p=0.95, seed=7))
        sched.start()
        try:
            outs.append([g.text for g in await asyncio.wait_for(sched.generate(prompts), 30)])
        finally:
            await sched.close()
    assert outs[0] == outs[1]
    greedy = [model.decode_text(solo(model, p, 16)).strip() for p in prompts]
    assert outs[0] != greedy


def test_templates_render_event_fields_and_bad_templates_are_usage_errors():
    t = template_from("explain-label")
    system, user = t.render("fees went up", label="negative")
    assert "negative" in user and "fees went up" in user
    with pytest.raises(Exception) as exc:
        template_from("reply", user="{nope}")
    assert "does not format" in str(exc.value)
    with pytest.raises(Exception) as exc:
        template_from("poem")
    assert "unknown prompt template" in str(exc.value)


async def test_kv_memory_follows_the_running_rows_and_one_long_prompt_does_not_inflate_the_rest(model):
    """The CPU decode batch used to keep the longest length ever seen × rows: one long prompt made every later
    batch allocate rows × its length. Now the budget counts positions as laid out (rows × the longest row), and
    the buffers shrink once the rows need a quarter of them; an empty batch holds nothing."""
    per_position = 2 * model.layers * model.kv_heads * model.head * np.dtype(model.kv_dtype).itemsize
    budget = 1024  # positions
    sched = GenerationScheduler(model, max_batch=8, max_tokens=budget, max_new_tokens=8, ignore_eos=True)
    seen: list[tuple[int, int]] = []  # (rows, bytes) at every decode step
    step = sched._batch.step

    def recording(tokens, greedy=False):
        out = step(tokens, greedy)
        seen.append((len(sched._batch.rows), sched._batch.nbytes))
        return out

    sched._batch.step = recording
    sched.start()
    try:
        long = model.render("Summarize.", "word " * 130)  # about 420 tokens
        short = prompts_of(model, PROMPTS)
        first = await asyncio.wait_for(sched.generate([long] + short), 60)
        assert all(isinstance(r, Generation) for r in first)
        after_long = len(seen)
        again = await asyncio.wait_for(sched.generate([p + " again" for p in short]), 60)
        assert all(isinstance(r, Generation) for r in again)
    finally:
        await sched.close()
    peak = max(b for _, b in seen)
    assert peak <= per_position * (budget + 8 * DecodeBatch.GROW), f"peak {peak} bytes over the budget"
    short_only = [b for _, b in seen[after_long:]]
    assert max(short_only) <= per_position * 8 * 2 * DecodeBatch.GROW, "the long prompt's length outlived it"
    assert sched._batch.nbytes == 0, "an idle batch holds no KV"


def test_the_device_step_runs_the_smallest_row_bucket_on_fixed_buffers(model):
    """The GPU decode step's shapes are fixed per row bucket (what a captured CUDA graph needs): a step runs the
    first k slots, k the smallest bucket past the highest busy slot, on buffers that never move."""
    from pipeline.generation import DeviceDecodeBatch

    prompts = prompts_of(model, LONGER)
    batch = DeviceDecodeBatch(model, rows=16, length=128, device="cpu", fixed=True)
    assert batch.grid == [1, 2, 3, 4, 6, 8, 12, 16]
    outs = _decode(batch, model, prompts, 6, {0: [0, 1, 2, 3, 4], 2: [5, 6]})
    for i, p in enumerate(prompts[:7]):
        assert outs[i] == solo(model, p, len(outs[i])), f"prompt {i}"
    assert set(batch._steps) <= set(batch.grid) and 6 in batch._steps and 8 in batch._steps
    s = batch._steps[8]
    io = s.io
    for h in list(batch.rows):
        batch.leave([batch.rows.index(h)])
    ids = model.encode(prompts[0])
    first = batch.join_many([(i, ids) for i in range(7)], greedy=True)  # slots 0..6 again: bucket 8
    batch.step(np.asarray(first), greedy=True)
    assert batch._steps[8] is s and s.io is io, "a bucket's step is made and bound once"
    assert s.toks.shape == (8, 1) and s.mask.shape == (8, 128), "its shapes are the bucket's, whatever the rows"


def test_capturing_on_an_empty_batch_leaves_decoding_exact(model):
    """Capture runs every bucket's step with every slot free (their position 0 written); the prompts that join
    afterwards decode exactly what they do alone."""
    from pipeline.generation import DeviceDecodeBatch

    prompts = prompts_of(model, LONGER)
    with pytest.raises(ValueError, match="fixed-shape"):
        DeviceDecodeBatch(model, rows=8, length=128, device="cpu").capture()
    batch = DeviceDecodeBatch(model, rows=8, length=128, device="cpu", fixed=True)
    batch.capture()
    assert set(batch._steps) == set(batch.grid)
    outs = _decode(batch, model, prompts, 8, {0: [0, 1, 2], 3: [3, 4, 5, 6, 7]})
    for i, p in enumerate(prompts):
        assert outs[i] == solo(model, p, len(outs[i])), f"prompt {i}"
    with pytest.raises(ValueError, match="empty batch"):
        batch.capture()


def test_cuda_graphs_asked_for_on_cpu_are_refused_with_the_reason(tiny_generator):
    m = GenerativeModel(tiny_generator, variant="fp32", provider="cpu", cuda_graph=True)
    try:
        assert m.cuda_graph is False and m.plain_run is None
        assert "CUDA provider" in m.cuda_graph_error
    finally:
        m.close()


def test_a_failed_capture_makes_the_session_again_without_graphs_and_decodes_exactly(tiny_generator):
    """A capture that fails (here: the session refuses every bound run once) turns the model's graphs off, makes
    its session again, and the batch's steps are made anew on it: decoding is unchanged."""
    from pipeline.generation import DeviceDecodeBatch

    m = GenerativeModel(tiny_generator, variant="fp32", provider="cpu")
    try:
        prompts = prompts_of(m, LONGER)

        class Refusing:
            def __init__(self, inner):
                self.inner = inner

            def __getattr__(self, name):
                return getattr(self.inner, name)

            def run_with_iobinding(self, io, options=None):
                raise RuntimeError("capture failed (test)")

        batch = DeviceDecodeBatch(m, rows=8, length=128, device="cpu", fixed=True)
        real = m.session
        m.session = Refusing(real)
        batch.capture()
        assert m.cuda_graph is False and m.cuda_graph_error.startswith("capturing the decode step failed")
        assert m.session is not real and not isinstance(m.session, Refusing) and not batch._steps
        outs = _decode(batch, m, prompts, 6, {0: [0, 1, 2, 3]})
        for i in range(4):
            assert outs[i] == solo(m, prompts[i], len(outs[i])), f"prompt {i}"
    finally:
        m.close()
