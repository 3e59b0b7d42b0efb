"""Transitional alias of :mod:`nnsight_vla.rollout.records`, :mod:`~nnsight_vla.rollout.store` and
:mod:`~nnsight_vla.rollout.stats` (removed once every importer uses them)."""

from ..rollout.records import *  # noqa: F401,F403
from ..rollout.records import _mean, jsonable as _jsonable  # noqa: F401
from ..rollout.stats import *  # noqa: F401,F403
from ..rollout.store import *  # noqa: F401,F403
from ..rollout.store import ResultsStore  # noqa: F401
