"""benchmarks/cuda_check.py on the CPU: the numerical check the GPU runs, at the micro shape."""

from __future__ import annotations

import torch
from benchmark_scripts import load_benchmark


def test_every_method_matches_float64_on_the_cpu() -> None:
    cuda_check = load_benchmark("cuda_check")
    report = cuda_check.run(torch.device("cpu"), [torch.float32, torch.bfloat16], "micro",
                            ["mtlora_ctcm", "loretta_rep", "loretta_adp"], seed=0)
    rows = {(r["method"], r["dtype"]): r for r in report["rows"]}
    assert len(rows) == 6
    assert all(not r["failures"] for r in rows.values()), [r["failures"] for r in rows.values()]
    for method in ("mtlora_ctcm", "loretta_rep", "loretta_adp"):
        fp32 = rows[(method, "float32")]
        assert fp32["logits"] < 1e-5 and fp32["grads"] < 1e-5 and fp32["grads_nonzero"]
        assert fp32["unbanked_grads"] < 1e-5 and fp32["generic_grads"] < 1e-5
        assert rows[(method, "bfloat16")]["logits"] > 1e-4  # the bf16 row really ran in bf16
    assert rows[("mtlora_ctcm", "float32")]["merged"] < 1e-5


def test_a_wrong_engine_fails_the_check(monkeypatch) -> None:
    """The check can fail: a fused node that drops the scaling is caught."""
    from structlora import layers

    cuda_check = load_benchmark("cuda_check")
    original = layers.dense_lowrank
    monkeypatch.setattr(layers, "dense_lowrank",
                        lambda x, w, b, a, bb, scaling: original(x, w, b, a, bb, 0.5 * scaling))
    report = cuda_check.run(torch.device("cpu"), [torch.float32], "micro", ["lora"], seed=0)
    assert report["rows"][0]["failures"]
