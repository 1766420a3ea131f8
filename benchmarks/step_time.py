"""One training step (forward + backward + AdamW) of every adapter method against the frozen-model floor.

Issue 3's benchmark. In one process and one run it times, per configuration:

- ``floor``: the model with every weight frozen and one trainable scalar multiplying the input
  embeddings, so the backward still runs through every layer's activations (the cost no adapter can beat);
- ``peft_lora``: PEFT's LoRA (``peft.get_peft_model``) with the same r, alpha and targets as ours;
- ours: ``lora``, ``mtlora_{shim,icfm,ctcm,dtsm}``, ``loretta_rep`` on the q,v and all-linear targets,
  and ``loretta_adp`` on its own default placement (gate/up/down bottleneck adapters).

Each configuration gets a freshly built, seeded, random-weight Llama; the previous one is freed first.
Step time is the median of the timed steps after warm-up (CUDA: synchronize + CUDA events per step).

    python benchmarks/step_time.py --device cuda --shape 7b --json runs/step_time_7b.json
    python benchmarks/step_time.py --device cuda --shape 7b --compile --no-eager --methods floor,lora
    # a shared CPU: one thread, timed by this process's CPU time, three alternating rounds
    python benchmarks/step_time.py --device cpu --shape small --threads 1 --clock cpu --rounds 3

Peak memory: CUDA reports ``torch.cuda.max_memory_allocated`` over the timed steps (weights, optimizer
state, gradients and activations included). CPU reports the peak resident set size (Linux VmHWM, reset
through /proc/self/clear_refs) during the timed steps minus the RSS of the built model before warm-up:
activations, gradients, optimizer state and allocator slack, not the frozen weights.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

# --------------------------------------------------------------------------------------------------
# What is compared
# --------------------------------------------------------------------------------------------------

ALL_LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_SETS: dict[str, list[str]] = {"qv": ["q_proj", "v_proj"], "all": ALL_LINEAR_TARGETS}

FLOOR = "floor"
PEFT_LORA = "peft_lora"
LORETTA_ADP = "loretta_adp"
MTLORA_STRUCTURES = ("shim", "icfm", "ctcm", "dtsm")
# torch.optim.AdamW implementations (--adamw): "default" is what the Trainer's adamw_torch gets (foreach on
# CUDA); "fused" does the whole update in few launches with little host work per tensor.
ADAMW_IMPLEMENTATIONS: dict[str, dict[str, bool]] = {"default": {}, "fused": {"fused": True}}
# Methods that take target_modules (compared on every target set); the floor and LoRETTA_adp run once.
LOW_RANK_METHODS = (PEFT_LORA, "lora", *(f"mtlora_{s}" for s in MTLORA_STRUCTURES), "loretta_rep")
ALL_METHODS = (FLOOR, *LOW_RANK_METHODS, LORETTA_ADP)
METHOD_LABELS = {
    FLOOR: "frozen floor",
    PEFT_LORA: "PEFT LoRA",
    "lora": "LoRA",
    **{f"mtlora_{s}": f"MTLoRA {s}" for s in MTLORA_STRUCTURES},
    "loretta_rep": "LoRETTA_rep",
    LORETTA_ADP: "LoRETTA_adp",
}
# Targets column for methods that do not take the --targets sets.
NO_TARGETS = "-"
ADP_DEFAULT_TARGETS = "default"


@dataclass(frozen=True)
class Shape:
    """A random-weight Llama and the batch it is trained on."""

    llama_overrides: dict[str, int]  # LlamaConfig fields; empty = LlamaConfig() defaults (the 7B shape)
    batch_size: int
    seq_len: int
    description: str


SHAPES: dict[str, Shape] = {
    # For the smoke test: a step takes milliseconds.
    "micro": Shape(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=256, max_position_embeddings=64),
                   batch_size=2, seq_len=16, description="micro Llama (hidden 64, 2 layers)"),
    # CPU: every configuration in a few minutes on 2 cores. The vocabulary is cut to 8192 so that the
    # LM head does not dominate the step (at the real sizes it is a small part of it).
    "small": Shape(dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=8, vocab_size=8192, max_position_embeddings=512),
                   batch_size=2, seq_len=128, description="small Llama (hidden 512, 4 layers, vocab 8192)"),
    # The 1B class: TinyLlama-1.1B's shape (GQA with 4 KV heads).
    "1b": Shape(dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
                batch_size=4, seq_len=1024, description="TinyLlama-1.1B shape (hidden 2048, 22 layers)"),
    # The reference shape: LlamaConfig() defaults are Llama-2-7B.
    "7b": Shape({}, batch_size=4, seq_len=1024, description="Llama-2-7B shape (LlamaConfig() defaults)"),
}


@dataclass(frozen=True)
class BenchSettings:
    device: torch.device
    dtype: torch.dtype
    shape_name: str
    batch_size: int
    seq_len: int
    rank: int
    lora_alpha: float
    tensor_rank: int
    bottleneck_size: int
    warmup_steps: int
    timed_steps: int
    learning_rate: float
    seed: int
    cpu_clock: str = "wall"  # CPU device: "wall" (perf_counter) or "cpu" (process CPU time)
    profile_dir: Path | None = None  # --profile: profile two extra steps per configuration (first round only)
    throwaway_run: bool = True  # one untimed configuration per mode first (--no-throwaway skips it)
    adamw: str = "default"  # --adamw: torch's default implementation (foreach on CUDA), or fused


@dataclass(frozen=True)
class Configuration:
    method: str
    targets: str  # a TARGET_SETS key, NO_TARGETS or ADP_DEFAULT_TARGETS
    compiled: bool


@dataclass
class Measurement:
    configuration: Configuration
    step_times_ms: list[float] = field(default_factory=list)  # every timed step, all rounds
    round_medians_ms: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0
    saved_activation_bytes: int = 0  # exact: distinct non-parameter storages saved for the backward
    trainable_params: int = 0
    total_params: int = 0
    trainable_dtypes: list[str] = field(default_factory=list)  # fp32 adapters on a bf16 model cost up-casts
    graph_breaks: int | None = None  # compiled runs only
    graph_break_reasons: dict[str, int] = field(default_factory=dict)
    profile: dict[str, Any] | None = None  # --profile: kernels per step, device-busy time, top kernels
    error: str | None = None


# --------------------------------------------------------------------------------------------------
# Building the models
# --------------------------------------------------------------------------------------------------


class InputGain(nn.Module):
    """The frozen embedding times one trainable scalar. The scalar's gradient needs the gradient of every
    layer's input, so the backward traverses all activations while no weight gets a gradient."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding
        self.gain = nn.Parameter(torch.ones((), dtype=embedding.weight.dtype, device=embedding.weight.device))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids) * self.gain


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_llama(shape: Shape, settings: BenchSettings) -> nn.Module:
    """A seeded random-weight LlamaForCausalLM created directly on the device in the benchmark dtype
    (initialising 7B parameters on the host and copying them over would take minutes per configuration)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape.llama_overrides)
    config._attn_implementation = "sdpa"  # the same kernel for every configuration
    config.use_cache = False  # training: no KV cache
    torch.manual_seed(settings.seed)
    with default_dtype(settings.dtype), torch.device(settings.device):
        model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    return model.train()


def adapter_config(method: str, targets: str, settings: BenchSettings) -> Any:
    """The structlora config for one of our methods (r, alpha, tensor rank shared with PEFT's LoRA)."""
    import structlora

    if method == LORETTA_ADP:
        return structlora.LorettaAdpConfig(bottleneck_size=settings.bottleneck_size,
                                           tensor_rank=settings.tensor_rank)
    target_modules = list(TARGET_SETS[targets])
    if method == "lora":
        return structlora.LoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha,
                                     target_modules=target_modules)
    if method.startswith("mtlora_"):
        return structlora.MTLoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha,
                                       target_modules=target_modules, structure=method.removeprefix("mtlora_"))
    if method == "loretta_rep":
        return structlora.LorettaRepConfig(r=settings.rank, lora_alpha=settings.lora_alpha,
                                           tensor_rank=settings.tensor_rank, target_modules=target_modules)
    raise ValueError(f"not one of structlora's methods: {method!r}")


