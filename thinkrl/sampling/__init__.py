"""Which prompts a training step sees: difficulty labels and filters, curriculum and
prioritized order, and DAPO dynamic sampling. See ``samplers``, ``difficulty``, ``dynamic``."""

from thinkrl.sampling.dynamic import Groups, collect_groups
from thinkrl.sampling.samplers import CurriculumSampler, PrioritizedSampler, ShuffleSampler, build_sampler

__all__ = [
    "CurriculumSampler",
    "Groups",
    "PrioritizedSampler",
    "ShuffleSampler",
    "build_sampler",
    "collect_groups",
]
