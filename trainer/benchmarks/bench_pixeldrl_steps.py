"""Does PixelDRL-MG refine over the steps, and when does its training sit at "all background"?

Issue 3's diagnosis experiment, on noisy ellipses (:class:`steprl.segmentation.data.SyntheticSliceSource`,
32 x 32, about 11% object pixels). Trains a small PixelDRL-MG (widths 8/16/32/64, batch 8) for
``--episodes`` episodes and, every 25 episodes, rolls out the greedy policy on 64 unseen slices:

- ``curve``: pooled Dice after steps 1..10;
- ``changed``: fraction of pixels whose value changes after step 1 (steps 2..10 together);
- ``mask_dep``: fraction of step decisions that change when the policy is given the TRUE mask
  instead of the all-object start (how much the policy uses the mask channel at all);
- ``p_obj`` / ``p_bg``: mean keep probability at step 1 on object / background pixels (the
  policy may rank object above background while its greedy mask is still empty);
- ``ret``, ``ent``: the training episode's mean return and entropy.

Variants (``--variant``, tokens combine): ``late`` (default network), ``input`` (the paper's
mask-at-the-input network), ``balance`` (:func:`steprl.segmentation.pa3c.class_weights`),
``norevival``.

    OMP_NUM_THREADS=1 python trainer/benchmarks/bench_pixeldrl_steps.py --variant late --seed 0
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="late")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args(argv)

    from steprl.segmentation.data import SyntheticSliceSource, pooled_dice
    from steprl.segmentation.pa3c import _decide, _encode, greedy_actions, greedy_masks
    from steprl.segmentation.training import build_learner
    from steprl.training.distributed import single_process

    torch.set_num_threads(1)
    kw = dict(widths=(8, 16, 32, 64), seed=args.seed, batch=8, iterations_per_epoch=10000,
              fusion="input" if "input" in args.variant else "late", class_balance="balance" in args.variant,
              allow_revival="norevival" not in args.variant)
    source = SyntheticSliceSource((32, 32), seed=args.seed, val_count=48)
    learner, _ = build_learner("pixeldrl", source, single_process("cpu"), **kw)
    unseen = source.make(64, np.random.default_rng(999))
    rows, start = [], time.time()
    for i in range(args.episodes):
        out = learner.train_iteration(i)
        if (i + 1) % 25:
            continue
        net = learner.net.eval()
        with torch.no_grad():
            masks = greedy_masks(net, unseen.images, 10, learner.pa3c.allow_revival)
            curve = [pooled_dice(m, unseen.masks) for m in masks]
            changed = sum(float((a != b).float().mean()) for a, b in zip(masks, masks[1:]))
            encoded = _encode(net, unseen.images, False)
            start_logits, _ = _decide(net, encoded, torch.ones_like(unseen.images), False)
            true_logits, _ = _decide(net, encoded, unseen.masks, False)
            dependence = float((greedy_actions(start_logits) != greedy_actions(true_logits)).float().mean())
            keep = torch.softmax(start_logits.float(), 1)[:, 1]
        net.train()
        obj = unseen.masks[:, 0] > 0.5
        rows.append(dict(ep=i + 1, curve=[round(c, 3) for c in curve], changed=round(changed, 4),
                         mask_dep=round(dependence, 4), p_obj=round(float(keep[obj].mean()), 3),
                         p_bg=round(float(keep[~obj].mean()), 3), ret=round(out["return"], 3),
                         ent=round(out["entropy"], 3), seconds=round(time.time() - start)))
        print(args.variant, args.seed, json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
