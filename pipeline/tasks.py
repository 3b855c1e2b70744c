"""What an artifact is served as, decided once: the engine (``load_engine``) and the ``ServingTask`` (``open_task``).

``ClassifyTask``: a classifier (or a cascade of two) behind a ``MicroBatcher``; the output is a label record.
``GenerateTask``: a generator behind a ``GenerationScheduler``; events become prompts through a template, the
output is a generated-text record. Everything that differs between the two lives here, so the worker's loop
is the same for both (``pipeline/serving.py`` has the protocol).
"""

from __future__ import annotations

import orjson

from pipeline.batcher import MicroBatcher
from pipeline.cache import settings_digest
from pipeline.cascade import CascadeEngine, load_cascade
from pipeline.config import ModelSettings, Settings
from pipeline.engine import OnnxEngine
from pipeline.errors import UsageError
from pipeline.events import Event, Generation, Prediction, generation_record, label_record
from pipeline.generation import GenerationScheduler, GenerativeModel, Sampling, template_from
from pipeline.manifest import load_manifest
from pipeline.serving import ServingTask


SHADOW_CPU_BATCH = 16  # texts per call of a shadow model on CPU


def load_engine(m: ModelSettings, generate=None, batching=None, backlog=None):
    """The engine ``[model]`` names: a cascade (``cascade``), else what the artifact's task calls for:
    ``OnnxEngine`` (a classifier) or ``GenerativeModel`` (a generator; with ``generate.labels``, a
    ``ChoiceClassifier``: the generator as a classifier of those labels). ``batching`` (and ``backlog`` when it is
    enabled: its drain batches are larger): the batch shapes a bucketed engine (``model.io_binding``) plans for."""
    if m.cascade:
        return load_cascade(m.cascade, m.cascade_threshold, provider=m.provider, threads=m.threads,
                            sessions=m.sessions or None)
    _, manifest = load_manifest(m.path, verify=False)
    if manifest.task == "text-generation":
        gen = GenerativeModel(m.path, variant=m.variant, provider=m.provider, threads=m.threads, cuda_graph=m.cuda_graph)
        if generate is not None and generate.labels:
            from pipeline.generation.choice import ChoiceClassifier

            return ChoiceClassifier(gen, generate.labels, generate.instruction, generate.calibrate)
        return gen
    if m.variant == "int4":
        raise UsageError("variant int4 exists for generators only", hint="use fp32, int8 or fp16 for a classifier")
    shapes = {}
    if batching is not None:
        drain = backlog is not None and backlog.enabled
        shapes = {"max_rows": max(batching.max_batch, backlog.max_batch) if drain else batching.max_batch,
                  "max_tokens": max(batching.max_tokens, backlog.max_tokens) if drain else batching.max_tokens}
    return OnnxEngine(m.path, variant=m.variant, provider=m.provider, threads=m.threads, max_length=m.max_length,
                      sessions=m.sessions or None, bind=m.io_binding, cuda_graph=m.cuda_graph, **shapes)


