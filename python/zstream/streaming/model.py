"""``StreamingModel``: a causal LM whose blocks live where the plan says, run block by block.

Where a weight byte goes, in order:
  disk --(Rust reader, io_uring O_DIRECT)--> host arena (pinned)          [foundations/store.py: read_flat, fetch]
       --(one copy per block, on the copy stream)--> device ring slot    [ring.py: DeviceRing._issue]
       --(views at the arena's offsets)--> the family's matmuls          [StreamingModel._forward -> family.block]
With quantized weights the slot holds the packed block, and ``blocks.Dequantized`` turns it into matrices on the
compute stream (a Triton kernel, ``foundations/quant/kernels.py``) just before the matmuls.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import torch
from torch import Tensor

from ..errors import ModelClosedError, ModelError, OutOfMemoryError, UsageError, warn
from ..foundations.checkpoint import is_synthetic, load_tokenizer, side_files_dir
from ..foundations.models import Family
from ..foundations.parallel import Group
from ..foundations.quant import BlockQuant
from ..foundations.store import WeightStore
from ..foundations.units import dtype_name, fmt_bytes, fmt_params
from ..planning.facts import CheckpointFacts
from ..planning.residency import GRAPH_MIN_STEPS, Plan, cpu_layers_of, micro_batch_rows
from . import generate as gen
from .blocks import Dequantized, Resident, Streamer, run_blocks
from .cache import KVCache
from .device import Device
from .graph import DecodeGraph
from .trace import Traced, Tracer, write_trace
from .weights import Weights, attention_kernels

_F = TypeVar("_F", bound=Callable[..., Any])
Prompt = Union[Tensor, str, Sequence[str], Sequence[Dict[str, str]], Sequence[Sequence[Dict[str, str]]]]


def _serialised(method: _F) -> _F:
    """Run ``method`` holding the model's lock, on an open model. Why: the ring is one schedule of blocks in flight,
    consumed in block order; two threads in passes at once would take each other's blocks (or reset the ring under
    each other). A second caller waits instead. Reentrant: generate -> forward, __call__ -> forward."""

    @functools.wraps(method)
    def locked(self: StreamingModel, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self._closed:
                raise ModelClosedError(f"{self.path}: the model is closed; load it again to use it")
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


class StreamingModel:
    """A causal LM whose blocks live where the plan says: on the device, in pinned host memory, or on disk.

    ``model(input_ids, attention_mask) -> logits``, ``model.generate(...)``, ``model.stream(...)``; a context
    manager (``with zstream.load(...) as model:``) that closes the model at the end. Built by ``zstream.load``.
    """

    def __init__(self, *, store: WeightStore, facts: CheckpointFacts, plan: Plan, config: Dict[str, Any],
                 outer: Weights, resident: Dict[int, Weights], streamed: Optional[Streamer], device: Device,
                 path: str = "", load_s: float = 0.0, group: Optional[Group] = None) -> None:
        self.store = store
        self.facts = facts
        self.family: Family = facts.family
        self.plan = plan
        self.config = config
        self.outer = outer
        self.resident = resident
        self.quant: Optional[BlockQuant] = facts.quant  # packed blocks: dequantized just before their matmuls
        self.path = path
        self.load_s = load_s
        self.device = torch.device(plan.device)
        self.dtype = plan.dtype
        self.synthetic = is_synthetic(config)
        self.group = group  # tensor parallelism: the ranks this model is sharded over; None alone
        self._streamed = streamed     # the streamed blocks' streamer (a ring, or in place); None: all resident
        self._seam = device
        self._generation_config: Any = None
        self._tokenizer: Any = None
        self._tokenizer_loaded = False
        self._tracer: Optional[Tracer] = None
        self._traced: Optional[Traced] = None
        self._warned_random = False
        self._closed = False
        self._lock = threading.RLock()  # one pass at a time through the streamer: see _serialised
        self._graph: Optional[DecodeGraph] = None  # the decode steps of the last cache, as one CUDA graph
        self.graph_steps = 0  # decode steps replayed from (or recorded into) a graph, over the model's life
        self.blocks = self._chain()

    def _chain(self) -> Streamer:
        """Every block's streamer: resident ones from the dict, streamed ones from the ring (traced while a trace
        runs), dequantized when packed."""
        streamed = self._traced if self._traced is not None else self._streamed
        chain: Streamer = Resident(self.resident, streamed)
        return Dequantized(chain, self.quant) if self.quant is not None else chain

    # --- the forward pass --------------------------------------------------------------------------------------
    @_serialised
    def forward(self, input_ids: Tensor, attention_mask: Tensor, cache: KVCache, last_only: bool = False) -> Tensor:
        """Run T new tokens (B, T) through every block, appending them to ``cache``; -> logits (B, T, vocab), or
        (B, 1, vocab) of the last position with ``last_only`` (generation needs no more)."""
        with attention_kernels(self.device):
            return self._forward(input_ids, attention_mask, cache, last_only)

    @torch.inference_mode()
    def _forward(self, input_ids: Tensor, attention_mask: Tensor, cache: KVCache, last_only: bool) -> Tensor:
        if self._graphable(input_ids, cache):
            return self._graphed(input_ids, attention_mask, cache)
        fam, blocks = self.family, self.blocks
        blocks.begin_pass(input_ids.numel())
        input_ids = input_ids.to(self.device)
        mask, _start = cache.extend(attention_mask.to(self.device))
        parts = micro_batch_rows(input_ids.shape[0], self.plan.micro_batch)  # rows of each micro-batch
        # positions, mask, ALiBi/RoPE: once per pass and micro-batch
        ctxs = [fam.context(mask[rows], input_ids.shape[1], self.dtype) for rows in parts]
        with self._telling_the_ranks():
            hidden = [fam.embed(self.outer, input_ids[rows], ctx) for rows, ctx in zip(parts, ctxs)]  # (b, T, C)
            hidden = run_blocks(fam, blocks, hidden, cache.layer, parts, ctxs)
            if last_only:
                hidden = [h[:, -1:] for h in hidden]                        # (b, 1, C)
            logits = [fam.head(self.outer, h) for h in hidden]              # (b, T, vocab)
            return logits[0] if len(logits) == 1 else torch.cat(logits)     # (B, T, vocab)

    def _graphable(self, input_ids: Tensor, cache: KVCache) -> bool:
        """Whether this pass is a decode step the plan lets replay as a CUDA graph (``plan.decode_graph``): one new
        token a row, after a prompt, the whole batch at once, the cache on the device, no trace running, and a graph
        already made for this cache or room left in it for enough steps to pay for making one."""
        if not self.plan.decode_graph or self._tracer is not None or self.group is not None:
            return False
        if input_ids.shape[1] != 1 or cache.length == 0 or cache.device_layers != self.family.num_blocks:
            return False
        micro = self.plan.micro_batch
        if micro is not None and micro < input_ids.shape[0]:
            return False
        graph = self._graph
        # generation sizes a cache for every new token, the last of which never runs: free slots - 1 steps to come
        return (graph is not None and graph.fits(cache)) or cache.max_len - cache.length > GRAPH_MIN_STEPS

    def _graphed(self, input_ids: Tensor, attention_mask: Tensor, cache: KVCache) -> Tensor:
        """A decode step replayed from this cache's CUDA graph (recorded at its first step) -> logits (B, 1, vocab)."""
        fam = self.family
        input_ids = input_ids.to(self.device)
        mask, _start = cache.extend(attention_mask.to(self.device))
        ctx = fam.context(mask, 1, self.dtype)  # eagerly, as for any step: the graph takes a copy
        if self._graph is None or not self._graph.fits(cache):
            self._graph = None  # the last cache's graph and its memory go first
            blocks = [self.resident[i] for i in range(fam.num_blocks)]
            self._graph = DecodeGraph(fam, self.outer, blocks, cache, capture=self.device.type == "cuda")
        self.graph_steps += 1
        return self._graph(input_ids, ctx)

    @contextlib.contextmanager
    def _telling_the_ranks(self) -> Iterator[None]:
        """Under tensor parallelism, a rank that fails mid-pass tells the others (waiting for it in an all-reduce)
        what it raised, so that they stop with a ParallelError naming it instead of hanging."""
        try:
            yield
        except BaseException as e:
            if self.group is not None:
                self.group.fail(e)
            raise

    def block_tensors(self, i: int) -> Dict[str, str]:
        """{local: checkpoint name} of block ``i`` as the files hold it (a packed checkpoint's packed tensors)."""
        return dict(self.facts.stored_block_names[i])

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        self._graph = None  # the last cache's graph holds that cache's device memory: let both go first
        try:
            kv = self.plan.kv_offload
            cpu = cpu_layers_of(self.family.num_blocks, self.plan.kv_cpu_layers)  # ("host-compute": every layer)
            return KVCache.for_family(self.family, batch, max_len, self.dtype, self.device,
                                      device_layers=None if kv == "none" else 0, host_compute=cpu)
        except torch.cuda.OutOfMemoryError as e:
            raise self._oom(f"a KV cache for batch {batch} x {max_len} tokens") from e

    @_serialised
    def __call__(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Logits (B, T, vocab) of whole sequences (left-padded where ``attention_mask`` has zeros)."""
        input_ids = gen.check_prompt(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._check_length(attention_mask, 0)
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1])
        try:
            return self.forward(input_ids, attention_mask, cache)
        except torch.cuda.OutOfMemoryError as e:
            raise self._oom(f"a forward pass of {tuple(input_ids.shape)} tokens") from e

    # --- generation --------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer, as transformers' ``AutoTokenizer`` loads it (on first use); None if the
        checkpoint has none."""
        if not self._tokenizer_loaded:
            tok = load_tokenizer(self.path)
            if tok is not None and tok.pad_token is None:
                tok.pad_token = tok.eos_token  # what transformers users do for batches of prompts
            self._tokenizer, self._tokenizer_loaded = tok, True
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self._tokenizer, self._tokenizer_loaded = value, True

    @property
    def generation_config(self) -> Any:
        """The checkpoint's ``GenerationConfig`` (its generation_config.json, else its config's special tokens):
        the defaults every ``generate`` call starts from."""
        if self._generation_config is None:
            from transformers import GenerationConfig

            path = side_files_dir(self.path)
            if (path / "generation_config.json").is_file():
                self._generation_config = GenerationConfig.from_pretrained(str(path))
            else:
                keys = ("bos_token_id", "eos_token_id", "pad_token_id")
                self._generation_config = GenerationConfig(**{k: self.config[k] for k in keys if k in self.config})
        return self._generation_config

    @_serialised
    def generate(self, inputs: Prompt, generation_config: Any = None, *, attention_mask: Optional[Tensor] = None,
                 streamer: Any = None, logits_processor: Any = None, stopping_criteria: Any = None,
                 seed: Optional[int] = None, progress: Optional[bool] = None,
                 **kwargs: Any) -> Union[Tensor, str, List[str]]:
        """Prompt + new tokens, as transformers' ``generate`` makes them (``zstream.streaming.generate`` lists what
        it takes: ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
        ``stop_strings``, ``eos_token_id``, ...).

        ``inputs``: token ids (B, T) -> token ids (B, T + n); a string / list of strings -> the text with its
        continuation (prompts of different lengths are left-padded); a conversation (a list of ``{"role",
        "content"}`` dicts, or a list of them) -> the assistant's reply, through the checkpoint's chat template.
        ``streamer``: a transformers streamer (``TextStreamer``, ``TextIteratorStreamer``) fed the tokens as they
        come. ``seed``: sample from a generator seeded so (default: torch's global generator). ``progress``: a bar
        over the new tokens (None: only if generating takes more than 2 s)."""
        if generation_config is not None and not hasattr(generation_config, "to_diff_dict"):
            raise UsageError(f"generate: the second argument is a transformers GenerationConfig, not "
                             f"{generation_config!r}; pass max_new_tokens={generation_config!r} by name")
        ids, mask, kind = self._inputs(inputs, attention_mask)
        tokens = self._generate(ids, mask, generation_config, kwargs, streamer=streamer, seed=seed, progress=progress,
                                logits_processor=logits_processor, stopping_criteria=stopping_criteria)
        if kind == "ids":
            return tokens
        self._warn_random()
        keep = torch.cat([mask.cpu(), torch.ones(tokens.shape[0], tokens.shape[1] - mask.shape[1],
                                                  dtype=mask.dtype)], dim=1)
        start = ids.shape[1] if kind == "chat" else 0
        texts = [self.tokenizer.decode([int(t) for t, m in zip(row[start:], mrow[start:]) if m],
                                       skip_special_tokens=True) for row, mrow in zip(tokens.tolist(), keep.tolist())]
        return texts if kind in ("texts", "chats") else texts[0]

    def stream(self, inputs: Union[str, Sequence[Dict[str, str]]], generation_config: Any = None, *,
               seed: Optional[int] = None, **kwargs: Any) -> Iterator[str]:
        """The continuation of one prompt (or the reply to one conversation), as pieces of text while they are
        generated: ``for piece in model.stream("Hello", max_new_tokens=64): print(piece, end="")``."""
        self.ensure_open()
        ids, mask, _ = self._inputs(inputs, None)
        if ids.shape[0] != 1:
            raise ModelError("stream takes one prompt or one conversation; use generate for a batch")
        self._warn_random()
        pieces = gen.text_pieces(self.tokenizer)
        config, explicit = gen.resolve_config(self.generation_config, generation_config, kwargs)
        for _ in self._steps(ids, mask, config, explicit, streamer=pieces, seed=seed):
            yield from pieces.pieces
            pieces.pieces.clear()
        yield from pieces.pieces

    def _generate(self, ids: Tensor, mask: Tensor, generation_config: Any, kwargs: Dict[str, Any], *,
                  streamer: Any, seed: Optional[int], progress: Optional[bool], logits_processor: Any,
                  stopping_criteria: Any) -> Tensor:
        config, explicit = gen.resolve_config(self.generation_config, generation_config, kwargs)
        out = [ids.to(self.device)]
        steps = self._steps(ids, mask, config, explicit, streamer=streamer, seed=seed,
                            logits_processor=logits_processor, stopping_criteria=stopping_criteria)
        from tqdm.auto import tqdm

        with tqdm(steps, desc="zstream generate", unit="token", leave=False, disable=progress is False,
                  delay=0 if progress else 2.0) as bar:
            out += [t[:, None] for t in bar]
        return torch.cat(out, dim=1)

    def _steps(self, ids: Tensor, mask: Tensor, config: Any, explicit: Any, *, streamer: Any = None,
               seed: Optional[int] = None, logits_processor: Any = None,
               stopping_criteria: Any = None) -> Iterator[Tensor]:
        """The decode loop on this model: each step's new tokens (B,), fed to ``streamer`` as they come."""
        ids, mask = ids.to(self.device), mask.to(self.device)
        s = gen.setup(config, explicit, ids, mask, tokenizer=self._tokenizer_for_criteria(config),
                      logits_processor=logits_processor, stopping_criteria=stopping_criteria)
        self._check_length(mask, s.max_new_tokens)
        cache = self.new_cache(ids.shape[0], ids.shape[1] + s.max_new_tokens)
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        if streamer is not None:
            streamer.put(ids.cpu())
        try:
            agree = self.group.broadcast if self.group is not None else None  # every rank takes rank 0's tokens
            for nxt in gen.decode(self._step, ids, mask, cache, s, generator=generator, agree=agree):
                if streamer is not None:
                    streamer.put(nxt.cpu())
                yield nxt
        except torch.cuda.OutOfMemoryError as e:
            raise self._oom(f"generating for batch {ids.shape[0]}") from e
        finally:
            if streamer is not None:
                streamer.end()

    def _tokenizer_for_criteria(self, config: Any) -> Any:
        return self.tokenizer if getattr(config, "stop_strings", None) is not None else None

    def _step(self, input_ids: Tensor, attention_mask: Tensor, cache: KVCache) -> Tensor:
        return self.forward(input_ids, attention_mask, cache, last_only=True)

    def _inputs(self, inputs: Prompt, attention_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor, str]:
        """(token ids (B, T), mask (B, T), what came in: "ids", "text", "texts", "chat" or "chats")."""
        if isinstance(inputs, Tensor):
            ids = gen.check_prompt(inputs)
            return ids, attention_mask if attention_mask is not None else torch.ones_like(ids), "ids"
        if isinstance(inputs, str):
            return (*self._encode([inputs]), "text")
        items = list(inputs) if isinstance(inputs, (list, tuple)) else None
        if items and all(isinstance(p, str) for p in items):
            return (*self._encode(items), "texts")
        if items and all(isinstance(m, dict) for m in items):
            return (*self._encode([self._chat(items)], special=False), "chat")
        if items and all(isinstance(c, (list, tuple)) and c and isinstance(c[0], dict) for c in items):
            return (*self._encode([self._chat(c) for c in items], special=False), "chats")
        gen.check_prompt(inputs)  # raises, naming what came in
        raise AssertionError("unreachable")

    def _chat(self, messages: Sequence[Dict[str, str]]) -> str:
        tok = self._require_tokenizer("a conversation")
        if not getattr(tok, "chat_template", None):
            raise ModelError(f"{self.path}: its tokenizer has no chat template (tokenizer_config.json "
                             "'chat_template' or chat_template.jinja); pass plain text instead")
        return tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def _require_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise ModelError(f"{self.path}: {what} needs the checkpoint's tokenizer, and it has none "
                             "(tokenizer.json); pass token ids as a LongTensor")
        return self.tokenizer

    def _encode(self, prompts: List[str], special: bool = True) -> Tuple[Tensor, Tensor]:
        """Token ids (B, T) of ``prompts`` and their mask, left-padded by the tokenizer (the last token of every row
        aligned, as decoding needs); ``special``: the tokenizer's own BOS and the like (a chat template has them)."""
        tok = self._require_tokenizer("text")
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = tok(prompts, padding=True, add_special_tokens=special, return_tensors="pt")
        finally:
            tok.padding_side = side
        return enc["input_ids"], enc["attention_mask"]

    def _warn_random(self) -> None:
        """Once per model, at the user's line."""
        if self.synthetic and not self._warned_random:
            self._warned_random = True
            warn(f"{self.path} holds random weights (zstream make-checkpoint): the text it generates is "
                 "noise; the speed is real", UserWarning)

    def _check_length(self, attention_mask: Tensor, max_new_tokens: int) -> None:
        longest = int(attention_mask.sum(dim=1).max()) + max_new_tokens if attention_mask.numel() else 0
        if longest > self.family.max_positions:
            raise ModelError(f"{longest} tokens (prompt + new) exceed the {self.family.max_positions} positions "
                             f"of {self.path}")

    def _oom(self, what: str) -> OutOfMemoryError:
        p = self.plan
        hint = (f"a smaller gpu_memory (now {fmt_bytes(p.budget_bytes)}) leaves more room for the KV cache"
                if p.budget_bytes is not None else "offload='cpu' or 'nvme' frees device memory")
        if p.offload == "none":
            hint = "offload='cpu' (or 'nvme') streams the weights and frees device memory"
        return OutOfMemoryError(f"{self.path}: out of device memory for {what} ({p.offload} offload, "
                                f"{fmt_bytes(p.resident_bytes)} resident): {hint}, or use a smaller batch")

    # --- tracing -------------------------------------------------------------------------------------------------
    @_serialised
    def trace_start(self) -> None:
        """Record, until ``trace_stop``, per streamed block: its disk read, its copy and its compute."""
        if self._tracer is not None:
            raise ModelError("a trace is already running: trace_stop first")
        self._tracer = Tracer(self._seam)
        if self._streamed is not None:
            self._traced = Traced(self._streamed, self._tracer)
        self.blocks = self._chain()

    @_serialised
    def trace_stop(self, path: Union[str, os.PathLike]) -> Dict[str, Any]:
        """Write what was recorded since ``trace_start`` as a Chrome/Perfetto trace (JSON); returns it. Under tensor
        parallelism every rank calls it; rank 0 writes one trace with a process (a group of tracks) per rank."""
        if self._tracer is None:
            raise ModelError("no trace is running: trace_start first")
        try:
            if self.group is None:
                return write_trace(path, self._tracer.chrome_events())
            mine = self._tracer.chrome_events(pid=self.group.rank + 1, process=f"rank {self.group.rank}")
            everyone = self.group.gather(mine, "gathering the ranks' traces")
            return write_trace(path if self.group.rank == 0 else None, [e for events in everyone for e in events])
        finally:
            if self._traced is not None:
                self._traced.untrace()
            self._tracer, self._traced = None, None
            self.blocks = self._chain()

    # --- housekeeping ------------------------------------------------------------------------------------------
    @property
    def waited_s(self) -> float:
        """Host seconds spent blocked on streamed bytes so far (disk reads; on the CPU also copies): the part of
        a step that is not compute, where the device is the CPU."""
        return sum(ring.waited_s for ring in self.blocks.rings())

    def peak_memory(self) -> int:
        """Peak device memory allocated by torch in this process (bytes); 0 on the CPU."""
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0

    def graph_pool_bytes(self) -> Optional[int]:
        """Device bytes held by the private memory pool of the decode graph of the last cache (None: no graph
        recorded): what the plan reserves for it beside the recording stream's workspace
        (``residency.decode_graph_bytes``). The pool's memory is reserved, not allocated: no peak counts it."""
        graph = self._graph.graph if self._graph is not None else None
        if graph is None:
            return None
        pool = tuple(graph.pool())  # GPU only
        return sum(s["total_size"] for s in torch.cuda.memory_snapshot()
                   if tuple(s.get("segment_pool_id", ())) == pool)

    def ensure_open(self) -> None:
        if self._closed:
            raise ModelClosedError(f"{self.path}: the model is closed; load it again to use it")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Finish everything in flight and let go of the store and the memory; the model cannot run afterwards.
        Waits for a pass in progress on another thread. Closing twice is harmless."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._traced is not None:
                self._traced.untrace()
                self._traced = self._tracer = None
            self._graph = None
            self.blocks.close()
            self._streamed = None
            self._seam.close()
            self.outer = {}
            self.store.close()
            if self.group is not None:
                self.group.close()

    def __enter__(self) -> StreamingModel:
        self.ensure_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        p = self.plan
        params = sum(math.prod(shape) for shape in self.family.expected_shapes().values())
        quant = f", {p.quantization}" if p.quantization else ""
        noise = ", random weights" if self.synthetic else ""
        head = (f"<StreamingModel {self.family.name} at {self.path}: {self.family.num_blocks} blocks, hidden "
                f"{self.family.hidden_size}, {fmt_params(params)} parameters, {dtype_name(p.dtype)}{quant}{noise}; "
                f"offload={p.offload} on {p.device}"
                + (f", rank {p.rank} of {p.ranks} (tensor parallel)" if p.ranks > 1 else "") + "; ")
        if self._closed:
            return head + "closed>"
        step = p.predicted_step_s
        return (head + f"{len(p.resident_blocks)}/{p.num_blocks} blocks resident, {len(p.streamed_blocks)} streamed "
                f"({fmt_bytes(p.streamed_bytes)} a pass)" + (f", predicted step {step * 1e3:.1f} ms" if step else "")
                + ">")
