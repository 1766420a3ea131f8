"""One FSDP2 training run per structlora method, for tests/test_fsdp.py (run under torchrun, gloo, CPU).

    torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR [--single]

Every decoder layer and the root are `fully_shard`ed; each rank trains on its half of every batch, then
`save_pretrained` (called on every rank: it gathers sharded tensors, rank 0 writes) saves OUT_DIR/<method>.
With --single (no torchrun) the same steps run unsharded on the whole batches: the reference.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_models import tiny_llama_for, tiny_word_tokenizer  # noqa: E402

from structlora import LoraConfig, LorettaAdpConfig, LorettaRepConfig, MTLoraConfig, get_peft_model  # noqa: E402

METHODS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8),
    "mtlora": lambda: MTLoraConfig(r=4, lora_alpha=8, structure="ctcm", init="identity"),
    "loretta_rep": lambda: LorettaRepConfig(r=4, tensor_rank=2, init="reference"),
    "loretta_adp": lambda: LorettaAdpConfig(bottleneck_size=8, tensor_rank=2, init="reference"),
}
STEPS, BATCH, LENGTH = 3, 4, 12


def batches(vocab_size: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(4, vocab_size, (BATCH, LENGTH), generator=generator) for _ in range(STEPS)]


def train(method: str, out_dir: str, sharded: bool) -> None:
    tokenizer = tiny_word_tokenizer()
    model = get_peft_model(tiny_llama_for(tokenizer), METHODS[method]())
    rank, world = 0, 1
    if sharded:
        from torch.distributed.fsdp import fully_shard

        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for ids in batches(len(tokenizer)):
        local = ids.chunk(world)[rank]
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(os.path.join(out_dir, method))


def main() -> None:
    out_dir, single = sys.argv[1], "--single" in sys.argv
    methods = [m for m in METHODS if f"--only={m}" in sys.argv] or list(METHODS)
    torch.set_num_threads(1)
    if not single:
        torch.distributed.init_process_group("gloo")
    try:
        for method in methods:
            train(method, out_dir, sharded=not single)
    finally:
        if not single:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
