"""Errors a user can act on: each names the bad value and what to change."""


class TuiliError(Exception):
    """Base class for tuili's user-facing errors."""

    def __reduce__(self):
        # Pickled whole (the engine process sends them): the subclasses' __init__ take other
        # arguments than the message that Exception would pass back.
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type, args: tuple, state: dict) -> TuiliError:
    error = Exception.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class InvalidParameter(TuiliError, ValueError):
    """A request or configuration value is out of its allowed range."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class ModelLoadError(TuiliError):
    """A model could not be found, read or understood."""


class PromptTooLong(InvalidParameter):
    def __init__(self, num_tokens: int, max_model_len: int):
        super().__init__(
            "prompt",
            f"the prompt has {num_tokens} tokens, more than max_model_len={max_model_len}; "
            "shorten it or raise --max-model-len",
        )
        self.num_tokens = num_tokens
        self.max_model_len = max_model_len


class RequestCancelled(TuiliError):
    """The server ended a request itself (it is shutting down): no fault of the client's."""


class EngineDied(RequestCancelled):
    """The engine's process ended while requests still needed it."""
    code = "engine_dead"


def check_text(param: str, text: str) -> None:
    """A 400's InvalidParameter for text that is not valid Unicode: a lone surrogate (JSON's
    "\\ud800") that UTF-8 and the tokenizer cannot take."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidParameter(param, f"has a lone surrogate U+{ord(text[e.start]):04X} at "
                                      f"character {e.start}; text must be valid Unicode") from e


class WrongTask(InvalidParameter):
    """A request for a task (generate, embed, score) that the served model does not have."""
    code = "wrong_task"

    def __init__(self, served: str, asked: str):
        super().__init__("model", f"this model serves task={served}, not {asked}; serve a model "
                                  f"with that task (or choose it with --task)")
        self.served, self.asked = served, asked


class RankFailure(RuntimeError):
    """A tensor-parallel rank died or stopped answering: the engine cannot run on."""
