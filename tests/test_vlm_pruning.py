"""The methods inside the multimodal model: every registered method through MambaVLM.answer, DTP's no-op case,
calibration on prepared inputs, and kept tokens mapped back to image patches."""
import pytest
import torch

from mambaprune.analysis import KeptTokenRecorder
from mambaprune.pruning import available_methods, build
from mambaprune.pruning.calibration import calibrate_dtp, search_vtw_layer

from test_vlm import make_image, small_vlm

PARAMS = {"dtp": dict(keep_ratio=0.5, early_layer=0, late_layer=2), "fastv": dict(layer=1), "vtw": dict(layer=2),
          "dart": dict(layer=1, pivots=2), "random_intra": dict(layer=1), "mtr": dict(layer=1)}


@pytest.fixture(scope="module")
def vlm():
    return small_vlm(seed=0)


def test_dtp_keeping_everything_answers_exactly_as_unpruned(vlm):
    img = make_image(1)
    ref = vlm.answer(img, "what is here?", max_new_tokens=6)
    assert isinstance(ref, str)
    same = vlm.answer(img, "what is here?", pruner=build("dtp", keep_ratio=1.0, early_layer=0, late_pruning=False),
                      max_new_tokens=6)
    assert same == ref


def check_method_through_answer(vlm, pruner, img, q):
    """``answer`` gives text with ``pruner``, and a prefill's per-layer token counts are the ones the method
    announces (``expected_tokens``), which cut visual tokens only."""
    assert isinstance(vlm.answer(img, q, pruner=pruner, max_new_tokens=4), str)
    prepared = vlm.prepare(img, q)
    out = vlm.prefill(prepared, pruner=pruner)
    n_vis, n_text = prepared.num_visual, prepared.inputs_embeds.shape[1] - prepared.num_visual
    assert out.tokens_per_layer == pruner.expected_tokens(vlm.lm.config.n_layer, n_vis, n_text)


@pytest.mark.parametrize("name", available_methods())
def test_every_method_runs_through_answer_and_cuts_only_visual_tokens(vlm, name):
    check_method_through_answer(vlm, build(name, **PARAMS.get(name, {})), make_image(2), "how many shapes are there?")


def test_calibration_and_vtw_search_on_prepared_inputs(vlm, tmp_path):
    samples = [vlm.prepare(make_image(s), "what colour is it?") for s in range(3)]
    cal = calibrate_dtp(vlm, samples, cache_key="vlm", cache_dir=tmp_path, progress=False)
    assert len(cal.std_curve) == vlm.lm.config.n_layer and cal.n_samples == 3
    k, tried = search_vtw_layer(vlm, samples, eta=float("inf"), start=1, progress=False)
    assert k == 1 and set(tried) == {1}


def test_kept_tokens_map_back_to_patches(vlm):
    prepared = vlm.prepare(make_image(3), "where is the square?")
    rec = KeptTokenRecorder(build("fastv", keep_ratio=0.25, layer=1))
    vlm.prefill(prepared, pruner=rec)
    kept = rec.visual_positions_at(1)[0]
    rows, cols = prepared.grid
    assert len(kept) == round(0.25 * rows * cols)
    assert all(0 <= int(p) < rows * cols for p in kept)        # visual positions are patch indices
