"""The FLOPs convention against hand-computed values, and the `mambaprune bench` command end to end."""
import json

import pytest

from mambaprune import MambaConfig
from mambaprune.cli import main
from mambaprune.flops import layer_macs_per_token, lm_macs


def test_layer_macs_hand_computed():
    # d_model 4, d_inner 8, d_state 2, dt_rank 1, d_conv 3
    cfg = MambaConfig(d_model=4, n_layer=2, vocab_size=10, d_state=2, d_conv=3, dt_rank=1, pad_vocab_size_multiple=1)
    in_proj, conv, x_proj, dt_proj, out_proj = 2 * 4 * 8, 3 * 8, 8 * (1 + 4), 1 * 8, 8 * 4
    scan = 9 * 8 * 2 + 2 * 8
    assert layer_macs_per_token(cfg) == in_proj + conv + x_proj + dt_proj + out_proj + scan == 328
    assert lm_macs(cfg, [5, 3]) == 328 * 8 + 4 * 10
    assert lm_macs(cfg, [5, 3], head_positions=0) == 328 * 8
    with pytest.raises(ValueError):
        lm_macs(cfg, [5])


def test_bench_command_prints_the_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--repeats", "1", "--seq-len", "24", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prefill speed-up" in printed and "scan speed-up" in printed and "Mamba-2 prefill speed-up" in printed
    res = json.loads(out.read_text())
    assert res["max_logit_diff"] < 1e-4 and res["mamba2"]["max_logit_diff"] < 1e-4
    assert res["prefill_s"] > 0 and res["scan_reference_ms"] > 0 and res["settings"]["seq_len"] == 24
    assert res["mamba2"]["prefill_s"] > 0 and res["mamba2"]["transformers_prefill_s"] > 0
    assert main(["bench", "--quick", "--repeats", "1", "--seq-len", "8", "--no-mamba2", "--no-transformers",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["mamba2"] is None and "Mamba-2" not in capsys.readouterr().out
