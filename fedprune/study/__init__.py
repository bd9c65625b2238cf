"""What a study needs beyond single runs: paired comparisons over seeds with intervals."""

from .paired import (Interval, mean_interval, paired_difference, t_critical,
                     weighted_mean_interval)

__all__ = ["Interval", "mean_interval", "paired_difference", "t_critical",
           "weighted_mean_interval"]
