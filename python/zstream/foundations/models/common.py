"""What every model family shares: the ``Family`` base class, the per-forward ``StepContext``, attention.

A family turns a Hugging Face ``config.json`` (a plain dict) and the checkpoint's tensor names into
pure functions over weight dicts. It holds no weights itself: the caller (the streaming engine) hands each
function the tensors it needs, already on the compute device.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Iterable, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import torch
from torch import Tensor

from ...errors import ModelError, UsageError
from ..units import parse_dtype, torch_dtype

Shape = Tuple[int, ...]
Cut = Tuple[int, int, int]  # (dim, index, count): cut a tensor into `count` equal pieces along `dim`, keep `index`
Reduce = Callable[[Tensor], Tensor]  # sums a rank's partial result over the ranks, in place

# SDPA's memory-efficient kernel (the one a float mask gets on a GPU) reads a mask whose rows start 16 bytes apart;
# torch pads any other into a fresh copy at every call (``preprocess_mask``), so every layer of every step over S keys
# not a multiple of 8 paid a copy: bloom-7b1's eager steps at batch 7 ran 0.17-0.27 ms slower at such S
# (docs/performance.md item 49)
MASK_ALIGN = 8  # elements


def mask_buffer(*shape: int, dtype: torch.dtype, device: Union[str, torch.device],
                fill: Optional[float] = 0.0) -> Tensor:
    """A mask of ``shape`` (..., S) filled with ``fill`` (None: left unset, for a caller that writes all of it), as
    a view of one whose rows are rounded up to MASK_ALIGN elements: attention takes it as it is."""
    S = shape[-1]
    rounded = (*shape[:-1], -(-S // MASK_ALIGN) * MASK_ALIGN)
    buffer = (torch.empty(rounded, dtype=dtype, device=device) if fill is None
              else torch.full(rounded, fill, dtype=dtype, device=device))
    return buffer[..., :S]


@dataclass
class StepContext:
    """Everything a block needs that is the same for every block of one forward pass.

    Built once per forward by ``Family.context`` and passed, unchanged, to every ``Family.block`` call,
    so masks, ALiBi biases and RoPE tables are computed once per step, not once per block.
    """

    start: int  # cache write index: the new keys/values go to cache slots [start, start + T)
    positions: Tensor  # (B, T) int64 position ids of the new tokens (from the attention-mask cumsum)
    mask: Optional[Tensor]  # (B, 1 or nh, T, S) additive float bias for SDPA, S = start + T; None = no mask
    is_causal: bool  # True only when mask is None, start == 0 and T > 1 (lets SDPA pick flash kernels)
    rope: Optional[Tuple[Tensor, Tensor]] = None  # (cos, sin), each (B, 1, T, hs), RoPE families only

    @property
    def num_new(self) -> int:
        return self.positions.shape[1]

    @property
    def end(self) -> int:
        return self.start + self.num_new


def require(config: Mapping[str, Any], *keys: str, family: str) -> Any:
    """The value of the first of ``keys`` present in ``config``; ModelError naming them all if none is."""
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    wanted = " or ".join(repr(k) for k in keys)
    raise ModelError(f"{family} config is missing {wanted}")


def config_dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The dtype a config declares ("dtype" in transformers 5, "torch_dtype" before); float32 if none."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    try:
        dtype = parse_dtype(name, what="config dtype")
    except UsageError as e:
        raise ModelError(str(e)) from None
    return dtype or torch.float32


def _info_shape_dtype(info: Any) -> Tuple[Shape, Optional[torch.dtype]]:
    """Shape and dtype of one tensor description: an object with .shape/.dtype, a (shape, dtype) pair,
    or a bare shape. dtype may be a torch dtype or a safetensors string ("F16")."""
    if hasattr(info, "shape"):
        shape, dtype = info.shape, getattr(info, "dtype", None)
    elif isinstance(info, tuple) and len(info) == 2 and not isinstance(info[1], int):
        shape, dtype = info
    else:
        shape, dtype = info, None
    if isinstance(dtype, str):
        try:
            dtype = torch_dtype(dtype.upper())
        except TypeError:
            dtype = None
    if not isinstance(dtype, torch.dtype):
        dtype = None  # unknown: check the shape only
    return tuple(int(d) for d in shape), dtype


def read_sizes(target: Any, config: Mapping[str, Any], family: str, **keys: Union[str, Tuple[str, ...]]) -> None:
    """Set each attribute of ``target`` to the integer under the first of its config keys that is present:
    ``read_sizes(self, config, "opt", num_blocks="num_hidden_layers", hidden_size=("hidden_size", "n_embed"))``.
    ModelError names the keys of the first one missing."""
    for attr, names in keys.items():
        setattr(target, attr, int(require(config, *((names,) if isinstance(names, str) else names), family=family)))


def find_prefix(names: Iterable[str], anchor: str, candidates: Sequence[str], family: str) -> str:
    """Which of ``candidates`` the checkpoint puts in front of its tensor names, found via ``anchor``.

    save_pretrained writes e.g. "transformer.h.0..." (BLOOM) but hub checkpoints saved from the bare
    model have no prefix ("h.0..."), so the prefix is read off the names rather than assumed.
    """
    names = set(names)
    for prefix in candidates:
        if prefix + anchor in names:
            return prefix
    tried = ", ".join(repr(p + anchor) for p in candidates)
    raise ModelError(f"{family} checkpoint has none of {tried}: not a {family} checkpoint?")


F = TypeVar("F", bound="Family")  # a family's own class, which its shard keeps


class Family:
    """One model architecture: weight names and shapes, and the math of embed / block / head.

    Subclasses set the class attributes and implement ``_block_shapes``, ``_outer_shapes``,
    ``embed``, ``block`` and ``head``; they may extend ``context`` (ALiBi, RoPE).
    """

    name: ClassVar[str]  # short family name, e.g. "llama"
    model_types: ClassVar[Tuple[str, ...]]  # config.json "model_type" values this family runs
    architectures: ClassVar[Tuple[str, ...]]  # config.json "architectures" values this family runs

    # set by subclasses in __init__
    num_blocks: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    vocab_size: int
    dtype: torch.dtype
    sliding_window: Optional[int] = None  # attend to at most this many previous tokens (Mistral)

    # families whose attention needs a bias tensor even without padding (ALiBi) set this
    _always_mask: ClassVar[bool] = False
    # the outer local name of the token embedding, which a tied head reuses
    _embedding_local: ClassVar[str] = "embed_tokens"
    # outer local names stored after the blocks (final norm, head), for checkpoint order
    _after_blocks: ClassVar[Tuple[str, ...]] = ()
    # where block i's tensors live under the prefix: "{prefix}{_blocks_path}.{i}.{local}"
    _blocks_path: ClassVar[str] = "layers"
    # outer locals stored as "{prefix}{local}.weight" (embeddings); other outer locals are "{prefix}{local}"
    _weight_locals: ClassVar[Tuple[str, ...]] = ("embed_tokens",)
    prefix: str = ""  # what the checkpoint puts before every name but the head's ("model.", "transformer.", "")

    # Tensor parallelism (Megatron's split): how each block module's weight divides over the ranks. "column": by
    # output rows (attention heads, MLP units), bias too; "row": by input columns, the partial sums all-reduced and
    # the bias added once after; "kv": rows by KV head, a head replicated where there are fewer KV heads than ranks.
    # Modules not named (norms) are whole on every rank. Keys are module names: "mlp.up_proj" covers its
    # ".weight", ".bias" and packed ".weight.qcodes" etc.
    _splits: ClassVar[Dict[str, str]] = {}
    _mlp_width: ClassVar[str] = "intermediate_size"  # the attribute holding the MLP's hidden units
    rank: int = 0
    world: int = 1
    reduce: Optional[Reduce] = None  # set on a shard: the all-reduce of row-parallel outputs
    unsharded: Optional[Family] = None  # set on a shard: the whole model's family

    def __init__(self, config: Mapping[str, Any], tensor_names: Optional[Iterable[str]] = None) -> None:
        self.config = dict(config)
        self.dtype = config_dtype(config)
        # None = the names save_pretrained writes; otherwise detect the prefix from the real names
        self.tensor_names = None if tensor_names is None else frozenset(tensor_names)

    # ---- weight names -------------------------------------------------------------------------

    def _block_shapes(self) -> Dict[str, Shape]:
        """local name -> shape of the tensors of one block (the same for every block)."""
        raise NotImplementedError

    def _outer_shapes(self) -> Dict[str, Shape]:
        """local name -> shape of the tensors outside the blocks, as stored (tied head excluded)."""
        raise NotImplementedError

    def _block_name(self, i: int, local: str) -> str:
        return f"{self.prefix}{self._blocks_path}.{i}.{local}"

    def _outer_name(self, local: str) -> str:
        if local == "lm_head":
            return "lm_head.weight"
        if local in self._weight_locals:
            return f"{self.prefix}{local}.weight"
        return self.prefix + local

    def block_tensors(self, i: int) -> Dict[str, str]:
        """local name -> checkpoint name for the tensors of block ``i``."""
        if not 0 <= i < self.num_blocks:
            raise IndexError(f"block {i} out of range: {self.name} has {self.num_blocks} blocks")
        return {local: self._block_name(i, local) for local in self._block_shapes()}

    def block_shapes(self) -> Dict[str, Shape]:
        """local name -> shape of the tensors of one block (every block has the same)."""
        return dict(self._block_shapes())

    def linear_weights(self) -> Tuple[str, ...]:
        """Local names of a block's linear-layer weights: the (out, in) matrices ``linear`` multiplies by, which
        quantization (``zstream.quant``) replaces. Norms and biases stay in the checkpoint dtype."""
        return tuple(local for local, shape in self._block_shapes().items()
                     if len(shape) == 2 and local.endswith(".weight"))

    def outer_tensors(self) -> Dict[str, str]:
        """local name -> checkpoint name for embeddings, final norm and head.

        A tied head maps "lm_head" to the embedding tensor's name (the same storage serves both)."""
        names = {local: self._outer_name(local) for local in self._outer_shapes()}
        if self.tied_embeddings:
            names["lm_head"] = names[self._embedding_local]
        return names

    @property
    def tied_embeddings(self) -> bool:
        return "lm_head" not in self._outer_shapes()

    def expected_shapes(self) -> Dict[str, Shape]:
        """checkpoint name -> shape of every tensor the checkpoint stores and the model reads, in
        checkpoint order: embeddings, block 0, block 1, ..., final norm and head."""
        outer = self._outer_shapes()
        shapes: Dict[str, Shape] = {}
        head = {k: v for k, v in outer.items() if k in self._after_blocks}
        for local, shape in outer.items():
            if local not in head:
                shapes[self._outer_name(local)] = shape
        block = self._block_shapes()
        for i in range(self.num_blocks):
            for local, shape in block.items():
                shapes[self._block_name(i, local)] = shape
        for local, shape in head.items():
            shapes[self._outer_name(local)] = shape
        return shapes

    def validate(self, infos: Mapping[str, Any]) -> None:
        """Check that the checkpoint has every tensor, with the shape the config implies.

        ``infos`` maps checkpoint names to a shape, a (shape, dtype) pair, or an object with ``.shape``
        (and optionally ``.dtype``: torch dtype or safetensors string); only floating dtypes are accepted.
        Raises ModelError listing the first few problems.
        """
        problems = []
        for name, want in self.expected_shapes().items():
            if name not in infos:
                block = self._block_of(name)
                where = f" (block {block})" if block is not None else ""
                problems.append(f"missing tensor {name!r}{where}")
                continue
            shape, dtype = _info_shape_dtype(infos[name])
            if shape != want:
                problems.append(f"{name!r} has shape {list(shape)}, the config implies {list(want)}")
            if dtype is not None and not dtype.is_floating_point:
                problems.append(f"{name!r} has non-floating dtype {dtype}")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ModelError(f"{self.name} checkpoint does not match its config: "
                             + "; ".join(problems[:5]) + more)

    def _block_of(self, name: str) -> Optional[int]:
        for i in range(self.num_blocks):
            if name in self.block_tensors(i).values():
                return i
        return None

    # ---- tensor parallelism -------------------------------------------------------------------

    def shard(self: F, rank: int, world: int, reduce: Reduce) -> F:
        """This family as rank ``rank`` of ``world`` runs it: its own heads and MLP units, its block shapes those of
        its pieces, ``reduce`` summing the row-parallel outputs. ModelError where the model does not divide."""
        if world == 1:
            return self
        f, why = self.name, f"tensor parallel over {world} ranks splits"
        check_divisible(self.num_heads, world, f"{why} the attention heads", f)
        nkv = self.num_kv_heads
        if nkv % world and world % nkv:
            raise ModelError(f"{f}: {why} the {nkv} KV heads, or replicates them: the ranks ({world}) must divide "
                             f"the KV heads or be a multiple of them")
        width = getattr(self, self._mlp_width)
        check_divisible(width, world, f"{why} the MLP units", f)
        part = copy.copy(self)
        part.unsharded, part.rank, part.world, part.reduce = self, rank, world, reduce
        part.num_heads = self.num_heads // world
        part.num_kv_heads = max(1, nkv // world)
        setattr(part, self._mlp_width, width // world)
        return part

    def shard_cut(self, local: str) -> Optional[Cut]:
        """Which piece of block tensor ``local`` (packed parts too) this rank holds; None: the whole tensor."""
        if self.world == 1:
            return None
        for module, kind in self._splits.items():
            if local == f"{module}.bias" and kind == "row":
                return None  # added once, after the all-reduce
            if local.startswith(f"{module}.weight") or local == f"{module}.bias":
                if kind == "kv":  # KV head h serves query heads [h * g, (h + 1) * g): the rank's heads need one
                    assert self.unsharded is not None
                    count = min(self.unsharded.num_kv_heads, self.world)
                    return (0, self.rank * count // self.world, count)
                return (0 if kind == "column" else 1, self.rank, self.world)
        return None

    def shard_block(self, views: Mapping[str, Tensor], names: Mapping[str, str]) -> Dict[str, Tensor]:
        """{checkpoint name: this rank's piece} of a block read whole: ``views`` by checkpoint name, ``names`` the
        block's {local: checkpoint name} (packed parts included). Row pieces are views; column pieces copies (made
        contiguous, as quantization and one-copy transfers want them)."""
        out: Dict[str, Tensor] = {}
        for local, ckpt in names.items():
            cut = self.shard_cut(local)
            out[ckpt] = views[ckpt] if cut is None else piece(views[ckpt], cut, ckpt)
        return out

    # ---- per-forward context ------------------------------------------------------------------

    def context(self, attention_mask: Tensor, num_new: int, dtype: torch.dtype) -> StepContext:
        """The StepContext of a forward pass over the last ``num_new`` tokens.

        attention_mask: (B, S) 1 for real tokens, 0 for (left) padding, over every token so far: the
        cached ones and the new ones. The new keys/values go to cache slots [S - num_new, S).
        """
        S = attention_mask.shape[1]
        T = num_new
        start = S - T
        device = attention_mask.device
        valid = attention_mask.bool()  # (B, S)
        # positions count real tokens only, so left padding does not shift them (as transformers does)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, T)
        limit = self.max_positions
        # cheap test first: positions < S, so only a long sequence can overflow (avoids a device sync)
        if positions.shape[1] and limit < S and int(positions.max()) >= limit:
            raise ModelError(f"sequence of {int(positions.max()) + 1} tokens is longer than the "
                             f"{self.max_positions} positions {self.name} supports")

        plain = not self._always_mask and self.sliding_window is None
        if plain and (T == 1 or start == 0) and bool(valid.all()):
            # no padding, no window: plain causal attention, no mask tensor needed
            return StepContext(start, positions, None, is_causal=T > 1)

        q_idx = torch.arange(start, S, device=device)[:, None]  # (T, 1)
        k_idx = torch.arange(S, device=device)[None, :]  # (1, S)
        allowed = k_idx <= q_idx  # (T, S) causal
        if self.sliding_window is not None:
            allowed = allowed & (k_idx > q_idx - self.sliding_window)
        allowed = allowed[None] & valid[:, None, :]  # (B, T, S)
        # a padding query sees no real key; let it see itself so its softmax row is not all -inf (NaN)
        allowed = allowed | (k_idx == q_idx)[None]
        mask = mask_buffer(allowed.shape[0], 1, T, S, dtype=dtype, device=device)  # (B, 1, T, S)
        mask.masked_fill_(~allowed[:, None], float("-inf"))
        return StepContext(start, positions, mask, is_causal=False)

    # ---- math ---------------------------------------------------------------------------------

    def embed(self, w: Mapping[str, Tensor], input_ids: Tensor, ctx: StepContext) -> Tensor:
        """(B, T) token ids -> (B, T, C) hidden states. ``w`` holds the outer tensors."""
        raise NotImplementedError

    def block(self, w: Mapping[str, Tensor], hidden: Tensor, cache: Any, ctx: StepContext) -> Tensor:
        """One transformer block: (B, T, C) -> (B, T, C); writes this step's keys/values into ``cache``.

        ``w`` holds this block's tensors by local name; ``cache`` is the block's ``LayerCache`` (``attend``)."""
        raise NotImplementedError

    def head(self, w: Mapping[str, Tensor], hidden: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, vocab) logits. ``w`` holds the outer tensors."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(blocks={self.num_blocks}, hidden={self.hidden_size}, "
                f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, vocab={self.vocab_size})")


def piece(t: Tensor, cut: Cut, name: str) -> Tensor:
    """Piece ``index`` of ``count`` equal pieces of tensor ``name`` along ``dim``, contiguous (a copy when cut by
    columns); ModelError if it does not cut evenly."""
    dim, index, count = cut
    if t.shape[dim] % count:
        raise ModelError(f"{name} {list(t.shape)} does not split into {count} equal pieces along dimension {dim} for "
                         "tensor parallelism (a packed checkpoint's groups must not straddle ranks: quantize at load "
                         "instead)")
    size = t.shape[dim] // count
    return t.narrow(dim, index * size, size).contiguous()


def check_divisible(a: int, b: int, what: str, family: str) -> None:
    if b <= 0 or a % b:
        raise ModelError(f"{family}: {what} ({a} is not divisible by {b})")
