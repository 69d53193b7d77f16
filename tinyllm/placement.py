"""Where the weights live in memory: mapped from the file, in huge pages, or released.

Loading maps each safetensors file (WeightFile), so a float32 tensor is the file's bytes in place.
When a schedule is applied, the scheduler (tinyllm/schedule.py::apply) hands `place` the prepared
weights it is about to install, and `place`

- releases the resident pages of mapped tensors that the prepared weights no longer contain (a
  fused Q/K/V copy replaces Q, K and V; they stay mapped, and preparing them again reads them back);
- copies the streamed weights into one new block of 2 MiB pages (huge_page_copies), every site's at
  once, so an older block is freed as a whole (a swap copies every weight, and holds two copies for
  a moment; processes no longer share these pages through the page cache);
- releases the embedding's pages when no head reads the whole table: a step reads a row of it.

Each site's `copied` record (id(copy) -> the loaded array it copies) lets `tinyllm info` count a
moved weight as the loaded one (loaded_originals).
"""
from __future__ import annotations

import dataclasses
import mmap
from pathlib import Path

import numpy as np

from ops.registry import Weights, get_variant


def place(sites, changes: list[tuple]) -> list[tuple]:
    """Memory for the weights a schedule installs. `sites`: every weight site of the model;
    `changes`: (site, key, prepared) for each site whose preparation changes. Returns (site, key,
    value) for each site to install: the changes with their weights moved into huge pages, and the
    other sites whose weights moved with them; each returned site's `copied` record is updated."""
    for site, _, prepared in changes:
        # Raw tensors the prepared value no longer contains leave resident memory (they stay
        # mapped from the file, so preparing them again later reads them back); the rest leave it
        # as they are copied into huge pages.
        kept = {id(a) for a in _arrays(prepared)}
        for a in _arrays(site.raw):
            if id(a) not in kept:
                release_pages(a)
    placed = _into_huge_pages(sites, changes) if changes else []
    for site, _, _, copied in placed:
        site.copied = copied
    installed = {id(site): value for site, _, value, _ in placed}
    # The embedding is read a row per token, so of its pages (all read once by loading's NaN check)
    # only the rows looked up need to stay, unless a head reads the whole table every step (tied, float32).
    embedding = next(site.raw for site in sites if site.op == "embedding")
    if not any(id(embedding) in {id(a) for a in _arrays(installed.get(id(site), getattr(site.owner, site.attr)))}
               for site in sites if site.op != "embedding"):
        release_pages(embedding)
    return [(site, key, value) for site, key, value, _ in placed]


def loaded_originals(sites) -> dict[int, np.ndarray]:
    """id(copy) -> the loaded array it copies, for every weight `place` moved into huge pages."""
    return {copy: a for s in sites for copy, a in s.copied.items()}


def _into_huge_pages(sites, changes) -> list:
    """`changes` (site, key, prepared) with the weights moved into one new block of 2 MiB pages,
    and with every other site's weights moved there too, each as (site, key, value, copied).

    Decode streams every weight once per token, faster from 2 MiB pages than from 4 KiB ones (the
    file's mapping, small heap arrays): see huge_page_copies. What moves: the weights of the built-in
    variants (a plugin's prepare result is installed as it returns it), and of those only what can then leave memory: weights mapped from the file (their
    pages are released) and what prepare steps made. A loaded tensor that had to be converted
    (float16 widened to float32) stays where it is, since its site keeps it to prepare from.
    All sites move together, so an older block is never left partly used: it is freed once nothing
    holds it (a swap copies the weights again, and holds two copies for a moment). Not the embedding:
    a step reads one row of it, and the rest of its pages can leave resident memory (see place).
    The last element of each becomes the site's `copied` record: id(copy) -> the loaded array it copies."""
    changed = {id(site) for site, *_ in changes}
    moving = list(changes)
    moving += [(site, site.key, getattr(site.owner, site.attr)) for site in sites if id(site) not in changed]
    moving = [m for m in moving if m[0].op != "embedding" and _built_in(m[0].op, m[1])]

    loaded = {}  # id(site) -> its loaded arrays by id, an older copy of one standing for it
    for site, _, _ in moving:
        loaded[id(site)] = {id(a): a for a in _arrays(site.raw) + _arrays(site.unquantized)} | site.copied

    def movable(a, site) -> bool:  # what can then leave memory: made by a prepare step, mapped, or an older copy
        return id(a) not in loaded[id(site)] or is_mapped(a) or in_huge_pages(a)

    copies = huge_page_copies([a for site, _, value in moving for a in _arrays(value) if movable(a, site)])
    moved = {}
    for site, key, value in moving:
        of_site = loaded[id(site)]
        copied = {id(copies[id(a)]): of_site[id(a)] for a in _arrays(value) if id(a) in of_site and id(a) in copies}
        moved[id(site)] = (site, key, _with_arrays(value, copies), copied)
    return [moved.get(id(site), (site, key, prepared, {})) for site, key, prepared in changes] + \
        [change for i, change in moved.items() if i not in changed]


def _built_in(op: str, key: tuple) -> bool:
    """Whether the variants a site's key names (its own, and `linear` inside a composed composite)
    are tinyllm's own (registered by a module of the ops package)."""
    names = [(op, key[0])] + ([("linear", key[1])] if len(key) > 1 else [])
    return all(get_variant(o, n).source.split(".")[0] == "ops" for o, n in names)


