"""Trainer runs of every structlora method (a peft.PeftModel) under FSDP2 and DeepSpeed ZeRO-2/3, for
tests/test_sharded_trainer.py (2 gloo processes under torchrun, CPU).

    torchrun --nproc_per_node 2 tests/sharded_trainer_worker.py OUT_DIR [--backends=fsdp,zero2,zero3]

`AdapterTrainer` with `fsdp` / `fsdp_config` version 2 (transformers' own arguments) or a DeepSpeed config
trains STEPS steps of 2 rows per process and checkpoints at the last one: OUT_DIR/<backend>/<method>/checkpoint-3.
A second Trainer resumes from that checkpoint (nothing left to train) and saves OUT_DIR/<backend>/<method>/resumed.
Each process also records whether its adapter parameters were sharded (OUT_DIR/<backend>/<method>/rank<N>.json).
`reference(method, out_dir)` is the same run in one process with 4 rows per step (the same global batches).
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fsdp_worker import METHODS  # noqa: E402
from tiny_models import tiny_llama_for, tiny_word_tokenizer  # noqa: E402

import peft  # noqa: E402

from structlora import AdapterTrainer  # noqa: E402
from structlora.distributed import end_process_group  # noqa: E402

STEPS, ROWS, LENGTH = 3, 12, 12
BACKENDS = ("fsdp", "zero2", "zero3")
FSDP_CONFIG = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}


def deepspeed_config(stage: int) -> dict:
    """The config a GPU run would use too ("auto" values come from TrainingArguments); parameters of any size
    are partitioned under ZeRO-3 (the default keeps parameters under 1e5 elements whole on every process)."""
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


class TokenRows(torch.utils.data.Dataset):
    def __init__(self, vocab_size: int) -> None:
        self.ids = torch.randint(4, vocab_size, (ROWS, LENGTH), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def make_trainer(method: str, out_dir: str, rows_per_process: int, backend: str | None) -> AdapterTrainer:
    from transformers import TrainingArguments

    tokenizer = tiny_word_tokenizer()
    model = peft.get_peft_model(tiny_llama_for(tokenizer), METHODS[method]())
    if backend == "fsdp":
        sharding = {"fsdp": True, "fsdp_config": FSDP_CONFIG, "use_cpu": True}
    elif backend is not None:
        # use_cpu: without it transformers gives accelerate no backend for DeepSpeed on a CPU machine and every
        # process runs as if alone (refused by AdapterTrainer; see structlora.sharded_trainer).
        sharding = {"deepspeed": deepspeed_config(int(backend[-1])), "use_cpu": True}
    else:
        sharding = {"use_cpu": True}
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=rows_per_process, max_steps=STEPS,
                             learning_rate=1e-2, save_steps=STEPS, report_to=[], seed=0, **sharding)
    return AdapterTrainer(model=model, args=args, train_dataset=TokenRows(len(tokenizer)))


def reference(method: str, out_dir: str) -> None:
    make_trainer(method, out_dir, rows_per_process=4, backend=None).train()


def main() -> None:
    out_dir = sys.argv[1]
    backends = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--backends=")), BACKENDS)
    methods = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--methods=")), list(METHODS))
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for backend in backends:
        for method in methods:
            run_dir = os.path.join(out_dir, backend, method)
            trainer = make_trainer(method, run_dir, rows_per_process=2, backend=backend)
            trainer.train()
            sharded = [type(p).__name__ == "DTensor" or (hasattr(p, "ds_id") and p.numel() == 0)
                       for n, p in trainer.model.named_parameters() if ".adapters." in n]
            # Resuming loads the adapter (and optimizer) back into the sharded model; saving it again must give
            # the checkpoint's adapter.
            resumed = make_trainer(method, run_dir, rows_per_process=2, backend=backend)
            resumed.train(resume_from_checkpoint=os.path.join(run_dir, f"checkpoint-{STEPS}"))
            resumed.save_model(os.path.join(run_dir, "resumed"))
            with open(os.path.join(run_dir, f"rank{rank}.json"), "w") as handle:
                json.dump({"fsdp": trainer.is_fsdp_enabled, "deepspeed": trainer.is_deepspeed_enabled,
                           "sharded_adapter_parameters": sum(sharded), "adapter_parameters": len(sharded)}, handle)
    end_process_group()  # started by accelerate; left alive, gloo can abort the process at exit


if __name__ == "__main__":
    main()
