"""The multi-turn source: Python's documented interpreter sessions as input / reply conversations."""

import numpy as np
import pytest

from moelab.config import MoelabError
from moelab.data.build import build_corpus
from moelab.data.sources import open_source
from moelab.data.turns import session_documents, sessions

PLANTED = '''
def f():
    """Docstring prose.

        >>> x = 1
        >>> x + 1
        2
        >>> for i in range(2):
        ...     print(i)
        0
        1

    More prose, then a one-exchange session:

    >>> len("ab")
    2
    """
'''


def test_sessions_match_a_hand_split():
    got = list(sessions(PLANTED))
    assert got == [
        (5, [">>> x = 1\n>>> x + 1", "2", ">>> for i in range(2):\n...     print(i)", "0\n1"]),
        (15, ['>>> len("ab")', "2"]),
    ]


def test_nothing_to_find():
    assert list(sessions("no sessions here\n... not a prompt\n")) == []
    # the one-exchange session has no later turn, so it is left out at min_replies=2
    docs = list(session_documents([("planted", PLANTED)]))
    assert [d.name for d in docs] == ["planted:5"]
    assert docs[0].turns[1] == "2" and docs[0].text == "\n".join(docs[0].turns)


def test_the_installed_docs_give_alternating_conversations():
    docs = list(open_source("turns:doctest"))
    assert len(docs) > 100  # 217 with Python 3.11's stdlib and pydoc topics
    assert {d.domain for d in docs} == {"dialogue"} and {d.lang for d in docs} == {"py"}
    for d in docs:
        assert len(d.turns) >= 4
        assert all(t.startswith(">>>") for t in d.turns[0::2])
        assert not any(t.startswith(">>>") for t in d.turns[1::2])
    assert any(d.name.startswith("pydoc:") for d in docs) and any(d.name.endswith(".py:" + d.name.split(":")[-1])
                                                                  for d in docs)
    with pytest.raises(MoelabError, match="turns:faq"):
        open_source("turns:faq")


def test_corpus_records_turn_ids(tmp_path):
    c = build_corpus(tmp_path / "c", ["turns:doctest"], vocab_size=512, max_bytes_per_source=20_000,
                     heldout_fraction=0.1)
    assert c.info["has_turns"] is True
    start, n = int(c.doc_start[0]), int(c.doc_length[0])
    turns = np.asarray(c.turns[start:start + n])
    assert turns[0] == 0 and turns.max() >= 3 and (np.diff(turns) >= 0).all()
