"""Why the testbed's answers stay at chance: a control with perfect visual features and no language model.

    python research/testbed_probe_control.py --data SYNTH [--images 4000] [--steps 1500]

Each training image of a SynthVQA folder gets *oracle* patch features written from its scene description
(:func:`mambaprune.train_testbed.patch_targets`; one 128-d vector per 16 px patch of the 160 px grid: a one-hot of
the colour x shape category of the object centred there, the code characters centred there, a one-hot of the
patch's row and column). They are summed over the 100 patches (what a scan that keeps everything would hold)
and, with the layer-normalised sum of the question's token embeddings, fed to a 2-layer MLP that answers the
image's existence question (POPE-like, yes / no). Trained twice from the same seed, 32 questions a step, AdamW:

* ``raw``: the summed features as they are;
* ``standardised``: minus their mean over the training images, divided by their std (per channel).

Printed: the training loss (cross-entropy of the yes / no token) every 250 steps, for both. On the project's
SynthVQA folder (seed 0, 4000 images, 1500 steps) ``raw`` stays at 0.63 and ``standardised`` falls to 0.04:
the features hold the answer in both, but when what every image shares (the background's 95 empty patches)
dominates them, gradient descent does not find it in this many steps. That is the testbed's problem in
miniature; :func:`mambaprune.train_testbed.standardize_tower` is the remedy it suggests.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


def oracle_sums(data: Path, images: list[str]) -> torch.Tensor:
    from mambaprune.train_testbed import patch_targets

    scene_file = json.loads((data / "scenes" / "train.json").read_text())
    scenes = {sc["image_id"]: sc for sc in scene_file["scenes"]}
    out = torch.zeros(len(images), 100, 128)
    pos = torch.arange(100)
    for k, path in enumerate(images):
        t = patch_targets(scenes[int(Path(path).stem)], scene_file["image_size"], 160, 16)
        out[k, pos, t["category"]] = 1.0
        out[k, :, 50:80] = t["chars"]
        out[k, pos, 80 + pos // 10] = 1.0
        out[k, pos, 90 + pos % 10] = 1.0
    return out.sum(1)


def main(argv=None) -> None:
    from mambaprune.data.readers import load_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a SynthVQA folder (mambaprune synth)")
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=2e-3)
    a = p.parse_args(argv)
    data = Path(a.data)
    items = [(str(s.image), s.question, s.answers[0]) for s in load_dataset("synthvqa", data, "train")
             if s.group == "synthvqa:exist"][: a.images]
    if not items:
        raise SystemExit(f"no exist questions under {data}")
    sums = oracle_sums(data, [i for i, _, _ in items])
    vocab = sorted({w for _, q, _ in items for w in q.lower().replace("?", "").split()})
    bags = torch.zeros(len(items), len(vocab))
    for k, (_, q, _) in enumerate(items):
        for w in q.lower().replace("?", "").split():
            bags[k, vocab.index(w)] += 1.0
    labels = torch.tensor([ans == "yes" for _, _, ans in items], dtype=torch.long)
    curves = {}
    for name in ("raw", "standardised"):
        torch.manual_seed(0)
        embed = nn.Linear(len(vocab), 64, bias=False)
        nn.init.normal_(embed.weight, std=0.02)
        net = nn.Sequential(nn.Linear(128 + 64, 256), nn.GELU(), nn.Linear(256, 2))
        v = sums if name == "raw" else (sums - sums.mean(0)) / (sums.std(0) + 1e-3)
        params = list(embed.parameters()) + list(net.parameters())
        opt = torch.optim.AdamW(params, lr=a.lr)
        rng, running, curve = random.Random(0), [], []
        for step in range(a.steps):
            for g in opt.param_groups:
                g["lr"] = a.lr * min(1.0, (step + 1) / 50)
            idx = rng.sample(range(len(items)), 32)
            q = embed(bags[idx])
            loss = F.cross_entropy(net(torch.cat([v[idx], F.layer_norm(q, q.shape[-1:])], -1)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            running.append(loss.item())
            if (step + 1) % 250 == 0:
                curve.append((step + 1, sum(running) / len(running)))
                running = []
        curves[name] = curve
    print(f"{len(items)} exist questions; training loss (yes/no cross-entropy, chance 0.693)")
    print("| step | raw | standardised |\n|---|---|---|")
    for (step, raw), (_, std) in zip(curves["raw"], curves["standardised"]):
        print(f"| {step} | {raw:.3f} | {std:.3f} |")


if __name__ == "__main__":
    main()
