"""Multi-process evaluation and training settings: every image and caption is scored exactly once.

Why this module exists: Lightning's ``DistributedSampler`` pads the dataset so that every rank gets the
same number of samples, which repeats a few images/captions. A repeated image is harmless for a loss but
changes retrieval metrics (an extra query, an extra distractor). Evaluation therefore shards the data
itself with :class:`ShardSampler` (no padding, shards may differ by one item), each rank encodes its
shard with the one evaluation path (:func:`rcit_bench.evaluation.encode_images` / ``encode_texts``), and
:func:`gather_reps` reassembles the representations in global index order, so the metrics equal the
single-process metrics exactly. Everything falls back to one process when ``torch.distributed`` is not
initialised.

Training of several processes: the runner starts one process per rank itself (rcit_bench.bench.multiprocess)
and Lightning's DDP trains them; the losses gather the global batch (rcit_bench.models.global_batch).
:func:`barrier`, :func:`broadcast_object` and :func:`all_reduce_numbers` are the small collectives the runner and
the evaluation use. :func:`trainer_kwargs_for` is a helper for scripts that build their own Trainer (the runner
does not use it), and :func:`maybe_compile` is the opt-in ``torch.compile`` switch.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, Sampler

from rcit_bench.errors import UserError
from rcit_bench.utils import check_choice

log = logging.getLogger(__name__)

SHARD_MODES = ("contiguous", "strided", "batches")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


# ----------------------------------------------------------------------------------------------------------
# process group helpers


def is_distributed() -> bool:
    """True when a default process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """World size, 1 without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank; nothing without a process group."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` (picklable) on every rank; `obj` itself without a process group. Used where one rank
    decides (what to train, which checkpoint to resume) and every rank must act on the same decision."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _resolve_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    world_size = get_world_size() if world_size is None else world_size
    rank = get_rank() if rank is None else rank
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise UserError(f"Argument `world_size` must be an integer >= 1, but got {world_size!r}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise UserError(f"Argument `rank` must be an integer in [0, {world_size - 1}], but got {rank!r}.")
    return rank, world_size


# ----------------------------------------------------------------------------------------------------------
# sharding


def shard_indices(n: int, rank: int | None = None, world_size: int | None = None,
                  mode: str = "contiguous", batch_size: int | None = None) -> list[int]:
    """The dataset indices of one rank's shard, without padding; the shards partition ``range(n)``.

    ``contiguous``: rank r gets one block, the first ``n % world_size`` ranks one item more.
    ``strided``: rank r gets ``r, r + world_size, ...``.
    ``batches``: rank r gets one contiguous block of whole batches of ``batch_size`` (the first ranks one batch
    more), so every batch a rank encodes is a batch the single-process loader would encode, with the same
    items: representations are then bit-identical to the single-process ones, not only equal up to rounding.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UserError(f"Argument `n` must be a non-negative integer, but got {n!r}.")
    check_choice("mode", mode, SHARD_MODES)
    rank, world_size = _resolve_rank_world(rank, world_size)
    if mode == "strided":
        return list(range(rank, n, world_size))
    if mode == "batches":
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"Argument `batch_size` must be a positive integer with mode='batches', but got "
                             f"{batch_size!r}.")
        blocks = shard_indices(-(-n // batch_size), rank, world_size, "contiguous")
        return list(range(blocks[0] * batch_size, min(n, (blocks[-1] + 1) * batch_size))) if blocks else []
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (1 if rank < extra else 0)))


