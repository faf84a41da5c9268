"""Distributed evaluation scores every item exactly once and equals the single-process numbers exactly."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from rcit_bench.distributed import (
    ShardSampler,
    distributed_encode,
    distributed_evaluate,
    gather_reps,
    maybe_compile,
    shard_indices,
    shard_loader,
    trainer_kwargs_for,
)

N_IMG, DIM, VOCAB, SIDE = 37, 16, 64, 8


# ----------------------------------------------------------------------------------------------------------
# a small deterministic "model" with the RetrievalModule surface, and the data for it


class TinyModel(nn.Module):
    """Image: fixed random linear map of the pixels; text: mean of word embeddings tied to that map, so
    caption tokens that name an image's marker pixel retrieve it. Also returns padded word features."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(3 * SIDE * SIDE, DIM, generator=g))  # (P, D)

    def encode_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"global": images.flatten(1) @ self.proj}  # (B, D)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        words = self.proj[tokens]  # (B, L, D)
        mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).float()  # (B, L)
        glob = (words * mask[..., None]).sum(1) / lengths[:, None].float()
        return {"global": glob, "words": words * mask[..., None], "lengths": lengths}

    def similarity(self, image_reps: dict, text_reps: dict) -> torch.Tensor:
        a = nn.functional.normalize(image_reps["global"], dim=1)
        b = nn.functional.normalize(text_reps["global"], dim=1)
        return a @ b.T  # (N_img, N_txt)


def caption_to_image() -> torch.Tensor:
    """185 captions: image 0 has 6, image 1 has 4, the others 5, in a shuffled (non-consecutive) order."""
    counts = [6, 4] + [5] * (N_IMG - 2)
    c2i = torch.repeat_interleave(torch.arange(N_IMG), torch.tensor(counts))
    return c2i[torch.randperm(len(c2i), generator=torch.Generator().manual_seed(1))]


class ImageSet(Dataset):
    def __len__(self) -> int:
        return N_IMG

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(100 + i)
        img = 0.3 * torch.rand(3, SIDE, SIDE, generator=g)
        img.view(-1)[i] += 1.0  # marker pixel i
        return {"images": img, "image_index": i}


class CaptionSet(Dataset):
    def __init__(self) -> None:
        self.c2i = caption_to_image()

    def __len__(self) -> int:
        return len(self.c2i)

    def __getitem__(self, j: int) -> dict:
        g = torch.Generator().manual_seed(1000 + j)
        n = 1 + int(torch.randint(0, 6, (1,), generator=g))  # 1..6 words
        toks = torch.randint(N_IMG, 3 * SIDE * SIDE, (n,), generator=g)
        toks[0] = int(self.c2i[j])  # the word naming the image's marker
        return {"tokens": toks, "caption_index": j}


def collate_captions(items: list[dict]) -> dict:
    lengths = torch.tensor([len(it["tokens"]) for it in items])
    tokens = torch.zeros(len(items), int(lengths.max()), dtype=torch.long)
    for k, it in enumerate(items):
        tokens[k, : len(it["tokens"])] = it["tokens"]
    return {"tokens": tokens, "lengths": lengths, "caption_index": torch.tensor([it["caption_index"] for it in items])}


def loaders() -> tuple[DataLoader, DataLoader]:
    return (DataLoader(ImageSet(), batch_size=5),
            DataLoader(CaptionSet(), batch_size=7, collate_fn=collate_captions))


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # forked from a process that may have used OpenMP threads
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for mode in ("contiguous", "strided"):
            _evaluate_both_ways(rank, out_dir, mode)
    finally:
        dist.destroy_process_group()


def _evaluate_both_ways(rank: int, out_dir: str, mode: str) -> None:
    """Encode and evaluate on this rank; save what the parent compares with one process."""
    model = TinyModel()
    img_loader, cap_loader = loaders()
    _, img_shard = shard_loader(img_loader, mode=mode)
    _, cap_shard = shard_loader(cap_loader, mode=mode)
    img = distributed_encode(model, img_loader, "image", mode=mode)
    txt = distributed_encode(model, cap_loader, "text", mode=mode)
    metrics = distributed_evaluate(model, image_loader=img_loader, caption_loader=cap_loader,
                                   caption_to_image=caption_to_image(), mode=mode)
    reused = distributed_evaluate(model, image_loader=img_loader, text_reps=txt,
                                  caption_to_image=caption_to_image(), mode=mode)
    torch.save({"img": img, "txt": txt, "metrics": metrics, "reused": reused,
                "img_shard": img_shard, "cap_shard": cap_shard}, Path(out_dir) / f"{mode}-rank{rank}.pt")


def single_process_reference() -> tuple[dict, dict, dict]:
    """The plain evaluation path, no sharding at all."""
    from rcit_bench.evaluation import encode_images, encode_texts, evaluate

    model = TinyModel()
    img_loader, cap_loader = loaders()
    img, txt = encode_images(model, img_loader), encode_texts(model, cap_loader)
    return img, txt, evaluate(model, img_loader, txt, caption_to_image())


