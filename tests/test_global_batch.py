"""Multi-process (DDP) training equals one-process training on the same global batch (rcit_bench.models.global_batch).

One pair of gloo processes (fork start) runs every case; the parent runs the same cases in one process and compares:
for every registered trained method (and vsepp with small-loss weights past its warm-up, matchmap with loss 'both'),
an even (4 + 4) and an uneven (5 + 3) split of a global batch of 8, in float64 and in float32: the unscaled loss,
every DDP-averaged gradient, the BatchNorm running stats after the step and the small-loss record; a negative
control (a local loss per rank) shows the comparison can fail; validation over contiguous caption shards (a shard
boundary inside an image's captions, and a rank with an empty shard) gives the one-process metrics on every rank.

Tolerances. The two-process step computes the same quantities with sums in another order (BatchNorm statistics as
per-rank partial sums, matmuls over other row blocks, the caption NLL as a sum of sums over a token count instead of
a mean), so it differs from one process by rounding only. Each gradient tensor is compared with one absolute
tolerance (entries near zero in a tensor with large entries carry the rounding of the large ones):

- float64 (models cast with ``.double()``; VSR++'s caption NLL still takes its log-softmax in float32, on both
  sides): ``1e-9 * max|reference tensor|``; observed below 3e-12 of it, so the construction is exact up to rounding.
- float32, what training runs: ``4 * e + 1e-6 * max|reference tensor|``, where ``e`` is the float32 rounding error of
  the one-process gradient itself (its largest difference from the float64 one-process gradient, same inputs and
  weights): the two float32 computations sum in different orders, each is off by about ``e``, so they differ by
  about ``2 e``; 4 leaves room for the two-process error being somewhat larger than the one-process one, the floor
  covers tensors whose one-process error happens to be tiny. Observed: at most ~2.7 e, i.e. at most 0.50 of the
  tolerance; as a fraction of the tensor's largest entry, up to ~1.3e-4 for VSR++ (SCAN attention at temperature 9,
  log-sum-exp at 6, and VSRN BatchNorm biases whose gradient is a cancelling sum over all regions) and up to ~4e-6
  for the other methods.

The loss is compared with rtol 1e-12 (float64) / 1e-5 (float32), running stats with ``1e-12`` / ``1e-5`` times
the tensor's largest entry (observed ~4e-15 / 2e-7). The negative control's gradients differ by more than 100
times the float32 tolerance.
"""

from __future__ import annotations

import copy
import datetime
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from rcit_bench.models.base import RetrievalModule
from rcit_bench.models.global_batch import (
    GlobalBatchNorm,
    convert_global_batchnorm,
    gather_reps_with_grad,
    gather_rows,
    world_size,
)
from rcit_bench.models.registry import build_method, get_method_class, list_methods, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

B, L_MAX, VOCAB = 8, 7, 40
#: every trained method; zero-shot ones (hf_dual_encoder, open_clip) are loaded as published and never trained,
#: so there is no training step to compare
TRAINED = [m for m in list_methods() if not get_method_class(m).zero_shot]
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **{m: (m, {}) for m in TRAINED},
    "vsepp+small_loss": ("vsepp", {"small_loss": True}),
    "matchmap+both": ("matchmap", {"loss": "both"}),
}
SPLITS = {"even": (4, 4), "uneven": (5, 3)}
#: dtype -> (gradient tolerance relative to the tensor's largest entry, loss rtol, running-stats tolerance relative to
#: the tensor's largest entry); float32 gradients also get FLOAT32_ERROR_FACTOR times the one-process float32 error
TOLERANCES = {"float64": (1e-9, 1e-12, 1e-12), "float32": (1e-6, 1e-5, 1e-5)}
FLOAT32_ERROR_FACTOR = 4.0


# ------------------------------------------------------------------------------------------------ fixed inputs
def train_batch(dtype: str = "float32") -> dict[str, torch.Tensor]:
    """8 pairs; captions 1 and 2 share image 1 (the datamodule's 5 captions per image); caption 2 is the longest."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(B, 3, 32, 32, generator=g)
    images[2] = images[1]
    corrupted = (images + 0.3 * torch.randn(B, 3, 32, 32, generator=g)).clamp(0, 1)
    tokens = torch.randint(4, VOCAB, (B, L_MAX), generator=g)
    tokens[:, 0] = 1  # <start>
    lengths = torch.tensor([4, 5, L_MAX, 3, 6, 4, 5, 3])
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n - 1] = 2  # <end>
        tokens[i, n:] = 0  # <pad>
    to = getattr(torch, dtype)
    return {"images": images.to(to), "corrupted_images": corrupted.to(to), "tokens": tokens, "lengths": lengths,
            "image_index": torch.tensor([0, 1, 1, 2, 3, 4, 5, 6]), "caption_index": torch.arange(20, 20 + B)}


def rank_slice(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows [start, stop), tokens cut to the slice's longest caption as a per-rank collate pads them."""
    out = {k: v[start:stop] for k, v in batch.items()}
    out["tokens"] = out["tokens"][:, : int(out["lengths"].max())]
    return out


