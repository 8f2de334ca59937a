"""The tiny models now live in :mod:`attnbridge.tiny_models` (the ``generate`` CLI uses them too);
this module keeps the tests' imports working."""

from attnbridge.tiny_models import *  # noqa: F403
from attnbridge.tiny_models import _seeded  # noqa: F401
