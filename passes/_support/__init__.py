"""Machinery shared by the decompose passes; not passes themselves.

* :mod:`.fake_meta`: check, refresh and share ``node.meta["val"]`` around a rewrite;
* :mod:`.worlds`: fake values of the graph at the traced sizes and at other sizes;
* :mod:`.tracer`: traces a Python function on those values, keeping sizes that vary dynamic;
* :mod:`.inline`: inlines a traced call in place of a node;
* :mod:`.linear_bias`: canonical Linear calls and in-place-zeroed biases made sliceable.
"""
