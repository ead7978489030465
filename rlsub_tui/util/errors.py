"""The one error type the core raises for bad input: its message is a sentence for the user."""


class InputError(Exception):
    """Bad input: a checkpoint, option or file the user gave us cannot be used.

    The message names the file or tensor and says what is wrong, in one sentence.
    """


class CheckpointError(InputError):
    """A checkpoint file or directory cannot be read as a checkpoint."""


class ComputeError(Exception):
    """The computation failed for a reason outside the input (a worker process died): a sentence for the user."""
