"""The memory allocator under CPU training. glibc's malloc takes each allocation over 32 MiB (one activation of 64
crops at 256x128 is 67 MiB) from the kernel with mmap and gives it back with munmap when freed, so every step
page-faults its activations in again: 184,000 page faults a second and a third of the CPU time in the kernel,
measured on a 2-core AMD EPYC. jemalloc keeps freed memory for the next step; preloaded, it made an epoch of the
strong recipe at 256x128 1.7x faster there, and the templates of an adaptation round 2.5x (docs/TRAINING.md, "The
memory allocator")."""

from __future__ import annotations

from pathlib import Path

ALLOCATORS = ("jemalloc", "tcmalloc")  # either keeps freed pages for reuse
PRELOAD = (
    "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 "
    "MALLOC_CONF=background_thread:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"
)


def allocator_advice(maps: str | None = None, on_gpu: bool = False) -> str | None:
    """A sentence for a CPU run under glibc's malloc (read from ``maps``, /proc/self/maps by default); None where
    jemalloc or tcmalloc is loaded, on a GPU, or off Linux."""
    if on_gpu:
        return None
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:  # not Linux: nothing to say
            return None
    if any(name in maps for name in ALLOCATORS):
        return None
    return (
        "training on the CPU with glibc's malloc, which page-faults every step's activations in again: preloading "
        "jemalloc made a training epoch 1.7x faster on a 2-core EPYC (Debian/Ubuntu: apt install libjemalloc2, then "
        f'run with {PRELOAD}; docs/TRAINING.md, "The memory allocator")'
    )
