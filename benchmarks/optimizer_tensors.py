"""How many tensors AdamW walks for LoRETTA_rep, what that costs, and the CPU step against LoRA (issue 30, item 1).

Per version of the library (this checkout's src/, and with --baseline COMMIT that commit's src/, extracted with
`git archive`), in a child process of its own:

- the trainable tensors LoRA and LoRETTA_rep have on Llama-2-7B (LlamaConfig() defaults: 32 layers, hidden
  4096, MLP 11008) for step_time.py's target sets, and the time of `optimizer.step()` of torch's default AdamW
  over them. Only the trainable tensors are built, as real CPU tensors (they are small): every adapted
  projection's parameterization as get_peft_model makes it (`make_parameterization`), and the trained norm
  copies where the config trains norms (2 per layer + the final norm: 65). Gradients are seeded random.
  tests/test_benchmark_optimizer_tensors.py checks that this set equals get_peft_model's on a micro Llama.
- training steps of LoRA and LoRETTA_rep at step_time.py's CPU shape, with step_time.py's models, batch and step
  (this checkout's copy for both versions: only the library differs), the two models' steps alternating one by
  one after 2 warm-up steps each; and the ratio LoRETTA_rep / LoRA of the medians.

Both clocks are this process's CPU time with one torch thread (robust on a shared machine). The versions alternate
round by round, in alternating order; every number is the median over all timed steps of all rounds.

    python benchmarks/optimizer_tensors.py --baseline 37a8557 --rounds 3 --json runs/optimizer_tensors.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
# step_time is imported where it is used: after the library to measure has been put on sys.path.
sys.path.insert(0, str(REPO / "benchmarks"))
METHODS = ("lora", "loretta_rep")
CURRENT = "this checkout"


# ------------------------------------------------------------------------------------------------------------
# The trainable set at a shape, built without the frozen model
# ------------------------------------------------------------------------------------------------------------


def projection_shapes(llama_overrides: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each Llama projection at this shape."""
    from transformers import LlamaConfig

    config = LlamaConfig(**llama_overrides)
    head_dim = config.hidden_size // config.num_attention_heads
    hidden, mlp, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * head_dim
    return {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
            "gate_proj": (hidden, mlp), "up_proj": (hidden, mlp), "down_proj": (mlp, hidden)}


def trainable_set(method: str, targets: str, llama_overrides: dict[str, int], step_time: Any,
                  settings: Any) -> list[torch.nn.Parameter]:
    """The tensors get_peft_model would train on a Llama of this shape (the frozen model itself is not built)."""
    from structlora.parameterizations import make_parameterization
    from transformers import LlamaConfig

    config = step_time.adapter_config(method, targets, settings)
    layers = LlamaConfig(**llama_overrides).num_hidden_layers
    hidden = LlamaConfig(**llama_overrides).hidden_size
    shapes = projection_shapes(llama_overrides)
    parameters: list[torch.nn.Parameter] = []
    for _ in range(layers):
        for target in step_time.TARGET_SETS[targets]:
            parameterization = make_parameterization(*shapes[target], config, [True])
            parameters += [p for p in parameterization.parameters() if p.requires_grad]
    if getattr(config, "train_norms", False):
        parameters += [torch.nn.Parameter(torch.ones(hidden)) for _ in range(2 * layers + 1)]
    return parameters


def time_optimizer_steps(parameters: list[torch.nn.Parameter], warmup: int, steps: int) -> list[float]:
    """CPU milliseconds of each `optimizer.step()` of torch's default AdamW over `parameters` (seeded gradients)."""
    generator = torch.Generator().manual_seed(0)
    for parameter in parameters:
        parameter.grad = torch.randn(parameter.shape, generator=generator) * 1e-3
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    for _ in range(warmup):  # creates the state (exp_avg, exp_avg_sq) outside the timed steps
        optimizer.step()
    times = []
    for _ in range(steps):
        begin = time.process_time()
        optimizer.step()
        times.append((time.process_time() - begin) * 1e3)
    return times


def interleaved_steps(step_time: Any, settings: Any, targets: str, steps: int) -> dict[str, list[float]]:
    """CPU milliseconds of training steps of LoRA and LoRETTA_rep (step_time.py's models, batch and step), the two
    models' steps alternating one by one in one process, so that the machine's drift reaches both alike."""
    shape, runs = step_time.SHAPES[settings.shape_name], {}
    for method in METHODS:
        model = step_time.build_model(method, targets, shape, settings)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate)
        runs[method] = (model, optimizer, step_time.make_batch(shape, settings, model.config.vocab_size))
        for _ in range(settings.warmup_steps):
            step_time.training_step(*runs[method])
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    for index in range(steps):
        for method in (METHODS if index % 2 == 0 else METHODS[::-1]):
            begin = time.process_time()
            step_time.training_step(*runs[method])
            times[method].append((time.process_time() - begin) * 1e3)
    return times


