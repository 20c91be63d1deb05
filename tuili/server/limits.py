"""What one request may ask of a shared server: each limit a flag, each default protective."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from tuili.errors import InvalidParameter
from tuili.sampling_params import MAX_LOGPROBS


@dataclass(frozen=True)
class ServerLimits:
    # A 128k-token prompt as JSON token ids is about 1 MB. Parsing holds the GIL (about 13 ms
    # per MB of numbers), so this also bounds how long one body can hold up the event loop.
    max_body_bytes: int = 4 * 2**20
    max_json_depth: int = 64  # tool schemas nest; nothing real nests this deep
    max_n: int = 16  # samples per prompt (n, best_of)
    max_logprobs: int = MAX_LOGPROBS  # top logprobs per token (logprobs, top_logprobs)
    max_stop: int = 16  # stop strings, and stop token ids, per request
    max_stop_len: int = 256  # characters in one stop string
    max_prompts: int = 64  # prompts in one /v1/completions call

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise InvalidParameter(f.name, f"got {value!r}, must be an integer >= 1")
        if self.max_logprobs > MAX_LOGPROBS:
            raise InvalidParameter("max_logprobs", f"got {self.max_logprobs}, must be <= "
                                                   f"{MAX_LOGPROBS}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerLimits:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def check_n(self, param: str, n: int) -> None:
        if n > self.max_n:
            raise InvalidParameter(param, f"got {n}, must be at most {self.max_n} (--max-n)")

    def check_logprobs(self, param: str, k: int | None) -> None:
        if k is not None and not 0 <= k <= self.max_logprobs:
            raise InvalidParameter(param, f"got {k}, must be in [0, {self.max_logprobs}] "
                                          "(--max-logprobs)")

    def check_stop(self, stop: str | list[str] | None, stop_token_ids: list[int] | None) -> None:
        strings = [stop] if isinstance(stop, str) else stop or []
        for param, items in (("stop", strings), ("stop_token_ids", stop_token_ids or [])):
            if len(items) > self.max_stop:
                raise InvalidParameter(param, f"got {len(items)} of them, at most {self.max_stop} "
                                              "are allowed (--max-stop)")
        for i, s in enumerate(strings):
            if len(s) > self.max_stop_len:
                raise InvalidParameter("stop", f"stop string {i} has {len(s)} characters, at most "
                                               f"{self.max_stop_len} are allowed (--max-stop-len)")

    def check_prompts(self, count: int) -> None:
        if count > self.max_prompts:
            raise InvalidParameter("prompt", f"got {count} prompts, at most {self.max_prompts} "
                                             "are allowed in one call (--max-prompts)")


_HELP = {
    "max_body_bytes": "largest request body in bytes; more gets 413",
    "max_json_depth": "deepest nesting of arrays and objects in a request body",
    "max_n": "most samples per prompt (n, best_of)",
    "max_logprobs": f"most top logprobs per token (logprobs, top_logprobs; at most {MAX_LOGPROBS})",
    "max_stop": "most stop strings, and most stop token ids, per request",
    "max_stop_len": "longest stop string, in characters",
    "max_prompts": "most prompts in one /v1/completions call",
}


def add_limit_options(group: argparse._ArgumentGroup) -> None:
    for f in fields(ServerLimits):
        group.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default,
                           help=f"{_HELP[f.name]} (default {f.default})")
