"""Is a stated spatial relation between two named objects learnable by the testbed's small Mamba, without a tower?

The task is the skeleton of SynthVQA's ``spatial`` family: a 10 x 10 grid of "patch" embeddings in row-major
order, each the sum of a learnt category embedding (background, or one of 30 colour x shape kinds; five
distinct kinds per image) and learnt row and column embeddings (what the testbed's tower gives: it reads
colour, shape and position at 97-99%, ``research/testbed_tower_probe.py``); then the caption
``<Q> colour_a shape_a relation colour_b shape_b ? <A>``; the answer, predicted at the last position, is
``yes`` when object a is left of / right of / above / below object b (the two always differ on that axis, and
half the captions are true, as in SynthVQA). ``--question-first`` puts the caption's tokens before the grid as
well, so the scan knows which two objects to look for. AdamW (lr 2e-3, batch 32, grad clip 1), ``init_mamba_``
as the testbed trains (A scale 64, Δ in [0.01, 0.5], unit-RMS embeddings); accuracy on 512 held-out captions
every ``--every`` steps.

Measured here (2 layers, d_model 64, d_state 16, expand 2, the testbed's shallow phase; 1 thread, ~0.5 s a
step, 0.2 on a free core): with the caption after the grid its accuracy is one answer's share of the held-out
captions (48.8 or 51.2%) at every check of ``--steps 8000``; with ``--question-first`` the same at every check
of 6000 steps; with ``--layers 4 --d-state 64`` (four times the state) the same for 1500 steps. The relation
needs each named object's position recalled from the state by a two-token key and the two compared, and neither
layout starts that within what the testbed's hour on this CPU gives.

Which of the two blocks it: with each named object's row and column embeddings added to its shape word
(``--given-positions``: recall done for the model) the same model learns the comparison at once (92.6% at step
750, 99.6% at 1250). With a training-only read-out of each named object's row and column at its shape word
(``--name-recall 1``) and three objects a grid (``--objects 3``), recall at the names climbs from step ~2500 to
99%, and the captions leave chance at step 4250 (70.1%) and reach 97.1% at 6000. Recall, not the relation, is
the first block, and supervising it where the caption names the objects opens it; with five objects (the
default) recall at the names reaches 98% by step 6250 but the captions are still at one answer's share at 8000.
``--recall-layer 0`` reads ``--name-recall`` after the first of the two layers, so the second can carry and
compare what was recalled: with five objects recall at the names reaches 98% by step 3250 (not 6250) and 99.3-99.8%
from step 6000, yet the captions are at one answer's share (47.5-51.2%) at every check of 8000 steps. With ``--layers 3`` (two
layers above the recall) the same: recall 99% by step 6000, captions at chance at every check. Recalled positions,
decodable at 99% after layer 0, are not what the given ones are to the layers above.
**What opens it with five objects: recall on a line.** ``--recall-code ordinal`` reads the same read-out as one
scalar per row and per column, -1 at the first and 1 at the last (a squared error), instead of a 10-way class
each: with ``--name-recall 1 --recall-layer 0 --recall-code ordinal`` (five objects) the captions are at one
answer's share (48.8-51.2%) up to step 3750, then at 82.6% at step 4000, 85.9% at 4250 and 87.7% at 4500 (the
run was stopped there to free the core; with ``--seed 1``: at chance up to step 3500, then 73.2% at 3750 and 90.0%
at 4000), with the nearest position to the recalled scalars right for only 35-40%
of rows and 30-36% of columns (chance 10%). A class code asks for positions a linear head can tell apart; a
comparison needs them in order, as a difference, and the ordinal code asks for exactly that.
``--where`` trains recall elsewhere instead (``<Q> colour shape WHERE`` -> row and column, a linear head on
the last state), the toy's form of ``train-testbed --where-per-image`` (an option of the code at commit 9bd38ae).

    python research/spatial_toy.py [--steps 3000] [--question-first] [--layers 2] [--d-state 16] [--objects 5]
        [--given-positions] [--name-recall W [--recall-layer K] [--recall-code class|ordinal]] [--where FRACTION]
        [--seed S]
"""
import argparse
import time

import torch
import torch.nn.functional as F

from mambaprune.data.synthvqa import RELATIONS, relation_holds
from mambaprune.models.mamba_lm import MambaConfig, MambaLM
from mambaprune.train_testbed import init_mamba_, ordinal_cells

GRID, N_KINDS, N_SHAPES, N_OBJECTS = 10, 30, 5, 5
COLOUR0, SHAPE0 = 31, 37                          # colour words 31..36, shape words 37..41
QUERY, QMARK, ANSWER, YES, NO, RELATION0 = 42, 43, 44, 45, 46, 47   # SynthVQA's four RELATIONS: 47..50
WHERE = 51                                        # the where-question's last token
VOCAB = 52


