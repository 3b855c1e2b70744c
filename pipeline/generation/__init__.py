"""Generator serving: a causal LM artifact answers each event with generated text (a reply, a summary, a reason).

- ``templates``: an event's fields → the prompt's system and user messages (``Template``, ``template_from``).
- ``model``: ``GenerativeModel``, ONNX Runtime over the onnxruntime-genai builder's graph (prefill, decode step).
- ``kv``: the decode batch's KV cache (``DecodeBatch`` in host memory, ``DeviceDecodeBatch`` in CUDA slots).
- ``sampling``: the next token (greedy or seeded sampling) and when a sequence stops.
- ``scheduler``: ``GenerationScheduler``, iteration-level batching on its own thread (rows join and leave
  between decode steps, earliest deadline first, shared prefixes prefilled once).
"""

from pipeline.generation.kv import GPU_SLOT_POSITIONS, DecodeBatch, DeviceDecodeBatch
from pipeline.generation.model import GenerativeModel, choose_generation
from pipeline.generation.sampling import Sampling, StopCheck, prompt_seed
from pipeline.generation.scheduler import GenerationScheduler
from pipeline.generation.templates import TEMPLATES, Template, template_from

__all__ = ["GPU_SLOT_POSITIONS", "DecodeBatch", "DeviceDecodeBatch", "GenerationScheduler", "GenerativeModel",
           "Sampling", "StopCheck", "TEMPLATES", "Template", "choose_generation", "prompt_seed", "template_from"]
