"""transformers' Trainer (`AdapterTrainer`) with FSDP2 (`fsdp` + `fsdp_config` version 2) and DeepSpeed ZeRO-2/3,
2 gloo processes on CPU: every method's adapter-only checkpoint equals a single-process run's after the same
steps, and resuming from it loads it back into the sharded model. Plus the refusals where accelerate would
silently not shard."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

import sharded_trainer_worker as worker
from structlora import AdapterTrainer, LoraConfig
from structlora.sharded_trainer import deepspeed_as_requested
from structlora.trainer import missing_checkpoint_state
from tiny_models import tiny_llama_for, tiny_word_tokenizer

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)

try:
    import deepspeed  # noqa: F401
except ImportError:  # the `distributed` extra is not installed: FSDP only
    deepspeed = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.distributed
def test_sharded_trainer_checkpoints_equal_the_single_process_run(tmp_path):
    backends = ["fsdp"] + (["zero2", "zero3"] if deepspeed is not None else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(worker.__file__).parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), worker.__file__, str(tmp_path), f"--backends={','.join(backends)}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for method in worker.METHODS:
        worker.reference(method, str(tmp_path / "single" / method))
        single = _adapter(tmp_path / "single" / method / f"checkpoint-{worker.STEPS}")
        fresh = peft.get_peft_model_state_dict(peft.get_peft_model(tiny_llama_for(tiny_word_tokenizer()),
                                                                   worker.METHODS[method]()))
        assert sum(not torch.allclose(single[k], fresh[k], atol=1e-4) for k in single) > len(single) // 2
        for backend in backends:
            run = tmp_path / backend / method
            checkpoint = run / f"checkpoint-{worker.STEPS}"
            sharded = _adapter(checkpoint)
            assert sharded.keys() == single.keys(), (backend, method)
            for key in single:
                torch.testing.assert_close(sharded[key], single[key], rtol=1e-5, atol=1e-5,
                                           msg=f"{backend} {method}: {key}")
            for key, value in _adapter(run / "resumed").items():  # loaded back exactly
                torch.testing.assert_close(value, sharded[key], rtol=0, atol=0, msg=f"{backend} {method}: {key}")
            states = [json.loads((run / f"rank{rank}.json").read_text()) for rank in (0, 1)]
            for state in states:
                assert state["fsdp"] == (backend == "fsdp") and state["deepspeed"] == (backend != "fsdp")
                expected = state["adapter_parameters"] if backend in ("fsdp", "zero3") else 0
                assert state["sharded_adapter_parameters"] == expected, (backend, method, state)
            # Adapter-only checkpoints: no whole-model copy beside the adapter (accelerate's sharded FSDP model state
            # holds the adapter's tensors only; DeepSpeed's module states only the trainable parameters).
            assert not (checkpoint / "pytorch_model_fsdp.bin").exists()
            if backend == "fsdp":
                from torch.distributed.checkpoint import FileSystemReader

                saved = FileSystemReader(str(checkpoint / "pytorch_model_fsdp_0")).read_metadata().state_dict_metadata
                assert saved and all(".adapters." in key for key in saved), (method, list(saved))
            assert missing_checkpoint_state(str(checkpoint)) == []
            if backend != "fsdp":  # (a file this test just wrote: unpickling it is safe)
                for states_file in (checkpoint / f"global_step{worker.STEPS}").glob("*model_states.pt"):
                    module = torch.load(states_file, map_location="cpu", weights_only=False)["module"]
                    assert module and all(".adapters." in key for key in module), (backend, method, list(module))


@pytest.fixture
def restored_environ():
    """accelerate records FSDP / DeepSpeed in os.environ (ACCELERATE_USE_FSDP, ACCELERATE_USE_DEEPSPEED), and
    transformers keeps a DeepSpeed config globally: later Trainers in this process must not inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def _trainer(tmp_path, **sharding) -> AdapterTrainer:
    from transformers import TrainingArguments

    model = peft.get_peft_model(tiny_llama_for(tiny_word_tokenizer()), LoraConfig(r=2))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, **sharding)
    return AdapterTrainer(model=model, args=args, train_dataset=worker.TokenRows(60))


def test_fsdp_on_one_process_is_refused(tmp_path, restored_environ):
    with pytest.raises(ValueError, match="fsdp only works in distributed training"):
        _trainer(tmp_path, fsdp=True, fsdp_config=worker.FSDP_CONFIG)


@pytest.mark.skipif(deepspeed is None, reason="needs deepspeed (the `distributed` extra)")
def test_deepspeed_that_accelerate_runs_as_one_process_of_several_is_refused(tmp_path, monkeypatch,
                                                                            restored_environ):
    trainer = _trainer(tmp_path, deepspeed=worker.deepspeed_config(2))  # one process: fine
    assert trainer.is_deepspeed_enabled and trainer.accelerator.num_processes == 1
    # What accelerate does on CPU processes without use_cpu: DeepSpeed's 2 processes, each seen as the only one.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="DeepSpeed runs 2 processes but accelerate sees 1.*set use_cpu=True"):
        deepspeed_as_requested(trainer)