# ----------------------------------------------------------------------------------------------------------
# the two-process test


def test_two_process_gloo_equals_single_process(tmp_path: Path) -> None:
    # fork, not spawn: spawned children re-import torch (~5-10 s each on 2 busy cores)
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ref_img, ref_txt, ref_metrics = single_process_reference()
    assert ref_metrics["rsum"] > 100  # the data make retrieval non-trivial, so equal metrics mean something
    for mode in ("contiguous", "strided"):
        _check_against_reference(tmp_path, mode, ref_img, ref_txt, ref_metrics)


def _check_against_reference(tmp_path: Path, mode: str, ref_img: dict, ref_txt: dict, ref_metrics: dict) -> None:
    results = [torch.load(tmp_path / f"{mode}-rank{r}.pt", weights_only=False) for r in range(2)]
    # every image and caption encoded by exactly one rank, shards unequal (37 and 185 are odd)
    for key, n in (("img_shard", N_IMG), ("cap_shard", 185)):
        a, b = results[0][key].tolist(), results[1][key].tolist()
        assert sorted(a + b) == list(range(n))
        assert abs(len(a) - len(b)) == 1
    # Every rank holds the full reps in the single-process order. Not bit-identical: CPU BLAS may round the
    # same row differently in a batch of another shape, so reps agree to float32 rounding; the metrics, which
    # only depend on the order of scores, must be equal exactly.
    for res in results:
        assert res["img"].keys() == ref_img.keys() and res["txt"].keys() == ref_txt.keys()
        for k in ref_img:
            torch.testing.assert_close(res["img"][k], ref_img[k], rtol=1e-5, atol=1e-5, msg=k)
        for k in ref_txt:
            torch.testing.assert_close(res["txt"][k], ref_txt[k], rtol=1e-5, atol=1e-5, msg=k)
        assert res["txt"]["words"].shape[1] == 6  # padded to the longest caption over both ranks
        assert res["metrics"] == ref_metrics
        assert res["reused"] == ref_metrics


def test_distributed_sampler_would_duplicate() -> None:
    """Why ShardSampler exists: DistributedSampler pads 37 items to 38, repeating one image."""
    seen = [i for r in range(2) for i in DistributedSampler(range(N_IMG), num_replicas=2, rank=r, shuffle=False)]
    assert len(seen) == 38 and len(set(seen)) == N_IMG
    mine = [i for r in range(2) for i in ShardSampler(N_IMG, r, 2)]
    assert sorted(mine) == list(range(N_IMG))


# ----------------------------------------------------------------------------------------------------------
# single-process pieces


@pytest.mark.parametrize("n,world", [(0, 3), (2, 3), (37, 2), (185, 4), (10, 1)])
@pytest.mark.parametrize("mode", ["contiguous", "strided"])
def test_shard_indices_partition(n: int, world: int, mode: str) -> None:
    shards = [shard_indices(n, r, world, mode) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= (1 if n else 0)
    for s in shards:
        assert s == sorted(s)
        if mode == "strided" and len(s) > 1:
            assert {b - a for a, b in zip(s, s[1:])} == {world}
        if mode == "contiguous" and s:
            assert s == list(range(s[0], s[0] + len(s)))


def test_shard_sampler_defaults_to_one_process() -> None:
    sampler = ShardSampler(5)
    assert list(sampler) == [0, 1, 2, 3, 4] and len(sampler) == 5


def test_shard_errors() -> None:
    with pytest.raises(ValueError, match=r"Argument `mode` must be one of 'contiguous', 'strided'.*'strided'"):
        shard_indices(5, 0, 2, mode="strided ")
    with pytest.raises(ValueError, match=r"Argument `rank` must be an integer in \[0, 1\], but got 2"):
        shard_indices(5, 2, 2)
    with pytest.raises(ValueError, match=r"Argument `world_size` must be an integer >= 1, but got 0"):
        shard_indices(5, 0, 0)
    with pytest.raises(ValueError, match=r"Argument `n` must be a non-negative integer, but got -1"):
        shard_indices(-1, 0, 1)


def test_shard_loader_keeps_loader_settings() -> None:
    img_loader, cap_loader = loaders()
    _, idx = shard_loader(cap_loader, rank=1, world_size=2, mode="contiguous")
    assert idx.tolist() == list(range(93, 185))  # 185 = 93 + 92
    # default: whole batches of 7, 27 batches = 14 + 13, so rank 1 starts at item 14 * 7 = 98
    shard, idx = shard_loader(cap_loader, rank=1, world_size=2)
    assert idx.tolist() == list(range(98, 185))
    batches = list(shard)
    assert batches[0]["tokens"].dtype == torch.long  # custom collate kept
    assert torch.cat([b["caption_index"] for b in batches]).tolist() == idx.tolist()
    assert len(batches[0]["caption_index"]) == 7
    # every batch of a shard is a batch of the single-process loader, item for item
    single = [b["caption_index"].tolist() for b in cap_loader]
    assert [b["caption_index"].tolist() for b in batches] == single[14:]


@pytest.mark.parametrize("n, batch, world", [(185, 7, 2), (10, 4, 3), (3, 4, 2), (0, 4, 2)])
def test_batch_shards_partition_and_align_with_batches(n: int, batch: int, world: int) -> None:
    shards = [shard_indices(n, r, world, "batches", batch) for r in range(world)]
    assert sum(shards, []) == list(range(n))
    assert all(s[0] % batch == 0 for s in shards if s)


def test_gather_reps_without_process_group_reorders_and_rejects_duplicates() -> None:
    reps = {"global": torch.tensor([[2.0], [0.0], [1.0]]), "mask": torch.tensor([True, False, True])}
    out = gather_reps(reps, torch.tensor([2, 0, 1]))
    assert out["global"].flatten().tolist() == [0.0, 1.0, 2.0]
    assert out["mask"].tolist() == [False, True, True]
    with pytest.raises(ValueError, match="appear more than once"):
        gather_reps(reps, torch.tensor([2, 0, 2]))
    with pytest.raises(ValueError, match=r"reps\['global'\] has 3 rows but `indices` has 2"):
        gather_reps(reps, torch.tensor([0, 1]))


def test_distributed_evaluate_one_process_equals_evaluate() -> None:
    _, _, ref = single_process_reference()
    img_loader, cap_loader = loaders()
    model = TinyModel()
    got = distributed_evaluate(model, image_loader=img_loader, caption_loader=cap_loader,
                               caption_to_image=caption_to_image())
    assert got == ref
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="needs `datamodule`"):
        distributed_evaluate(model, image_loader=img_loader)


