"""Generation with transformers' vocabulary: ``GenerationConfig``, its logits processors and stopping criteria, its
streamers. zstream runs the decode loop (its own model and KV cache); transformers decides what each step keeps.

What ``generate`` takes: everything a ``GenerationConfig`` holds for greedy decoding and sampling (``max_new_tokens``
/ ``max_length``, ``min_new_tokens`` / ``min_length``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
``min_p``, ``typical_p``, ``epsilon_cutoff``, ``eta_cutoff``, ``repetition_penalty``, ``no_repeat_ngram_size``,
``bad_words_ids``, ``suppress_tokens``, ``begin_suppress_tokens``, ``forced_bos_token_id``,
``forced_eos_token_id``, ``renormalize_logits``, ``remove_invalid_values``, ``eos_token_id`` (one or a list),
``pad_token_id``, ``stop_strings``, ``max_time``), with transformers' defaults (``top_k=50`` when sampling), plus
``logits_processor=`` / ``stopping_criteria=`` lists and ``streamer=``. Beam search, assisted decoding and
guidance are refused (``UsageError``). The processors are built in the order transformers builds them, and a step
samples as transformers' ``_sample`` does (``torch.multinomial`` over the softmax), so the same seed gives the
same tokens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set

import torch
from torch import Tensor

from ..errors import ModelError, UsageError
from .cache import KVCache

# What transformers applies when a field is unset (``GenerationConfig._get_default_generation_params`` in 5.x, the
# field defaults in 4.x).
DEFAULTS: Dict[str, Any] = {
    "max_length": 20, "min_length": 0, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    "typical_p": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "remove_invalid_values": False, "renormalize_logits": False, "num_beams": 1,
    "num_return_sequences": 1, "guidance_scale": None, "penalty_alpha": None, "num_beam_groups": 1,
}
DEFAULT_MAX_NEW_TOKENS = 20
# Set to anything but their default, these need a search or a second model: zstream's loop does neither.
UNSUPPORTED = {"num_beams": "beam search", "num_beam_groups": "group beam search", "penalty_alpha": "contrastive "
               "search", "guidance_scale": "classifier-free guidance", "num_return_sequences": "several sequences "
               "per prompt", "prompt_lookup_num_tokens": "prompt-lookup decoding", "assistant_early_exit":
               "assisted decoding", "watermarking_config": "watermarking", "sequence_bias": "sequence bias",
               "exponential_decay_length_penalty": "exponential decay length penalty", "top_h": "top-h sampling",
               "encoder_repetition_penalty": "encoder repetition penalty", "encoder_no_repeat_ngram_size":
               "encoder n-gram blocking"}


def _get(cfg: Any, name: str) -> Any:
    value = getattr(cfg, name, None)
    return DEFAULTS.get(name) if value is None else value


def eos_list(value: Any) -> List[int]:
    if value is None:
        return []
    if isinstance(value, Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def resolve_config(base: Any, given: Any, kwargs: Dict[str, Any]) -> tuple[Any, Set[str]]:
    """(the GenerationConfig of one call, the fields set explicitly): ``given`` (or the checkpoint's ``base``),
    updated with ``kwargs`` as ``model.generate`` does. Unknown keywords and unsupported settings are refused."""
    config = copy.deepcopy(given if given is not None else base)
    explicit = set(config.to_diff_dict()) | set(kwargs)
    unused = config.update(**kwargs)
    if unused:
        raise UsageError(f"generate: unknown argument(s) {', '.join(sorted(unused))}; it takes the fields of "
                         "transformers' GenerationConfig, attention_mask, streamer, logits_processor, "
                         "stopping_criteria, seed and progress")
    for name, what in UNSUPPORTED.items():
        value = getattr(config, name, None)
        if value is not None and value != DEFAULTS.get(name) and name in explicit:
            raise UsageError(f"generate: {name}={value!r} asks for {what}, which zstream does not run (its decode "
                             "loop is greedy or sampling, one sequence per prompt)")
    return config, explicit


@dataclass
class Setup:
    """One call's decode settings, resolved against the prompt."""

    config: Any
    max_new_tokens: int
    eos: List[int]
    pad_token_id: int
    processors: Any   # transformers.LogitsProcessorList
    criteria: Any     # transformers.StoppingCriteriaList


def _repetition_penalty(penalty: float, padding: Tensor) -> Any:
    """As the installed transformers' own generate builds it: recent versions leave each row's left padding out of
    the penalty (a tensor of pad lengths); older ones take no lengths, or an int only, and penalise the padding."""
    from transformers.generation import logits_process as lp

    try:
        return lp.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=padding)
    except (TypeError, ValueError):
        return lp.RepetitionPenaltyLogitsProcessor(penalty)


