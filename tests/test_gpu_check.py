"""The prepared device check runs end to end on tiny dimensions on the CPU (``--dry-run``), as CI runs it."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--json", str(out),
                           "--md", str(tmp_path / "check.md")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    ran = {(r["path"], r["dtype"]) for r in report["scan"] if "unavailable" not in r}
    assert {(p, d) for p in ("chunked", "parallel", "triton") for d in ("float32", "bfloat16")} <= ran
    model = {(r["path"], r["method"]): r for r in report["model"] if "unavailable" not in r}
    for path in ("chunked", "parallel", "triton"):
        none, dtp = model[(path, "none")], model[(path, "dtp")]
        assert none["flops_ratio"] == 1.0 and 0.0 < dtp["flops_ratio"] < 1.0
        assert dtp["flops"] < none["flops"] and none["ms_prefill"] > 0 and dtp["ms_decode_per_token"] > 0
    m2 = report["mamba2"]                                    # part 3: Mamba-2 against transformers, same weights
    assert m2["transformers_path"] == "pytorch" and m2["max_logit_diff"] < 0.05 * m2["max_logit"]
    assert 0.0 < m2["dtp"]["flops_ratio"] < 1.0 and m2["none"]["ms_decode_per_token"] > 0
    assert "| triton | dtp |" in (tmp_path / "check.md").read_text()