def build(variant: str, dtype: str = "float32") -> RetrievalModule:
    name, over = VARIANTS[variant]
    torch.manual_seed(0)
    model = build_method(name, **{**tiny_config(name), **over})
    if model.small_loss_selector is not None:  # past the warm-up: a fitted mixture gives unequal pair weights
        g = torch.Generator().manual_seed(5)
        model.small_loss_selector.record(torch.arange(30), 3 * torch.rand(30, generator=g), epoch=0)
        model.small_loss_selector.end_epoch(0)
        assert model.small_loss_selector.weights(torch.arange(20, 28)).std() > 0.05
    for module in model.modules():
        if isinstance(module, nn.Dropout):  # VSR++'s decoder: masks are drawn per rank (equal only in distribution)
            module.p = 0.0
    return model.to(getattr(torch, dtype)).train()


class _Step(nn.Module):
    """What Lightning's DDP wrapper does: forward = the module's training_step."""

    def __init__(self, model: RetrievalModule) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.training_step(batch, 0)


def run_step(model: RetrievalModule, batch: dict[str, torch.Tensor], ddp: bool) -> dict[str, Any]:
    """One training step: the loss training_step logs and returns, every gradient (DDP-averaged under DDP), the
    buffers after it, the small-loss record."""
    logged: dict[str, Any] = {}
    model.log = lambda key, value, **kw: logged.__setitem__(key, value)  # type: ignore[method-assign]
    step: nn.Module = _Step(model)
    if ddp:
        step = DistributedDataParallel(step, find_unused_parameters=True)  # vsepp leaves the local head unused
    returned = step(batch)
    returned.backward()
    sel = model.small_loss_selector
    return {"loss": logged["train/loss"].detach().clone(), "returned": returned.detach().clone(),
            "grads": {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
            "buffers": {k: b.clone() for k, b in model.named_buffers()},
            "record": sel.state_dict() if sel is not None else None}


# ------------------------------------------------------------------------------------------------ validation data
N_IMG_VAL, CAPS = 5, 5


def val_captions(n_img: int = N_IMG_VAL) -> dict[str, torch.Tensor]:
    """n_img images with 5 captions each, captions in image order (the datamodule's validation split)."""
    g = torch.Generator().manual_seed(1)
    n = n_img * CAPS
    images = torch.rand(n_img, 3, 32, 32, generator=g)
    lengths = torch.randint(3, L_MAX + 1, (n,), generator=g)
    tokens = torch.randint(4, VOCAB, (n, L_MAX), generator=g)
    tokens[:, 0] = 1
    for i, m in enumerate(lengths.tolist()):
        tokens[i, m - 1] = 2
        tokens[i, m:] = 0
    c2i = torch.arange(n) // CAPS
    return {"images": images[c2i], "tokens": tokens, "lengths": lengths, "image_index": c2i,
            "caption_index": torch.arange(n)}


def validate(model: RetrievalModule, captions: dict[str, torch.Tensor], shard: range, batch_size: int = 4
             ) -> dict[str, float]:
    """Lightning's validation hooks over one shard of the captions, in batches (none for an empty shard)."""
    logged: dict[str, float] = {}
    model.log = lambda key, value, **kw: logged.__setitem__(key, float(value))  # type: ignore[method-assign]
    model.eval()
    model.on_validation_epoch_start()
    with torch.no_grad():
        for i, s in enumerate(range(shard.start, shard.stop, batch_size)):
            model.validation_step(rank_slice(captions, s, min(s + batch_size, shard.stop)), i)
        model.on_validation_epoch_end()
    return logged


def val_shards(n: int, world: int) -> list[range]:
    base, extra = divmod(n, world)  # contiguous, the first ranks one more: the datamodule's validation shards
    starts = [r * base + min(r, extra) for r in range(world + 1)]
    return [range(starts[r], starts[r + 1]) for r in range(world)]


VAL_METHODS = ("miie", "matchmap")  # miie: val/modality_acc; matchmap: word features padded across ranks


# ------------------------------------------------------------------------------------------------ the two processes
def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # forked from a process that may have used OpenMP threads
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a bug fails the test instead of hanging
    try:
        out: dict[str, Any] = {"gather": _gather_checks(rank)}
        for dtype in TOLERANCES:
            batch = train_batch(dtype)
            for split, sizes in SPLITS.items():
                start = sum(sizes[:rank])
                local = rank_slice(batch, start, start + sizes[rank])
                for variant in VARIANTS:
                    model = build(variant, dtype)
                    model.setup("fit")  # converts BatchNorm under W > 1, as Lightning does before wrapping in DDP
                    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in model.modules())
                    out[f"{variant}/{split}/{dtype}"] = run_step(model, local, ddp=True)
        model = build("vsepp")  # negative control: a local loss per rank (global_batch does nothing)
        model.setup("fit")
        model.global_batch = lambda *reps: reps  # type: ignore[method-assign]
        out["control"] = run_step(model, rank_slice(train_batch(), 4 * rank, 4 * rank + 4), ddp=True)
        captions = val_captions()
        for name in VAL_METHODS:
            model = build(name)
            model.setup("validate")
            out[f"val/{name}"] = validate(model, captions, val_shards(N_IMG_VAL * CAPS, world)[rank])
        one = val_captions(1)  # 1 image, 1 caption: rank 1's shard is empty, it must still join the collectives
        one = {k: v[:1] for k, v in one.items()}
        out["val/empty_shard"] = validate(build("vsepp"), one, val_shards(1, world)[rank])
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _gather_checks(rank: int) -> dict[str, Any]:
    """gather_rows: rows and later dims differing per rank, bool, the gradient only in this rank's slot; and a
    GlobalBatchNorm1d with cumulative momentum against nn.BatchNorm1d on the concatenated input."""
    n, length = (3, 5) if rank == 0 else (2, 2)
    x = torch.full((n, length, 2), float(rank + 1), requires_grad=True)
    flags = torch.tensor([rank == 0] * n)
    got = gather_reps_with_grad({"x": x, "flags": flags})
    (got["x"] * torch.arange(1.0, 6.0)[:, None, None]).sum().backward()  # row weights 1..5
    g = torch.Generator().manual_seed(7)
    full = torch.randn(7, 3, generator=g)
    mine = full[:4] if rank == 0 else full[4:]
    bn = GlobalBatchNorm(3, momentum=None).train()
    y = bn(mine.requires_grad_())
    (y * torch.arange(1.0, 4.0)).sum().backward()
    return {"x": got["x"].detach(), "flags": got["flags"], "x_grad": x.grad, "rows": gather_rows(torch.tensor([rank])),
            "bn_out": y.detach(), "bn_grad": mine.grad, "bn_state": {k: v.clone() for k, v in bn.state_dict().items()}}


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("global_batch")
    begin = time.perf_counter()
    # fork, not spawn: spawned children re-import torch (~5-10 s each on 2 busy cores)
    mp.start_processes(_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True, start_method="fork")
    print(f"two processes: {time.perf_counter() - begin:.1f} s")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def one_process_results() -> dict[str, Any]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {f"{variant}/{dtype}": run_step(build(variant, dtype), train_batch(dtype), ddp=False)
               for variant in VARIANTS for dtype in TOLERANCES}
        captions = val_captions()
        for name in VAL_METHODS:
            out[f"val/{name}"] = validate(build(name), captions, range(N_IMG_VAL * CAPS))
        one = {k: v[:1] for k, v in val_captions(1).items()}
        out["val/empty_shard"] = validate(build("vsepp"), one, range(1))
        return out
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ the comparisons
def gradient_tolerances(variant: str, dtype: str, one: dict[str, Any]) -> dict[str, float]:
    """Absolute tolerance per gradient tensor (see the module docstring)."""
    ref = one[f"{variant}/{dtype}"]["grads"]
    tol = {k: TOLERANCES[dtype][0] * float(v.abs().max()) for k, v in ref.items()}
    if dtype == "float32":
        exact = one[f"{variant}/float64"]["grads"]
        for key, value in ref.items():
            tol[key] += FLOAT32_ERROR_FACTOR * float((value.double() - exact[key]).abs().max())
    return tol


