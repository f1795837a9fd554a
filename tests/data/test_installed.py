import threading
import time

import pytest

from moelab.config import MoelabError
from moelab.data.installed import (LOCALE_ROOT, MAN_ROOT, MESSAGES_PER_DOC_BYTES, catalog_messages, ordered_map,
                                   render_man_page)
from moelab.data.sources import capped, open_source

needs_de_man = pytest.mark.skipif(not (MAN_ROOT / "de").is_dir(), reason="no German man pages installed")
needs_catalogs = pytest.mark.skipif(not (LOCALE_ROOT / "de" / "LC_MESSAGES").is_dir() or
                                    not (LOCALE_ROOT / "fr" / "LC_MESSAGES").is_dir(),
                                    reason="no German and French gettext catalogs installed")


def test_ordered_map_keeps_order_and_bounds_look_ahead():
    calls = []
    lock = threading.Lock()

    def square(x):
        with lock:
            calls.append(x)
        return x * x

    assert list(ordered_map(square, range(20), workers=2)) == [x * x for x in range(20)]
    calls.clear()
    gen = ordered_map(square, range(1000), workers=2)
    assert [next(gen) for _ in range(3)] == [0, 1, 4]
    gen.close()
    assert len(calls) <= 3 + 2 * 2  # what was read plus the look-ahead, not the 1000 items


@needs_de_man
def test_man_pages_render_to_plain_text():
    docs = list(capped(open_source("manpages:de"), max_docs=3))
    assert len(docs) == 3 and all(d.lang == "de" and d.domain == "prose" for d in docs)
    assert [d.name for d in docs] == sorted(d.name for d in docs)
    for d in docs:
        assert "\x08" not in d.text and "\x1b" not in d.text
        assert max(len(line) for line in d.text.splitlines()) <= 80
        assert len(d.text) > 200


@needs_de_man
def test_a_page_that_does_not_finish_in_time_is_left_out():
    page = sorted((MAN_ROOT / "de").glob("man1/*.gz"))[0]
    start = time.monotonic()
    assert render_man_page(page, timeout_s=0.001) == ""
    assert time.monotonic() - start < 5


def test_missing_man_language_names_the_package():
    with pytest.raises(MoelabError, match="install the Debian package manpages-xx"):
        open_source("manpages:xx")


@needs_catalogs
def test_gettext_documents_are_batches_of_long_messages():
    docs = list(open_source("gettext:de"))
    assert all(d.lang == "de" and d.domain == "prose" for d in docs)
    assert sum(d.num_bytes for d in docs) > 100_000
    by_catalog = {}
    for d in docs:
        by_catalog.setdefault(d.name.split("#")[0], []).append(d)
    for parts in by_catalog.values():
        # Every batch but a catalog's last reaches the target size.
        assert all(p.num_bytes >= MESSAGES_PER_DOC_BYTES for p in parts[:-1])
    # A catalog's documents hold exactly its messages, each 20+ characters, one after another.
    messages = catalog_messages(LOCALE_ROOT / "de" / "LC_MESSAGES" / "coreutils.mo")
    assert all(len(m) >= 20 for m in messages)
    assert "".join(d.text for d in by_catalog["coreutils.mo"]) == "".join(m + "\n" for m in messages)


@needs_catalogs
def test_catalogs_are_parallel_across_languages():
    # The same catalog in two languages holds translations of the same messages, in msgid order.
    name = "coreutils.mo"
    de = catalog_messages(LOCALE_ROOT / "de" / "LC_MESSAGES" / name)
    fr = catalog_messages(LOCALE_ROOT / "fr" / "LC_MESSAGES" / name)
    assert len(de) > 100 and len(fr) > 100 and set(de).isdisjoint(set(fr[:50]))


def test_unreadable_catalog_yields_nothing(tmp_path):
    bad = tmp_path / "bad.mo"
    bad.write_bytes(b"not a catalog")
    assert catalog_messages(bad) == []


def test_missing_gettext_language():
    with pytest.raises(MoelabError, match="no message catalogs for 'xx'"):
        open_source("gettext:xx")