def open_task(settings: Settings, engine, *, metrics=None, slo=None) -> ServingTask:
    """The serving task for this engine (by the task its artifact declares), with its scheduler built."""
    if engine.task == "text-generation":
        return GenerateTask(settings, engine, metrics=metrics, slo=slo)
    return ClassifyTask(settings, engine, metrics=metrics, slo=slo)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class ClassifyTask:
    """A classifier: the event's text in, a label record out (``latency_ms``: ``e2e``, ``batch_wait``, ``infer``)."""

    kind = "classify"
    dumps = staticmethod(orjson.dumps)  # the output record's encoding (pipeline/registry.py replaces it)
    shadow_sink = None  # the worker's writer of model.shadow_topic (see Shadow.sink)

    def __init__(self, settings: Settings, engine, *, metrics=None, slo=None) -> None:
        b = settings.batching
        self.engine = engine
        self.model_id = engine.model_id
        self.cache_namespace = engine.model_id
        self.objective_ms = settings.slo.objective_ms
        self.shadow_idle_min = settings.model.shadow_idle_min
        self.scheduler = MicroBatcher(engine, max_batch=b.max_batch, max_tokens=b.max_tokens, max_wait_ms=b.max_wait_ms,
                                      metrics=metrics, concurrency=b.engine_concurrency or engine.sessions, slo=slo,
                                      timeout_s=b.engine_timeout_s)
        if isinstance(engine, CascadeEngine):
            # A full batch waiting means there is no time to escalate; answers depend on the threshold too.
            batcher = self.scheduler
            engine.pressure = lambda: batcher.waiting() >= batcher.max_batch
            engine.second_batch = b.max_batch
            engine.metrics = metrics
            self.cache_namespace = f"{engine.model_id}|t={engine.threshold}"

    canary = None  # a candidate engine answering a share of keys (pipeline/swap.py), behind its own batcher
    canary_share = 0.0

    def set_canary(self, engine, share: float, *, linger_s: float = 30.0):
        """Have ``engine`` answer ``share`` of the keys (None: no canary); the engine it replaces is returned (the
        caller closes it once its calls are done). Ending a canary: new texts go to the served model at once; the
        canary's batcher answers what it holds and is closed ``linger_s`` later."""
        old = self.canary
        batcher = getattr(self, "_canary_batcher", None)
        if engine is None:
            self._canary_batcher = None
            if batcher is not None:
                import asyncio

                loop = asyncio.get_running_loop()
                loop.call_later(linger_s, lambda: loop.create_task(batcher.close()))
        elif batcher is not None:
            batcher.swap(engine)
        else:
            self._canary_batcher = MicroBatcher(engine, max_batch=self.scheduler.max_batch,
                                                max_tokens=self.scheduler.max_tokens,
                                                max_wait_ms=self.scheduler.max_wait * 1000,
                                                concurrency=engine.sessions, slo=self.scheduler.slo,
                                                timeout_s=self.scheduler.timeout_s)
            self._canary_batcher.start()
        self.canary, self.canary_share = engine, share
        return getattr(old, "_inner", old)

    shadow = None  # a pipeline.swap.Shadow: another version labelling the same texts off the critical path

    def set_shadow(self, engine, *, metrics=None, linger_s: float = 30.0):
        """Have ``engine`` shadow the served model (None: no shadow); the Shadow it replaces is returned."""
        from pipeline.shadow import Shadow

        old = self.shadow
        if old is not None:
            import asyncio

            loop = asyncio.get_running_loop()
            loop.call_later(linger_s, lambda: loop.create_task(old.batcher.close()))
        if engine is None:
            self.shadow = None
        else:
            cpu = getattr(engine, "providers", ["CPUExecutionProvider"])[0] == "CPUExecutionProvider"
            # On CPU a shadow's calls are short (SHADOW_CPU_BATCH texts): one that starts just before the load does
            # gives the cores back soon.
            b = MicroBatcher(engine, max_batch=min(SHADOW_CPU_BATCH, self.scheduler.max_batch) if cpu
                             else self.scheduler.max_batch, max_tokens=self.scheduler.max_tokens,
                             max_wait_ms=self.scheduler.max_wait * 1000, concurrency=engine.sessions,
                             timeout_s=self.scheduler.timeout_s)
            b.start()
            idle = None
            if self.shadow_idle_min > 0 and cpu:
                from pipeline.runtime import IdleCpu

                idle = IdleCpu()
                if not idle.readable:  # no CPU figures here: the other guards only (never a shadow that drops all)
                    from pipeline import logs

                    logs.get("streamlabel.shadow").warning(
                        "shadow_idle_cpu_unreadable", note="neither /proc/stat nor the cgroup's cpu.stat could be "
                        "read: the shadow is guarded by the served model's load only")
                    idle = None
            self.shadow = Shadow(engine, b, metrics, sink=self.shadow_sink, guard_s=self.objective_ms / 2000.0,
                                 idle=idle, idle_min=self.shadow_idle_min)
        return old

    @property
    def canary_scheduler(self):
        return getattr(self, "_canary_batcher", None)

    def swap(self, engine):
        """Serve ``engine`` (another version of the same classifier) from the next engine call on; the old one is
        returned (the caller closes it once its calls are done). Cache keys follow the new version."""
        old = self.scheduler.swap(engine)
        self.engine = engine
        self.model_id = self.cache_namespace = engine.model_id
        return old

    def text(self, event: Event) -> str:
        return event.text

    def cacheable(self, answer: Prediction) -> bool:
        return not answer.degraded  # a cascade's answer kept only because of overload is not a normal one

    def encode(self, event: Event, answer: Prediction, *, wait_s: float, now_ms: int, record_ts_ms: int) -> bytes:
        if answer.cached:
            lat = {"e2e": now_ms - record_ts_ms}
        else:
            lat = {"e2e": now_ms - record_ts_ms, "batch_wait": _ms(wait_s), "infer": _ms(answer.timings.infer)}
        return self.dumps(label_record(event, answer, labeled_at_ms=now_ms, latency_ms=lat))

    def started(self, log) -> None:
        pass


