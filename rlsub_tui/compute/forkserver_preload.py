"""What the forkserver imports once, before it forks the analysis' processes (processes.PRELOAD): torch and
the engine, then every object so far frozen out of the garbage collector's reach.

A forked child shares its parent's memory until it writes to it, and a collection writes to the header of every
object it walks: without the freeze, a child's first collections copied the pages of every object torch's import
made (a worker's first, smallest tensor took 0.16 s instead of 0.03 s; BENCHMARKS.md). Imported anywhere else,
this module would freeze that process's objects too: only the forkserver names it.
"""

import gc
import importlib

for module in ("rlsub_tui.compute.engine", "rlsub_tui.compute.timeline", "rlsub_tui.compute.matrix_detail"):  # what the children run
    importlib.import_module(module)
gc.collect()
gc.freeze()
