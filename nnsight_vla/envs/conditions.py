"""Transitional alias of :mod:`nnsight_vla.rollout.conditions` (removed once every importer uses it)."""

from ..rollout.conditions import *  # noqa: F401,F403
from ..rollout.conditions import Condition, ConditionError, baseline, check_unique  # noqa: F401
