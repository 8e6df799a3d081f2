"""generation.ban_tokens_in_logits (fix ledger M10): the trainer scores the policy vLLM samples from, i.e. the
model's distribution renormalised over the tokens that can be sampled."""

from __future__ import annotations

import torch

from adapters import load_base_model
from generation import BANNED_LOGIT, ban_tokens_in_logits, vision_token_ban


def test_banned_tokens_get_no_probability_and_the_rest_is_renormalised(tiny_model, processor):
    model = load_base_model(str(tiny_model), dtype="float32")
    banned = vision_token_ban(processor.tokenizer, use_vllm=False)["suppress_tokens"]
    ids = processor.tokenizer("How many red squares are there?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        handle = ban_tokens_in_logits(model, banned)
        masked = model(input_ids=ids).logits
        handle.remove()
        again = model(input_ids=ids).logits

    assert torch.equal(again, plain), "removing the hook restores the model"
    allowed = torch.ones(plain.shape[-1], dtype=torch.bool)
    allowed[banned] = False
    assert torch.equal(masked[..., allowed], plain[..., allowed])
    assert (masked[..., banned] == BANNED_LOGIT).all()
    # log-probs over the allowed tokens: the unmasked model's, renormalised (what vLLM reports after bad_words)
    expected = plain[..., allowed].log_softmax(-1)
    logps = masked.log_softmax(-1)
    assert torch.allclose(logps[..., allowed], expected, atol=1e-6)
    assert (logps[..., banned].exp() == 0).all()
    # and TRL's entropy (sum of p log p) stays finite
    entropy = -(logps.exp() * logps).sum(-1)
    assert torch.isfinite(entropy).all()
