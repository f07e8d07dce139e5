"""The front end: the one process that owns a request's life from the API call to its result.

Modules, one job each:

* ``engine``: ``Engine``, the request API (generate, stream, control calls) and the engine loop;
* ``ray_engine``: ``RayEngine``, the ``Engine`` whose rank workers are Ray actors on a placement group;
* ``inputs``: prompts, token ids, sampling parameters and request ids checked at the edge;
* ``request``: a request as the front end tracks it (``RequestState``, ``RequestFailed``);
* ``detokenizer``: incremental detokenization and stop strings (workers deal in token ids only);
* ``choices``: the n choices of one prompt, followed as one stream;
* ``control``: the control plane (pause/resume, memory release, the op round trip to the leaders);
* ``stats``: what ``Engine.stats()`` reports, as typed structs;
* ``private_dir``: the engine's private 0700 folder, and reaping those a killed front end left behind;
* ``timeouts``: the bound every control call puts on a time-out argument.

Routing and replica lifecycle are ``flotilla.router``'s, process start-up ``flotilla.launch``'s. Nothing is
imported here: ``flotilla.router`` and ``flotilla.weights`` import single modules (``request``, ``stats``,
``timeouts``), and a worker process never loads the engine.
"""
