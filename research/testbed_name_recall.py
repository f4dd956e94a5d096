"""Does a testbed run recall where the objects its questions name are? The names read-out on validation questions.

    python research/testbed_name_recall.py RUN_DIR --data SYNTH --layer K [--images 300] [--family spatial]
        [--code class|ordinal] [--order scan|rows-reversed|columns-reversed]

``RUN_DIR`` is a ``train-testbed --out`` folder holding ``last.pt`` of a run trained with ``--referent-weight W
--referent-at names`` (the read-out, :meth:`~mambaprune.train_testbed.MemoryHead.named_loss`, is not shipped);
``--layer`` is the layer after which that run read it (``--referent-layer``, or ``--memory-layer`` modulo the
depth; followed through a growth by :func:`~mambaprune.train_testbed.referent_tap`). Each of the first
``--images`` validation images is asked its ``--family`` question alone, as the harness asks it; at the last
token of each object the question names (:meth:`~mambaprune.train_testbed.TurnEncoder.name_positions`) the
read-out's row and column are compared with the object's grid cell. Printed: the row, column and cell (both)
accuracy over the named objects (chance 1/4 for a row or a column of the 4 x 4 grid), and how often every token
of the reference answer is the model's most likely one (teacher-forced) on those questions. ``--order`` feeds
the visual tokens in another order (:func:`~mambaprune.train_testbed.reorder_patches`), and ``row_mirrored`` /
``column_mirrored`` count the read-outs that give the mirrored row / column: a read-out that finds a row from
the tokens' content gives the same row under ``rows-reversed``, one that finds it from how long ago the scan
passed the object (recency) gives the mirrored one.

Measured (300 validation captions, 600 named objects; runs 35 and 36 of the README, run 30's command with the
names read-out after the last layer or after layer 0): run 35 found the row of 38, 45, 57 and 72% of the named
objects at steps 2700, 4300, 5200 and 6900 of the shallow phase (150-200 captions before 6900), the column of
30-37% (chance 25% each); run 36, at step 6900, 46% and 34%. Its answers were at chance throughout (48-53%).
Runs 40 and 41 (run 39 resumed, ordinal read-out after layer 0; 150 captions): rows 50% (run 40, step 6600)
and 63% (run 41, ``--referent-weight 3``, step 5900), columns 24-27%; with ``--order rows-reversed`` the same
read-outs give the true row of 16% and the mirrored row of 43-44% of the named objects: **the rows are read
from recency, not from the tokens** (which hold them: ``testbed_position_probe.py``), and recency gives no
column, which a row-major scan passes within one row; with ``--order rows-rotated`` run 41 finds 5% of the rows.
Run 42 (run 41 at step 6100 trained on with ``train-testbed --row-flip 0.5``): at step 6700 the true row of 52%
under ``rows-reversed`` (mirrored 13%), at step 9250 rows 72% and columns 38% in scan order, 66% and 37% under
``rows-rotated``: recall from the tokens, columns included.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mambaprune.train_testbed import PATCH_ORDERS, reorder_patches


def name_recall(run: Path, data: Path, layer: int, n_images: int = 300, family: str = "spatial",
                code: str = "class", order: str = "scan") -> dict:
    from mambaprune.data.readers import load_dataset
    from mambaprune.data.synthvqa import load_scenes
    from mambaprune.models.testbed import TestbedConfig, build_testbed
    from mambaprune.models.vlm import load_tokenizer
    from mambaprune.data.synthvqa import GRID
    from mambaprune.train_testbed import IGNORE, MemoryHead, TurnEncoder, answer_loss

    ck = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    model = build_testbed(TestbedConfig.from_dict(ck["config"]), load_tokenizer(run / "tokenizer"))
    model.load_state_dict(ck["model"])
    model.eval()
    memory = MemoryHead(model.lm.config.d_model)
    missing, unexpected = memory.load_state_dict(ck["memory"], strict=False)
    if unexpected or any(not k.startswith("ordinal.") for k in missing) or (code == "ordinal" and missing):
        raise ValueError(f"{run / 'last.pt'} holds another read-out: missing {missing}, unexpected {unexpected}")
    scenes = {sc["image_id"]: sc for sc in load_scenes(data, "val")}
    samples = [s for s in load_dataset("synthvqa", data, "val") if s.group == f"synthvqa:{family}"][:n_images]
    if not samples:
        raise ValueError(f"no {family} questions in the val split of {data}")
    encoder = TurnEncoder(model.tokenizer)
    rows, cols, rows_mirrored, cols_mirrored, answered = [], [], [], [], 0
    with torch.no_grad():
        for s in samples:
            scene = scenes[int(Path(s.image).stem)]
            turns = [(s.question, s.answers[0])]
            named = encoder.name_positions(scene, turns)
            ids, labels = encoder.batch([turns])
            visual = reorder_patches(model.embed_visual(model.vision.preprocess(s.image)),
                                     model.vision.image_size // model.vision.patch_size, order)
            _, states = answer_loss(model, visual, ids, labels, state_layer=layer % model.lm.config.n_layer)
            nv = visual.shape[1]
            if named:
                at = torch.tensor([nv + j for j, _, _ in named])
                if code == "ordinal":     # the nearest of the GRID positions on the line -1 .. 1
                    cells = ((memory.named_ordinal(states[0, at]) + 1) * (GRID - 1) / 2).round()
                    row, col = cells.clamp(0, GRID - 1).long().T.tolist()
                else:
                    row, col = memory.named_logits(states[0, at]).argmax(-1).T.tolist()
                rows += [p == r for p, (_, r, _) in zip(row, named)]
                cols += [p == c for p, (_, _, c) in zip(col, named)]
                rows_mirrored += [p == GRID - 1 - r for p, (_, r, _) in zip(row, named)]
                cols_mirrored += [p == GRID - 1 - c for p, (_, _, c) in zip(col, named)]
            # teacher-forced: is every token of the reference answer the model's most likely one?
            pred = model.lm(inputs_embeds=torch.cat([visual, model.lm.backbone.embedding(ids)], 1),
                            return_all_logits=True).logits[0, nv - 1:-1].argmax(-1)
            answer_at = labels[0] != IGNORE
            answered += bool(torch.equal(pred[answer_at], labels[0][answer_at]))
    both = [a and b for a, b in zip(rows, cols)]
    return {"names": len(rows), "row": sum(rows) / len(rows), "column": sum(cols) / len(cols),
            "cell": sum(both) / len(both), "row_mirrored": sum(rows_mirrored) / len(rows),
            "column_mirrored": sum(cols_mirrored) / len(cols), "answers": answered / len(samples),
            "questions": len(samples), "order": order}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--layer", type=int, required=True, help="the layer after which the run read the names")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--family", default="spatial", choices=("spatial", "attr"))
    p.add_argument("--code", default="class", choices=("class", "ordinal"),
                   help="the run's --referent-code (ordinal: the nearest grid position to each scalar)")
    p.add_argument("--order", default="scan", choices=PATCH_ORDERS,
                   help="feed the visual tokens in another order (train_testbed.reorder_patches): recall from content keeps its "
                        "answers, recall from recency answers the mirrored row or column")
    a = p.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(name_recall(a.run, a.data, a.layer, a.images, a.family, a.code, a.order), indent=1))


if __name__ == "__main__":
    main()
