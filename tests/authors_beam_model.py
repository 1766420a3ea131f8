"""The tiny GPT-2 of the beam-identity test: the real vocabulary (50,257 tokens), random weights drawn
from one seeded generator in parameter-name order, so the authors' script (run outside this
repository, see tests/fixtures/authors_beam_e2e.json) and our test build the very same weights."""

from __future__ import annotations

import torch

SEED = 20261126
VOCAB = 50257
# The end-of-text (50256) and blank-line (628) embeddings are scaled up so that beams end at different
# steps: the stop-token, length-penalty and finished-beam logic is then exercised.
STOP_TOKENS = (50256, 628)
STOP_BOOST = 3.0


def tiny_gpt2_real_vocab():
    """GPT-2 with 2 layers, width 32, 1,024 positions and GPT-2's vocabulary, seeded weights: every
    matrix N(0, 0.5²) (peaked next-token distributions), biases N(0, 0.1²), layer-norm gains 1 + N(0, 0.1²),
    the two stop tokens' embeddings (tied with the output layer) times ``STOP_BOOST``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, parameter in sorted(model.transformer.named_parameters()):
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
                parameter.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                parameter.copy_(0.1 * noise)
            else:
                parameter.copy_(0.5 * noise)
        for token in STOP_TOKENS:
            model.transformer.wte.weight[token] *= STOP_BOOST
    model.tie_weights()
    return model
