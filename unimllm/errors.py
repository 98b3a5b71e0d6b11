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

from unimllm.artifacts import ArtifactError
from unimllm.checkpoint import CheckpointError
from unimllm.config import ConfigError
from unimllm.trainer import TrainingDiverged

USAGE_ERRORS = (ConfigError, CheckpointError, ArtifactError, FileNotFoundError, NotADirectoryError)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None
    except USAGE_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
