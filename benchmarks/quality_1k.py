"""Clean RSUM on the synthetic 1K test (1,000 images x 5,000 captions) of the models `make bench` trained.

The quick spec evaluates its grid on a 500-image test split to fit 25 minutes on a CPU; this scores its
checkpoints once on the 1K split of the same generator (same seed and training split, hence the same
vocabulary, which is checked), the figure the methods' quality target is stated on.

    python benchmarks/quality_1k.py [--runs runs] [--root data/synthetic]
"""

from __future__ import annotations

import argparse

import torch

from rcit_bench.bench.runner import (
    build_model,
    datamodule_kwargs,
    load_weights,
    make_datamodule,
    method_config,
)
from rcit_bench.bench.spec import load_spec
from rcit_bench.evaluation import CellEvaluator
from rcit_bench.evaluation import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="benchmarks/quick.yaml")
    p.add_argument("--runs", default="runs", help="results dir of the `make bench` run")
    p.add_argument("--root", default="data/synthetic", help="where the 1K-test synthetic dataset is (generated)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    spec = load_spec(args.spec)
    print(f"# command: python benchmarks/quality_1k.py --spec {args.spec} --runs {args.runs} --root {args.root}")
    print("| entry | method | regime | clean RSUM, 1K test | i2t R@1 | t2i R@1 |\n|---|---|---|---|---|---|")
    for entry in spec.entries:
        cfg = method_config(spec, entry)
        trained_on = make_datamodule(datamodule_kwargs(spec, entry, args.seed, cfg))
        kw = datamodule_kwargs(spec, entry, args.seed, cfg)
        kw.update(root=args.root, n_test=1000)
        dm = make_datamodule(kw)
        if getattr(dm.vocab, "itos", None) != getattr(trained_on.vocab, "itos", None):
            raise ValueError(f"{args.root}'s training vocabulary differs from the one {entry.id} was trained with.")
        model = build_model(entry, cfg, dm)
        load_weights(model, f"{args.runs}/{spec.name}/{entry.id}/seed{args.seed}/checkpoints/best.ckpt")
        model.eval()
        ev = CellEvaluator(model, dm, seed=args.seed)
        with torch.no_grad():
            m = evaluate(model, ev.image_reps(), ev.text_reps(), ev.c2i)
        print(f"| {entry.id} | {entry.method} | {entry.regime} | {m['rsum']:.1f} | {m['i2t_r1']:.1f} | {m['t2i_r1']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
