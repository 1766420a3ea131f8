"""benchmarks/decode_overhead.py on a tiny Llama: what an unmerged adapter adds per decoded token, as counts (no
timing assertions: a shared CPU). The counts pin the lean no-grad path: a few tensor ops per adapted projection,
fewer than PEFT's LoRA layer, and fewer Python calls."""

from __future__ import annotations

import json

import pytest
from benchmark_scripts import load_benchmark

pytest.importorskip("peft")

ADAPTED_PROJECTIONS = 2 * 4  # q and v in each of the 4 layers


def test_decode_overhead_counts(tmp_path) -> None:
    module = load_benchmark("decode_overhead")
    module.main(["--tiny", "--tokens", "2", "--calls", "5", "--blocks", "1",
                 "--variants", "base:-,peft_lora:qv,lora:qv,loretta_rep:qv", "--json", str(tmp_path / "r.json")])
    rows = json.loads((tmp_path / "r.json").read_text())["variants"]
    base, peft, ours, rep = (rows[k] for k in ("base -", "peft_lora qv", "lora qv", "loretta_rep qv"))
    extra_ops = {name: row["aten_ops_per_token"] - base["aten_ops_per_token"]
                 for name, row in (("peft", peft), ("ours", ours), ("rep", rep))}
    # Ours: the low-rank mm + in-place addmm_ (and two transposed views of A and B); no factor is rebuilt per token.
    assert 0 < extra_ops["ours"] <= 4 * ADAPTED_PROJECTIONS
    assert 0 < extra_ops["rep"] <= 4 * ADAPTED_PROJECTIONS
    assert extra_ops["ours"] < extra_ops["peft"]
    assert "bmm" not in rep["aten_ops"]  # no tensor-train contraction while decoding
    assert base["python_calls_per_token"] < ours["python_calls_per_token"] < peft["python_calls_per_token"]
    assert set(ours["module_forward_us"]) == {"1", "8"}  # the one-layer timing at both decode batches
    assert all(ours["module_forward_us"][b]["StructloraLowRankLayer"]["wrapper"] > 0 for b in ("1", "8"))
    assert set(peft["module_forward_us"]["8"]) == {"peft LoRA Linear"}
    same = json.loads((tmp_path / "r.json").read_text())["same_weight_us"]
    assert set(same) == {"1", "8"} and all(r["bare"] > 0 and r["ours"] > 0 and r["peft"] > 0 for r in same.values())
