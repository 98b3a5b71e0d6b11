"""Errors a user can act on end a command with one line on stderr, never a traceback from deep inside.

Every launcher (``launch/*.py``) runs its ``main`` inside :func:`user_errors`: a bad config value, a missing
file or directory, a checkpoint that cannot be resumed, an artifact of the wrong kind exit with status 2; a
training run that diverged (a non-finite loss, gradient norm or weight) exits with status 3. Library callers
(and the tests) call ``main`` directly and get the exception itself.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class ArtifactError(ValueError):
    """A path that is not what a command expects, or is incomplete; ``str()`` names the path."""


class SampleError(ValueError):
    """A sample that violates the data schema; ``kind`` is one of ``data.schema``'s error-kind constants."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    from unimllm.checkpoint import CheckpointError
    from unimllm.config import ConfigError
    from unimllm.trainer import TrainingDiverged

    usage_errors = (ConfigError, CheckpointError, ArtifactError, FileNotFoundError, NotADirectoryError)
    try:
        yield
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None
    except usage_errors as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
