"""The lm-evaluation-harness backend: its log-likelihoods are megamem eval's per-token losses on the same text, and
`megamem lm-eval` runs a multiple-choice task defined here, offline, scoring as lm-eval's `hf` backend does on the
Hugging Face export."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megamem.inference.evaluate import evaluate
from megamem.inference.generate import generate
from tests.paths import REPO

pytest.importorskip("lm_eval")
from megamem.inference.lm_eval_adapter import MegamemLM  # noqa: E402

TEXT = "import json\n\ndef load(path):\n    return json.loads(open(path).read())\n"


@pytest.fixture(scope="module")
def adapter(trained):
    return MegamemLM(path=str(trained), batch_size=3, device="cpu")


def _requests(*arguments):
    return [SimpleNamespace(args=args) for args in arguments]


def _log_probs(model, tokens: list[int]) -> torch.Tensor:
    """log p(token i | tokens before it) for every token but the first, from one full forward."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([tokens[:-1]])).float()[0, :, :257], -1)
    return logprobs.gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


def test_log_likelihoods_are_the_evaluated_losses(adapter):
    """Rolling: the text after end-of-document, whose summed loss megamem eval measures. Conditional: the
    continuation's tokens' log-probabilities after the context's (an empty context is end-of-document)."""
    encode = adapter.tokenizer.encode
    tokens = [adapter.tokenizer.eod_id, *encode(TEXT)]
    measured = evaluate(adapter.model, [torch.tensor([tokens])], adapter.tokenizer.token_bytes(),
                        torch.device("cpu"))
    [rolling] = adapter.loglikelihood_rolling(_requests((TEXT,)))
    assert rolling == pytest.approx(-measured.loss * measured.tokens, rel=1e-5)

    context, continuation = TEXT[:20], TEXT[20:40]
    pair = [*encode(context), *encode(continuation)]
    expected = float(_log_probs(adapter.model, pair)[len(encode(context)) - 1:].sum())
    (conditional, greedy), (whole, _) = adapter.loglikelihood(_requests((context, continuation), ("", TEXT)))
    assert conditional == pytest.approx(expected, rel=1e-5) and greedy is False
    assert whole == pytest.approx(rolling, rel=1e-5)


def test_generate_until_stops_at_the_stop_string(adapter):
    """The stop string is taken from the model's own continuation a few characters in, at its first occurrence
    there, so the text must be exactly what comes before it: not empty, and without it. The continuation is drawn
    (temperature 1, decoding's fixed seed): a briefly trained model's greedy one repeats a single character."""
    tokenizer = adapter.tokenizer
    free = tokenizer.decode(generate(adapter.model, tokenizer.encode("def ").tolist(), 32, tokenizer.vocab_size,
                                     tokenizer.eod_id, temperature=1.0))
    cut = next(i for i in range(3, len(free) - 2) if free.find(free[i:i + 3]) == i)
    options = {"until": [free[cut:cut + 3]], "max_gen_toks": 32, "temperature": 1.0}
    [text] = adapter.generate_until(_requests(("def ", options)))
    assert text == free[:cut] and text, (text, free)
    [text] = adapter.generate_until(_requests(("def ", {"until": ["("], "max_gen_toks": 32})))
    assert "(" not in text and len(text) <= 32


@pytest.mark.slow
def test_a_local_task_runs_offline_through_megamem_lm_eval_and_lm_eval_on_the_export(trained, trained_hf, tmp_path):
    """`megamem lm-eval --model megamem` on the run, and lm-eval's own CLI with its `hf` backend on the run's
    `megamem export --format hf`, score every choice alike."""
    docs = [{"question": "def add(a, b):\n    return a", "choices": [" + b", " ** zebra"], "answer": 0},
            {"question": "import", "choices": [" os", " ~~~~"], "answer": 0}]
    (tmp_path / "choices.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "local_choice.yaml").write_text(f"""task: megamem_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "choices.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"),
               OMP_NUM_THREADS="1")
    task = ["--tasks", "megamem_local_choice", "--include_path", str(tmp_path), "--batch_size", "4", "--log_samples"]
    commands = {"megamem": ([sys.executable, "-m", "megamem.cli.main", "lm-eval", "--model", "megamem",
                             "--model_args", f"path={trained}"], REPO),
                # lm-eval as users run it, away from the repository (whose kernels/ would shadow a package)
                "hf": ([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                        f"pretrained={trained_hf},trust_remote_code=True,dtype=float32", "--device", "cpu"], tmp_path)}
    outputs = {}
    for backend, (command, cwd) in commands.items():
        result = subprocess.run([*command, *task, "--output_path", str(tmp_path / backend)], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[backend] = result.stdout
    scores = {}
    for backend, stdout in outputs.items():
        assert "megamem_local_choice" in stdout and "acc" in stdout, stdout[-3000:]
        [saved] = (tmp_path / backend).rglob("results_*.json")
        assert "acc,none" in json.loads(saved.read_text())["results"]["megamem_local_choice"]
        [samples] = (tmp_path / backend).rglob("samples_*.jsonl")
        scores[backend] = [float(choice[0][0]) for line in samples.read_text().splitlines()
                           for choice in json.loads(line)["resps"]]
    assert len(scores["megamem"]) == 4 and scores["hf"] == pytest.approx(scores["megamem"], rel=1e-5)


def test_bad_lm_eval_inputs_are_named(trained, tmp_path, megamem, monkeypatch):
    """The missing run is found when lm-eval builds the model, before it would fetch the task's data."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    for model_args, task, message in ((f"path={trained}", "no_such_task_anywhere",
                                       "lm-eval Tasks not found: no_such_task_anywhere. Fix: `megamem lm-eval ls "
                                       "tasks`"),
                                      (f"path={tmp_path / 'no-run'}", "arc_easy", "is not a run directory")):
        status, _, err = megamem("lm-eval", "--model", "megamem", "--model_args", model_args, "--tasks", task)
        assert status == 2 and message in err and "Traceback" not in err, err[-3000:]