def build_model(method: str, targets: str, shape: Shape, settings: BenchSettings) -> nn.Module:
    """The model one configuration trains; its trainable parameters are exactly what AdamW updates."""
    base = build_llama(shape, settings)
    torch.manual_seed(settings.seed + 1)  # adapter initialisation, independent of the base's draws
    if method == FLOOR:
        base.set_input_embeddings(InputGain(base.get_input_embeddings()))
        return base
    if method == PEFT_LORA:
        import peft

        # PEFT defaults otherwise (its adapters are kept in fp32 on a bf16 model: what its users get).
        return peft.get_peft_model(base, peft.LoraConfig(
            r=settings.rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
            target_modules=list(TARGET_SETS[targets]), task_type="CAUSAL_LM"))
    import structlora

    return structlora.get_peft_model(base, adapter_config(method, targets, settings))


def configurations(methods: Sequence[str], target_sets: Sequence[str], compile_modes: Sequence[bool]
                   ) -> list[Configuration]:
    result = []
    for compiled in compile_modes:
        result.append(Configuration(FLOOR, NO_TARGETS, compiled))  # always: the overheads are relative to it
        for targets in target_sets:
            result += [Configuration(m, targets, compiled) for m in LOW_RANK_METHODS if m in methods]
        if LORETTA_ADP in methods:
            result.append(Configuration(LORETTA_ADP, ADP_DEFAULT_TARGETS, compiled))
    return result


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


