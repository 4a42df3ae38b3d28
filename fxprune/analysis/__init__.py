"""The read-only analysis engine: GraphModule -> :class:`Analysis`."""

from fxprune.analysis.engine import (
    ANALYSIS_KEY,
    Analysis,
    AttentionSite,
    ChannelGroup,
    analyze,
    get_analysis,
)

__all__ = ["ANALYSIS_KEY", "Analysis", "AttentionSite", "ChannelGroup", "analyze", "get_analysis"]
