"""AMAP training-time parts: gates, indicators, linear-attention indicator start, the
differentiable MACs model, search and refine."""