class ShardSampler(Sampler[int]):
    """Yields one rank's shard of ``range(n)`` in increasing order, never padded or repeated.

    Unlike ``DistributedSampler`` the shards of different ranks may differ in length by one, so use it
    only where ranks do not need the same number of steps (evaluation, not DDP training).
    ``rank``/``world_size`` default to the running process group (0 / 1 without one).
    """

    def __init__(self, n: int, rank: int | None = None, world_size: int | None = None,
                 mode: str = "contiguous", batch_size: int | None = None) -> None:
        self.indices = shard_indices(n, rank, world_size, mode, batch_size)
        self.n, self.mode = n, mode

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def shard_loader(loader: DataLoader, rank: int | None = None, world_size: int | None = None,
                 mode: str = "batches") -> tuple[DataLoader, torch.Tensor]:
    """Rebuild an evaluation DataLoader over one rank's shard of its dataset.

    Returns the new loader and the global (dataset) indices of its items in iteration order,
    ``(n_local,)`` int64. Batch size, workers, collate and worker seeding are kept, so each item is
    loaded (and corrupted: corruption is seeded per image id) exactly as in the single-process loader.
    """
    if isinstance(loader.dataset, IterableDataset):
        raise UserError("Argument `loader` must be map-style (have __getitem__/__len__) to be sharded, but its "
                         f"dataset is an IterableDataset ({type(loader.dataset).__name__}).")
    if loader.batch_size is None:
        raise UserError("Argument `loader` must use `batch_size` (not a custom `batch_sampler`) to be sharded.")
    sampler = ShardSampler(len(loader.dataset), rank, world_size, mode, loader.batch_size)
    kwargs: dict[str, Any] = dict(
        batch_size=loader.batch_size, sampler=sampler, shuffle=False, drop_last=False,
        num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn, generator=loader.generator, timeout=loader.timeout,
        multiprocessing_context=loader.multiprocessing_context,
    )
    if loader.num_workers > 0:
        kwargs.update(persistent_workers=loader.persistent_workers, prefetch_factor=loader.prefetch_factor)
    return DataLoader(loader.dataset, **kwargs), torch.tensor(sampler.indices, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------
# gathering


def gather_reps(reps: Mapping[str, torch.Tensor], indices: torch.Tensor, *,
                device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """All-gather every rank's rows and return them on every rank, ordered by global index.

    ``reps``: tensors whose first dim is this rank's ``n_local`` items (an empty dict is allowed on a rank
    with no items); ``indices``: ``(n_local,)`` global row index of each item. Shards may differ in size
    and in the size of later dims (word features padded per batch): each tensor is zero-padded to the
    largest shape over ranks, gathered, stripped back to the true row counts and concatenated, so later
    dims keep the global maximum with zero padding, as ``rcit_bench.evaluation.cat_reps`` does in one
    process. Raises ValueError if an index appears on more than one rank or twice.
    Without a process group (or with one process) the reps are only reordered.
    """
    indices = torch.as_tensor(indices, dtype=torch.long)
    for key, value in reps.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"gather_reps: reps[{key!r}] must be a Tensor, but got {type(value).__name__}.")
        if value.shape[0] != indices.numel():
            raise UserError(f"gather_reps: reps[{key!r}] has {value.shape[0]} rows but `indices` has "
                             f"{indices.numel()} entries; they must match.")
    if not is_distributed():
        return _reorder(dict(reps), indices.cpu())

    world = dist.get_world_size()
    if device is None:
        first = next(iter(reps.values()), None)
        device = first.device if first is not None else indices.device
    device = torch.device(device)
    # metadata (tiny): row count, and per key shape + dtype, so ranks may differ in later dims
    meta_local = {"n": int(indices.numel()),
                  "keys": {k: (tuple(v.shape), v.dtype) for k, v in reps.items()}}
    metas: list[Any] = [None] * world
    dist.all_gather_object(metas, meta_local)
    keysets = [set(m["keys"]) for m in metas if m["n"] > 0]
    if any(ks != keysets[0] for ks in keysets[1:]):
        raise UserError(f"gather_reps: ranks produced different rep keys: {[sorted(k) for k in keysets]}.")
    keys = sorted(keysets[0]) if keysets else sorted(meta_local["keys"])
    counts = [m["n"] for m in metas]
    n_max = max(counts)

    all_idx = _gather_padded(indices.to(device), n_max, world)
    all_idx = torch.cat([t[:c] for t, c in zip(all_idx, counts)]).cpu()
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        shapes = [m["keys"][key][0] for m in metas if key in m["keys"]]
        dtype = next(m["keys"][key][1] for m in metas if key in m["keys"])
        tail = tuple(max(s[d] for s in shapes) for d in range(1, len(shapes[0])))
        local = reps.get(key)
        if local is None:  # this rank has no items
            local = torch.zeros((0, *tail), dtype=dtype, device=device)
        padded = _pad_to(local.to(device), (n_max, *tail))
        wire = padded.to(torch.uint8) if dtype == torch.bool else padded  # gloo has no bool collectives
        parts = _gather_padded(wire, n_max, world)
        gathered = torch.cat([p[:c] for p, c in zip(parts, counts)])
        out[key] = gathered.to(dtype) if dtype == torch.bool else gathered
    return _reorder(out, all_idx)


def _pad_to(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad ``x`` at the end of every dim to ``shape``."""
    if tuple(x.shape) == tuple(shape):
        return x.contiguous()
    out = x.new_zeros(shape)
    out[tuple(slice(0, s) for s in x.shape)] = x
    return out


def _gather_padded(x: torch.Tensor, n_max: int, world: int) -> list[torch.Tensor]:
    """all_gather of ``x`` after padding dim 0 to ``n_max``: a list of ``world`` tensors."""
    x = _pad_to(x, (n_max, *x.shape[1:]))
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return parts


def _reorder(reps: dict[str, torch.Tensor], indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows sorted by global index; duplicates are an error (they would bias the metrics)."""
    order = torch.argsort(indices, stable=True)
    sorted_idx = indices[order]
    if sorted_idx.numel() > 1 and bool((sorted_idx[1:] == sorted_idx[:-1]).any()):
        dup = sorted_idx[1:][sorted_idx[1:] == sorted_idx[:-1]].unique()[:10].tolist()
        raise UserError(f"gather_reps: global indices appear more than once (e.g. {dup}); shards must not overlap.")
    return {k: v[order.to(v.device)] for k, v in reps.items()}


# ----------------------------------------------------------------------------------------------------------
# evaluation


def distributed_encode(model: torch.nn.Module, loader: DataLoader, kind: str, *,
                       mode: str = "batches", wrap: Callable[[Iterable[Any]], Iterable[Any]] | None = None
                       ) -> dict[str, torch.Tensor]:
    """Encode a loader's items ('image' or 'text') split over ranks; full reps on every rank.

    Each rank encodes its shard with :func:`rcit_bench.evaluation.encode_images` / ``encode_texts``; the
    shards are gathered by their ``image_index`` / ``caption_index`` entry, so the result (index entry
    included) equals the single-process ``encode_*`` output (bit for bit with mode 'batches'). ``wrap``: applied
    to this rank's batches before encoding (e.g. :class:`rcit_bench.evaluation.ImageChange` measuring them).
    """
    check_choice("kind", kind, ("image", "text"))
    from rcit_bench.evaluation import encode_images, encode_texts

    shard, idx = shard_loader(loader, mode=mode)
    index_key = "image_index" if kind == "image" else "caption_index"
    reps: dict[str, torch.Tensor] = {}
    if len(idx) > 0:
        reps = (encode_images if kind == "image" else encode_texts)(model, wrap(shard) if wrap else shard)
        idx = reps[index_key]
    return gather_reps(reps, idx, device=_model_device(model))


def all_reduce_numbers(values: Mapping[str, float], op: str = "sum") -> dict[str, float]:
    """Sum (or max) a few scalars over ranks, in float64; unchanged without a process group. Every rank must call
    it with the same keys."""
    check_choice("op", op, ("sum", "max"))
    if not is_distributed():
        return dict(values)
    keys = sorted(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None  # NCCL: GPU only
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def distributed_evaluate(
    model: torch.nn.Module,
    datamodule: Any = None,
    *,
    split: str = "test",
    image_loader: DataLoader | None = None,
    caption_loader: DataLoader | None = None,
    caption_to_image: torch.Tensor | None = None,
    corruption: str | None = None,
    severity: int | None = None,
    rate: float | None = None,
    perturbation: str | None = None,
    level: int | None = None,
    text_reps: Mapping[str, torch.Tensor] | None = None,
    mode: str = "batches",
) -> dict[str, float]:
    """Retrieval metrics of ``model`` with the encoding split over all ranks; same result on every rank.

    Give either a ``datamodule`` (its ``image_loader(split, corruption, severity, rate)``,
    ``caption_loader(split, perturbation, level)`` and ``caption_to_image(split)`` are used) or the
    loaders and ``caption_to_image`` directly. ``text_reps`` (full, from :func:`distributed_encode`) skips
    text encoding, so one text pass serves a whole corruption grid. Must be called on every rank.
    The gathered reps go through :func:`rcit_bench.evaluation.evaluate` (similarity + metrics) on every
    rank, so the numbers are those of the single-process path.
    """
    from rcit_bench.evaluation import evaluate

    if datamodule is not None:
        if image_loader is None:
            image_loader = datamodule.image_loader(split, corruption=corruption, severity=severity, rate=rate)
        if caption_loader is None and text_reps is None:
            caption_loader = datamodule.caption_loader(split, perturbation=perturbation, level=level)
        if caption_to_image is None:
            caption_to_image = datamodule.caption_to_image(split)
    if image_loader is None or (caption_loader is None and text_reps is None) or caption_to_image is None:
        raise UserError("distributed_evaluate needs `datamodule`, or `image_loader`, `caption_to_image` and one "
                         "of `caption_loader` / `text_reps`.")
    was_training = model.training
    try:
        img = distributed_encode(model, image_loader, "image", mode=mode)
        txt = dict(text_reps) if text_reps is not None else distributed_encode(model, caption_loader, "text",
                                                                              mode=mode)
        return evaluate(model, img, txt, caption_to_image)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------
# training settings


def trainer_kwargs_for(devices: int | str = 1, strategy: str = "auto", precision: str = "auto", *,
                       accelerator: str = "auto", find_unused_parameters: bool = False) -> dict[str, Any]:
    """``lightning.Trainer`` keyword arguments for a device count, portable between CPU and GPU.

    - ``accelerator='auto'``: 'gpu' when CUDA is available, else 'cpu'.
    - ``devices='auto'``: all visible GPUs, 1 on CPU.
    - ``strategy='auto'``: 'ddp' when more than one device (one process per device, gloo on CPU, NCCL on
      GPU), else Lightning's 'auto'; ``find_unused_parameters=True`` selects
      'ddp_find_unused_parameters_true' (needed when a stage leaves parameters unused, e.g. a
      discriminator during a warm-up). Any explicit strategy string is passed through.
    - ``precision``: 'auto' = '32-true' (reproducible default); 'bf16-mixed' / '16-mixed' only on GPU when
      requested; on CPU mixed precision falls back to '32-true' with a warning (CPU autocast is slow and
      would make CPU and GPU numbers differ in kind, not only in speed).

    ``torch.compile`` is not a Trainer setting: apply :func:`maybe_compile` to the module (opt-in).
    Evaluation under DDP must not use the padded DistributedSampler: use :func:`distributed_evaluate`.
    """
    check_choice("accelerator", accelerator, ACCELERATORS)
    check_choice("precision", precision, PRECISIONS)
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "cuda":
        accelerator = "gpu"
    if devices == "auto":
        devices = max(torch.cuda.device_count(), 1) if accelerator == "gpu" else 1
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise UserError(f"Argument `devices` must be a positive integer or 'auto', but got {devices!r}.")
    if not isinstance(strategy, str) or not strategy:
        raise UserError(f"Argument `strategy` must be a Lightning strategy name ('auto', 'ddp', 'ddp_spawn', ...), "
                         f"but got {strategy!r}.")
    if strategy == "auto" and devices > 1:
        strategy = "ddp_find_unused_parameters_true" if find_unused_parameters else "ddp"
    if precision == "auto":
        precision = "32-true"
    elif accelerator == "cpu" and precision != "32-true":
        log.warning("precision=%r requested on CPU; using '32-true' (mixed precision is a GPU setting)", precision)
        precision = "32-true"
    return {"accelerator": accelerator, "devices": devices, "strategy": strategy, "precision": precision}


def maybe_compile(module: torch.nn.Module, enabled: bool = False, **compile_kwargs: Any) -> torch.nn.Module:
    """Opt-in ``torch.compile``: returns ``module`` unchanged unless ``enabled``.

    Off by default because compilation takes minutes, recompiles on the variable caption lengths, and
    helps only long GPU runs; the compiled module shares parameters with ``module``.
    """
    if not enabled:
        return module
    return torch.compile(module, **compile_kwargs)  # type: ignore[return-value]
