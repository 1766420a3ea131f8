"""benchmarks/step_anatomy.py: its meta-device counts equal the counts on real tensors; on the Llama-2-7B
shape it reproduces PEFT's measured H100 memory and shows the issue's memory target; operations are counted
through the backward."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark

pytest.importorskip("peft")


def by_configuration(report: dict) -> dict[tuple[str, str], dict]:
    return {(row["method"], row["targets"]): row for row in report["results"]}


@pytest.fixture(scope="module")
def micro_counts() -> tuple[dict, dict]:
    step_anatomy = load_benchmark("step_anatomy")
    common = ["--shape", "micro", "--dtype", "float32", "--methods", "peft_lora,lora,mtlora_icfm,loretta_rep,loretta_adp"]
    return (by_configuration(step_anatomy.main([*common, "--device", "meta"])),
            by_configuration(step_anatomy.main([*common, "--device", "cpu"])))


def test_meta_counts_equal_the_counts_on_real_tensors(micro_counts: tuple[dict, dict]) -> None:
    on_meta, on_cpu = micro_counts
    assert on_meta.keys() == on_cpu.keys() and len(on_meta) == 1 + 4 * 2 + 1
    for key, row in on_meta.items():
        # Only the attention differs (the CUDA flash op on meta also keeps its 24-byte RNG state per call),
        # and it is the same in every configuration: the extras over the floor are equal to the byte.
        assert row["extra_over_floor_bytes"] == on_cpu[key]["extra_over_floor_bytes"], key
        assert 0 <= row["saved_activation_bytes"] - on_cpu[key]["saved_activation_bytes"] <= 2 * 24, key
        assert row["operations_by_name"]["mm"] == on_cpu[key]["operations_by_name"]["mm"], key


def test_operations_include_the_backward_and_the_banked_trains(micro_counts: tuple[dict, dict], monkeypatch) -> None:
    on_meta, _ = micro_counts
    rep, lora = on_meta[("loretta_rep", "qv")]["operations_by_name"], on_meta[("lora", "qv")]["operations_by_name"]
    # LoRETTA_rep rebuilds A and B from 3-core trains (micro: 64 x 8 = 8*8*8): 2 products forward and 4 backward
    # per train. Banked, the A's of q and v in both layers are one stack and so are the B's: 2 batched chains.
    assert rep["bmm"] == 2 * (2 + 4) and "bmm" not in lora
    # LoRETTA_rep also trains the norms, so the first layer's q, k and v need their input gradient: 3 matmuls
    # that LoRA, with nothing trainable below them, skips; and each of the 5 trained norms (2 per layer and the
    # final one) sums its weight gradient over the tokens as one vector-matrix product. Everything else is LoRA's.
    trained_norms = 2 * 2 + 1
    assert rep["mm"] - lora["mm"] == 3 + trained_norms
    # Without the bank every train rebuilds itself: 8 trains (A, B of q, v in 2 layers) x 6 products.
    import structlora.peft_tuner  # the tuner's forward pre-hook banks the factors

    monkeypatch.setattr(structlora.peft_tuner, "bank", lambda members: 0)
    unbanked = by_configuration(load_benchmark("step_anatomy").main(
        ["--shape", "micro", "--dtype", "float32", "--methods", "loretta_rep", "--targets", "qv"]))
    assert unbanked[("loretta_rep", "qv")]["operations_by_name"]["mm"] - lora["mm"] == 8 * (2 + 4) + 3 + trained_norms
    assert on_meta[("lora", "qv")]["extra_operations"] > 0 and on_meta[("lora", "qv")]["flops"] > 0


def test_7b_shape_reproduces_peft_on_the_h100_and_meets_the_memory_target() -> None:
    step_anatomy = load_benchmark("step_anatomy")
    rows = by_configuration(step_anatomy.main(["--shape", "7b", "--methods", "peft_lora,lora,loretta_rep",
                                               "--targets", "qv"]))
    peft_extra = rows[("peft_lora", "qv")]["extra_over_floor_bytes"] / 2**30
    published = (step_anatomy.PUBLISHED_H100_PEAK_GIB[("peft_lora", "qv")]
                 - step_anatomy.PUBLISHED_H100_PEAK_GIB["floor"])
    assert abs(peft_extra - published) < 0.05 * published  # 3.98 GiB counted vs 4.0 GiB measured
    # Ours keeps the bf16 input once for q and v (32 layers x 32 MiB) where PEFT keeps an fp32 copy per adapter.
    assert rows[("lora", "qv")]["extra_vs_peft"] == pytest.approx(0.25, abs=0.01)
    assert rows[("loretta_rep", "qv")]["extra_vs_peft"] <= 0.5


def test_bank_ab_times_both_ways_and_restores_the_bank() -> None:
    import structlora.peft_tuner

    bank_ab = load_benchmark("bank_ab")
    real_bank = structlora.peft_tuner.bank
    report = bank_ab.main(["--layers", "2", "--hidden", "64", "--rounds", "1", "--steps", "1"])
    assert set(report) == set(bank_ab.CONFIGURATIONS)
    assert all(times["bank_on_ms"] > 0 and times["bank_off_ms"] > 0 for times in report.values())
    assert structlora.peft_tuner.bank is real_bank
