"""FSDP2 (`fully_shard` per decoder layer, 2 gloo ranks under torchrun, CPU): a sharded run saves the same
adapter (trained norms included) as an unsharded run of the same steps on the same data and seed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fsdp_worker
from structlora import get_peft_model
from tiny_models import tiny_llama_for, tiny_word_tokenizer

pytest.importorskip("torch.distributed.fsdp")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed  # over a minute (70 s on the shared 2-core machine): `make test` runs it after the rest
def test_fully_shard_saves_the_unsharded_runs_adapter(tmp_path):
    sharded_dir, single_dir = tmp_path / "sharded", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(fsdp_worker.__file__).parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), fsdp_worker.__file__, str(sharded_dir)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    for method in fsdp_worker.METHODS:
        fsdp_worker.train(method, str(single_dir), sharded=False)
        sharded = load_file(str(sharded_dir / method / "adapter_model.safetensors"))
        single = load_file(str(single_dir / method / "adapter_model.safetensors"))
        assert sharded.keys() == single.keys()
        for key in single:
            torch.testing.assert_close(sharded[key], single[key], rtol=1e-5, atol=1e-5, msg=f"{method}: {key}")
        # The runs trained: the adapter moved away from its initial value (norm copies too, where trained).
        fresh = get_peft_model(tiny_llama_for(tiny_word_tokenizer()), fsdp_worker.METHODS[method]())
        initial = fresh.adapter_state_dict()
        moved = {key for key in single if not torch.allclose(single[key], initial[key], atol=1e-4)}
        assert len(moved) > len(single) // 2, f"{method}: only {len(moved)} of {len(single)} tensors trained"
        if fresh.peft_config["default"].train_norms:
            assert any("norm" in key for key in moved), f"{method}: trained norms did not change"
