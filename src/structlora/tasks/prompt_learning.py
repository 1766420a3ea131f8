"""Guards for decoding PEFT's prompt-learning models (prefix, prompt and P-tuning) with ``generate()``.

PEFT's generate() for these models does not always score what their forward computes (the function they were
trained as); the NLG and LLM tasks decode through these guards. The library never imports PEFT for them: a model
that is not a PEFT prompt-learning model passes through unchanged.
"""

from __future__ import annotations

from typing import Any, NoReturn


def is_prompt_learning(model: Any) -> bool:
    """Whether ``model`` is a PEFT prompt-learning model (prefix, prompt or P-tuning)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def check_generate_matches_forward(model: Any, prompt: list[int], steps: int = 3, tolerance: float = 1e-3) -> None:
    """Refuse to decode a PEFT prompt-learning model whose generate() scores other logits than its forward (the
    function it was trained as): PEFT 0.21's prefix tuning on a rotary-position model (Llama) in transformers 5
    does, by ~0.1 from the second step on, and PEFT 0.22's fails inside generate() with a shape error. Greedy
    ``steps`` on ``prompt`` through both; no-op for other models."""
    if not is_prompt_learning(model):
        return
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        try:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                 do_sample=False, num_beams=1, output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=0, **generation_cache_kwargs(model))
        except RuntimeError as error:
            # PEFT 0.22's prefix tuning on a rotary model (Llama) in transformers 5 fails inside generate() with
            # a shape error: the same refusal as when it decodes other logits.
            _refuse_generate(model, f"generate() fails: {error}")
        sequence = out.sequences[0].tolist()
        gap = 0.0
        for step, scores in enumerate(out.scores):
            current = torch.tensor([sequence[:len(prompt) + step]], device=device)
            logits = model(input_ids=current, attention_mask=torch.ones_like(current)).logits[0, -1]
            gap = max(gap, float((logits.float() - scores[0].float()).abs().max()))
    if gap > tolerance:
        _refuse_generate(model, f"logits up to {gap:.3g} apart")


def _refuse_generate(model: Any, why: str) -> NoReturn:
    base = type(model.get_base_model()).__name__
    raise ValueError(f"PEFT's generate() does not reproduce this {model.active_peft_config.peft_type} model's "
                     f"forward on {base} ({why}): its decoding would not be the model that was trained, so it is "
                     f"refused; score it by likelihood instead, or use --method prompt / ptuning")


def generation_cache_kwargs(model: Any) -> dict[str, bool]:
    """Extra ``generate()`` arguments: no key/value cache for PEFT's prompt-learning models. With a cache, PEFT
    0.21's generate() on transformers 5 scores every step after the first with other logits than the model's own
    forward (up to 0.26 apart on a tiny model: other tokens); without one, each step is that forward (equal to
    1e-7; tests/test_peft_methods_e2e.py)."""
    return {"use_cache": False} if is_prompt_learning(model) else {}