def measure(optimizer_shape: str, step_shape: str, target_sets: Sequence[str], optimizer_steps: int,
            training_steps: int) -> dict[str, Any]:
    """One round for the library on sys.path: per method and target set, tensor count, AdamW and step times."""
    import step_time

    torch.set_num_threads(1)
    settings = step_time.BenchSettings(
        device=torch.device("cpu"), dtype=torch.float32, shape_name=optimizer_shape, batch_size=1, seq_len=1,
        rank=8, lora_alpha=16.0, tensor_rank=5, bottleneck_size=64, warmup_steps=2, timed_steps=1,
        learning_rate=1e-4, seed=0)
    result: dict[str, Any] = {"optimizer": {}, "step": {}}
    overrides = step_time.SHAPES[optimizer_shape].llama_overrides
    for targets in target_sets:
        for method in METHODS:
            torch.manual_seed(1)
            parameters = trainable_set(method, targets, overrides, step_time, settings)
            result["optimizer"][f"{method}/{targets}"] = {
                "tensors": len(parameters), "numel": sum(p.numel() for p in parameters),
                "step_ms": time_optimizer_steps(parameters, warmup=2, steps=optimizer_steps)}
    step_settings = dataclasses.replace(settings, shape_name=step_shape,
                                        batch_size=step_time.SHAPES[step_shape].batch_size,
                                        seq_len=step_time.SHAPES[step_shape].seq_len)
    for targets in target_sets:
        for method, times in interleaved_steps(step_time, step_settings, targets, training_steps).items():
            result["step"][f"{method}/{targets}"] = times
    return result


# ------------------------------------------------------------------------------------------------------------
# The parent: versions side by side
# ------------------------------------------------------------------------------------------------------------


def extract_source(commit: str, into: Path) -> Path:
    """`src/` of `commit` (git archive) under `into`; returns that src directory."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def run_child(source: Path, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, "--child", out.name, "--optimizer-shape", args.optimizer_shape,
                   "--step-shape", args.step_shape, "--targets", ",".join(args.targets),
                   "--optimizer-steps", str(args.optimizer_steps), "--steps", str(args.steps)]
        env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
        subprocess.run(command, env=env, check=True)
        return json.loads(Path(out.name).read_text())


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"optimizer": {}, "step": {}}
    for key, first in rounds[0]["optimizer"].items():
        merged["optimizer"][key] = {"tensors": first["tensors"], "numel": first["numel"],
                                    "step_ms": statistics.median(t for r in rounds for t in r["optimizer"][key]["step_ms"])}
    for key in rounds[0]["step"]:
        merged["step"][key] = statistics.median(t for r in rounds for t in r["step"][key])
    return merged


def report(results: dict[str, dict[str, Any]], target_sets: Sequence[str]) -> tuple[str, list[dict[str, Any]]]:
    """The markdown table and the issue's targets for the newest version (the last in `results`)."""
    lines = ["| code | method | targets | trainable tensors (7B) | parameters (7B) | AdamW step ms (7B set) "
             "| training step ms (CPU shape) | LoRETTA_rep / LoRA step |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for code, merged in results.items():
        for targets in target_sets:
            for method in METHODS:
                key, lora_key = f"{method}/{targets}", f"lora/{targets}"
                optimizer, step = merged["optimizer"][key], merged["step"][key]
                ratio = f"{step / merged['step'][lora_key]:.3f}" if method != "lora" else ""
                lines.append(f"| {code} | {method} | {targets} | {optimizer['tensors']:,} | {optimizer['numel']:,} "
                             f"| {optimizer['step_ms']:.2f} | {step:.1f} | {ratio} |")
    newest = list(results.values())[-1]
    checks = []
    for targets in target_sets:
        rep, lora = newest["optimizer"][f"loretta_rep/{targets}"], newest["optimizer"][f"lora/{targets}"]
        checks.append({"target": f"{targets}: LoRETTA_rep trainable tensors <= LoRA's",
                       "measured": f"{rep['tensors']} vs {lora['tensors']}", "met": rep["tensors"] <= lora["tensors"]})
        ratio = newest["step"][f"loretta_rep/{targets}"] / newest["step"][f"lora/{targets}"]
        checks.append({"target": f"{targets}: LoRETTA_rep CPU step <= 1.05x LoRA's", "measured": f"{ratio:.3f}x",
                       "met": ratio <= 1.05})
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {c['target']} | {c['measured']} | {'yes' if c['met'] else 'NO'} |" for c in checks]
    return "\n".join(lines), checks


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=None, help="a commit to measure too (its src/, via git archive)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--optimizer-shape", default="7b", help="step_time.py shape of the AdamW trainable set")
    parser.add_argument("--step-shape", default="small", help="step_time.py shape of the training step")
    parser.add_argument("--targets", default="qv,all", help="comma-separated subset of qv,all")
    parser.add_argument("--optimizer-steps", type=int, default=20, help="timed AdamW steps per round")
    parser.add_argument("--steps", type=int, default=10,
                        help="timed training steps per method, target set and round (after 2 warm-up)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one round, JSON to this file
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        result = measure(args.optimizer_shape, args.step_shape, args.targets, args.optimizer_steps, args.steps)
        Path(args.child).write_text(json.dumps(result))
        return result
    with tempfile.TemporaryDirectory() as scratch:
        sources = {CURRENT: REPO / "src"}
        if args.baseline:
            sources = {args.baseline: extract_source(args.baseline, Path(scratch)), **sources}
        rounds: dict[str, list[dict[str, Any]]] = {code: [] for code in sources}
        for index in range(args.rounds):
            order = list(sources) if index % 2 == 0 else list(reversed(sources))
            for code in order:
                print(f"[round {index + 1}/{args.rounds}] {code}", file=sys.stderr, flush=True)
                rounds[code].append(run_child(sources[code], args))
    results = {code: merge_rounds(r) for code, r in rounds.items()}
    table, checks = report(results, args.targets)
    print(table)
    output = {"results": results, "targets": checks, "rounds": rounds, "argv": sys.argv[1:] if argv is None else argv}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(output, indent=2))
    return output


if __name__ == "__main__":
    main()
