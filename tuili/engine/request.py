"""Request: one sequence's state as it moves WAITING -> RUNNING -> (PREEMPTED ->) FINISHED."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tuili.pooling_params import PoolingParams
from tuili.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class Logprob:
    """A sampled (or prompt) token's log-probability, with the top alternatives."""
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    seed: int | None = None  # this sequence's own seed (the request's, plus its index in n)
    arrival_time: float = field(default_factory=time.monotonic)
    pooling: PoolingParams | None = None  # a pooling request: one prefill, no tokens sampled

    status: Status = Status.WAITING
    token_ids: list[int] = field(init=False)  # prompt, then the outputs read back so far
    # Sampled tokens still on their way back from the device. With asynchronous scheduling a
    # request's next step is planned before its last token is read back: the token counts in
    # num_tokens, and the step takes it straight from the device.
    num_pending: int = 0
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache (or scheduled to be)
    # This step's guessed next tokens (spec_decode.draft.Draft), computed after the last real
    # token and counted in num_computed_tokens until the verify step's update rolls them back.
    draft: object | None = None
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at admission
    num_preemptions: int = 0
    logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: list[Logprob | None] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason, self.stop_reason = reason, stop_reason
