"""How much of the testbed's state at the answer depends on the image: the diagnostic behind the training recipe.

For 16 validation images and one fixed question, the residual stream of the language model is read after every
layer at three positions: the last visual token, the first question token and the position that predicts the
answer. At each, the std across the images is printed against the mean magnitude, and their ratio: the share
of the stream that the image moves. A model that uses the image needs a ratio well above 0 at the answer
position. Also printed: the spread across the images of the answer's yes-no log-odds, and the RMS of the visual
embeddings against that of the text embeddings.

    python research/testbed_image_signal.py RUN_DIR --data SYNTH [--question "Is there a red circle in the image?"]

``RUN_DIR`` is a ``train-testbed --out`` folder, read from its resumable ``last.pt`` (any step) and its
``tokenizer/``, or a finished testbed folder (``model.safetensors``). Measured on run checkpoints at step 200-300
of the CPU runs; ``testbed_image_signal.md`` beside this file gives the figures.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def load_run(folder: Path):
    from mambaprune.models.testbed import TestbedConfig, build_testbed, load_testbed
    from mambaprune.models.vlm import load_tokenizer

    if (folder / "model.safetensors").is_file():
        return load_testbed(folder)
    ckpt = torch.load(folder / "last.pt", map_location="cpu", weights_only=False)
    config = ckpt.get("config")
    if config is None:          # checkpoints written before last.pt held the config: the grid from the weights
        g = int(ckpt["model"]["vision.position"].shape[1] ** 0.5)
        config = {"image_size": g * TestbedConfig().patch_size,
                  "vision_attention_layers": len({k.split(".")[2] for k in ckpt["model"]
                                                  if k.startswith("vision.attention.")})}
    config = TestbedConfig.from_dict(config)
    model = build_testbed(config, load_tokenizer(folder / "tokenizer"))
    model.load_state_dict(ckpt["model"])
    print(f"{folder / 'last.pt'}: step {ckpt['step']}")
    return model.eval()


def main(argv=None) -> None:
    from mambaprune.data.readers import load_dataset
    from mambaprune.models.testbed import testbed_prompt
    from mambaprune.train_testbed import TurnEncoder

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--data", required=True, help="the SynthVQA folder the run trained on")
    p.add_argument("--question", default="Is there a red circle in the image?")
    p.add_argument("--images", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_run(args.run)
    images = sorted({str(s.image) for s in load_dataset("synthvqa", args.data, "val")})[: args.images]
    prompt = TurnEncoder(model.tokenizer).ids(testbed_prompt(args.question))  # ends where the answer is predicted
    ids = torch.tensor([prompt] * len(images))
    streams = {}

    def tap(seq):
        streams[seq.layer] = seq.stream().detach()

    with torch.no_grad():
        visual = model.embed_visual(model.vision.preprocess(images))
        text = model.lm.backbone.embedding(ids)
        out = model.lm(inputs_embeds=torch.cat([visual, text], 1), hook=tap)
    nv = visual.shape[1]
    rms = lambda x: float(x.pow(2).mean(-1).sqrt().mean())
    print(f"RMS of the visual embeddings {rms(visual):.3f}, of the text embeddings {rms(text):.3f}")
    print(f"{'layer':>5} {'last visual':>22} {'first question':>22} {'answer position':>22}   (std across images / "
          f"magnitude = share)")
    for layer in sorted(streams):
        cells = []
        for pos in (nv - 1, nv, streams[layer].shape[1] - 1):
            x = streams[layer][:, pos]
            spread, size = float(x.std(0).mean()), float(x.abs().mean())
            cells.append(f"{spread:8.4f}/{size:8.3f}={spread / max(size, 1e-12):6.4f}")
        print(f"{layer:>5} " + " ".join(f"{c:>22}" for c in cells))
    logp = torch.log_softmax(out.logits.float(), -1)
    yes, no = (model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no"))
    odds = logp[:, yes] - logp[:, no]
    print(f"yes-no log-odds across the images: mean {float(odds.mean()):.4f}, std {float(odds.std()):.5f}")


if __name__ == "__main__":
    main()
