"""megamem generate: the KV cache gives the logits of full recomputation; sampling is seeded; the command works on a
trained run and names its bad inputs."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megamem.errors import MegamemError
from megamem.inference.generate import generate, next_token
from megamem.model import build_model
from megamem.model.kv_cache import KVCache


@pytest.fixture(params=["memoryformer", "dense"])
def model(request, tiny_config):
    config = dataclasses.replace(tiny_config, model=dataclasses.replace(tiny_config.model, arch=request.param))
    return build_model(config).eval()


@torch.no_grad()
def test_cached_decoding_gives_the_logits_of_full_recomputation(model):
    """A prefix, then 3 tokens at once (a mask over cache and chunk), then one at a time up to model.seq_len."""
    tokens = torch.randint(0, 97, (2, model.seq_len), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    cache = KVCache(len(model.blocks))
    pieces, start = [], 0
    for size in [5, 3] + [1] * (model.seq_len - 8):
        pieces.append(model(tokens[:, start:start + size], cache))
        start += size
    assert cache.length == model.seq_len
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds model.seq_len"):
        model(tokens[:, :1], cache)


def test_greedy_is_the_argmax_of_the_full_model_and_sampling_is_seeded(model):
    prompt = [5, 17, 42]
    greedy = generate(model, prompt, 12, 97, eod_id=96, temperature=0)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + greedy]))[0, len(prompt) - 1:-1, :97]
    assert greedy == logits.argmax(-1).tolist()[:len(greedy)]
    first, again = (generate(model, prompt, 12, 97, eod_id=96, seed=3) for _ in range(2))
    assert first == again and len(first) <= 12
    assert first != generate(model, prompt, 12, 97, eod_id=96, seed=4)


def test_top_k_and_top_p_keep_only_the_likeliest():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0])
    draws = {next_token(logits, 1.0, top_k, top_p, torch.Generator().manual_seed(s))
             for s in range(50) for top_k, top_p in ((1, 1.0), (0, 0.5))}
    assert draws == {0}
    wide = {next_token(logits, 1.0, 2, 1.0, torch.Generator().manual_seed(s)) for s in range(200)}
    assert wide == {0, 1}


def test_generate_command_on_a_trained_run(trained, megamem):
    status, out, err = megamem("generate", str(trained), "--prompt", "def ", "--max-new-tokens", "16",
                               "--temperature", "0")
    assert status == 0 and out.startswith("def "), err[-2000:]
    streamed = megamem("generate", str(trained), "--prompt", "def ", "--max-new-tokens", "16", "--temperature", "0",
                       "--stream")
    assert streamed[0] == 0 and streamed[1] == out
    status, _, err = megamem("generate", str(trained), "--prompt", "x" * 200)
    assert status == 2 and "the prompt is 200 tokens, and model.seq_len=128 leaves no room" in err
    status, _, err = megamem("generate", str(trained), "--prompt", "def ", "--top-p", "0")
    assert status == 2 and "0 < P <= 1" in err


def test_an_empty_prompt_is_refused(model):
    with pytest.raises(MegamemError, match="the prompt is empty"):
        generate(model, [], 4, 97, eod_id=96)