class HostPeakRss:
    """Peak resident memory of this process on Linux: VmHWM, whose high-water mark clear_refs resets."""

    @staticmethod
    def _status_kib(field_name: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"{field_name} missing from /proc/self/status")

    @classmethod
    def current_bytes(cls) -> int:
        return cls._status_kib("VmRSS") * 1024

    @classmethod
    def peak_bytes(cls) -> int:
        return cls._status_kib("VmHWM") * 1024

    @staticmethod
    def reset_peak() -> None:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # "5": reset the peak RSS to the current RSS (Linux >= 4.0)


def release_memory(device: torch.device) -> None:
    """Free the previous configuration before building the next one, so peaks do not overlap."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so RSS deltas are honest


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(shape: Shape, settings: BenchSettings, vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(0, vocab_size, (settings.batch_size, settings.seq_len), generator=generator)
    return ids.to(settings.device)


def training_step(forward: Callable[..., Any], optimizer: torch.optim.Optimizer, input_ids: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = forward(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    optimizer.step()


def time_steps(step: Callable[[], None], settings: BenchSettings) -> list[float]:
    """Milliseconds per step. CUDA: events around each step, with the queue drained before it, so a
    step's time includes its own launch overhead and nothing of its neighbours'."""
    times_ms = []
    if settings.device.type == "cuda":
        for _ in range(settings.timed_steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(settings.device)
            start.record()
            step()
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
    else:
        # "cpu": CPU seconds of this process (all its threads), which time slices lost to other processes
        # on a shared machine do not inflate; equal to the wall time on an idle machine with one thread.
        clock = time.process_time if settings.cpu_clock == "cpu" else time.perf_counter
        for _ in range(settings.timed_steps):
            begin = clock()
            step()
            times_ms.append((clock() - begin) * 1e3)
    return times_ms


def profile_steps(step: Callable[[], None], settings: BenchSettings, steps: int, table_path: Path | None
                  ) -> dict[str, Any]:
    """Profile `steps` more steps: device kernels per step, the time the device was busy with them (their
    summed durations), and the kernels that took longest. A step time well above its busy time is time the
    device waited for the host (launch-bound); busy time above the floor's is extra device work."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_cuda = settings.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    synchronize(settings.device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(settings.device)
    kernels: dict[str, list[float]] = {}  # name -> [count, total us]
    for event in prof.events():
        # Device-side ranges of user annotations (Optimizer.step#AdamW.step) overlap the kernels they hold and
        # the device's idle gaps between them: they are not device work.
        if on_cuda and event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False):
            entry = kernels.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.time_range.elapsed_us()
    if table_path is not None:
        table_path.parent.mkdir(parents=True, exist_ok=True)
        sort_by = "self_device_time_total" if on_cuda else "self_cpu_time_total"
        table_path.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=90))
    top = sorted(kernels.items(), key=lambda item: -item[1][1])[:15]
    return {
        "profiled_steps": steps,
        "kernels_per_step": sum(count for count, _ in kernels.values()) / steps if on_cuda else None,
        "device_busy_ms_per_step": sum(us for _, us in kernels.values()) / steps / 1e3 if on_cuda else None,
        "top_kernels": [{"name": name[:160], "calls_per_step": count / steps, "ms_per_step": us / steps / 1e3}
                        for name, (count, us) in top],
    }


def graph_breaks_since_reset() -> dict[str, int]:
    """Graph-break reasons (first line) and counts recorded by dynamo since the counters were cleared."""
    from torch._dynamo.utils import counters

    reasons: dict[str, int] = {}
    for reason, count in counters["graph_break"].items():
        first_line = str(reason).strip().splitlines()[0][:200]
        reasons[first_line] = reasons.get(first_line, 0) + count
    return reasons


