"""RetrievalDataModule: batch format, determinism, corruption modes, eval loaders, vocab, limits, errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from rcit_bench.data.corruptions import corrupt
from rcit_bench.data.datamodule import RetrievalDataModule
from rcit_bench.data.text_perturbations import perturb_caption
from rcit_bench.data.captions import simple_tokenize

SIZES = dict(n_train=20, n_val=6, n_test=6, image_size=32)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    RetrievalDataModule("synthetic", root, **SIZES).prepare_data()
    return root


def _dm(root, **kw):
    return RetrievalDataModule("synthetic", root, **{**SIZES, "batch_size": 8, "eval_batch_size": 5, **kw})


def test_train_batch_format_matches_split(synth_root):
    dm = _dm(synth_root)
    dm.setup("fit")
    split = dm.split("train")
    assert len(split) == 20 and split.num_captions == 100
    loader = dm.train_dataloader()
    assert len(loader.dataset) == 100  # one item per caption
    batch = next(iter(loader))
    assert set(batch) == {"images", "tokens", "lengths", "image_index", "caption_index"}
    assert batch["images"].shape == (8, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["tokens"].dtype == torch.int64 and batch["lengths"].dtype == torch.int64
    assert batch["tokens"].shape == (8, int(batch["lengths"].max()))
    for b in range(8):
        k, i, n = int(batch["caption_index"][b]), int(batch["image_index"][b]), int(batch["lengths"][b])
        assert split.caption_to_image[k] == i
        assert torch.equal(batch["images"][b], split.load_image(i))
        assert batch["tokens"][b, 0] == 1 and batch["tokens"][b, n - 1] == 2  # <start> ... <end>
        assert (batch["tokens"][b, n:] == dm.pad_id).all()
        assert dm.vocab.decode(batch["tokens"][b].tolist()) == split.tokens[k]
    # an epoch visits every caption exactly once
    seen = torch.cat([b["caption_index"] for b in loader])
    assert sorted(seen.tolist()) == list(range(100))
    assert dm._store("train").cache.dtype == torch.uint8  # synthetic images decoded once


def test_same_seed_same_batches_new_epoch_new_order(synth_root):
    stamp = (synth_root / "synthetic_params.json").read_text()
    first = [next(iter(_dm(synth_root, seed=s).train_dataloader())) for s in (1, 1, 2)]
    assert (synth_root / "synthetic_params.json").read_text() == stamp  # training seed does not regenerate data
    assert all(torch.equal(first[0][k], first[1][k]) for k in first[0])
    assert not torch.equal(first[0]["caption_index"], first[2]["caption_index"])
    loader = _dm(synth_root, seed=1).train_dataloader()
    e0 = torch.cat([b["caption_index"] for b in loader])
    e1 = torch.cat([b["caption_index"] for b in loader])  # next iteration = next epoch
    assert not torch.equal(e0, e1)
    loader.batch_sampler.sampler.set_epoch(0)  # what Lightning calls before each epoch
    assert torch.equal(torch.cat([b["caption_index"] for b in loader]), e0)


@pytest.mark.parametrize("n, batch, world", [(100, 8, 2), (100, 7, 3), (10, 4, 3), (9, 9, 1)])
def test_rank_parts_of_global_batches_are_the_single_process_batches(n, batch, world):
    """Each rank's part of a global batch, concatenated in rank order, is the batch one process draws (in order),
    for every epoch; the last global batch is dropped only when it is smaller than the world size."""
    from rcit_bench.data.datamodule import _EpochSampler, _GlobalBatchSampler

    one = _GlobalBatchSampler(_EpochSampler(n, seed=3), batch_size=batch)
    parts = [_GlobalBatchSampler(_EpochSampler(n, seed=3), batch_size=batch, rank=r, world_size=world)
             for r in range(world)]
    for epoch in (0, 1):
        for s in (one, *parts):
            s.sampler.set_epoch(epoch)
        single = list(one)
        ranked = [list(p) for p in parts]
        assert len({len(r) for r in ranked}) == 1  # DDP: every rank takes the same number of steps
        keep = [b for b in single if len(b) >= world]
        assert len(keep) == len(ranked[0]) == len(parts[0])
        for k, batch_k in enumerate(keep):
            assert sum((r[k] for r in ranked), []) == batch_k
            sizes = [len(r[k]) for r in ranked]
            assert max(sizes) - min(sizes) <= 1
        assert all(e == epoch for b in single for _, e in b)
    assert sorted(i for b in single for i, _ in b) == list(range(n))  # one process sees every caption


def test_eval_images_deterministic_across_workers_and_batch_sizes(synth_root):
    ref_dm = _dm(synth_root, eval_seed=5)
    split = ref_dm.split("test")
    # independent reference: each image corrupted alone with its own id and the module's seed
    ref = torch.stack([corrupt(split.load_image(i)[None], "gaussian_noise", severity=3, seed=5,
                               image_ids=[split.image_ids[i]])[0] for i in range(len(split))])
    for workers, ebs in ((0, 5), (2, 4), (0, 6)):
        dm = _dm(synth_root, seed=workers, eval_seed=5, num_workers=workers, eval_batch_size=ebs)
        batches = list(dm.image_loader("test", "gaussian_noise", severity=3))
        images = torch.cat([b["images"] for b in batches])
        assert torch.cat([b["image_index"] for b in batches]).tolist() == list(range(6))
        assert torch.equal(images, ref), (workers, ebs)
    clean = torch.cat([b["images"] for b in ref_dm.image_loader("test")])
    with pytest.raises(ValueError, match=r"Argument `corruption` must be one of .*Did you mean 'gaussian_noise'"):
        ref_dm.image_loader("test", "gausian_noise", severity=3)
    assert torch.equal(clean, torch.stack([split.load_image(i) for i in range(6)]))
    assert not torch.equal(clean, ref)


def test_val_loader_in_caption_order(synth_root):
    dm = _dm(synth_root)
    batches = list(dm.val_dataloader())
    assert torch.cat([b["caption_index"] for b in batches]).tolist() == list(range(30))
    assert torch.equal(torch.cat([b["image_index"] for b in batches]), dm.caption_to_image("val"))
    assert dm.caption_to_image("val").tolist() == [i for i in range(6) for _ in range(5)]


def test_augment_mode_fraction_and_epoch_dependence(synth_root):
    mix = [{"name": "salt_pepper", "rate": 0.6}]
    none = _dm(synth_root, train_corruption="augment", corruption_mix=mix, augment_fraction=0.0).train_dataloader()
    allc = _dm(synth_root, train_corruption="augment", corruption_mix=mix, augment_fraction=1.0).train_dataloader()
    b0, b1 = next(iter(none)), next(iter(allc))
    assert torch.equal(b0["caption_index"], b1["caption_index"])
    assert torch.equal(b0["images"], torch.stack([none.dataset.store.get(int(i)) for i in b0["image_index"]]))
    assert b1["corrupted"].all() and not b0["corrupted"].any()
    differs = (b1["images"] != b0["images"]).flatten(1).float().mean(1)
    assert (differs > 0.3).all()  # 60 % of pixels hit (some already black/white)
    ds = allc.dataset
    assert not torch.equal(ds[(0, 0)]["image"], ds[(0, 1)]["image"])  # fresh noise each epoch
    assert torch.equal(ds[(0, 0)]["image"], ds[(0, 0)]["image"])
    half = _dm(synth_root, train_corruption="augment", corruption_mix=mix, augment_fraction=0.5).train_dataloader()
    frac = torch.cat([b["corrupted"] for b in half])
    assert 0.3 < frac.float().mean() < 0.7


def test_paired_mode(synth_root):
    mix = [{"name": "gaussian_noise", "severity": 3}, {"name": "speckle", "rate": 0.6}]
    dm = _dm(synth_root, train_corruption="paired", corruption_mix=mix)
    batch = next(iter(dm.train_dataloader()))
    assert batch["corrupted_images"].shape == batch["images"].shape
    clean = torch.stack([dm._store("train").get(int(i)) for i in batch["image_index"]])
    assert torch.equal(batch["images"], clean)
    assert ((batch["corrupted_images"] - clean).abs().flatten(1).mean(1) > 0.01).all()
    assert batch["corrupted_images"].min() >= 0 and batch["corrupted_images"].max() <= 1
    # training batches (order and noise) do not depend on the number of workers
    other = next(iter(_dm(synth_root, train_corruption="paired", corruption_mix=mix, num_workers=2).train_dataloader()))
    assert all(torch.equal(batch[k], other[k]) for k in batch)


def test_caption_loader_clean_and_perturbed(synth_root):
    dm = _dm(synth_root, eval_seed=3)
    split = dm.split("test")
    clean = list(dm.caption_loader("test"))
    assert torch.cat([b["caption_index"] for b in clean]).tolist() == list(range(30))
    pert = list(dm.caption_loader("test", "word_drop", level=5))
    again = list(_dm(synth_root, eval_seed=3).caption_loader("test", "word_drop", level=5))
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(pert, again))
    k = 7
    expected = simple_tokenize(perturb_caption(split.captions[k], "word_drop", 5, seed=3, caption_id=k))
    row = torch.cat([torch.nn.functional.pad(b["tokens"], (0, 40 - b["tokens"].shape[1])) for b in pert])[k]
    assert dm.vocab.decode(row.tolist()) == expected
    with pytest.raises(ValueError, match="Argument `perturbation`"):
        dm.caption_loader("test", "word_dorp", level=1)


def _flickr_root(tmp_path):
    images = []
    words = {"train": "dog", "val": "cat", "test": "zebra"}  # 'zebra' only in test
    for i, split in enumerate(["train", "train", "train", "val", "test", "test"]):
        Image.new("RGB", (8, 6), (30 * i, 10, 200)).save(_mk(tmp_path / "images") / f"{i}.jpg")
        images.append({"split": split, "filename": f"{i}.jpg", "imgid": i,
                       "sentences": [{"raw": f"a {words[split]} {k}", "tokens": ["a", words[split], str(k)]}
                                     for k in range(5)]})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    return tmp_path


def _mk(d):
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_flickr_layout_vocab_from_train_only_and_resize(tmp_path):
    dm = RetrievalDataModule("flickr30k", _flickr_root(tmp_path), image_size=4, eval_batch_size=10)
    assert "dog" in dm.vocab and "zebra" not in dm.vocab
    tokens = next(iter(dm.caption_loader("test")))["tokens"]
    assert (tokens[:, 2] == dm.vocab.unk_id).all()  # <start> a <unk> k <end>
    images = next(iter(dm.image_loader("test")))["images"]
    assert images.shape == (2, 3, 4, 4)  # shorter side resized, center crop
    assert dm._store("test").cache is None  # real datasets are decoded lazily
    dm2 = RetrievalDataModule("karpathy", tmp_path / "images", json_path=tmp_path / "dataset_flickr30k.json",
                              image_size=4, limit_train=2)
    assert len(dm2.split("train")) == 2 and dm2.split("train").num_captions == 10


def test_limits_take_first_images(synth_root):
    dm = _dm(synth_root, limit_train=3, limit_val=2, limit_test=1)
    full = _dm(synth_root)
    assert len(dm.split("train")) == 3 and dm.split("train").num_captions == 15
    assert dm.split("val").image_ids == full.split("val").image_ids[:2]
    assert len(list(dm.image_loader("test"))[0]["images"]) == 1


def test_missing_roots_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset='flickr30k' not found: .*dataset_flickr30k\.json.*dataset='synthetic'"):
        RetrievalDataModule("flickr30k", tmp_path / "nowhere").split("test")
    with pytest.raises(ValueError, match=re.escape("Argument `dataset` must be one of") + ".*Did you mean 'flickr30k'"):
        RetrievalDataModule("flikr30k")
    with pytest.raises(ValueError, match="Argument `train_corruption`"):
        RetrievalDataModule("synthetic", tmp_path, train_corruption="pair")
    with pytest.raises(ValueError, match=r"corruption_mix\[0\]\.name.*Did you mean 'gaussian_noise'"):
        RetrievalDataModule("synthetic", tmp_path, train_corruption="augment",
                            corruption_mix=[{"name": "gausian_noise", "severity": 3}])
    with pytest.raises(ValueError, match=r"corruption_mix\[0\]: Corruption 'speckle' needs `rate`"):
        RetrievalDataModule("synthetic", tmp_path, train_corruption="paired", corruption_mix=[{"name": "speckle"}])
    with pytest.raises(ValueError, match="`augment_fraction`"):
        RetrievalDataModule("synthetic", tmp_path, augment_fraction=1.5)
    with pytest.raises(ValueError, match="`limit_train`"):
        RetrievalDataModule("synthetic", tmp_path, limit_train=0)
    with pytest.raises(ValueError, match="json_path"):
        RetrievalDataModule("karpathy", tmp_path)


def test_lightning_sets_epochs_on_the_sampler(synth_root):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: dict[int, list[int]] = {}

        def training_step(self, batch, _):
            self.seen.setdefault(self.current_epoch, []).extend(batch["caption_index"].tolist())
            return (self.w * batch["images"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(probe, datamodule=_dm(synth_root))
    assert len(probe.seen[0]) == len(probe.seen[1]) == 16
    assert probe.seen[0] != probe.seen[1]


# ---- corruption_scaling ----

SIZES64 = dict(n_train=8, n_val=2, n_test=4, image_size=64)


@pytest.fixture(scope="module")
def synth64_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth64")
    RetrievalDataModule("synthetic", root, **SIZES64).prepare_data()
    return root


def _dm64(root, **kw):
    return RetrievalDataModule("synthetic", root, **{**SIZES64, "batch_size": 4, "eval_batch_size": 3, **kw})


def test_corruption_scaling_reaches_the_eval_image_loader(synth64_root):
    clean = torch.cat([b["images"] for b in _dm64(synth64_root).image_loader("test")])
    split = _dm64(synth64_root).split("test")
    for scaling in ("image", "published"):
        dm = _dm64(synth64_root, eval_seed=2, corruption_scaling=scaling)
        assert dm.corruption_scaling == scaling and dm.hparams.corruption_scaling == scaling
        got = torch.cat([b["images"] for b in dm.image_loader("test", "pixelate", severity=1)])
        ref = corrupt(clean, "pixelate", severity=1, seed=2, image_ids=split.image_ids, scaling=scaling)
        assert torch.equal(got, ref), scaling
        if scaling == "image":
            assert torch.equal(got, clean)  # the 224 px reference scaling: pixelate s1 is the identity at 64 px
        else:
            assert not torch.equal(got, clean)
    default = torch.cat([b["images"] for b in _dm64(synth64_root).image_loader("test", "pixelate", severity=1)])
    assert torch.equal(default, clean)  # the default is 'image'


@pytest.mark.parametrize("mode", ["augment", "paired"])
def test_corruption_scaling_reaches_training_corruptions(synth64_root, mode):
    mix = [{"name": "defocus_blur", "severity": 1}]  # at 64 px the identity in 'image' scaling (radius < 1 px)
    key = "corrupted_images" if mode == "paired" else "images"
    batches = {}
    for scaling in ("image", "published"):
        dm = _dm64(synth64_root, train_corruption=mode, corruption_mix=mix, augment_fraction=1.0,
                   corruption_scaling=scaling)
        batches[scaling] = next(iter(dm.train_dataloader()))
    clean = torch.stack([_dm64(synth64_root)._store("train").get(int(i)) for i in batches["image"]["image_index"]])
    assert torch.equal(batches["image"]["image_index"], batches["published"]["image_index"])
    assert torch.allclose(batches["image"][key], clean, atol=1e-6)
    assert (batches["published"][key] - clean).abs().amax() > 0.05


def test_corruption_scaling_bad_value(tmp_path):
    with pytest.raises(ValueError, match=r"Argument `corruption_scaling` must be one of 'image', 'published', "
                                         r"but got 'publshed'.*Did you mean 'published'"):
        RetrievalDataModule("synthetic", tmp_path, corruption_scaling="publshed")
    with pytest.raises(ValueError, match=r"Argument `corruption_scaling`"):
        RetrievalDataModule("synthetic", tmp_path, corruption_scaling=None)