# ----------------------------------------------------------------------------------------------------------
# trainer settings


def test_trainer_kwargs_cpu_selection(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trainer_kwargs_for() == {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true"}
    assert trainer_kwargs_for(2)["strategy"] == "ddp"
    assert trainer_kwargs_for(2, find_unused_parameters=True)["strategy"] == "ddp_find_unused_parameters_true"
    assert trainer_kwargs_for(2, strategy="ddp_spawn")["strategy"] == "ddp_spawn"
    assert trainer_kwargs_for("auto")["devices"] == 1
    with caplog.at_level(logging.WARNING, logger="rcit_bench.distributed"):
        assert trainer_kwargs_for(1, precision="bf16-mixed")["precision"] == "32-true"
    assert "bf16-mixed" in caplog.text


def test_trainer_kwargs_gpu_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    kw = trainer_kwargs_for("auto", precision="bf16-mixed")
    assert kw == {"accelerator": "gpu", "devices": 4, "strategy": "ddp", "precision": "bf16-mixed"}
    assert trainer_kwargs_for(1)["precision"] == "32-true"
    assert trainer_kwargs_for(1, accelerator="cpu", precision="bf16-mixed")["precision"] == "32-true"


def test_trainer_kwargs_errors() -> None:
    with pytest.raises(ValueError,
                       match=r"Argument `precision` must be one of .*but got 'bf16_mixed'.*Did you mean 'bf16-mixed'"):
        trainer_kwargs_for(1, precision="bf16_mixed")
    with pytest.raises(ValueError, match=r"Argument `devices` must be a positive integer or 'auto', but got 0"):
        trainer_kwargs_for(0)
    with pytest.raises(ValueError, match=r"Argument `accelerator` must be one of"):
        trainer_kwargs_for(1, accelerator="tpu")


def test_maybe_compile_is_opt_in() -> None:
    model = TinyModel()
    assert maybe_compile(model) is model


# ----------------------------------------------------------------------------------------------------------
# Lightning DDP training on CPU (gloo)


def _tiny_lit_module(out_dir: str):
    """A linear regression LightningModule that writes which rank of how many processes ran its step.

    Built inside a function so that the fast tests do not import Lightning.
    """
    import lightning as L

    class TinyLitModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            Path(out_dir, f"rank{self.global_rank}.txt").write_text(str(self.trainer.world_size))
            return self.layer(batch).pow(2).mean()

        def train_dataloader(self) -> DataLoader:
            return DataLoader(torch.randn(8, 4), batch_size=2)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return TinyLitModule()


def test_lightning_ddp_fast_dev_run_on_cpu(tmp_path: Path) -> None:
    """Two gloo processes train with the kwargs we pick. 'ddp_fork' instead of 'ddp_spawn': spawned children
    re-import Lightning (tens of seconds on 2 busy cores); the DDP code path is the same."""
    import lightning as L

    kw = trainer_kwargs_for(2, strategy="ddp_fork", accelerator="cpu")
    assert kw["precision"] == "32-true"
    trainer = L.Trainer(**kw, fast_dev_run=True, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forked workers must not inherit a used OpenMP pool
    try:
        trainer.fit(_tiny_lit_module(str(tmp_path)))
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in tmp_path.glob("rank*.txt")) == ["rank0.txt", "rank1.txt"]
    assert {p.read_text() for p in tmp_path.glob("rank*.txt")} == {"2"}