@contextlib.contextmanager
def recording_saved_storages(model: nn.Module) -> Iterator[dict[int, int]]:
    """Inside the block, the distinct non-parameter storages saved for the backward: {storage id: bytes}.

    Storages are told apart by identity, so a tensor saved by several ops (q, k and v all saving the same
    normalised input) or through different views counts once, as it does in memory. Unlike a peak, this does
    not depend on the allocator, the device or the machine's load.
    """
    parameter_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameter_storages:
            saved.setdefault(storage._cdata, storage.nbytes())
        # Detached (same storage, no grad_fn): returning the tensor itself makes a saved *output* hold its own
        # grad_fn through C++ references that Python's collector cannot see, so a graph that is never
        # back-propagated (saved_activation_bytes) leaked with every weight it referenced: 29 GiB per
        # configuration at the 7B shape, which ran the first CUDA run out of memory.
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved


def saved_activation_bytes(model: nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages that one forward with the loss saves for backward."""
    with recording_saved_storages(model) as saved:
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    del loss  # the graph goes with it
    return sum(saved.values())


def measure_once(configuration: Configuration, shape: Shape, settings: BenchSettings, measurement: Measurement
                 ) -> None:
    """Build, warm up and time one configuration, adding to `measurement` (the next call frees it)."""
    device = settings.device
    release_memory(device)
    if configuration.compiled:
        torch._dynamo.reset()  # fresh caches: every configuration compiles its own model from scratch
        from torch._dynamo.utils import counters
        counters.clear()
    model = build_model(configuration.method, configuration.targets, shape, settings)
    trainable = [p for p in model.parameters() if p.requires_grad]
    measurement.trainable_params = sum(p.numel() for p in trainable)
    measurement.total_params = sum(p.numel() for p in model.parameters())
    measurement.trainable_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trainable})
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, **ADAMW_IMPLEMENTATIONS[settings.adamw])
    forward = torch.compile(model) if configuration.compiled else model
    input_ids = make_batch(shape, settings, model.config.vocab_size)
    if not measurement.saved_activation_bytes:
        measurement.saved_activation_bytes = saved_activation_bytes(model, input_ids)

    def step() -> None:
        training_step(forward, optimizer, input_ids)

    host_rss_before_warmup = HostPeakRss.current_bytes() if device.type == "cpu" else 0
    for _ in range(settings.warmup_steps):  # compilation, allocator and optimizer-state warm-up
        step()
    synchronize(device)
    # The peak is taken over the timed steps only, so a compilation's transient memory stays out of it.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        HostPeakRss.reset_peak()
    times_ms = time_steps(step, settings)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = HostPeakRss.peak_bytes() - host_rss_before_warmup
    measurement.peak_memory_bytes = max(measurement.peak_memory_bytes, peak)
    measurement.step_times_ms += times_ms
    measurement.round_medians_ms.append(statistics.median(times_ms))
    if settings.profile_dir is not None and measurement.profile is None:
        mode = "compiled" if configuration.compiled else "eager"
        targets = "none" if configuration.targets == NO_TARGETS else configuration.targets
        table = settings.profile_dir / f"{mode}_{configuration.method}_{targets}.txt"
        try:
            measurement.profile = profile_steps(step, settings, steps=2, table_path=table)
        except Exception as error:  # noqa: BLE001 - a profiler failure must not cost the timing
            measurement.profile = {"error": f"{type(error).__name__}: {error}"[:300]}
    if configuration.compiled:
        measurement.graph_break_reasons = graph_breaks_since_reset()
        measurement.graph_breaks = sum(measurement.graph_break_reasons.values())
    del step, forward, optimizer, trainable, model, input_ids  # the next configuration's release frees them


def run_benchmark(settings: BenchSettings, plan: list[Configuration], rounds: int,
                  log: Callable[[str], None]) -> list[Measurement]:
    shape = SHAPES[settings.shape_name]
    measurements = {c: Measurement(c) for c in plan}
    import structlora  # noqa: F401 - imported before the freeze below, like peft
    with contextlib.suppress(ImportError):
        import peft  # noqa: F401
    # Park everything the imports created in the permanent generation: the full collection between
    # configurations then only walks the models (0.2 s less per configuration).
    gc.collect()
    gc.freeze()
    try:
        run_rounds(settings, shape, plan, measurements, rounds, log)
    finally:
        release_memory(settings.device)
        gc.unfreeze()
    return [measurements[c] for c in plan]


def run_rounds(settings: BenchSettings, shape: Shape, plan: list[Configuration],
               measurements: dict[Configuration, Measurement], rounds: int,
               log: Callable[[str], None]) -> None:
    # One throwaway run per mode first: the process's one-time costs (lazy library loading, thread pools,
    # allocator growth, the compiler's own modules and caches) would otherwise land on whichever
    # configuration happens to run first.
    first_of_each_mode = {c.compiled: c for c in reversed(plan)}.values() if settings.throwaway_run else ()
    for configuration in first_of_each_mode:
        with contextlib.suppress(Exception):
            measure_once(configuration, shape, settings, Measurement(configuration))
    for round_index in range(rounds):
        # Alternate the order between rounds so slow drift (thermal, a neighbour's load) does not always
        # hit the same configurations.
        order = plan if round_index % 2 == 0 else list(reversed(plan))
        for configuration in order:
            measurement = measurements[configuration]
            if measurement.error is not None:
                continue
            label = describe(configuration)
            try:
                measure_once(configuration, shape, settings, measurement)
            except Exception as error:  # noqa: BLE001 - one failing configuration (OOM, compile) must not end the run
                measurement.error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                log(f"[round {round_index + 1}/{rounds}] {label}: FAILED {measurement.error}")
            if measurement.error is not None:
                # Outside the except block: its traceback, which holds the failed model, is gone by now.
                release_memory(settings.device)
                continue
            log(f"[round {round_index + 1}/{rounds}] {label}: {measurement.round_medians_ms[-1]:.1f} ms/step")


def describe(configuration: Configuration) -> str:
    mode = "compiled" if configuration.compiled else "eager"
    return f"{mode:8s} {METHOD_LABELS[configuration.method]:12s} {configuration.targets}"


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def result_rows(measurements: list[Measurement], settings: BenchSettings) -> list[dict[str, Any]]:
    tokens_per_step = settings.batch_size * settings.seq_len
    floors = {m.configuration.compiled: m for m in measurements
              if m.configuration.method == FLOOR and m.error is None and m.step_times_ms}
    rows = []
    for m in measurements:
        c = m.configuration
        row: dict[str, Any] = {
            "method": c.method, "label": METHOD_LABELS[c.method], "targets": c.targets,
            "target_modules": TARGET_SETS.get(c.targets), "compiled": c.compiled,
            "trainable_params": m.trainable_params, "total_params": m.total_params,
            "trainable_dtypes": m.trainable_dtypes,
        }
        if m.error is not None or not m.step_times_ms:
            row["error"] = m.error or "no timed steps"
            rows.append(row)
            continue
        step_ms = statistics.median(m.step_times_ms)
        quartiles = statistics.quantiles(m.step_times_ms, n=4) if len(m.step_times_ms) > 1 else [step_ms] * 3
        row.update({
            "step_ms": step_ms, "step_ms_min": min(m.step_times_ms),
            "step_ms_p25": quartiles[0], "step_ms_p75": quartiles[2],
            "round_median_step_ms": m.round_medians_ms, "step_times_ms": m.step_times_ms,
            "tokens_per_s": tokens_per_step / (step_ms / 1e3),
            "peak_memory_bytes": m.peak_memory_bytes, "saved_activation_bytes": m.saved_activation_bytes,
            "graph_breaks": m.graph_breaks, "graph_break_reasons": m.graph_break_reasons,
            "profile": m.profile,
        })
        floor = floors.get(c.compiled)
        if floor is not None:
            floor_ms = statistics.median(floor.step_times_ms)
            row["overhead_over_floor_pct"] = 100.0 * (step_ms / floor_ms - 1.0)
            row["extra_memory_over_floor_bytes"] = m.peak_memory_bytes - floor.peak_memory_bytes
            row["extra_saved_over_floor_bytes"] = m.saved_activation_bytes - floor.saved_activation_bytes
        rows.append(row)
    return rows


def _find(rows: list[dict[str, Any]], method: str, targets: str, compiled: bool) -> dict[str, Any] | None:
    for row in rows:
        if (row["method"], row["targets"], row["compiled"]) == (method, targets, compiled) and "step_ms" in row:
            return row
    return None


def evaluate_targets(rows: list[dict[str, Any]], device: torch.device, shape_name: str) -> list[dict[str, Any]]:
    """The issue's targets that this run can speak to, each with the measured value and met / not met."""
    checks: list[dict[str, Any]] = []
    for compiled in (False, True):
        mode = "compiled" if compiled else "eager"
        if device.type == "cpu":
            for targets in TARGET_SETS:
                ours, peft_row = _find(rows, "lora", targets, compiled), _find(rows, PEFT_LORA, targets, compiled)
                if ours and peft_row:
                    checks.append({
                        "target": f"CPU {shape_name}, {mode}, {targets}: our LoRA step <= PEFT LoRA step",
                        "measured": f"{ours['step_ms']:.1f} ms vs {peft_row['step_ms']:.1f} ms "
                                    f"({100 * (ours['step_ms'] / peft_row['step_ms'] - 1):+.1f}%)",
                        "met": ours["step_ms"] <= peft_row["step_ms"]})
            continue
        # GPU targets (defined by the issue on the 7B shape, batch 4 x 1024, r 8).
        limits = {"qv": 5.0, "all": 20.0}
        for row in rows:
            if (row["compiled"] != compiled or "overhead_over_floor_pct" not in row
                    or row["method"] in (FLOOR, PEFT_LORA)):
                continue
            limit = 15.0 if row["method"] == LORETTA_ADP else limits[row["targets"]]
            checks.append({
                "target": f"CUDA {shape_name}, {mode}: {row['label']} ({row['targets']}) <= +{limit:.0f}% over floor",
                "measured": f"{row['overhead_over_floor_pct']:+.1f}%",
                "met": row["overhead_over_floor_pct"] <= limit})
            peft_row = _find(rows, PEFT_LORA, row["targets"], compiled)
            if peft_row and "extra_memory_over_floor_bytes" in peft_row:
                ours_extra, peft_extra = row["extra_memory_over_floor_bytes"], peft_row["extra_memory_over_floor_bytes"]
                checks.append({
                    "target": f"CUDA {shape_name}, {mode}: {row['label']} ({row['targets']}) extra peak memory "
                              f"<= half of PEFT's",
                    "measured": f"{ours_extra / 2**30:.2f} GiB vs PEFT {peft_extra / 2**30:.2f} GiB",
                    "met": ours_extra <= 0.5 * peft_extra})
    return checks


def environment(settings: BenchSettings) -> dict[str, Any]:
    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    if settings.device.type == "cuda":
        device_name = torch.cuda.get_device_name(settings.device)
    else:
        device_name = cpu_model_name()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name, "cpu_cores": os.cpu_count(), "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft_version,
        "structlora_core_digest": structlora_core_digest(),
        "command": " ".join(["python", *sys.argv]) if sys.argv else None,
    }


