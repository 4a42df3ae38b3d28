"""Planning: what to keep (units, cost model, criteria, allocation, the one-shot plan).
Nothing here edits a graph."""