def _arrays(value) -> list:
    """The NumPy arrays a weight value holds: an array, a Weights bundle's, a (prepared or stored)
    quantised matrix's fields."""
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, Weights) or dataclasses.is_dataclass(value):
        return [a for v in vars(value).values() for a in _arrays(v)]
    return []


def _with_arrays(value, copies: dict[int, np.ndarray]):
    """`value` (as _arrays reads it) with each of its arrays replaced by copies[id(array)]."""
    if isinstance(value, np.ndarray):
        return copies.get(id(value), value)
    if isinstance(value, Weights):
        return Weights(**{name: _with_arrays(v, copies) for name, v in vars(value).items()})
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _with_arrays(getattr(value, f.name), copies)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def release_pages(array: np.ndarray) -> bool:
    """Drop a memory-mapped weight's pages from this process's resident memory.

    Used when a schedule's prepare step has made its own copy (e.g. Q, K and V concatenated): the
    raw tensor is no longer read, so its pages need not count twice. They stay in the OS page cache
    and the array stays valid: reading it again (swapping back to `reference`) faults them back in.
    Whole pages inside the array only; returns False for an array that is not memory-mapped."""
    base = _mapping_of(array)
    if not isinstance(base, WeightFile) or not hasattr(base, "madvise"):
        return False  # only our own read-only file maps: any other mapping's pages may not come back
    start = array.ctypes.data - np.frombuffer(base, dtype=np.uint8, count=1).ctypes.data
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # round up: never drop a neighbour's page
    last = (start + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        base.madvise(mmap.MADV_DONTNEED, first, last - first)
    return True


def _mapping_of(array: np.ndarray):
    """The mmap object an array's memory belongs to (through views and memoryviews), or None."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return base


class WeightFile(mmap.mmap):
    """A safetensors file mapped read-only by read_safetensors (a type of its own, so that
    release_pages touches no other mapping)."""


class _HugePageBlock(mmap.mmap):
    """The anonymous memory huge_page_copies puts weights in."""


def is_mapped(array: np.ndarray) -> bool:
    """Whether `array` lies in a weights file mapped by read_safetensors (so its pages can be released)."""
    return isinstance(_mapping_of(array), WeightFile)


def in_huge_pages(array: np.ndarray) -> bool:
    """Whether `array` is one of huge_page_copies' copies (or a view of one)."""
    return isinstance(_mapping_of(array), _HugePageBlock)


HUGE_PAGE = 2 << 20  # x86-64's large page: one TLB entry covers 2 MiB instead of 4 KiB
_ALIGN = 64  # each array starts on a cache line


def _huge_pages_available() -> bool:
    """Linux with transparent huge pages not switched off ("[never]" in its sysfs setting)."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap, "MAP_PRIVATE"):
        return False
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return True  # no such file to read: let madvise decide


def huge_page_copies(arrays: list[np.ndarray]) -> dict[int, np.ndarray]:
    """Read-only copies of `arrays`, side by side in one block of anonymous memory that Linux backs
    with 2 MiB pages (madvise MADV_HUGEPAGE), keyed by id() of each original (each copied once).

    Decode streams every weight once per token. From 4 KiB pages (the file's mapping, or arrays
    under 4 MiB, which NumPy's allocator leaves in small pages) each 4 KiB of a stream needs its own
    page-table entry, and the table walks cost bandwidth: with two copies of the model alternating in
    one process, decode ran 3-4.5% faster (`fused`) and 6% faster (`int8`) from huge pages
    (benchmarks/RESULTS.md, Memory). Where there are no huge pages to have (not Linux, or THP
    switched off) it copies nothing and returns {}. The block stays alive while any copy does. The pages of an original mapped from
    a weights file are released as it is copied (reading it again faults them back in)."""
    if not arrays or not _huge_pages_available():
        return {}  # nothing to gain, so no copies
    unique = list({id(a): a for a in arrays}.values())
    sizes = [-(-a.nbytes // _ALIGN) * _ALIGN for a in unique]
    # Private anonymous memory (a shared mapping would be shmem, which keeps 4 KiB pages); the
    # pages arrive on first write.
    block = _HugePageBlock(-1, sum(sizes) + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    try:
        block.madvise(mmap.MADV_HUGEPAGE)  # before the first write, so the pages come huge
    except OSError:  # a kernel built without transparent huge pages
        block.close()
        return {}
    raw = np.frombuffer(block, dtype=np.uint8)
    offset = -raw.ctypes.data % HUGE_PAGE  # start on a 2 MiB boundary
    copies = {}
    for a, size in zip(unique, sizes):
        column_major = a.flags.f_contiguous and not a.flags.c_contiguous  # keep a transposed layout as it is
        shape = a.shape[::-1] if column_major else a.shape
        copy = raw[offset:offset + a.nbytes].view(a.dtype).reshape(shape)
        copy = copy.T if column_major else copy
        copy[...] = a
        copy.flags.writeable = False  # weights are never written (and Numba compiles read-only arrays apart)
        copies[id(a)] = copy
        release_pages(a)  # a mapped original leaves resident memory at once (a no-op for any other)
        offset += size
    return copies


def release_free_heap() -> None:
    """Hand the C heap's free memory back to the OS (glibc's malloc_trim; elsewhere nothing).

    Parsing tokenizer.json leaves freed heap that glibc keeps mapped for reuse, so it would stay in the
    process's resident memory for good (benchmarks/RESULTS.md, Memory)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
