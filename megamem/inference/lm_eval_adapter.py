"""A trained megamem model as an lm-evaluation-harness backend named `megamem`.

    megamem lm-eval --model megamem --model_args path=RUN_DIR --tasks piqa,winogrande,wsc,arc_easy,arc_challenge,logiqa

The installed lm-eval (0.4) finds model backends only among its own modules, so
`megamem lm-eval` registers this one and hands every argument to lm-eval's CLI.
Scores are log-probabilities of continuations (batched, the longest first, so
padding is small) and greedy generation with a KV cache; a request longer than
model.seq_len keeps its last seq_len tokens, as lm-eval's own backends do.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megamem.inference.generate import generate
from megamem.inference.load import load_trained


@register_model("megamem")
class MegamemLM(LM):
    def __init__(self, path: str, batch_size: int | str = 8, device: str | None = None, **_lm_eval_options):
        super().__init__()
        from megamem.data_tools.tokenizer import load_tokenizer

        cuda = torch.cuda.is_available()
        # lm-eval passes --device, cuda unless told otherwise: on a machine without a GPU that means the CPU
        self._device = torch.device(device if device and (cuda or not device.startswith("cuda"))
                                    else "cuda" if cuda else "cpu")
        trained = load_trained(path, self._device, kernel="auto")
        self.model, self.config = trained.model, trained.config
        self.tokenizer = load_tokenizer(self.config.data.tokenizer)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8      # "auto": a fixed size
        self.max_length = self.config.model.seq_len

    def _encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def _scores(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per pair."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            # the model sees context + continuation but its last token, and keeps the last seq_len of those
            inputs = [(pairs[i][0] + pairs[i][1])[:-1][-self.max_length:] for i in chunk]
            width = max(len(ids) for ids in inputs)
            batch = torch.tensor([ids + [0] * (width - len(ids)) for ids in inputs], device=self._device)
            with torch.no_grad():
                logprobs = F.log_softmax(self.model(batch).float()[..., :self.tokenizer.vocab_size], dim=-1)
            for row, i in enumerate(chunk):
                continuation = pairs[i][1]
                end = len(inputs[row])
                picked = logprobs[row, end - len(continuation):end]
                target = torch.tensor(continuation, device=self._device)
                results[i] = (float(picked.gather(-1, target[:, None]).sum()),
                              bool((picked.argmax(-1) == target).all()))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for context, continuation in (request.args for request in requests):
            # a trailing space belongs to the continuation, where the tokenizer sees it (as lm-eval's hf does)
            spaces = len(context) - len(context.rstrip())
            context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
            prefix = self._encode(context) if context else [self.tokenizer.eod_id]
            pairs.append((prefix, self._encode(continuation)))
        return self._scores(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        """The whole text's log-probability, the first token conditioned on end-of-document, in disjoint windows
        of seq_len tokens."""
        totals = []
        for (text,) in (request.args for request in requests):
            windows = [make_disjoint_window(window) for window in get_rolling_token_windows(
                self._encode(text), self.tokenizer.eod_id, self.max_length, context_len=1)]
            totals.append(sum(score for score, _ in self._scores(windows)))
        return totals

    def generate_until(self, requests) -> list[str]:
        outputs = []
        for context, options in (request.args for request in requests):
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else until
            prompt = self._encode(context)[-(self.max_length - 1):] or [self.tokenizer.eod_id]
            new = generate(self.model, prompt, int(options.get("max_gen_toks", 256)), self.tokenizer.vocab_size,
                           self.tokenizer.eod_id, temperature=float(options.get("temperature", 0.0)))
            text = self.tokenizer.decode(new)
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def run_lm_eval(argv: list[str]) -> int:
    """lm-eval's own CLI, with this backend registered (importing this module did that). An unknown task is a
    user's mistake, named in one line like megamem's own."""
    from lm_eval.__main__ import cli_evaluate

    from megamem.errors import MegamemError

    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except ValueError as err:
        if not str(err).startswith("Tasks not found"):
            raise
        raise MegamemError(f"lm-eval {err}. Fix: `megamem lm-eval ls tasks` lists lm-eval's tasks; a task of your "
                           f"own needs --include_path DIR (the directory of its YAML)") from None
    return 0