class GenerateTask:
    """A generator: the prompt a template renders from the event in, a generated-text record out (``latency_ms``:
    ``e2e``, ``queue``, ``ttft``, ``decode``)."""

    kind = "generate"
    dumps = staticmethod(orjson.dumps)

    def __init__(self, settings: Settings, engine: GenerativeModel, *, metrics=None, slo=None) -> None:
        g, b = settings.generate, settings.batching
        self.engine = engine
        self.model_id = engine.model_id
        self.objective_ms = settings.slo.objective_ms
        self.template = template_from(g.template, g.system, g.user)
        self.scheduler = GenerationScheduler(
            engine, max_batch=b.max_batch, max_tokens=b.max_tokens, max_new_tokens=g.max_new_tokens, stop=g.stop,
            sampling=Sampling(g.do_sample, g.temperature, g.top_p, g.seed), prefill_tokens=g.prefill_tokens,
            max_prompt_tokens=g.max_prompt_tokens, ignore_eos=g.ignore_eos, metrics=metrics, slo=slo)
        self.scheduler.add_prefix(engine.prefix_of(self.template.render("")[0]))
        # A cached generation is valid only for the same prompt and decoding settings: their digest goes into the
        # key (never the template's text, which would then sit in every Redis key).
        self.cache_namespace = f"{engine.model_id}|" + settings_digest(
            self.template.system, self.template.user, g.max_new_tokens, g.stop, g.ignore_eos,
            g.do_sample and (g.temperature, g.top_p, g.seed))

    def text(self, event: Event) -> str:
        return self.engine.render(*self.template.for_event(event))

    def cacheable(self, answer: Generation) -> bool:
        return answer.finish_reason in ("stop", "length")  # never one cut off by its deadline

    def encode(self, event: Event, answer: Generation, *, wait_s: float, now_ms: int, record_ts_ms: int) -> bytes:
        if answer.cached:
            lat = {"e2e": now_ms - record_ts_ms}
        else:
            t = answer.timings
            lat = {"e2e": now_ms - record_ts_ms, "queue": _ms(t.queue), "ttft": _ms(t.ttft), "decode": _ms(t.decode)}
        return self.dumps(generation_record(event, answer, generated_at_ms=now_ms, latency_ms=lat))

    def started(self, log) -> None:
        if self.objective_ms < 1000:
            log.warning("generation_deadline_short", objective_ms=self.objective_ms,
                        note="each generation must finish by its record timestamp + slo.objective_ms; most will "
                             "end with finish_reason=deadline. Set [slo] objective_ms = 5000 (or more) for generators")
