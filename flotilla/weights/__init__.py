"""Weight updates as one subsystem (docs/weight_updates.md).

* ``check``: the one check of names, shapes and dtypes against the model built on the meta device, made by
  every transport before any rank is told;
* ``ledger``: the version ledger, the one owner of the weight version, its history and the replay list;
* ``transport``: the one transport interface (front-end side and rank side), with ``file`` (a safetensors
  path), ``staged`` (a launcher's object store), ``broadcast`` (a trainer's NCCL / gloo group) and ``ipc``
  (CUDA IPC handles) behind it;
* ``updater``: the front end's flow (check -> stage on every rank -> commit on every rank, or discard);
  ``groups``: weight-sync groups with a trainer; ``ports``: what it needs of the control plane and the fleet;
* ``rank``: the rank side, one stage -> agree -> commit path for every transport.
"""

from flotilla.weights.check import WeightChecker
from flotilla.weights.ledger import VersionLedger
from flotilla.weights.transport import RankContext, WeightTransport

__all__ = ["RankContext", "VersionLedger", "WeightChecker", "WeightTransport", "WeightUpdater"]


def __getattr__(name: str):  # the updater pulls in the front end's pieces: imported when asked for
    if name == "WeightUpdater":
        from flotilla.weights.updater import WeightUpdater

        return WeightUpdater
    raise AttributeError(name)
