"""Review of the explorer's first-paint work (rev2): edge cases with a known answer."""

from __future__ import annotations

import pytest

from moelab.explore.summary import ExpertSummary
from moelab.trace.io import open_trace


def test_an_index_never_built_says_so(traces):
    # the document index (`first`) fails: the routing index is never built, and must not read as built
    # (ready with no error), or a view taking it would count from ids_TLK = None
    t = open_trace(traces[0])

    def broken_docs():
        raise RuntimeError("the document index failed")

    s = ExpertSummary("(SELECT 1)", "tx", traces[0], t.meta.num_experts, t.meta.top_k, first=broken_docs).start()
    assert s.wait(60) and "document index failed" in s.error
    assert s.index.ready.is_set() and s.index.ids_TLK is None
    assert s.index.error is not None and "not built" in s.index.error