def structlora_core_digest() -> str:
    """A short hash of structlora's adapter code (its top-level modules; subpackages are recipes, and the
    demo and CLI do not run here): which engine version produced these numbers."""
    import hashlib

    import structlora

    package = Path(structlora.__file__).parent
    digest = hashlib.sha256()
    for source in sorted(package.glob("*.py")):
        if source.name in ("demo.py", "cli.py"):
            continue
        digest.update(str(source.relative_to(package)).encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def cpu_model_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def format_memory(num_bytes: int, device: torch.device) -> str:
    # CPU numbers are deltas of a few hundred MiB; CUDA numbers are absolute peaks of tens of GiB.
    return f"{num_bytes / 2**20:.1f} MiB" if device.type == "cpu" else f"{num_bytes / 2**30:.2f} GiB"


def markdown_report(rows: list[dict[str, Any]], meta: dict[str, Any], checks: list[dict[str, Any]],
                    device: torch.device) -> str:
    memory_header = ("peak RSS over built model" if device.type == "cpu" else "peak memory (allocated)")
    lines = [
        f"Device: {meta['device']} ({meta['cpu_cores']} cores, torch threads {meta['cpu_threads']}) · "
        f"{meta['date_utc']} · torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}, "
        f"structlora core {meta['structlora_core_digest']}",
        f"Model: {meta['shape_description']}, {meta['dtype']}, batch {meta['batch_size']} x {meta['seq_len']} "
        f"tokens, r={meta['rank']}, alpha={meta['lora_alpha']}, TT rank {meta['tensor_rank']}, "
        f"bottleneck {meta['bottleneck_size']}; AdamW; {meta['step_clock']}, median of "
        f"{meta['timed_steps']} timed steps x {meta['rounds']} round(s) after {meta['warmup_steps']} warm-up",
        "",
        f"| mode | method | targets | trainable params | step ms (median) | min | tokens/s | {memory_header} "
        f"| extra memory over floor | saved for backward | extra saved over floor | over the floor |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        mode = "compiled" if row["compiled"] else "eager"
        if "error" in row:
            lines.append(f"| {mode} | {row['label']} | {row['targets']} | {row['trainable_params']:,} | "
                         f"failed: {row['error'][:80]} | | | | | | | |")
            continue
        extra, extra_saved = row.get("extra_memory_over_floor_bytes"), row.get("extra_saved_over_floor_bytes")
        overhead = row.get("overhead_over_floor_pct")
        is_floor = row["method"] == FLOOR
        lines.append(
            f"| {mode} | {row['label']} | {row['targets']} | {row['trainable_params']:,} | "
            f"{row['step_ms']:.1f} | {row['step_ms_min']:.1f} | {row['tokens_per_s']:,.0f} | "
            f"{format_memory(row['peak_memory_bytes'], device)} | "
            f"{'—' if is_floor or extra is None else format_memory(extra, device)} | "
            f"{format_memory(row['saved_activation_bytes'], device)} | "
            f"{'—' if is_floor or extra_saved is None else format_memory(extra_saved, device)} | "
            f"{'—' if is_floor or overhead is None else f'{overhead:+.1f}%'} |")
    compiled_rows = [row for row in rows if row["compiled"] and row.get("graph_breaks") is not None]
    if compiled_rows:
        with_breaks = [f"{row['label']} {row['targets']}: {row['graph_breaks']}" for row in compiled_rows
                       if row["graph_breaks"]]
        summary = "; ".join(with_breaks) or f"none in any of the {len(compiled_rows)} compiled configurations"
        lines += ["", f"torch.compile graph breaks: {summary}"]
    lines += profile_table(rows)
    if checks:
        lines += ["", "| issue target | measured | met |", "|---|---|---|"]
        lines += [f"| {c['target']} | {c['measured']} | {'yes' if c['met'] else 'NO'} |" for c in checks]
    return "\n".join(lines) + "\n"


def profile_table(rows: list[dict[str, Any]]) -> list[str]:
    """Where the time over the floor goes (--profile on CUDA): more device work, or the device waiting."""
    profiled = [row for row in rows if (row.get("profile") or {}).get("kernels_per_step") is not None]
    failed = [f"{row['label']} {row['targets']}: {row['profile']['error']}" for row in rows
              if "error" in (row.get("profile") or {})]
    if failed:
        return ["", "Profiler failed: " + "; ".join(failed)]
    if not profiled:
        return []
    floors = {row["compiled"]: row for row in profiled if row["method"] == FLOOR}
    lines = ["", "| mode | method | targets | kernels / step | device busy ms / step | step − busy ms "
             "| extra kernels over floor | extra busy ms over floor | extra step ms over floor | top kernel |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in profiled:
        profile, floor = row["profile"], floors.get(row["compiled"])
        busy, kernels = profile["device_busy_ms_per_step"], profile["kernels_per_step"]
        extra = ["—", "—", "—"]
        if floor is not None and row is not floor:
            floor_profile = floor["profile"]
            extra = [f"{kernels - floor_profile['kernels_per_step']:+,.0f}",
                     f"{busy - floor_profile['device_busy_ms_per_step']:+.1f}",
                     f"{row['step_ms'] - floor['step_ms']:+.1f}"]
        top = profile["top_kernels"][0] if profile["top_kernels"] else None
        top_text = f"{top['name'][:48]} ({top['ms_per_step']:.1f} ms)" if top else "—"
        lines.append(f"| {'compiled' if row['compiled'] else 'eager'} | {row['label']} | {row['targets']} | "
                     f"{kernels:,.0f} | {busy:.1f} | {row['step_ms'] - busy:.1f} | {' | '.join(extra)} | {top_text} |")
    return lines


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=tuple(SHAPES), default=None,
                        help="model shape (default: small on CPU, 7b on CUDA)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the shape's (CUDA shapes: 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the shape's (CUDA shapes: 1024)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every configuration this many times (order alternating); the step time "
                             "is the median over all rounds' timed steps - useful on a shared machine")
    parser.add_argument("--methods", default=",".join(ALL_METHODS),
                        help=f"comma-separated subset of {','.join(ALL_METHODS)} (the floor always runs)")
    parser.add_argument("--targets", default="qv,all", help="comma-separated subset of qv,all")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--tensor-rank", type=int, default=5)
    parser.add_argument("--bottleneck-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="CPU device: time steps by wall clock, or by this process's CPU time (robust on a "
                             "shared machine; use with --threads 1 so CPU time equals the step's critical path)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: torch intra-op threads (default: torch's choice, one per core)")
    parser.add_argument("--compile", action="store_true", help="also run every configuration under torch.compile")
    parser.add_argument("--no-eager", action="store_true",
                        help="with --compile: only the compiled runs (to split a long run in two)")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the markdown table here too")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="after timing, profile two more steps per configuration (first round only): kernels "
                             "per step and device-busy time in the report, each profiler table written to DIR")
    parser.add_argument("--adamw", choices=tuple(ADAMW_IMPLEMENTATIONS), default="default",
                        help="AdamW implementation: torch's default (foreach on CUDA) or fused")
    parser.add_argument("--no-throwaway", action="store_true",
                        help="skip the untimed first configuration of each mode (the warm-up steps still run; saves "
                             "a compilation per mode when device time is short)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)

    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [m for m in args.methods if m not in ALL_METHODS] + [t for t in args.targets if t not in TARGET_SETS]
    if unknown:
        parser.error(f"unknown method or target set: {', '.join(unknown)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.no_eager and not args.compile:
        parser.error("--no-eager needs --compile")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the markdown table; return (and optionally write) the JSON report."""
    args = parse_args(argv)
    device = torch.device(args.device)
    shape_name = args.shape or ("small" if device.type == "cpu" else "7b")
    dtype_name = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    shape = SHAPES[shape_name]
    settings = BenchSettings(
        device=device, dtype=getattr(torch, dtype_name), shape_name=shape_name,
        batch_size=args.batch_size or shape.batch_size, seq_len=args.seq_len or shape.seq_len,
        rank=args.rank, lora_alpha=args.lora_alpha, tensor_rank=args.tensor_rank,
        bottleneck_size=args.bottleneck_size, warmup_steps=args.warmup, timed_steps=args.steps,
        learning_rate=args.lr, seed=args.seed, cpu_clock=args.clock, profile_dir=args.profile,
        throwaway_run=not args.no_throwaway, adamw=args.adamw)
    compile_modes = ([] if args.no_eager else [False]) + ([True] if args.compile else [])
    plan = configurations(args.methods, args.targets, compile_modes)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    previous_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run_and_report(args, settings, plan, shape, log)
    finally:
        torch.set_num_threads(previous_threads)  # main() is also called from tests: leave the process as found


def run_and_report(args: argparse.Namespace, settings: BenchSettings, plan: list[Configuration], shape: Shape,
         log: Callable[[str], None]) -> dict[str, Any]:
    device, shape_name, dtype_name = settings.device, settings.shape_name, str(settings.dtype).removeprefix("torch.")
    meta = environment(settings)
    argv = args.argv
    if argv is not None:
        meta["command"] = " ".join(["python benchmarks/step_time.py", *argv])
    meta.update({
        "shape": shape_name, "shape_description": shape.description, "dtype": dtype_name,
        "batch_size": settings.batch_size, "seq_len": settings.seq_len, "rank": settings.rank,
        "lora_alpha": settings.lora_alpha, "tensor_rank": settings.tensor_rank,
        "bottleneck_size": settings.bottleneck_size, "warmup_steps": settings.warmup_steps,
        "timed_steps": settings.timed_steps, "rounds": args.rounds, "seed": settings.seed, "adamw": settings.adamw,
        "step_clock": ("CUDA events" if device.type == "cuda" else
                       "process CPU time" if settings.cpu_clock == "cpu" else "wall clock"),
        "memory_measure": ("torch.cuda.max_memory_allocated over the timed steps (absolute: weights included)"
                           if device.type == "cuda" else
                           "peak RSS (VmHWM) over the timed steps minus RSS of the built model before warm-up"),
        "floor": "all weights frozen; one trainable scalar scales the input embeddings (full activation backward)",
    })
    log(f"{len(plan)} configurations x {args.rounds} round(s): {shape.description}, {dtype_name}, "
        f"batch {settings.batch_size} x {settings.seq_len}, on {meta['device']}")
    measurements = run_benchmark(settings, plan, args.rounds, log)
    rows = result_rows(measurements, settings)
    checks = evaluate_targets(rows, device, shape_name)
    report = {"meta": meta, "results": rows, "targets": checks}
    table = markdown_report(rows, meta, checks, device)
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
