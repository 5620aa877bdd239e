"""lm-evaluation-harness adapter: evaluate a lowbit run with any lm-eval task.

``lm_eval`` is an optional dependency (``pip install lm-eval``); it is imported only when this module is, and
importing this module registers the model name ``"lowbit"``::

    import lm_eval
    import lowbit.eval.lm_eval_adapter  # noqa: F401  (registers "lowbit")

    results = lm_eval.simple_evaluate(model="lowbit", model_args="run=runs/tiny,device=cpu",
                                      tasks=["hellaswag", "lambada_openai"])

The three request kinds map onto :mod:`lowbit.eval.tasks`: ``loglikelihood`` →
:func:`~lowbit.eval.tasks.score_continuations`, ``loglikelihood_rolling`` → the sliding-window scorer (every
token once, the text preceded by EOS as lm-eval's rolling windows are), ``generate_until`` → greedy decoding
with a left-truncated window.
"""

from __future__ import annotations

from typing import Any

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("lowbit.eval.lm_eval_adapter needs lm-evaluation-harness: pip install lm-eval") from e

import torch


@register_model("lowbit")
class LowbitLM(LM):
    """A lowbit run (its newest checkpoint and its dataset's tokenizer) as an lm-eval ``LM``."""

    def __init__(self, run: str | None = None, device: str = "auto", batch_size: int | str = 16,
                 data: str | None = None, model: Any = None, tokenizer: Any = None, **_: Any) -> None:
        super().__init__()
        from lowbit.runs import autocast_dtype, resolve_device

        self.device_ = resolve_device(device)
        if model is None:
            from lowbit.data import load_tokenizer
            from lowbit.runs import load_run

            if run is None:
                raise ValueError("model_args needs run=<run directory>")
            model, cfg, _ = load_run(run, self.device_)
            tokenizer = load_tokenizer(data or cfg.data.dir)
            self.amp = autocast_dtype(cfg.train.precision, self.device_)
        else:
            self.amp = None
        self.model, self.tok = model, tokenizer
        self.batch_size_ = int(batch_size) if str(batch_size).isdigit() else 16

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from lowbit.eval.tasks import _encode_pair, score_continuations

        pairs = [_encode_pair(self.tok, *r.args[:2]) for r in requests]
        return score_continuations(self.model, pairs, self.device_, self.batch_size_, amp_dtype=self.amp)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lowbit.eval.tasks import text_perplexity

        out = []
        for r in requests:
            res = text_perplexity(self.model, self.tok, r.args[0], self.device_, batch_size=self.batch_size_,
                                  amp_dtype=self.amp)
            out.append(-res["loss"] * res["tokens"])
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from lowbit.eval.tasks import model_max_len

        max_len = model_max_len(self.model)
        self.model.eval()
        out = []
        for r in requests:
            context, kw = r.args[0], dict(r.args[1]) if len(r.args) > 1 else {}
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = [self.tok.eos_id, *self.tok.encode(context)]
            gen: list[int] = []
            text = ""
            for _ in range(int(kw.get("max_gen_toks", 256))):
                x = torch.tensor([(ids + gen)[-max_len:]], device=self.device_)
                nxt = int(self.model(x)[0, -1].argmax())
                if nxt == self.tok.eos_id:
                    break
                gen.append(nxt)
                text = self.tok.decode(gen)
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out