def assert_close_within(got: dict[str, Tensor], ref: dict[str, Tensor], atol: dict[str, float]) -> None:
    assert got.keys() == ref.keys()  # the same parameters receive gradients (the same buffers exist)
    for key, value in ref.items():
        torch.testing.assert_close(got[key], value, rtol=0.0, atol=atol[key], msg=key)


def _scaled(ref: dict[str, Tensor], got: dict[str, Tensor], scale: dict[str, float]) -> float:
    """Largest ``max|got - ref| / scale`` over the tensors (tensors with scale 0 must be equal)."""
    worst = 0.0
    for key, value in ref.items():
        diff = float((got[key].double() - value.double()).abs().max())
        worst = max(worst, diff / scale[key] if scale[key] > 0 else (0.0 if diff == 0 else float("inf")))
    return worst


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_process_step_equals_one_process(variant: str, split: str, dtype: str,
                                             two_process_results: list[dict[str, Any]],
                                             one_process_results: dict[str, Any]) -> None:
    _, loss_rtol, buf_tol = TOLERANCES[dtype]
    ref = one_process_results[f"{variant}/{dtype}"]
    assert float(ref["loss"]) > 0.0 and ref["loss"].dtype == getattr(torch, dtype)
    grad_tol = gradient_tolerances(variant, dtype, one_process_results)
    buf_atol = {k: buf_tol * float(v.abs().max()) for k, v in ref["buffers"].items()}
    for res in two_process_results:
        got = res[f"{variant}/{split}/{dtype}"]
        # every rank logs the global loss and hands DDP world_size times it
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=loss_rtol, atol=0.0)
        assert torch.equal(got["returned"], 2 * got["loss"])
        assert_close_within(got["grads"], ref["grads"], grad_tol)  # DDP-averaged gradients
        assert_close_within(got["buffers"], ref["buffers"], buf_atol)  # BatchNorm running stats: global statistics
        if ref["record"] is not None:  # every rank recorded every pair, as one process
            assert torch.equal(got["record"]["stamps"], ref["record"]["stamps"])
            # the selector stores float32: a float64 loss may round to a neighbouring float32 value
            torch.testing.assert_close(got["record"]["losses"], ref["record"]["losses"], rtol=max(loss_rtol, 1e-6),
                                       atol=0.0)
    # both ranks hold the same averaged gradient (DDP) and the very same running stats (all-reduced statistics are
    # bit-identical on every rank, so DDP's buffer broadcast from rank 0 changes nothing)
    a, b = (res[f"{variant}/{split}/{dtype}"] for res in two_process_results)
    assert all(torch.equal(a["grads"][k], b["grads"][k]) for k in a["grads"])
    assert all(torch.equal(a["buffers"][k], b["buffers"][k]) for k in a["buffers"])
    largest = {k: float(v.abs().max()) for k, v in ref["grads"].items()}
    line = (f"{variant}/{split}/{dtype}: gradients {_scaled(ref['grads'], a['grads'], largest):.1e} of the tensor's "
            f"largest entry")
    if dtype == "float32":
        exact = one_process_results[f"{variant}/float64"]["grads"]
        err = {k: float((v.double() - exact[k]).abs().max()) for k, v in ref["grads"].items()}
        line += f", {_scaled(ref['grads'], a['grads'], err):.2f} x the one-process float32 error"
    largest_buf = {k: float(v.abs().max()) for k, v in ref["buffers"].items()}
    line += f" ({_scaled(ref['grads'], a['grads'], grad_tol):.2f} of the tolerance)"
    print(f"{line}; running stats {_scaled(ref['buffers'], a['buffers'], largest_buf):.1e}; loss "
          f"{abs(float(a['loss']) - float(ref['loss'])) / float(ref['loss']):.1e} relative")


