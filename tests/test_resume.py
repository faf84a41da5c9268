"""Resuming training from ``last.ckpt`` continues the very same optimisation on CPU.

Train 2 epochs straight vs 1 epoch, then a fresh model and datamodule (what a rerun after a kill builds)
resumed from ``last.ckpt`` to epoch 2, both through the runner's own :func:`train`: the batches of every
step, epoch and global step counters, the learning rate, the Adam moments, the LR scheduler and the
weights must be exactly equal. VSRN++ is the case that needs the runner's RNG checkpointing: its caption
decoder has dropout, so epoch 2 draws from the global RNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rcit_bench.bench import runner as RN
from rcit_bench.bench.spec import validate_spec
from rcit_bench.bench.wandb_log import WandbRun
from tiny_specs import tiny_dataset, tiny_trainer


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """One intra-op thread: on a loaded 2-core machine two spinning threads make these tiny steps ~20x
    slower. Both runs compared use the same setting, so exactness is unaffected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _spec(root: Path, method: str, overrides: dict[str, Any]) -> Any:
    return validate_spec({
        "name": "resume",
        "dataset": tiny_dataset(root),
        "seeds": [0],
        "trainer": tiny_trainer(max_epochs=2),
        "entries": [{"id": "e", "method": method, "regime": "clean", "overrides": overrides}],
        "evaluation": {"clean": True},
    })


def _train(spec: Any, rd: Path, max_epochs: int) -> tuple[list[tuple], dict[str, Any]]:
    """One runner training call in a fresh model/datamodule (as a rerun builds them); returns per-step
    records and last.ckpt; also checks that train() returns the best checkpoint."""
    entry = spec.entries[0]
    cfg = RN.method_config(spec, entry)
    dm = RN.make_datamodule(RN.datamodule_kwargs(spec, entry, 0, cfg))
    RN._seed(0)  # as the runner does before building the model
    model = RN.build_model(entry, cfg, dm)
    steps: list[tuple] = []
    inner = model.training_step

    def recording_step(batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        lr = model.optimizers().param_groups[0]["lr"]
        steps.append((model.current_epoch, model.global_step, batch_idx, lr, batch["caption_index"].tolist()))
        return inner(batch, batch_idx)

    model.training_step = recording_step
    tkw = {**RN.trainer_kwargs(spec, entry, cfg), "max_epochs": max_epochs}
    best = RN.train(model, dm, RN.RunStore(rd), 0, tkw, WandbRun(enabled=False, run_id="x", name="x", save_dir=rd)).checkpoint
    assert Path(best) == rd / "checkpoints" / "best.ckpt"
    return steps, torch.load(rd / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _assert_equal(a: Any, b: Any, where: str = "") -> None:
    """Exact, recursive equality of checkpoint pieces (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


TINY = {"image_encoder": {"name": "small_cnn", "input_size": 32}, "embed_dim": 32}
CASES = {
    # lr decays after epoch 1 and the loss switches to the hardest negative: epoch-dependent optimisation
    "vsepp": {"model": {**TINY, "text_encoder": {"name": "gru", "word_dim": 32}},
              "optim": {"lr_decay_epochs": 1}},
    # dropout in the caption decoder: the global RNG must be restored too
    "vsrpp": {"model": {**TINY, "image_encoder": {"name": "small_cnn", "input_size": 32, "channels": [8, 16, 16]},
                        "text_encoder": {"name": "bigru", "word_dim": 32}, "n_reasoning_blocks": 1,
                        "decoder_word_dim": 16, "decoder_hidden_dim": 32},
              "optim": {"lr_decay_epochs": 1}},
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_resume_continues_the_same_optimisation(method: str, tmp_path: Path) -> None:
    spec = _spec(tmp_path / "data", method, CASES[method])
    straight_steps, straight = _train(spec, tmp_path / "straight", max_epochs=2)
    first_steps, first = _train(spec, tmp_path / "split", max_epochs=1)
    assert first["epoch"] == 0 and first["global_step"] == 3
    resumed_steps, resumed = _train(spec, tmp_path / "split", max_epochs=2)

    # data order, counters and lr of every step: epoch 1 from the first run, epoch 2 from the resumed one
    assert [s[0] for s in straight_steps] == [0, 0, 0, 1, 1, 1]
    assert first_steps + resumed_steps == straight_steps
    assert straight_steps[0][3] != straight_steps[-1][3]  # the lr did decay: the scheduler state matters
    # the final checkpoint: same epoch, step, weights, Adam moments and step counts, scheduler, loops
    assert (resumed["epoch"], resumed["global_step"]) == (straight["epoch"], straight["global_step"]) == (1, 6)
    _assert_equal(resumed["state_dict"], straight["state_dict"], "state_dict")
    _assert_equal(resumed["optimizer_states"], straight["optimizer_states"], "optimizer_states")
    _assert_equal(resumed["lr_schedulers"], straight["lr_schedulers"], "lr_schedulers")
    # the budget counters and the validation curve survive the interruption (wall time aside)
    meter = {k: {n: v for n, v in ck["callbacks"]["BudgetMeter"].items() if n != "wall_s"}
             for k, ck in (("resumed", resumed), ("straight", straight))}
    assert meter["resumed"] == meter["straight"]
    assert meter["straight"]["pairs"] == 2 * 3 * 16 and [c["epoch"] for c in meter["straight"]["curve"]] == [0, 1]
    adam = resumed["optimizer_states"][0]["state"]
    assert adam and all(float(s["step"]) == 6 and s["exp_avg"].abs().sum() > 0 for s in adam.values())


def test_rerun_after_finished_fit_trains_nothing(tmp_path: Path) -> None:
    """Killed after the last epoch's checkpoint but before the runner recorded the model as trained: the
    rerun's fit restores the finished state, takes no step and returns the same best checkpoint."""
    spec = _spec(tmp_path / "data", "vsepp", CASES["vsepp"])
    _, done = _train(spec, tmp_path / "run", max_epochs=2)
    best = (tmp_path / "run" / "checkpoints" / "best.ckpt").read_bytes()
    steps, again = _train(spec, tmp_path / "run", max_epochs=2)
    assert steps == [] and again["global_step"] == done["global_step"] == 6
    _assert_equal(again["state_dict"], done["state_dict"], "state_dict")
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").read_bytes() == best
