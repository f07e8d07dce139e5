"""Tools around the engine, not part of it: benchmarks, the tiny-model builder and the chaos soak.

* ``bench``: ``flotilla bench``, offline throughput of a fixed workload (Flotilla or transformers);
* ``bench_serve``: ``flotilla bench-serve``, streaming load on an OpenAI-compatible server;
* ``tiny``: tiny random Hugging Face checkpoints built locally (``flotilla make-tiny-model``; the tests' models);
* ``soak``: ``flotilla soak``, mixed traffic under injected faults, checking nothing is lost or duplicated.

Fault injection itself is the worker's (``flotilla.worker.faults``).
"""