def setup(config: Any, explicit: Set[str], input_ids: Tensor, attention_mask: Tensor, *, tokenizer: Any,
          logits_processor: Optional[Sequence[Any]] = None, stopping_criteria: Optional[Sequence[Any]] = None) -> Setup:
    """Processors and criteria for ``config`` and a (B, T) prompt, in transformers' order."""
    from transformers import LogitsProcessorList, StoppingCriteriaList
    from transformers.generation import logits_process as lp
    from transformers.generation import stopping_criteria as sc

    T, device = input_ids.shape[1], str(input_ids.device)  # (transformers' processors take it by name)
    if config.max_new_tokens is not None:
        max_new = int(config.max_new_tokens)
    elif "max_length" in explicit:
        max_new = int(_get(config, "max_length")) - T
    else:
        max_new = DEFAULT_MAX_NEW_TOKENS
    if max_new < 0:
        raise UsageError(f"generate: max_length {config.max_length} is shorter than the prompt ({T} tokens); "
                         "use max_new_tokens")
    eos = eos_list(config.eos_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    p = LogitsProcessorList()
    penalty = _get(config, "repetition_penalty")
    if penalty != 1.0:
        p.append(_repetition_penalty(penalty, padding=(attention_mask != 0).int().argmax(dim=1)))
    if _get(config, "no_repeat_ngram_size") > 0:
        p.append(lp.NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.bad_words_ids is not None:
        p.append(lp.NoBadWordsLogitsProcessor(config.bad_words_ids, eos))
    if _get(config, "min_length") > 0 and eos:
        p.append(lp.MinLengthLogitsProcessor(config.min_length, eos, device=device))
    if config.min_new_tokens is not None and config.min_new_tokens > 0 and eos:
        p.append(lp.MinNewTokensLengthLogitsProcessor(T, config.min_new_tokens, eos, device=device))
    if config.forced_bos_token_id is not None:
        p.append(lp.ForcedBOSTokenLogitsProcessor(config.forced_bos_token_id))
    if config.forced_eos_token_id is not None:
        p.append(lp.ForcedEOSTokenLogitsProcessor(T + max_new, config.forced_eos_token_id, device=device))
    if _get(config, "remove_invalid_values"):
        p.append(lp.InfNanRemoveLogitsProcessor())
    if config.suppress_tokens is not None:
        p.append(lp.SuppressTokensLogitsProcessor(config.suppress_tokens, device=device))
    if config.begin_suppress_tokens is not None:
        p.append(lp.SuppressTokensAtBeginLogitsProcessor(config.begin_suppress_tokens, T, device=device))
    p.extend(logits_processor or [])
    if _get(config, "do_sample"):
        _add_warpers(p, config, device)
    if _get(config, "renormalize_logits"):
        p.append(lp.LogitNormalization())

    c = StoppingCriteriaList([sc.MaxLengthCriteria(T + max_new)])
    if config.max_time is not None:
        c.append(sc.MaxTimeCriteria(config.max_time))
    if config.stop_strings is not None:
        if tokenizer is None:
            raise UsageError("generate: stop_strings need the checkpoint's tokenizer, and it has none")
        c.append(sc.StopStringCriteria(tokenizer=tokenizer, stop_strings=config.stop_strings))
    if eos:
        c.append(sc.EosTokenCriteria(torch.tensor(eos, device=device)))
    c.extend(stopping_criteria or [])
    return Setup(config, max_new, eos, int(pad), p, c)


def _add_warpers(p: Any, config: Any, device: str) -> None:
    """Sampling's warpers, in transformers' order."""
    from transformers.generation import logits_process as lp

    temperature = _get(config, "temperature")
    if temperature <= 0:
        raise UsageError(f"generate: temperature must be > 0 when sampling, not {temperature}")
    if temperature != 1.0:
        p.append(lp.TemperatureLogitsWarper(temperature))
    if _get(config, "top_k") != 0:
        p.append(lp.TopKLogitsWarper(top_k=_get(config, "top_k"), min_tokens_to_keep=1))
    if _get(config, "top_p") < 1.0:
        p.append(lp.TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    if config.min_p is not None:
        p.append(lp.MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    if _get(config, "typical_p") < 1.0:
        p.append(lp.TypicalLogitsWarper(mass=config.typical_p, min_tokens_to_keep=1))
    if 0.0 < _get(config, "epsilon_cutoff") < 1.0:
        p.append(lp.EpsilonLogitsWarper(epsilon=config.epsilon_cutoff, min_tokens_to_keep=1))
    if 0.0 < _get(config, "eta_cutoff") < 1.0:
        p.append(lp.EtaLogitsWarper(epsilon=config.eta_cutoff, min_tokens_to_keep=1, device=device))


StepFn = Callable[[Tensor, Tensor, KVCache], Tensor]  # (ids (B, T), mask (B, T), cache) -> logits (B, 1, vocab)


def decode(step: StepFn, input_ids: Tensor, attention_mask: Tensor, cache: KVCache, s: Setup, *,
           generator: Optional[torch.Generator] = None,
           agree: Optional[Callable[[Tensor], Tensor]] = None) -> Iterator[Tensor]:
    """The decode loop: prefill the prompt, then one token a step until ``max_new_tokens`` or the stopping criteria
    end every row; yields each step's tokens (B,). A finished row gets ``pad_token_id`` (as transformers pads).
    ``agree`` (tensor parallelism: rank 0's tensor on every rank) makes the ranks take the same tokens and stop
    together, whatever their generators or clocks (``max_time``) say."""
    tokens = input_ids
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    step_ids, step_mask = input_ids, attention_mask
    sample = bool(_get(s.config, "do_sample"))
    for _ in range(s.max_new_tokens):
        logits = step(step_ids, step_mask, cache)[:, -1].to(tokens.device, torch.float32, copy=True)  # (B, V)
        scores = s.processors(tokens, logits)
        if sample:
            nxt = torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(dim=-1)                                                     # (B,)
        nxt = nxt * unfinished + s.pad_token_id * (1 - unfinished)
        if agree is not None:
            nxt = agree(nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        yield nxt
        unfinished = unfinished & ~_stops(s.criteria, tokens, scores)
        if agree is not None:
            unfinished = agree(unfinished)
        if int(unfinished.max()) == 0:
            return
        step_ids = nxt[:, None]                                                             # (B, 1)
        step_mask = torch.ones_like(step_ids)


def _stops(criteria: Any, tokens: Tensor, scores: Tensor) -> Tensor:
    done = criteria(tokens, scores)
    if isinstance(done, bool):  # transformers < 4.39 criteria return one bool for the batch
        return torch.full((tokens.shape[0],), done, dtype=torch.bool, device=tokens.device)
    return done.to(tokens.device)


def text_pieces(tokenizer: Any) -> Any:
    """A transformers ``TextStreamer`` that collects the text it would print (``pieces``), for ``model.stream``:
    its incremental decoding (whole words, no broken characters) without a thread or a queue."""
    from transformers import TextStreamer

    class Pieces(TextStreamer):
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.pieces: List[str] = []

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                self.pieces.append(text)

    return Pieces()


def check_prompt(ids: object) -> Tensor:
    """A (B, T) LongTensor of token ids, or a ModelError naming what was given instead."""
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.dim() not in (1, 2):
        what = f"a {ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
        raise ModelError(f"generate takes text, a list of texts, a conversation (a list of {{'role', 'content'}} "
                         f"dicts) or token ids as a LongTensor (B, T); got {what}")
    return ids if ids.dim() == 2 else ids[None]
