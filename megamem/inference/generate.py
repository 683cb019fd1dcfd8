"""Sampling text from a trained model, one token at a time, with a KV cache.

The prompt runs through the model once; after that each step feeds only the
token just chosen, whose keys and values join the cache (megamem.model.kv_cache).
Greedy at temperature 0; otherwise top-k, then top-p (nucleus) filtering, then a
draw from a seeded generator, so a seed gives the same text every time.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from megamem.errors import MegamemError
from megamem.model.kv_cache import KVCache


def next_token(logits_V: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V.float() / temperature
    if 0 < top_k < logits_V.numel():
        logits_V = logits_V.masked_fill(logits_V < logits_V.topk(top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        probs, order = logits_V.softmax(-1).sort(descending=True)
        outside = probs.cumsum(-1) - probs >= top_p          # tokens after the nucleus already holds top_p
        logits_V = logits_V.masked_fill(torch.zeros_like(outside).scatter(0, order, outside), float("-inf"))
    return int(torch.multinomial(logits_V.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, vocab_size: int, eod_id: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             on_token: Callable[[int], None] | None = None) -> list[int]:
    """The new tokens (without the end-of-document token that stops decoding), each also handed to `on_token`
    as it comes. `vocab_size`: the tokenizer's; the head's padding rows are never drawn."""
    if not prompt:
        raise MegamemError("the prompt is empty. Fix: pass --prompt with some text")
    if len(prompt) >= model.seq_len:
        raise MegamemError(f"the prompt is {len(prompt)} tokens, and model.seq_len={model.seq_len} leaves no room "
                           f"to generate. Fix: shorten the prompt")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache(len(model.blocks))
    logits = model(torch.tensor([prompt], device=device), cache)[0, -1, :vocab_size]
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = next_token(logits, temperature, top_k, top_p, generator)
        if token == eod_id:
            break
        new.append(token)
        if on_token:
            on_token(token)
        if cache.length == model.seq_len:
            break
        logits = model(torch.tensor([[token]], device=device), cache)[0, -1, :vocab_size]
    return new
