"""The output processor of text generation: a user request's n samples as one group, their
detokenizers and stop strings, prompt logprobs, and the RequestOutputs a step hands back.

The engine's loop only schedules, runs, samples and updates; a pooling task would bring an
output processor of its own and reuse the loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuili.engine.detokenizer import Detokenizer
from tuili.engine.request import Request
from tuili.engine.sampler import token_logprobs
from tuili.engine.transfer import to_device
from tuili.models.tokenizer import Tokenizer
from tuili.outputs import CompletionOutput, RequestOutput


@dataclass
class _Sample:
    """One of a request's n samples: its sequence and the streaming state around it."""
    request: Request
    group_id: str
    index: int
    detok: Detokenizer
    sent_tokens: int = 0  # output tokens already handed out
    decoded: int = 0  # output tokens whose text is built (those with stop strings: all, at once)


class _Group:
    """The n samples of one user request."""

    def __init__(self, request_id: str, prompt: str | None, samples: list[_Sample], stream: bool):
        self.request_id, self.prompt, self.samples = request_id, prompt, samples
        self.stream = stream  # report every step's progress, not only the final output

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.groups: dict[str, _Group] = {}
        self.samples: dict[str, _Sample] = {}  # by the sequence's own request id

    def is_running(self, request_id: str, child_ids: list[str]) -> bool:
        return request_id in self.groups or any(c in self.samples for c in child_ids)

    def add(self, request_id: str, prompt: str | None, requests: list[Request],
            stream: bool) -> None:
        """Track the sequences (one per sample) of a new request."""
        samples = [_Sample(req, request_id, i,
                           Detokenizer(self.tokenizer, req.prompt_token_ids, req.params))
                   for i, req in enumerate(requests)]
        self.groups[request_id] = _Group(request_id, prompt, samples, stream)
        for s in samples:
            self.samples[s.request.request_id] = s

    def abort(self, request_id: str) -> list[Request]:
        """Forget a request; its sequences that had not finished (for the scheduler to finish)."""
        group = self.groups.get(request_id)
        if group is None:
            return []
        unfinished = [s.request for s in group.samples if not s.request.is_finished]
        self._forget(group)
        return unfinished

    def _forget(self, group: _Group) -> None:
        del self.groups[group.request_id]
        for s in group.samples:
            del self.samples[s.request.request_id]

    def group_ids(self, requests: list[Request]) -> list[str]:
        """The groups these sequences belong to, in their order, each once."""
        return list(dict.fromkeys(self.samples[r.request_id].group_id for r in requests
                                  if r.request_id in self.samples))

    def stop_string(self, req: Request, token: int, check: bool) -> str | None:
        """Scheduler.update's hook for a request with stop strings: its new token's text, and the
        stop string it completes (looked for when check)."""
        s = self.samples[req.request_id]
        s.decoded += 1
        return s.detok.add(token, check_stop=check)

    def add_prompt_logprobs(self, req: Request, logits: torch.Tensor, first: int) -> None:
        """Logprobs of prompt tokens first.. from their rows of logits [m, vocab]."""
        if not req.prompt_logprobs:
            req.prompt_logprobs.append(None)  # the first prompt token has no context
        known = max(len(req.prompt_logprobs) - first, 0)  # rows recomputed after a preemption
        if known >= logits.shape[0]:
            return
        logits, first = logits[known:], first + known
        targets = to_device(req.token_ids[first:first + logits.shape[0]], torch.long, logits.device)
        req.prompt_logprobs.extend(token_logprobs(logits, targets, req.params.prompt_logprobs))

    def outputs(self, group_ids: list[str]) -> list[RequestOutput]:
        """The outputs of these groups (streaming ones, or finished); finished groups forgotten."""
        outputs = []
        for gid in group_ids:
            group = self.groups.get(gid)
            if group is None:  # aborted
                continue
            finished = group.finished
            if group.stream or finished:
                outputs.append(self._output(group, finished))
            if finished:
                self._forget(group)
        return outputs

    def _output(self, group: _Group, finished: bool) -> RequestOutput:
        outputs = []
        for s in group.samples:
            r = s.request
            tokens = r.output_token_ids  # a copy: the request's list grows on
            if not r.params.stop:  # no stop string to look for: decoded only now
                for token in tokens[s.decoded:]:
                    s.detok.add(token, check_stop=False)
                s.decoded = len(tokens)
            outputs.append(CompletionOutput(
                index=s.index, text=s.detok.text, token_ids=tokens,
                finish_reason=r.finish_reason, stop_reason=r.stop_reason,
                logprobs=list(r.logprobs) if r.params.logprobs is not None else None,
                delta_text=s.detok.take_delta(r.is_finished),
                delta_token_ids=tokens[s.sent_tokens:]))
            s.sent_tokens = len(tokens)
        first = group.samples[0].request
        return RequestOutput(
            request_id=group.request_id, prompt=group.prompt,
            prompt_token_ids=first.prompt_token_ids, outputs=outputs, finished=finished,
            prompt_logprobs=first.prompt_logprobs if first.wants_prompt_logprobs else None,
            num_cached_tokens=first.num_cached_tokens)