def test_negative_control_local_loss_differs(two_process_results: list[dict[str, Any]],
                                             one_process_results: dict[str, Any]) -> None:
    """Without gathering, each rank's hardest negatives come from its own 4 pairs: the averaged gradient is that
    of another loss, far outside the tolerance, so the comparison above can fail."""
    ref, got = one_process_results["vsepp/float32"], two_process_results[0]["control"]
    assert torch.equal(got["returned"], got["loss"])  # a local loss is not scaled
    tol = gradient_tolerances("vsepp", "float32", one_process_results)
    assert _scaled(ref["grads"], got["grads"], tol) > 100
    with pytest.raises(AssertionError):
        assert_close_within(got["grads"], ref["grads"], tol)


@pytest.mark.parametrize("name", [*VAL_METHODS, "empty_shard"])
def test_validation_over_contiguous_shards_equals_one_process(name: str, two_process_results: list[dict[str, Any]],
                                                              one_process_results: dict[str, Any]) -> None:
    """25 captions of 5 images: rank 0 holds captions 0-12, rank 1 13-24, image 2's captions straddle them; every
    rank logs the one-process metrics (MIIE's val/modality_acc included). 'empty_shard': 1 caption, rank 1 none."""
    ref = one_process_results[f"val/{name}"]
    assert "val/rsum" in ref and (name != "miie" or "val/modality_acc" in ref)
    if name != "empty_shard":
        assert 0 < ref["val/rsum"] < 600  # not a degenerate ranking
    for res in two_process_results:
        assert res[f"val/{name}"] == ref


