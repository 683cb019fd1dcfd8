"""megamem export --format hf: transformers loads the directory in a process where megamem cannot be imported, and its
token ids, logits (also left-padded in a batch) and greedy decoding through transformers' own cache are megamem's;
the byte tokenizer's tokenizer.json gives megamem's ids for any text."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megamem.data_tools.tokenizer import ByteTokenizer
from megamem.inference.generate import generate
from megamem.inference.hf_export import byte_tokenizer_json
from megamem.inference.load import load_trained

pytest.importorskip("transformers")

TEXT = "def héllo(x):\n    return [x, '✓']  # no-op\n"
PROMPT = 7              # tokens of TEXT that prompt the greedy decoding
NEW_TOKENS = 24

IN_TRANSFORMERS = textwrap.dedent('''
    import sys

    import torch


    class NoMegamem:
        """As on a machine without megamem: importing it fails."""

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "megamem":
                raise ImportError(f"{name} is not installed here")


    sys.meta_path.insert(0, NoMegamem())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, text, prompt, new_tokens, output = sys.argv[1:]
    prompt, new_tokens = int(prompt), int(new_tokens)
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    pad = ids.shape[1] - prompt
    left_padded = torch.cat([torch.full((1, pad), tokenizer.pad_token_id), ids[:, :prompt]], dim=1)
    batch = torch.cat([left_padded, ids])
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    with torch.no_grad():
        batch_logits = model(batch, attention_mask=mask).logits
        greedy = model.generate(batch, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    torch.save({"ids": ids[0].tolist(), "logits": model(ids).logits.detach(), "batch_logits": batch_logits,
                "greedy": greedy[:, batch.shape[1]:].tolist(), "eos": tokenizer.eos_token_id}, output)
''')


@pytest.fixture(scope="module")
def dense(layout_runs):
    return layout_runs["dense"].dir


@pytest.mark.parametrize("arch", ["memoryformer", "dense"])
def test_transformers_loads_the_export_without_megamem(arch, request, tmp_path, megamem):
    run = request.getfixturevalue("trained" if arch == "memoryformer" else "dense")
    if arch == "memoryformer":
        export = request.getfixturevalue("trained_hf")            # the same command, run once for the session
    else:
        export = tmp_path / "hf"
        status, _, err = megamem("export", str(run), "--format", "hf", "--output", str(export))
        assert status == 0, err
    assert {p.name for p in export.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "modeling_megamem.py", "tokenizer.json",
        "tokenizer_config.json"}
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", IN_TRANSFORMERS, str(export), TEXT, str(PROMPT),
                             str(NEW_TOKENS), str(tmp_path / "out.pt")], env=env, capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)     # not the repository: its kernels/ would shadow a package
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")

    trained = load_trained(run)
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(TEXT).tolist()
    assert got["ids"] == ids and got["eos"] == tokenizer.eod_id
    with torch.no_grad():
        logits = trained.model(torch.tensor([ids]))
        prompt_logits = trained.model(torch.tensor([ids[:PROMPT]]))
    torch.testing.assert_close(got["logits"], logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got["batch_logits"][1], logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["batch_logits"][0, -PROMPT:], prompt_logits[0], rtol=0, atol=1e-5)

    def until_eod(tokens):
        return tokens[:tokens.index(tokenizer.eod_id)] if tokenizer.eod_id in tokens else tokens

    for row, prompt in enumerate((ids[:PROMPT], ids)):      # the left-padded prompt, and the whole text
        expected = generate(trained.model, prompt, NEW_TOKENS, tokenizer.vocab_size, tokenizer.eod_id, temperature=0)
        assert until_eod(got["greedy"][row]) == expected, row


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text())
def test_the_byte_tokenizer_file_gives_megamem_ids(text):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(json.dumps(byte_tokenizer_json()))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == ByteTokenizer().encode(text).tolist()
    assert tokenizer.decode(ids) == text


def test_bad_export_targets_are_named(trained, tmp_path, megamem):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    for argv, message in (([str(trained), "--output", str(tmp_path / "taken")], "is not a Hugging Face model dir"),
                          ([str(tmp_path / "no-run"), "--output", str(tmp_path / "hf")], "is not a run directory")):
        status, _, err = megamem("export", *argv, "--format", "hf")
        assert status == 2 and message in err and "Traceback" not in err, err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine" and not (tmp_path / "hf").exists()