def spatial_batch(n: int, gen: torch.Generator, n_objects: int = N_OBJECTS):
    """``(grid kinds (n, GRID * GRID), caption tokens (n, 8), answer token (n,))``; kind 0 is background,
    kinds 1..30 are colour * 5 + shape + 1."""
    cells = GRID * GRID
    kinds = torch.stack([torch.randperm(N_KINDS, generator=gen)[:n_objects] for _ in range(n)]) + 1
    where = torch.stack([torch.randperm(cells, generator=gen)[:n_objects] for _ in range(n)])
    grid = torch.zeros(n, cells, dtype=torch.long).scatter_(1, where, kinds)
    rows, cols = (where // GRID).tolist(), (where % GRID).tolist()
    captions, answers = [], []
    for b in range(n):
        relation = int(torch.randint(len(RELATIONS), (1,), generator=gen))
        axis = rows[b] if RELATIONS[relation][1] else cols[b]      # (name, row step, column step)
        if len(set(axis)) == 1:                   # every object on one line of that axis: ask the other one
            relation = (relation + 2) % 4
            axis = rows[b] if RELATIONS[relation][1] else cols[b]
        while True:
            i, j = torch.randperm(n_objects, generator=gen)[:2].tolist()
            if axis[i] != axis[j]:
                break
        true = relation_holds({"row": rows[b][i], "col": cols[b][i]}, {"row": rows[b][j], "col": cols[b][j]},
                              RELATIONS[relation][0])
        if bool(torch.rand(1, generator=gen) < 0.5) != true:   # half true: swap the two objects to flip it
            i, j = j, i
            true = not true
        ka, kb = int(kinds[b, i]) - 1, int(kinds[b, j]) - 1
        captions.append([QUERY, COLOUR0 + ka // N_SHAPES, SHAPE0 + ka % N_SHAPES, RELATION0 + relation,
                         COLOUR0 + kb // N_SHAPES, SHAPE0 + kb % N_SHAPES, QMARK, ANSWER])
        answers.append(YES if true else NO)
    return grid, torch.tensor(captions), torch.tensor(answers)


def named_kind(caption: torch.Tensor, at: int) -> torch.Tensor:
    """The grid kind of the object a caption names by its colour and shape words at ``at`` and ``at + 1``."""
    return (caption[:, at] - COLOUR0) * N_SHAPES + (caption[:, at + 1] - SHAPE0) + 1


def named_cells(grid: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
    """``(n, 2)``: the grid cell of the caption's subject and of its object."""
    return torch.stack([(grid == named_kind(caption, at)[:, None]).long().argmax(1) for at in (1, 4)], 1)


def row_col(cells: torch.Tensor) -> torch.Tensor:
    """``cells``' grid row and column, stacked on a new last dimension."""
    return torch.stack([cells // GRID, cells % GRID], -1)


def where_batch(n: int, gen: torch.Generator, n_objects: int = N_OBJECTS):
    """``(grid kinds, question tokens (n, 4): <Q> colour shape WHERE, row (n,), column (n,))`` of the caption's
    subject in a :func:`spatial_batch` of the same arguments."""
    grid, caption, _ = spatial_batch(n, gen, n_objects)
    cell = named_cells(grid, caption)[:, 0]
    question = torch.cat([caption[:, :3], torch.full((n, 1), WHERE)], 1)
    return grid, question, cell // GRID, cell % GRID


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--question-first", action="store_true", help="the caption before the grid as well")
    parser.add_argument("--objects", type=int, default=N_OBJECTS, help="objects in each grid (at least 2)")
    parser.add_argument("--where", type=float, default=0.0,
                        help="share of each batch given to where-questions (<Q> colour shape WHERE -> row and "
                             "column of that object, read out by a linear head from the last state)")
    parser.add_argument("--given-positions", action="store_true",
                        help="add each named object's row and column embeddings to its shape word in the caption: "
                             "recall done for the model, only the comparison left to learn")
    parser.add_argument("--name-recall", type=float, default=0.0,
                        help="weight of a read-out of each named object's row and column at its shape word in the "
                             "caption (the same linear head as --where)")
    parser.add_argument("--recall-layer", type=int, default=None,
                        help="read --name-recall from the residual stream after this layer (0-based, "
                             "layer-normalised) instead of the final norm's output")
    parser.add_argument("--recall-code", choices=("class", "ordinal"), default="class",
                        help="--name-recall as a 10-way classification of row and of column (class), or as a "
                             "regression of both onto one scalar each, -1 at the first row/column and 1 at the "
                             "last (ordinal: the code a comparison can read as a difference)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the model's initialisation and the training batches (the held-out captions stay)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not 2 <= args.objects <= N_KINDS or not 0 <= args.where < 1:
        parser.error("--objects must be in 2..30 and --where in [0, 1)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    lm = MambaLM(MambaConfig(d_model=args.d_model, n_layer=args.layers, d_state=args.d_state, expand=2,
                             vocab_size=VOCAB))
    init_mamba_(lm, args.seed, dt_min=0.01, dt_max=0.5, a_scale=64.0, embedding_std=1.0)
    row_emb, col_emb = torch.nn.Embedding(GRID, args.d_model), torch.nn.Embedding(GRID, args.d_model)
    where_head = torch.nn.Linear(args.d_model, 2 * GRID)
    ordinal_head = torch.nn.Linear(args.d_model, 2)
    params = [*lm.parameters(), *row_emb.parameters(), *col_emb.parameters(), *where_head.parameters(),
              *ordinal_head.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    embed = lm.backbone.embedding
    cell = torch.arange(GRID * GRID)

    def image(grid):
        return embed(grid) + row_emb(cell // GRID) + col_emb(cell % GRID)

    def answer_logits(grid, caption):
        text = embed(caption)
        if args.given_positions:           # each named object's row and column added to its shape word
            cells = named_cells(grid, caption)
            given = row_emb(cells // GRID) + col_emb(cells % GRID)
            text = text.index_add(1, torch.tensor([2, 5]), given)
        parts = ([embed(caption[:, :-1])] if args.question_first else []) + [image(grid), text]
        tapped = []

        def tap(seq):
            if seq.layer == args.recall_layer:
                tapped.append(seq.stream())

        out = lm(inputs_embeds=torch.cat(parts, 1), return_all_logits=True,
                 hook=None if args.recall_layer is None else tap)
        if tapped:
            names = F.layer_norm(tapped[0][:, [-6, -3]], (args.d_model,))
        else:
            names = lm.backbone.norm_f(out.sequence.stream()[:, [-6, -3]])
        # (n, 2, 2, GRID): row and column of each named object, read at its shape word (caption positions 2, 5)
        if args.recall_code == "ordinal":       # (n, 2, 2): row and column of each named object, in [-1, 1]
            at_names = ordinal_head(names)
        else:
            at_names = where_head(names).view(-1, 2, 2, GRID)
        return out.logits[:, -1, :VOCAB], at_names

    def where_logits(grid, question):
        """``(n, 2, GRID)``: row and column logits of the asked object, from the final state."""
        out = lm(inputs_embeds=torch.cat([image(grid), embed(question)], 1), return_all_logits=True)
        return where_head(lm.backbone.norm_f(out.sequence.stream()[:, -1])).view(-1, 2, GRID)

    held = spatial_batch(512, torch.Generator().manual_seed(99), args.objects)
    held_where = where_batch(512, torch.Generator().manual_seed(98), args.objects)
    n_where = round(args.batch_size * args.where)
    gen, start, curve = torch.Generator().manual_seed(1 + args.seed), time.time(), []
    for step in range(1, args.steps + 1):
        grid, caption, answer = spatial_batch(args.batch_size - n_where, gen, args.objects)
        logits, at_names = answer_logits(grid, caption)
        loss = F.cross_entropy(logits, answer)
        where_loss = torch.zeros(())
        if args.name_recall:
            cells = named_cells(grid, caption)
            if args.recall_code == "ordinal":
                where_loss = args.name_recall * F.mse_loss(at_names, ordinal_cells(row_col(cells), GRID))
            else:
                where_loss = args.name_recall * F.cross_entropy(at_names.flatten(0, 2),
                                                                row_col(cells).flatten())
        if n_where:
            grid, question, row, col = where_batch(n_where, gen, args.objects)
            where_loss = where_loss + F.cross_entropy(where_logits(grid, question).flatten(0, 1),
                                                      torch.stack([row, col], 1).flatten())
        opt.zero_grad()
        (loss + where_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.every == 0:
            with torch.no_grad():
                logits, at_names = answer_logits(held[0], held[1])
                acc = float((logits.argmax(-1) == held[2]).float().mean())
                where = ""
                if args.name_recall:
                    cells = named_cells(*held[:2])
                    if args.recall_code == "ordinal":
                        hit = ((at_names + 1) * (GRID - 1) / 2).round() == row_col(cells)
                    else:
                        hit = at_names.argmax(-1) == row_col(cells)
                    where = (f"  at the names: row {hit[..., 0].float().mean():.3f} "
                             f"column {hit[..., 1].float().mean():.3f}")
                if n_where:
                    hit = where_logits(*held_where[:2]).argmax(-1) == torch.stack(held_where[2:], 1)
                    where += f"  where: row {hit[:, 0].float().mean():.3f} column {hit[:, 1].float().mean():.3f}"
            curve.append(f"{acc:.2f}")
            print(f"step {step:5d}  loss {loss.item():.3f}  held-out accuracy {acc:.3f}{where}  "
                  f"({time.time() - start:.0f} s)", flush=True)
    print("question first" if args.question_first else "caption after the grid", "|", " ".join(curve))


if __name__ == "__main__":
    main()