def test_gather_rows_and_global_batchnorm_across_ranks(two_process_results: list[dict[str, Any]]) -> None:
    r0, r1 = (res["gather"] for res in two_process_results)
    expected = torch.zeros(5, 5, 2)
    expected[:3] = 1.0
    expected[3:, :2] = 2.0  # rank 1's rows, zero-padded from length 2 to 5
    for res in (r0, r1):
        assert torch.equal(res["x"], expected)
        assert res["flags"].tolist() == [True] * 3 + [False] * 2 and res["flags"].dtype == torch.bool
        assert res["rows"].tolist() == [0, 1]
    # the gradient reaches only this rank's own rows: rank 0 rows 1-3, rank 1 rows 4-5 (padding cut off)
    assert torch.equal(r0["x_grad"], torch.tensor([1.0, 2.0, 3.0])[:, None, None].expand(3, 5, 2))
    assert torch.equal(r1["x_grad"], torch.tensor([4.0, 5.0])[:, None, None].expand(2, 2, 2))
    # GlobalBatchNorm1d on 4 + 3 rows equals nn.BatchNorm1d on the 7 rows: output, input gradient, running stats
    g = torch.Generator().manual_seed(7)
    full = torch.randn(7, 3, generator=g).requires_grad_()
    bn = nn.BatchNorm1d(3, momentum=None).train()
    y = bn(full)
    (y * torch.arange(1.0, 4.0)).sum().backward()
    torch.testing.assert_close(torch.cat([r0["bn_out"], r1["bn_out"]]), y.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r0["bn_grad"], r1["bn_grad"]]), full.grad, rtol=1e-5, atol=1e-6)
    for res in (r0, r1):
        assert res["bn_state"].keys() == bn.state_dict().keys()
        for key, value in bn.state_dict().items():
            torch.testing.assert_close(res["bn_state"][key], value, rtol=1e-5, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------------------ one process
def test_one_process_is_the_identity() -> None:
    """Without a process group: the very same tensors, no conversion, plain BatchNorm results."""
    assert world_size() == 1
    x = torch.randn(3, 2)
    assert gather_rows(x) is x
    reps = {"a": x, "b": torch.ones(3, dtype=torch.bool)}
    assert all(v is reps[k] for k, v in gather_reps_with_grad(reps).items())
    model = build("vsepp")
    img, txt = {"global": x}, {"global": x}
    out = model.global_batch(img, txt)
    assert len(out) == 2 and out[0] is img and out[1] is txt
    model.setup("fit")
    assert any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert not any(isinstance(m, GlobalBatchNorm) for m in model.modules())


@pytest.mark.parametrize("train", [True, False])
def test_global_batchnorm_without_process_group_is_batchnorm(train: bool) -> None:
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(2), nn.BatchNorm1d(4))
    with torch.no_grad():
        seq[1].running_mean.uniform_(-1, 1)
        seq[1].weight.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in seq.state_dict().items()}
    ref = copy.deepcopy(seq)
    params = {id(p) for p in seq.parameters()}
    converted = convert_global_batchnorm(seq)
    assert converted is seq and isinstance(seq[1], GlobalBatchNorm) and isinstance(seq[4], GlobalBatchNorm)
    assert {id(p) for p in seq.parameters()} == params  # the very same parameters (an optimizer keeps them)
    assert all(torch.equal(v, before[k]) for k, v in seq.state_dict().items())  # same keys and values
    x = torch.rand(5, 3, 8, 8)
    seq.train(train), ref.train(train)
    assert torch.equal(seq(x), ref(x))  # bit-identical: F.batch_norm
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in seq.state_dict().items())
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(2), nn.BatchNorm1d(4))
    plain.load_state_dict(seq.state_dict())  # checkpoints load both ways
    seq.load_state_dict(plain.state_dict())
